"""python -m ocpp_gateway --csms NAME --host HOST --port PORT (Redis from REDIS_URL)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from ocpp.v16 import call

from ocpp_gateway.envelopes import RELAYED_ACTIONS
from ocpp_gateway.server import GatewayConfig, load_passwords, run_gateway


def parse_args(argv: list[str] | None = None) -> GatewayConfig:
    parser = argparse.ArgumentParser(
        prog="python -m ocpp_gateway",
        description="Serve OCPP 1.6J stations for one CSMS and relay commands from Redis "
        "(REDIS_URL, default redis://127.0.0.1:6379/0).",
    )
    parser.add_argument(
        "--csms", required=True, help="name of the CSMS this gateway serves (as in add_csms)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    parser.add_argument("--port", type=int, default=9000, help="port (default %(default)s)")
    parser.add_argument(
        "--heartbeat-interval",
        type=int,
        default=300,
        help="interval sent in BootNotification.conf, seconds (default %(default)s)",
    )
    parser.add_argument(
        "--max-frame-bytes",
        type=int,
        default=256 * 1024,
        help="largest websocket frame accepted (default %(default)s)",
    )
    parser.add_argument(
        "--ping-interval",
        type=float,
        default=60.0,
        help="seconds between websocket pings that detect dead connections (default %(default)s)",
    )
    parser.add_argument(
        "--auth-file",
        type=Path,
        help="identity:password lines; when given, every station must authenticate (HTTP Basic)",
    )
    parser.add_argument(
        "--open",
        action="store_true",
        help="admit any station identity (a lab CSMS); by default only the stations "
        "registered on the CSMS (the registry the Django side publishes in Redis)",
    )
    parser.add_argument(
        "--registry-refresh",
        type=float,
        default=2.0,
        help="seconds between checks for a new registry version (default %(default)s)",
    )
    parser.add_argument(
        "--rejected-hold",
        type=float,
        default=60.0,
        help="after a Rejected BootNotification, refuse that station's connections this many "
        "seconds, so it falls back to its other network profile (default %(default)s)",
    )
    parser.add_argument(
        "--allow-action",
        action="append",
        default=[],
        metavar="ACTION",
        help="also relay this OCPP action (repeatable; also OCPP_GATEWAY_ALLOWED_ACTIONS, "
        f"comma separated); always relayed: {', '.join(RELAYED_ACTIONS)}",
    )
    parser.add_argument("--certfile", help="TLS certificate (PEM) to serve wss://")
    parser.add_argument("--keyfile", help="TLS private key (PEM)")
    parser.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "INFO"))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # The ocpp library logs every frame at INFO: far too much for thousands of stations.
    logging.getLogger("ocpp").setLevel(logging.WARNING)
    if args.keyfile and not args.certfile:
        parser.error("--keyfile needs --certfile")
    try:
        passwords = load_passwords(args.auth_file) if args.auth_file else None
    except (OSError, ValueError) as exc:
        parser.error(f"--auth-file: {exc}")
    if args.registry_refresh <= 0 or args.rejected_hold < 0:
        parser.error("--registry-refresh must be > 0 and --rejected-hold >= 0")
    extra = [*args.allow_action, *os.environ.get("OCPP_GATEWAY_ALLOWED_ACTIONS", "").split(",")]
    allowed = set(RELAYED_ACTIONS)
    for action in filter(None, (name.strip() for name in extra)):
        if not isinstance(getattr(call, action, None), type):
            parser.error(f"--allow-action: {action!r} is not an OCPP 1.6 action")
        allowed.add(action)
    return GatewayConfig(
        csms=args.csms,
        host=args.host,
        port=args.port,
        redis_url=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        heartbeat_interval=args.heartbeat_interval,
        max_frame_bytes=args.max_frame_bytes,
        ping_interval=args.ping_interval,
        passwords=passwords,
        certfile=args.certfile,
        keyfile=args.keyfile,
        open_admission=args.open,
        registry_refresh=args.registry_refresh,
        rejected_hold=args.rejected_hold,
        allowed_actions=frozenset(allowed),
    )


async def _main(config: GatewayConfig) -> None:
    import ocpp.messages

    # Validating in a thread pool costs more than the validation itself (see DESIGN.md).
    ocpp.messages.ASYNC_VALIDATION = False
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await run_gateway(config, stop)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        import uvloop

        uvloop.run(_main(config))
    except ImportError:
        asyncio.run(_main(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
