"""`python -m ocpp_gateway.simulator`: a fleet of simulated OCPP 1.6J stations."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

import ocpp.messages

from ocpp_gateway.simulator.config import DEFAULT_PRIORITY
from ocpp_gateway.simulator.fleet import Fleet
from ocpp_gateway.simulator.spec import (
    Behaviour,
    StationSpec,
    Timing,
    apply_overrides,
    assign_firmware,
    identity_for,
    load_spec_file,
    parse_firmware_mix,
    parse_ids,
    parse_ids_with_seconds,
    read_roots,
)

log = logging.getLogger("ocpp_gateway.simulator")

_EPILOG = """\
IDS is a comma list of 1-based station indexes and ranges ("1,5,10-12") or "all"; index 7
is the station PREFIX0007. Behaviour options may be repeated.

--spec FILE is a JSON list of entries such as
  {"identity": "SIM-0003", "firmware": "4.2.9", "behaviour": {"reject_reset": true}}
  {"identity": "DEMO-A", "url2": "ws://b/ocpp", "behaviour": {"charging": 60}}
An entry naming a station of the generated fleet changes only the fields it gives; other
entries add stations built from the command-line defaults. Entry fields: identity, url,
url2, priority, firmware, vendor, model, serial_number, connectors, profile_timeout,
password, root_certificates (a list of PEM texts or PEM file paths),
additional_root_certificate_check (true/false), behaviour. Behaviours: reject_url_writes,
reject_reset, accept_priority_without_reboot, target_unreachable, charging (true or
seconds), drop_offline (true or seconds), fall_back_after (seconds), boot_loop (seconds),
reconnect_without_boot, no_security_extension, lose_install_certificate_answer.
serial_number defaults to SN-<identity> (sent as chargePointSerialNumber and
chargeBoxSerialNumber); an impostor is an entry run in another simulator with the same
identity and another serial_number.

Root certificates (OCPP 1.6 security extension): --root-certificate FILE installs the PEM
certificate(s) in FILE as CentralSystemRootCertificate on every station. A station answers
GetInstalledCertificateIds with their hash data (SHA256 issuerNameHash, issuerKeyHash,
serialNumber; NotFound when none), and InstallCertificate with Accepted (the root is kept
until the process ends) or Rejected (not a PEM certificate; or, with
AdditionalRootCertificateCheck true, a root no installed root signed). With
AdditionalRootCertificateCheck true a station keeps one root, as the OCPP 1.6 security
whitepaper says: the new root replaces the installed one, which stays a fallback (trusted
for TLS, no longer listed) until a wss:// connection succeeds using the new root, then is
removed (journal: "root_certificate_replaced", "root_fallback_used",
"root_fallback_removed"). A wss:// profile is
verified against the installed roots only (none installed: the system's trust store), so a
missing CSMS root is a failed connection, as on real firmware.
--additional-root-check IDS: AdditionalRootCertificateCheck is true on those stations.
--no-security-extension IDS: firmware without the extension: both messages answer
CALLERROR NotImplemented and AdditionalRootCertificateCheck is an unknown key.
--lose-install-certificate-answer IDS: the first InstallCertificate is applied but its
answer is never sent (journal: "answer_lost"), as when it is lost on the way: the CSMS
sees a timeout.
The journal records the installed roots' hash data at power-on ("powered_on":
root_certificates) and after each InstallCertificate ("certificate_installed" or
"certificate_rejected", with the reason).

--accept-priority-without-reboot answers Accepted instead of RebootRequired, but the new
priority still takes effect at the next boot, like the other network settings.
--drop-offline's seconds count from the station's first accepted BootNotification.
--fall-back-after's from each accepted BootNotification on a URL the station was not
installed with (a migration target): the connection drops and that URL stays unreachable,
so after NetworkProfileConnectionTimeoutSec the station is back on its previous profile.
--boot-loop's from each accepted BootNotification: the station reboots by itself.
--reconnect-without-boot: after a drop that was not a Reset the station reconnects without
a BootNotification, as real firmware does (it boots only at power-on or after a reset).

