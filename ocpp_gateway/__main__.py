"""python -m ocpp_gateway --csms NAME --host HOST --port PORT [--upstream URL] (Redis from
REDIS_URL)."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import signal
import sys
from pathlib import Path
from urllib.parse import urlsplit

from ocpp.v16 import call

from ocpp_gateway.envelopes import RELAYED_ACTIONS
from ocpp_gateway.server import GatewayConfig, load_passwords, run_gateway
from ocpp_gateway.upstream import UpstreamConfig, url_without_credentials


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
    proxy = parser.add_argument_group(
        "proxy mode",
        "with --upstream, each station that connects is relayed to its own OCPP-J connection "
        "to UPSTREAM/<identity>; without it the gateway is the CSMS itself (endpoint mode)",
    )
    proxy.add_argument("--upstream", metavar="URL", help="ws:// or wss:// URL of the upstream CSMS")
    proxy.add_argument(
        "--upstream-auth-file",
        type=Path,
        metavar="FILE",
        help="identity:password lines: HTTP Basic credentials for the upstream per station; "
        "a station not in it has its own Authorization header passed on unchanged",
    )
    proxy.add_argument(
        "--upstream-ca",
        metavar="FILE.pem",
        help="trust this CA for a wss:// upstream (default: the system's trust store)",
    )
    proxy.add_argument(
        "--upstream-connect-timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="upstream not reached in time: the station's handshake is refused with HTTP 502 "
        "(default %(default)s)",
    )
    proxy.add_argument(
        "--upstream-call-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="deadline of an upstream CALL to the station, waiting behind an injected command "
        "included; past it the upstream gets a CALLERROR (default %(default)s)",
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
    # websockets logs every handshake's headers at DEBUG: the stations' Authorization (their
    # passwords, merely base64) and the upstream credentials would land in the log. Its
    # DEBUG lines are frame dumps otherwise, so they are not worth a redacting filter.
    root_level = logging.getLogger().getEffectiveLevel()
    logging.getLogger("websockets").setLevel(max(logging.INFO, root_level))
    if args.keyfile and not args.certfile:
        parser.error("--keyfile needs --certfile")
    try:
        passwords = load_passwords(args.auth_file) if args.auth_file else None
    except (OSError, ValueError) as exc:
        parser.error(f"--auth-file: {exc}")
    if args.registry_refresh <= 0 or args.rejected_hold < 0:
        parser.error("--registry-refresh must be > 0 and --rejected-hold >= 0")
    upstream = _upstream_config(parser, args)
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
        upstream=upstream,
    )


def _upstream_config(
    parser: argparse.ArgumentParser, args: argparse.Namespace
) -> UpstreamConfig | None:
    if not args.upstream:
        if args.upstream_auth_file or args.upstream_ca:
            parser.error("--upstream-auth-file and --upstream-ca need --upstream")
        return None
    shown = url_without_credentials(args.upstream)
    try:
        parts = urlsplit(args.upstream)
        port = parts.port  # raises on a port that is not a number from 0 to 65535
    except ValueError as exc:
        parser.error(f"--upstream: {shown!r} cannot be parsed ({exc})")
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        parser.error(f"--upstream: {shown!r} is not a ws:// or wss:// URL")
    if port == 0:
        parser.error(f"--upstream: {shown!r} has port 0")
    port = port or (443 if parts.scheme == "wss" else 80)
    if port == args.port and _same_host(parts.hostname, args.host):
        # Each station's link would come back in as a new station, which opens a new link...
        parser.error(f"--upstream: {shown!r} is this gateway itself (--host, --port)")
    if "@" in parts.netloc:
        # One user:password would go to the upstream for every station; OCPP's Basic auth
        # is per station (user = identity), as is the inventory's record of the upstream.
        parser.error(
            f"--upstream: {shown!r} has credentials (user:password@), which would be sent "
            "for every station: pass the stations' own Authorization on, or put per-station "
            "credentials in --upstream-auth-file"
        )
    if any(char.isspace() or not char.isprintable() for char in args.upstream):
        parser.error(f"--upstream: {shown!r} contains whitespace or a control character")
    if parts.query or parts.fragment or args.upstream.endswith(("?", "#")):
        # The station's identity is appended to the path: after a query it would be lost.
        parser.error(f"--upstream: {shown!r} has a query or fragment; give a plain path")
    if args.upstream_ca and parts.scheme != "wss":
        parser.error("--upstream-ca needs a wss:// upstream")
    if args.upstream_connect_timeout <= 0 or args.upstream_call_timeout <= 0:
        parser.error("--upstream-connect-timeout and --upstream-call-timeout must be > 0")
    try:
        credentials = load_passwords(args.upstream_auth_file) if args.upstream_auth_file else None
    except (OSError, ValueError) as exc:
        parser.error(f"--upstream-auth-file: {exc}")
    if args.upstream_ca and not Path(args.upstream_ca).is_file():
        parser.error(f"--upstream-ca: {args.upstream_ca} is not a file")
    return UpstreamConfig(
        url=args.upstream,
        credentials=credentials,
        ca_file=args.upstream_ca,
        connect_timeout=args.upstream_connect_timeout,
        call_timeout=args.upstream_call_timeout,
    )


def _same_host(upstream_host: str, bind_host: str) -> bool:
    """Whether connecting to upstream_host reaches a gateway bound to bind_host.

    Only what is known without DNS: the very name or address, or a loopback one when the
    gateway listens on loopback or on every address (its other names are not looked up).
    """
    upstream_host, bind_host = upstream_host.lower().rstrip("."), bind_host.lower().strip("[]")
    if upstream_host == bind_host:
        return True
    return _local(bind_host) and _local(upstream_host)


def _local(host: str) -> bool:
    """A loopback name or address, or the unspecified one (which connects to this host)."""
    if host in ("", "localhost") or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


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
