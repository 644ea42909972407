"""The command line: building a fleet from options, and a real run in a subprocess."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys

import pytest

from devstack.processes import ROOT, wait_until_async
from ocpp_gateway.simulator import read_journal
from ocpp_gateway.simulator.cli import build_parser, build_specs
from ocpp_gateway.simulator.spec import assign_firmware, parse_ids, parse_ids_with_seconds
from tests.simulator.csms import CentralSystem, run


def specs_for(*argv: str):
    return build_specs(build_parser().parse_args(["--url", "ws://a/ocpp", *argv]))


def test_it_parses_ids_and_ranges():
    assert parse_ids("1,5,10-12", 20) == {1, 5, 10, 11, 12}
    assert parse_ids("all", 3) == {1, 2, 3}
    assert parse_ids_with_seconds("2-3:45", 5) == ({2, 3}, 45.0)
    assert parse_ids_with_seconds("all", 2) == ({1, 2}, None)
    with pytest.raises(ValueError):
        parse_ids("3-1", 5)


def test_it_spreads_a_firmware_mix_evenly_and_deterministically():
    versions = assign_firmware([("4.2.85", 90), ("4.2.9", 10)], 100)
    assert versions.count("4.2.9") == 10
    assert versions[:10].count("4.2.9") == 1
    assert versions == assign_firmware([("4.2.85", 90), ("4.2.9", 10)], 100)


def test_it_builds_the_fleet_from_options():
    specs = specs_for(
        "--count", "12", "--prefix", "CP-", "--firmware-mix", "4.2.85:3,3.5.9:1",
        "--url2", "ws://b/ocpp", "--connectors", "2", "--profile-timeout", "7",
        "--reject-reset", "1,3", "--charging", "2-3:60", "--charging", "4",
        "--drop-offline", "5:2.5", "--target-unreachable", "all",
    )  # fmt: skip
    assert [s.identity for s in specs][:2] == ["CP-0001", "CP-0002"]
    assert specs[-1].identity == "CP-0012"
    assert [s.firmware for s in specs].count("3.5.9") == 3
    assert all(s.url == "ws://a/ocpp" and s.url2 == "ws://b/ocpp" for s in specs)
    assert specs[0].connectors == 2 and specs[0].profile_timeout == 7
    assert [s.behaviour.reject_reset for s in specs[:4]] == [True, False, True, False]
    assert specs[1].behaviour.charging and specs[1].behaviour.charging_seconds == 60
    assert specs[3].behaviour.charging and specs[3].behaviour.charging_seconds is None
    assert specs[4].behaviour.drop_offline and specs[4].behaviour.drop_offline_after == 2.5
    assert all(s.behaviour.target_unreachable for s in specs)


def test_it_refuses_indexes_beyond_the_fleet():
    with pytest.raises(ValueError, match="--reject-reset"):
        specs_for("--count", "3", "--reject-reset", "4")


def test_it_merges_a_spec_file(tmp_path):
    spec_file = tmp_path / "fleet.json"
    entries = [
        {"identity": "SIM-0002", "firmware": "4.2.9", "behaviour": {"reject_reset": True}},
        {"identity": "DEMO-A", "url2": "ws://b/ocpp", "behaviour": {"charging": 30}},
    ]
    spec_file.write_text(json.dumps(entries))
    specs = {s.identity: s for s in specs_for("--count", "2", "--spec", str(spec_file))}
    assert set(specs) == {"SIM-0001", "SIM-0002", "DEMO-A"}
    assert specs["SIM-0002"].firmware == "4.2.9"
    assert specs["SIM-0002"].behaviour.reject_reset
    assert specs["SIM-0002"].serial_number == "SN-SIM-0002"
    assert specs["DEMO-A"].url == "ws://a/ocpp" and specs["DEMO-A"].url2 == "ws://b/ocpp"
    assert specs["DEMO-A"].behaviour.charging_seconds == 30
    assert specs["DEMO-A"].serial_number == "SN-DEMO-A"

    spec_file.write_text(json.dumps([{"identity": "X", "colour": "red"}]))
    with pytest.raises(ValueError, match="colour"):
        specs_for("--spec", str(spec_file))
    spec_file.write_text(json.dumps([{"identity": "X", "behaviour": {"reject_reset": "yes"}}]))
    with pytest.raises(ValueError, match="reject_reset"):
        specs_for("--spec", str(spec_file))


def test_it_never_imports_django():
    code = (
        "import sys, ocpp_gateway.simulator, ocpp_gateway.simulator.cli;"
        "sys.exit(any(m.split('.')[0] == 'django' for m in sys.modules))"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


def test_it_runs_a_fleet_from_the_command_line_and_stops_on_sigterm(tmp_path):
    journal = tmp_path / "journal.jsonl"
    log = tmp_path / "simulator.log"
    identities = {f"SIM-{i:04d}" for i in range(1, 6)}

    async def scenario(out):
        async with CentralSystem() as csms:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "ocpp_gateway.simulator",
                "--url", csms.url, "--count", "5", "--duration", "120",
                "--connect-rate", "50", "--journal", str(journal),
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip

            def booted():
                # StatusNotification follows an accepted boot, so the journal has it by then.
                return {m.identity for m in csms.messages if m.action == "StatusNotification"}

            try:
                await wait_until_async(lambda: booted() == identities, 20, "5 stations booted")
                proc.send_signal(signal.SIGTERM)
                assert await asyncio.wait_for(proc.wait(), 15) == 0
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            # Closed cleanly (1001 going away), not dropped.
            await wait_until_async(
                lambda: len(csms.seen_all("disconnect")) == 5, 10, "5 disconnects"
            )
            assert {m["code"] for m in csms.seen_all("disconnect")} == {1001}

    with open(log, "wb") as out:
        run(scenario(out), timeout=60)
    lines = read_journal(journal)
    assert {line["station"] for line in lines if line["event"] == "boot_accepted"} == identities
    assert all({"t", "station", "event"} <= set(line) for line in lines)


def test_it_exits_after_the_duration(tmp_path):
    async def scenario():
        async with CentralSystem() as csms:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "ocpp_gateway.simulator", "--url", csms.url,
                "--count", "2", "--duration", "1", "--log-level", "WARNING",
                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            )  # fmt: skip
            output, _ = await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode == 0, output.decode()
            assert len([m for m in csms.messages if m.action == "connect"]) == 2

    run(scenario(), timeout=60)


def test_it_explains_itself():
    result = subprocess.run(
        [sys.executable, "-m", "ocpp_gateway.simulator", "--help"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    for option in ("--url", "--firmware-mix", "--target-unreachable", "--spec", "--journal"):
        assert option in result.stdout