Each journal line is a JSON object {"t": epoch, "station": id, "event": name, ...}.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ocpp_gateway.simulator",
        description="Run simulated OCPP 1.6J charging stations that behave like the vendor "
        "firmware during a CSMS migration (network profiles, RebootRequired, Reset, "
        "reconnect by priority, fallback after NetworkProfileConnectionTimeoutSec).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    net = parser.add_argument_group("network profiles (each station appends /<identity>)")
    net.add_argument("--url", required=True, help="initial NetworkConnectionProfile1")
    net.add_argument(
        "--url2", default="", help="initial NetworkConnectionProfile2 (default: empty)"
    )
    net.add_argument(
        "--priority",
        default=DEFAULT_PRIORITY,
        help="initial NetworkConfigurationPriority (default: %(default)s)",
    )
    net.add_argument(
        "--profile-timeout",
        type=int,
        default=30,
        metavar="SECONDS",
        help="initial NetworkProfileConnectionTimeoutSec (default: %(default)s)",
    )
    net.add_argument("--password", help="HTTP Basic auth password (username: the identity)")

    fleet = parser.add_argument_group("fleet")
    fleet.add_argument(
        "--count", type=int, metavar="N", help="number of stations (default: 1, or 0 with --spec)"
    )
    fleet.add_argument("--prefix", default="SIM-", help="identity prefix (default: %(default)s)")
    firmware = fleet.add_mutually_exclusive_group()
    firmware.add_argument(
        "--firmware",
        default="4.2.85",
        metavar="VERSION",
        help="firmware version of every station (default: %(default)s)",
    )
    firmware.add_argument(
        "--firmware-mix",
        metavar="V:W,...",
        help='weighted versions, assigned by index, e.g. "4.2.85:90,4.2.9:10"',
    )
    fleet.add_argument("--vendor", default="SimVendor", help="default: %(default)s")
    fleet.add_argument("--model", default="SimCharger", help="default: %(default)s")
    fleet.add_argument(
        "--connectors",
        type=int,
        default=1,
        metavar="N",
        help="connectors per station (default: %(default)s)",
    )
    fleet.add_argument("--spec", metavar="FILE", help="JSON list of per-station overrides")
    fleet.add_argument(
        "--root-certificate",
        action="append",
        metavar="FILE",
        help="PEM CentralSystemRootCertificate(s) installed on every station (repeatable)",
    )

    timing = parser.add_argument_group("timing")
    timing.add_argument(
        "--reboot-delay",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="time from Reset to reconnecting (default: %(default)s)",
    )
    timing.add_argument(
        "--connect-rate",
        type=float,
        default=200.0,
        metavar="PER_SECOND",
        help="stations started per second (default: %(default)s; 0: all at once)",
    )
    timing.add_argument(
        "--response-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="wait for a CSMS answer (default: %(default)s)",
    )
    timing.add_argument(
        "--duration",
        type=float,
        metavar="SECONDS",
        help="exit after this long (default: run until SIGINT/SIGTERM)",
    )

    behaviours = parser.add_argument_group("behaviours for a subset of stations")
    for flag, helptext in (
        ("--reject-url-writes", "ChangeConfiguration of a profile URL is Rejected"),
        ("--reject-reset", "Reset is Rejected"),
        ("--accept-priority-without-reboot", "priority change answers Accepted"),
        ("--target-unreachable", "only the initial profile URLs can be reached"),
        ("--no-security-extension", "no GetInstalledCertificateIds/InstallCertificate"),
        ("--additional-root-check", "AdditionalRootCertificateCheck is true"),
        (
            "--lose-install-certificate-answer",
            "the first InstallCertificate's answer is never sent",
        ),
    ):
        behaviours.add_argument(flag, action="append", metavar="IDS", help=helptext)
    behaviours.add_argument(
        "--charging",
        action="append",
        metavar="IDS[:SECONDS]",
        help="a session in progress from boot, ending after SECONDS",
    )
    behaviours.add_argument(
        "--drop-offline",
        action="append",
        metavar="IDS[:SECONDS]",
        help="disconnect after SECONDS and never come back",
    )
    behaviours.add_argument(
        "--fall-back-after",
        action="append",
        metavar="IDS:SECONDS",
        help="lose a URL it was not installed with SECONDS after booting there",
    )
    behaviours.add_argument(
        "--boot-loop",
        action="append",
        metavar="IDS:SECONDS",
        help="reboot by itself SECONDS after each accepted boot",
    )
    behaviours.add_argument(
        "--reconnect-without-boot",
        action="append",
        metavar="IDS",
        help="after a connection drop (not a Reset) reconnect without a BootNotification",
    )

    out = parser.add_argument_group("output")
    out.add_argument("--journal", metavar="FILE", help="append JSON lines of station events")
    out.add_argument(
        "--history",
        type=int,
        default=128,
        metavar="N",
        help="events kept in memory per station (default: %(default)s)",
    )
    out.add_argument(
        "--status-every",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="log a state summary this often (default: %(default)s; 0: never)",
    )
    out.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="default: %(default)s",
    )
    return parser


