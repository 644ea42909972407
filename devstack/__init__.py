"""The processes of a development stack (redis-server, gateway, worker, simulator), started
and stopped the same way by the demo, the tests and the benchmarks: see devstack.processes."""
