"""One simulated station: power on, connect by priority with fallback, boot, heartbeat, reboot.

Everything here runs on one event loop with no thread and no timer of its own beyond a
couple of tasks per connected station, so thousands of stations fit in one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import ssl
import time
from collections import deque
from collections.abc import Coroutine, Iterable
from functools import lru_cache
from typing import Any
from urllib.parse import urlsplit

from ocpp.v16 import call
from ocpp.v16.datatypes import MeterValue, SampledValue
from ocpp.v16.enums import (
    AuthorizationStatus,
    ChargePointErrorCode,
    ChargePointStatus,
    Measurand,
    MessageTrigger,
    Reason,
    RegistrationStatus,
    ResetStatus,
    ResetType,
    UnitOfMeasure,
)
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from ocpp_gateway.certificates import (
    CertificateError,
    CertificateHashData,
    certificate_pem,
    hash_data,
    is_self_issued,
    is_signed_by,
    load_certificate,
)
from ocpp_gateway.simulator.charging import Transaction, ocpp_timestamp
from ocpp_gateway.simulator.config import (
    ADDITIONAL_ROOT_CHECK,
    HEARTBEAT_INTERVAL,
    NUMBER_OF_CONNECTORS,
    PRIORITY,
    PROFILE_1,
    PROFILE_2,
    PROFILE_TIMEOUT,
    StationConfig,
    key_table,
)
from ocpp_gateway.simulator.firmware import has_network_keys
from ocpp_gateway.simulator.journal import Event, Journal
from ocpp_gateway.simulator.network import (
    CONNECT_ERRORS,
    ConnectError,
    Profile,
    boot_profiles,
    open_connection,
)
from ocpp_gateway.simulator.protocol import StationLink
from ocpp_gateway.simulator.spec import StationSpec, Timing

log = logging.getLogger(__name__)

_DEFAULT_TIMING = Timing()
# How long a closed connection waits for the station's own CALL to take an answer that was
# read before the close: a few loop turns, so this only bounds a CALL left unanswered.
ANSWER_GRACE = 0.2
# Errors a background follow-up (status, trigger, transaction message) may meet when the
# connection goes away under it; the next boot resends what matters.
_LINK_ERRORS = (ConnectionClosed, TimeoutError)


@lru_cache(maxsize=64)
def _roots_hash_data(
    pems: tuple[str, ...], issuers: tuple[str, ...] = ()
) -> tuple[CertificateHashData, ...]:
    # Cached: a fleet installed with the same roots computes their hash data once.
    # ``issuers``: roots the station no longer keeps that signed installed ones (a real
    # firmware computes a root's hash data when it installs it, while its issuer is there).
    certificates = [load_certificate(pem) for pem in pems]
    candidates = [*certificates, *(load_certificate(pem) for pem in issuers)]
    found = []
    for certificate in certificates:
        issuer = None
        if not is_self_issued(certificate):
            issuer = next((c for c in candidates if is_signed_by(certificate, c)), None)
            if issuer is None:
                continue  # its issuer is not here: nothing to name it by
        found.append(hash_data(certificate, issuer=issuer))
    return tuple(found)


class StationState(enum.Enum):
    OFF = "off"
    CONNECTING = "connecting"
    BOOTING = "booting"  # connected, BootNotification not accepted yet
    ONLINE = "online"
    REBOOTING = "rebooting"
    OFFLINE = "offline"  # the drop-offline behaviour: gone for good
    STOPPED = "stopped"


class SimulatedStation:
    """A station's persistent state (config, session, history) across its connections."""

    __slots__ = (
        "_background",
        "_inoperative",
        "_install_answer_lost",
        "_installed_urls",
        "_link",
        "_needs_boot",
        "_offline",
        "_reset_type",
        "_self_reboot",
        "_stopping",
        "_task",
        "_tx_lock",
        "_unreachable",
        "_ws",
        "boot_count",
        "config",
        "connected_profile",
        "connected_url",
        "history",
        "identity",
        "journal",
        "meter_wh",
        "reset_count",
        "root_certificates",
        "root_fallback",
        "root_issuers",
        "spec",
        "state",
        "timing",
        "transaction",
    )

    def __init__(
        self,
        spec: StationSpec,
        *,
        timing: Timing | None = None,
        journal: Journal | None = None,
        history_size: int = 128,
    ) -> None:
        self.spec = spec
        self.identity = spec.identity
        self.timing = timing or _DEFAULT_TIMING
        self.journal = journal
        self.history: deque[Event] = deque(maxlen=history_size)
        security = not spec.behaviour.no_security_extension
        values = {
            PROFILE_1: spec.url,
            PROFILE_2: spec.url2,
            PRIORITY: spec.priority,
            PROFILE_TIMEOUT: str(spec.profile_timeout),
            NUMBER_OF_CONNECTORS: str(spec.connectors),
        }
        if security:
            values[ADDITIONAL_ROOT_CHECK] = str(spec.additional_root_certificate_check).lower()
        self.config = StationConfig(key_table(has_network_keys(spec.firmware), security), values)
        # Installed CentralSystemRootCertificates (PEM), kept across reboots like the config.
        self.root_certificates: tuple[str, ...] = spec.root_certificates
        # Under AdditionalRootCertificateCheck (OCPP 1.6 security whitepaper) a station keeps
        # one CentralSystemRootCertificate: installing a new one replaces it, and the old one
        # stays here as a temporary fallback (still trusted for TLS, no longer listed) until
        # the station has connected successfully using the new one.
        self.root_fallback: tuple[str, ...] = ()
        # Roots replaced since power-on that signed an installed one: its hash data's issuer.
        self.root_issuers: tuple[str, ...] = ()
        # The lose-install-certificate-answer behaviour: the one answer it drops is gone.
        self._install_answer_lost = False
        self.state = StationState.OFF
        self.connected_url: str | None = None
        self.connected_profile: str | None = None
        self.reset_count = 0
        self.boot_count = 0
        self.meter_wh = 0
        self.transaction: Transaction | None = None
        if spec.behaviour.charging:
            self.transaction = Transaction(
                connector_id=1,
                id_tag=f"TAG-{spec.identity}"[-20:],
                meter_start=self.meter_wh,
                started_at=time.time(),
                limit_seconds=spec.behaviour.charging_seconds,
            )
        self._inoperative: frozenset[int] = frozenset()
        self._installed_urls = frozenset(url for url in (spec.url, spec.url2) if url)
        # URLs lost for good (the fall-back-after behaviour).
        self._unreachable: set[str] = set()
        self._reset_type: str | None = None
        # A reboot the station decided on itself (the boot-loop behaviour).
        self._self_reboot = False
        # Until the first accepted BootNotification since power-on or the last reboot.
        self._needs_boot = True
        self._ws: ClientConnection | None = None
        self._link: StationLink | None = None
        self._task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] | None = None
        self._tx_lock: asyncio.Lock | None = None
        self._stopping = False
        self._offline = False

    def __repr__(self) -> str:
        return f"<SimulatedStation {self.identity} {self.state.value} {self.connected_url}>"

    # -- observation ---------------------------------------------------------------------

    @property
    def online(self) -> bool:
        return self.state is StationState.ONLINE

    @property
    def reset_pending(self) -> bool:
        return self._reset_type is not None

    def events(self, name: str | None = None) -> list[Event]:
        """A copy of the in-memory history, optionally only events called `name`."""
        return [e for e in list(self.history) if name is None or e.event == name]

    def record(self, event: str, **data: Any) -> None:
        entry = Event(time.time(), event, {k: v for k, v in data.items() if v is not None})
        self.history.append(entry)
        if self.journal is not None:
            self.journal.write(self.identity, entry)

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.get_running_loop().create_task(self.run(), name=self.identity)
        return self._task

    async def run(self) -> None:
        """Power on and keep the station connected until stopped (or gone offline)."""
        self._task = asyncio.current_task()
        self.record(
            "powered_on",
            firmware=self.spec.firmware,
            network_keys=PROFILE_1 in self.config,
            security_extension=not self.spec.behaviour.no_security_extension,
            root_certificates=[data.as_payload() for data in self.installed_root_hash_data()],
        )
        try:
            while not self._finished:
                # The firmware reads its network configuration once per boot.
                profiles = boot_profiles(self.config)
                while not self._finished:
                    connected = await self._connect(profiles)
                    if connected is None:
                        break
                    await self._serve(*connected)
                    if self._finished:
                        break
                    if self._reset_type is not None or self._self_reboot:
                        await self._reboot()
                        break
                    self.state = StationState.CONNECTING
                    await asyncio.sleep(self.timing.reconnect_delay * random.uniform(0.5, 1.5))
        finally:
            self.state = StationState.OFFLINE if self._offline else StationState.STOPPED

    async def stop(self) -> None:
        """Close the connection cleanly and end every task of this station."""
        self._stopping = True
        ws = self._ws
        if ws is not None:
            try:
                await ws.close(CloseCode.GOING_AWAY, "simulator stopping")
            except Exception:  # a dying connection must not prevent the others from closing
                log.debug("%s: close failed", self.identity, exc_info=True)
        tasks = [t for t in (self._task, *(self._background or ())) if t and not t.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if not self._offline:
            self.state = StationState.STOPPED

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a follow-up (after a CSMS request) or a timer as a task owned by the station."""
        task = asyncio.get_running_loop().create_task(coro)
        if self._background is None:
            self._background = set()
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        if self._background is not None:
            self._background.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None and not isinstance(error, _LINK_ERRORS):
            log.error("%s: background task failed", self.identity, exc_info=error)

    @property
    def _finished(self) -> bool:
        return self._stopping or self._offline

    # -- connecting by priority ----------------------------------------------------------

    async def _connect(
        self, profiles: tuple[Profile, ...]
    ) -> tuple[Profile, ClientConnection] | None:
        failed_rounds = 0
        while not self._finished:
            self.state = StationState.CONNECTING
            if not profiles:
                self.record("no_profile")
                await asyncio.sleep(self.timing.max_round_backoff)
                continue
            for i, profile in enumerate(profiles):
                ws = await self._try_profile(profile)
                if ws is not None:
                    return profile, ws
                if self._finished:
                    return None
                if i + 1 < len(profiles):
                    nxt = profiles[i + 1]
                    self.record(
                        "fell_back",
                        from_url=profile.url,
                        to_url=nxt.url,
                        from_profile=profile.name,
                        to_profile=nxt.name,
                    )
            failed_rounds += 1
            backoff = min(
                self.timing.max_round_backoff,
                self.timing.reconnect_delay * 2 ** (failed_rounds - 1),
            ) * random.uniform(0.8, 1.2)
            self.record("all_profiles_failed", retry_in=round(backoff, 3))
            await asyncio.sleep(backoff)
        return None

    async def _try_profile(self, profile: Profile) -> ClientConnection | None:
        """Retry one profile until NetworkProfileConnectionTimeoutSec has passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.get_int(PROFILE_TIMEOUT, 30)
        while True:
            remaining = deadline - loop.time()
            try:
                ws = await self._open(profile.url, remaining)
            except CONNECT_ERRORS as exc:
                error = f"{type(exc).__name__}: {exc}"
                self.record("connect_failed", url=profile.url, profile=profile.name, error=error)
            else:
                self.record("connected", url=profile.url, profile=profile.name)
                return ws
            remaining = deadline - loop.time()
            if self._finished or remaining <= 0:
                return None
            pause = self.timing.retry_interval * random.uniform(0.8, 1.2)
            await asyncio.sleep(min(remaining, pause))

    async def _open(self, url: str, remaining: float) -> ClientConnection:
        if self.spec.behaviour.target_unreachable and url not in self._installed_urls:
            raise ConnectError("unreachable (target-unreachable behaviour)")
        if url in self._unreachable:
            raise ConnectError("unreachable (fall-back-after behaviour)")
        if not self.root_fallback or urlsplit(url).scheme != "wss":
            return await self._open_trusting(url, remaining, self.root_certificates)
        # A replaced root is pending removal: the new one first; a connection it verifies
        # removes the fallback, one it does not is tried again trusting the fallback too.
        try:
            ws = await self._open_trusting(url, remaining, self.root_certificates)
        except ssl.SSLCertVerificationError:
            ws = await self._open_trusting(
                url, remaining, (*self.root_certificates, *self.root_fallback)
            )
            self.record("root_fallback_used", url=url)
            return ws
        removed, self.root_fallback = self.root_fallback, ()
        self.record(
            "root_fallback_removed",
            url=url,
            removed=[data.as_payload() for data in _roots_hash_data(removed)],
            root_certificates=[data.as_payload() for data in self.installed_root_hash_data()],
        )
        return ws

    async def _open_trusting(
        self, url: str, remaining: float, roots: tuple[str, ...]
    ) -> ClientConnection:
        return await open_connection(
            url,
            self.identity,
            trusted_roots=roots,
            password=self.spec.password,
            user_agent=f"{self.spec.vendor}/{self.spec.firmware}",
            open_timeout=max(0.2, min(self.timing.open_timeout, remaining)),
            close_timeout=self.timing.close_timeout,
        )

    # -- one connection ------------------------------------------------------------------

    async def _serve(self, profile: Profile, ws: ClientConnection) -> None:
        link = StationLink(self, ws)
        self._ws, self._link = ws, link
        self.connected_url, self.connected_profile = profile.url, profile.name
        self.state = StationState.BOOTING
        driver = asyncio.get_running_loop().create_task(self._drive(link, ws))
        try:
            await link.start()
        except ConnectionClosed:
            pass
        except Exception:
            log.exception("%s: connection failed", self.identity)
            await ws.close(CloseCode.INTERNAL_ERROR)
        finally:
            try:
                await link.own_calls_settled(ANSWER_GRACE)
            finally:
                # Bookkeeping before the await below: stop() may cancel this task right there.
                self._ws = self._link = None
                self.connected_url = self.connected_profile = None
                self.record(
                    "disconnected",
                    url=profile.url,
                    code=ws.close_code,
                    reason=ws.close_reason or None,
                )
                driver.cancel()
                await asyncio.gather(driver, return_exceptions=True)

    async def _drive(self, link: StationLink, ws: ClientConnection) -> None:
        """What the station sends on its own: boot, statuses, transaction, heartbeats."""
        try:
            behaviour = self.spec.behaviour
            if behaviour.reconnect_without_boot and not self._needs_boot:
                self.record("reconnected_without_boot", url=self.connected_url)
                self.state = StationState.ONLINE
            else:
                await self._boot(link)
                self._needs_boot = False
                self.state = StationState.ONLINE
                self.boot_count += 1
                self._after_boot(ws)
            tx = self.transaction
            if tx is not None and not tx.running:
                # A session ended by a hard reset is reported once the CSMS accepted the boot.
                await self.sync_transaction()
            await self.send_statuses(self.connector_ids())
            await self.sync_transaction()
            await self._heartbeats(link)
        except TimeoutError:
            # A CSMS that stops answering is treated as gone: reconnect.
            self.record("call_timeout", url=self.connected_url)
            await ws.close(CloseCode.GOING_AWAY, "CSMS not answering")
        except ConnectionClosed:
            pass

    def _after_boot(self, ws: ClientConnection) -> None:
        """Start the timers of the behaviours that count from an accepted boot."""
        behaviour = self.spec.behaviour
        if self.boot_count == 1 and behaviour.drop_offline:
            self.spawn(self._go_offline_after(behaviour.drop_offline_after))
        url = self.connected_url
        if behaviour.fall_back_after is not None and url and url not in self._installed_urls:
            self.spawn(self._lose_url_after(ws, url, behaviour.fall_back_after))
        if behaviour.boot_loop is not None:
            self.spawn(self._reboot_after(ws, behaviour.boot_loop))

    async def _boot(self, link: StationLink) -> None:
        while not await self._boot_once(link):
            pass

    async def _boot_once(self, link: StationLink) -> bool:
        spec = self.spec
        result = await link.call(
            call.BootNotification(
                charge_point_vendor=spec.vendor,
                charge_point_model=spec.model,
                charge_point_serial_number=spec.serial_number,
                charge_box_serial_number=spec.serial_number,
                firmware_version=spec.firmware,
            )
        )
        if result is not None and result.status == RegistrationStatus.accepted:
            if result.interval > 0:
                self.config.set(HEARTBEAT_INTERVAL, str(result.interval))
            self.record("boot_accepted", url=self.connected_url, interval=result.interval)
            return True
        # ocpp returns None for a CALLERROR.
        status = result.status if result is not None else "CallError"
        interval = result.interval if result is not None else 0
        retry = interval if interval > 0 else self.timing.boot_retry_default
        self.record("boot_not_accepted", url=self.connected_url, status=status, retry_in=retry)
        await asyncio.sleep(retry)
        return False

    async def _heartbeats(self, link: StationLink) -> None:
        first = True
        while True:
            interval = self.config.get_int(HEARTBEAT_INTERVAL, 300)
            if interval <= 0:
                await asyncio.sleep(60)
                continue
            # Jitter the first beat so a fleet that booted together does not beat together.
            await asyncio.sleep(interval * random.uniform(0.1, 1.0) if first else interval)
            first = False
            await link.call(call.Heartbeat())

    # -- root certificates (OCPP 1.6 security extension) --------------------------------

    def installed_root_hash_data(self) -> list[CertificateHashData]:
        """GetInstalledCertificateIds' answer: each root named by its issuer (itself when
        self-issued, else the installed root that signed it)."""
        return list(_roots_hash_data(self.root_certificates, self.root_issuers))

    def install_root(self, pem: str) -> tuple[bool, str]:
        """InstallCertificate of a CentralSystemRootCertificate: (accepted, why not).

        Without AdditionalRootCertificateCheck the root is added to the installed ones.
        With it, the new root (which an installed one must have signed) replaces the
        installed one, which stays a fallback until a TLS connection succeeds using the new
        one (``_open``), as the OCPP 1.6 security whitepaper describes.
        """
        try:
            certificate = load_certificate(pem)
        except CertificateError as exc:
            return False, str(exc)
        installed = [load_certificate(p) for p in self.root_certificates]
        check = (self.config.get(ADDITIONAL_ROOT_CHECK) or "").lower() == "true"
        if check and not any(is_signed_by(certificate, root) for root in installed):
            return False, f"{ADDITIONAL_ROOT_CHECK}: not signed by an installed root"
        if certificate in installed:
            return True, ""
        new = certificate_pem(certificate)
        if not check:
            self.root_certificates = (*self.root_certificates, new)
            return True, ""
        replaced = self.root_certificates
        self.root_certificates = (new,)
        self.root_fallback = tuple(dict.fromkeys((*self.root_fallback, *replaced)))
        self.root_issuers = tuple(dict.fromkeys((*self.root_issuers, *replaced)))
        self.record(
            "root_certificate_replaced",
            replaced=[data.as_payload() for data in _roots_hash_data(replaced)],
            fallback_kept=True,
        )
        return True, ""

    def lose_install_answer(self) -> bool:
        """Whether to drop this InstallCertificate's answer (the behaviour does it once)."""
        if not self.spec.behaviour.lose_install_certificate_answer or self._install_answer_lost:
            return False
        self._install_answer_lost = True
        return True

    # -- reset and going offline ---------------------------------------------------------

    def accept_reset(self, reset_type: str) -> ResetStatus:
        if self.spec.behaviour.reject_reset:
            status = ResetStatus.rejected
        else:
            status = ResetStatus.accepted
            if self._reset_type is None:
                self._reset_type = reset_type
                self.reset_count += 1
        self.record("reset", type=reset_type, status=status.value)
        return status

    async def shut_down_for_reset(self) -> None:
        hard = self._reset_type == ResetType.hard
        tx = self.transaction
        if tx is not None and tx.running:
            tx.stop(Reason.hard_reset if hard else Reason.soft_reset)
            if not hard:
                # OCPP 1.6 §5.14: a soft reset stops sessions gracefully before restarting;
                # a hard one reports them after the reboot.
                with contextlib.suppress(*_LINK_ERRORS):
                    await self.sync_transaction()
        ws = self._ws
        if ws is not None:
            await ws.close(CloseCode.SERVICE_RESTART, "reset")

    async def _reboot(self) -> None:
        self.state = StationState.REBOOTING
        await asyncio.sleep(self.timing.reboot_delay)
        reset_type, self._reset_type = self._reset_type, None
        self._self_reboot = False
        self._needs_boot = True
        self.record("rebooted", type=reset_type or "BootLoop", priority=self.config.get(PRIORITY))

    async def _lose_url_after(self, ws: ClientConnection, url: str, seconds: float) -> None:
        await asyncio.sleep(seconds)
        if self._ws is not ws:
            return  # that connection ended already
        self._unreachable.add(url)
        self.record("lost_url", url=url)
        # The network path is gone: no closing handshake.
        ws.transport.abort()

    async def _reboot_after(self, ws: ClientConnection, seconds: float) -> None:
        await asyncio.sleep(seconds)
        if self._ws is not ws or self._reset_type is not None:
            return  # that connection ended, or a Reset reboots it anyway
        self._self_reboot = True
        self.record("rebooting_by_itself", url=self.connected_url)
        await ws.close(CloseCode.SERVICE_RESTART, "reboot")

    async def _go_offline_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        self._offline = True
        self.record("went_offline", url=self.connected_url)
        ws = self._ws
        if ws is not None:
            # Power or network loss: no closing handshake.
            ws.transport.abort()
        elif self._task is not None:
            self._task.cancel()

    # -- connectors and statuses ---------------------------------------------------------

    def connector_ids(self) -> list[int]:
        """Connector 0 (the whole station) and each connector."""
        return list(range(self.spec.connectors + 1))

    def charging_connector(self) -> int | None:
        tx = self.transaction
        return tx.connector_id if tx is not None and tx.running else None

    def connector_status(self, connector_id: int) -> ChargePointStatus:
        if connector_id and connector_id == self.charging_connector():
            return ChargePointStatus.charging
        if 0 in self._inoperative or connector_id in self._inoperative:
            return ChargePointStatus.unavailable
        return ChargePointStatus.available

    def set_availability(self, connector_id: int, *, operative: bool) -> None:
        if operative:
            self._inoperative = (
                frozenset() if connector_id == 0 else self._inoperative - {connector_id}
            )
        else:
            self._inoperative = self._inoperative | {connector_id}

    async def send_statuses(self, connector_ids: Iterable[int]) -> None:
        link = self._link
        if link is None:
            return
        for connector_id in connector_ids:
            await link.call(
                call.StatusNotification(
                    connector_id=connector_id,
                    error_code=ChargePointErrorCode.no_error,
                    status=self.connector_status(connector_id),
                    timestamp=ocpp_timestamp(),
                )
            )

    async def send_triggered(self, message: MessageTrigger, connector_id: int | None) -> None:
        link = self._link
        if link is None:
            return
        if message is MessageTrigger.boot_notification:
            await self._boot_once(link)
        elif message is MessageTrigger.heartbeat:
            await link.call(call.Heartbeat())
        elif message is MessageTrigger.status_notification:
            await self.send_statuses(
                self.connector_ids() if connector_id is None else [connector_id]
            )
        elif message is MessageTrigger.meter_values:
            await self._send_meter_values(link, connector_id or self.charging_connector() or 1)

    async def _send_meter_values(self, link: StationLink, connector_id: int) -> None:
        tx = self.transaction
        on_tx = tx is not None and tx.running and tx.connector_id == connector_id
        meter = tx.meter_now() if tx is not None and on_tx else self.meter_wh
        await link.call(
            call.MeterValues(
                connector_id=connector_id,
                transaction_id=tx.transaction_id if tx is not None and on_tx else None,
                meter_value=[
                    MeterValue(
                        timestamp=ocpp_timestamp(),
                        sampled_value=[
                            SampledValue(
                                value=str(meter),
                                measurand=Measurand.energy_active_import_register,
                                unit=UnitOfMeasure.wh,
                            )
                        ],
                    )
                ],
            )
        )

    # -- charging sessions ---------------------------------------------------------------

    def begin_transaction(self, connector_id: int, id_tag: str) -> bool:
        """Start a session (RemoteStartTransaction); one session per station at a time."""
        if not 1 <= connector_id <= self.spec.connectors or self.transaction is not None:
            return False
        if not self.online or self.connector_status(connector_id) != ChargePointStatus.available:
            return False
        self.transaction = Transaction(
            connector_id=connector_id,
            id_tag=id_tag,
            meter_start=self.meter_wh,
            started_at=time.time(),
        )
        return True

    async def report_new_session(self) -> None:
        """After RemoteStartTransaction: the connector starts charging, then StartTransaction."""
        tx = self.transaction
        if tx is not None and tx.transaction_id is None and tx.running:
            await self.send_statuses([tx.connector_id])
            await self.sync_transaction()

    async def sync_transaction(self) -> None:
        """Tell the CSMS what it has not heard yet: the session's start, then its stop."""
        if self._link is None or self.transaction is None:
            return
        if self._tx_lock is None:
            self._tx_lock = asyncio.Lock()
        async with self._tx_lock:
            link = self._link
            tx = self.transaction
            if link is None or tx is None:
                return
            if tx.transaction_id is None and tx.running:
                await self._send_start(link, tx)
            if not tx.running:
                await self._send_stop(link, tx)

    async def _send_start(self, link: StationLink, tx: Transaction) -> None:
        result = await link.call(
            call.StartTransaction(
                connector_id=tx.connector_id,
                id_tag=tx.id_tag,
                meter_start=tx.meter_start,
                timestamp=ocpp_timestamp(tx.started_at),
            )
        )
        if result is None:
            self.record("charging_start_failed", url=self.connected_url)
            return
        tx.transaction_id = result.transaction_id
        id_status = (result.id_tag_info or {}).get("status")
        self.record(
            "charging_started",
            url=self.connected_url,
            connector_id=tx.connector_id,
            transaction_id=tx.transaction_id,
            id_tag=tx.id_tag,
            id_tag_status=id_status,
        )
        if id_status != AuthorizationStatus.accepted:
            tx.stop(Reason.de_authorized)
        elif tx.limit_seconds is not None:
            self.spawn(self._end_session_after(tx, tx.limit_seconds))

    async def _send_stop(self, link: StationLink, tx: Transaction) -> None:
        assert tx.stop_reason is not None and tx.meter_stop is not None
        if tx.transaction_id is not None:
            await link.call(
                call.StopTransaction(
                    meter_stop=tx.meter_stop,
                    timestamp=ocpp_timestamp(tx.stopped_at),
                    transaction_id=tx.transaction_id,
                    reason=tx.stop_reason,
                )
            )
        self.record(
            "charging_stopped",
            url=self.connected_url,
            connector_id=tx.connector_id,
            transaction_id=tx.transaction_id,
            reason=tx.stop_reason.value,
            meter_stop=tx.meter_stop,
        )
        self.meter_wh = tx.meter_stop
        self.transaction = None
        await self.send_statuses([tx.connector_id])

    async def _end_session_after(self, tx: Transaction, seconds: float) -> None:
        await asyncio.sleep(seconds)
        if self.transaction is tx and tx.running:
            tx.stop(Reason.local)
            await self.sync_transaction()