def build_specs(args: argparse.Namespace) -> list[StationSpec]:
    """The fleet the command line describes; raises ValueError on a bad option value."""
    count = args.count if args.count is not None else (0 if args.spec else 1)
    if count < 0:
        raise ValueError("--count must be >= 0")
    if args.firmware_mix:
        versions = assign_firmware(parse_firmware_mix(args.firmware_mix), count)
    else:
        versions = [args.firmware] * count
    behaviours = _behaviour_fields(args, count)

    template = StationSpec(
        identity=f"{args.prefix}template",
        url=args.url,
        url2=args.url2,
        priority=args.priority,
        firmware=versions[0] if versions else args.firmware or "4.2.85",
        vendor=args.vendor,
        model=args.model,
        connectors=args.connectors,
        profile_timeout=args.profile_timeout,
        password=args.password,
        root_certificates=read_roots(args.root_certificate or []),
    )
    specs = [
        dataclasses.replace(
            template,
            identity=identity_for(args.prefix, index, count),
            serial_number="",
            firmware=versions[index - 1],
            additional_root_certificate_check=behaviours[index - 1].pop(
                "additional_root_check", False
            ),
            behaviour=Behaviour(**behaviours[index - 1]),
        )
        for index in range(1, count + 1)
    ]
    if args.spec:
        specs = apply_overrides(specs, load_spec_file(args.spec), template=template)
    return specs


_FLAG_BEHAVIOURS = (
    "reject_url_writes",
    "reject_reset",
    "accept_priority_without_reboot",
    "target_unreachable",
    "reconnect_without_boot",
    "no_security_extension",
    "lose_install_certificate_answer",
    # A key of the station's configuration, not a behaviour: build_specs takes it out.
    "additional_root_check",
)
# Options whose IDS must say how many seconds: IDS:SECONDS.
_SECONDS_BEHAVIOURS = ("fall_back_after", "boot_loop")


def _behaviour_fields(args: argparse.Namespace, count: int) -> list[dict[str, Any]]:
    """Behaviour fields per station (index 1 first) from the IDS options."""
    fields: list[dict[str, Any]] = [{} for _ in range(count)]

    def mark(name: str, text: str, indexes: frozenset[int], values: dict[str, Any]) -> None:
        beyond = sorted(i for i in indexes if i > count)
        if beyond:
            option = "--" + name.replace("_", "-")
            raise ValueError(f"{option} {text}: index {beyond[0]} > --count {count}")
        for index in indexes:
            fields[index - 1].update(values)

    for name in _FLAG_BEHAVIOURS:
        for text in getattr(args, name) or ():
            mark(name, text, parse_ids(text, count), {name: True})
    for text in args.charging or ():
        indexes, seconds = parse_ids_with_seconds(text, count)
        mark("charging", text, indexes, {"charging": True, "charging_seconds": seconds})
    for text in args.drop_offline or ():
        indexes, seconds = parse_ids_with_seconds(text, count)
        values = {"drop_offline": True, "drop_offline_after": seconds or 0.0}
        mark("drop_offline", text, indexes, values)
    for name in _SECONDS_BEHAVIOURS:
        for text in getattr(args, name) or ():
            indexes, seconds = parse_ids_with_seconds(text, count)
            if seconds is None:
                raise ValueError(f"--{name.replace('_', '-')} {text}: give IDS:SECONDS")
            mark(name, text, indexes, {name: seconds})
    return fields


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # The ocpp library logs every frame at INFO; thousands of stations would drown the log.
    logging.getLogger("ocpp").setLevel(max(logging.WARNING, logging.getLevelName(args.log_level)))
    try:
        specs = build_specs(args)
    except (ValueError, OSError) as error:
        parser.error(str(error))
    if not specs:
        parser.error("no stations: give --count or --spec")

    # Validating in a thread pool costs more than the validation itself.
    ocpp.messages.ASYNC_VALIDATION = False
    _raise_open_file_limit(len(specs))
    timing = Timing(reboot_delay=args.reboot_delay, response_timeout=args.response_timeout)
    fleet = Fleet(
        specs,
        timing=timing,
        journal=args.journal,
        connect_rate=args.connect_rate,
        history_size=args.history,
    )
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(_serve(fleet, duration=args.duration, status_every=args.status_every))
    return 0


async def _serve(fleet: Fleet, *, duration: float | None, status_every: float) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # not on Windows
            loop.add_signal_handler(sig, fleet.request_stop)
    log.info("starting %d stations", len(fleet))
    reporter = loop.create_task(_report(fleet, status_every)) if status_every > 0 else None
    try:
        await fleet.run(duration)
    finally:
        if reporter is not None:
            reporter.cancel()
        log.info("stopped: %s", dict(fleet.summary()))


async def _report(fleet: Fleet, every: float) -> None:
    while True:
        await asyncio.sleep(every)
        log.info("stations: %s", dict(fleet.summary()))


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _raise_open_file_limit(stations: int) -> None:
    """One socket per station: lift the soft limit towards the hard one when needed."""
    try:
        import resource
    except ImportError:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = stations + 256
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < wanted:
            log.warning("open file limit %d is below %d stations", new, stations)


if __name__ == "__main__":
    sys.exit(main())
