"""The gateway process: handshake, command bridge, events, shutdown. Real sockets, real Redis."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import time
import urllib.request
from dataclasses import dataclass

import pytest
import redis
from ocpp.exceptions import GenericError
from ocpp.v16 import call
from ocpp.v16.enums import ResetType
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidMessage, InvalidStatus

from devstack.processes import free_port, wait_until
from ocpp_gateway.client import (
    ClaimLapsed,
    ClaimRefused,
    CommandNotSent,
    CommandRevoked,
    StationOffline,
    claim_command,
    revoke_command,
    send_command,
)
from ocpp_gateway.envelopes import (
    EVENT_STREAM,
    REPLY_KEY_PREFIX,
    Event,
    EventKind,
    Outcome,
    claim_key,
    last_boot_key,
)
from tests.ocpp_gateway.stations import station_on


def http_base(ws_url: str) -> str:
    return ws_url.replace("ws://", "http://").rsplit("/", 1)[0]


def health(ws_url: str) -> dict:
    with urllib.request.urlopen(f"{http_base(ws_url)}/health", timeout=5) as response:
        return json.load(response)


def test_it_answers_the_health_check(start_gateway):
    base = start_gateway("csms-1", "--open")
    body = wait_until(lambda: (b := health(base))["redis"] == "ok" and b, 5, "redis ok in /health")
    assert body == {
        "status": "ok",
        "csms": "csms-1",
        "stations": 0,
        "admission": "open",
        "registered": 0,
        "redis": "ok",
        "event_backlog": 0,
        "mode": "endpoint",
        "upstream": None,
        "upstream_last_link": None,
    }


@pytest.mark.parametrize("subprotocols", [["ocpp2.0.1"], None])
def test_it_refuses_a_connection_without_the_ocpp16_subprotocol(start_gateway, subprotocols):
    base = start_gateway("csms-1", "--open")

    async def attempt():
        async with connect(f"{base}/CP1", subprotocols=subprotocols):
            pass

    with pytest.raises(InvalidStatus) as refused:
        asyncio.run(attempt())
    assert refused.value.response.status_code == 400


def _basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def test_with_auth_it_refuses_wrong_credentials_before_the_upgrade(
    start_gateway, tmp_path, redis_client
):
    auth_file = tmp_path / "passwords"
    auth_file.write_text("# identity:password\nCP1:s3cret-key-0001\n")
    base = start_gateway("csms-1", "--open", "--auth-file", str(auth_file))

    async def attempt(identity, headers):
        async with station_on(base, identity, additional_headers=headers) as station:
            return station.id

    for identity, headers in [
        ("CP1", _basic("CP1", "wrong")),
        ("CP1", _basic("CP2", "s3cret-key-0001")),  # username must equal the identity
        ("CP1", {}),
        ("CP2", _basic("CP2", "s3cret-key-0001")),  # unknown station
    ]:
        with pytest.raises(InvalidStatus) as refused:
            asyncio.run(attempt(identity, headers))
        assert refused.value.response.status_code == 401
    assert redis_client.xlen(EVENT_STREAM) == 0  # no OCPP traffic reached the gateway
    assert asyncio.run(attempt("CP1", _basic("CP1", "s3cret-key-0001"))) == "CP1"


def test_a_boot_is_reported_durably_and_kept_as_the_last_boot(start_gateway, redis_client):
    base = start_gateway("csms-1", "--open")

    async def boot_and_leave():
        async with station_on(base, "CP1"):
            pass

    asyncio.run(boot_and_leave())
    wait_until(lambda: redis_client.xlen(EVENT_STREAM) >= 3, 5, "connect, boot, disconnect")
    entries = redis_client.xrange(EVENT_STREAM)
    events = [Event.from_json(fields[b"e"]) for _, fields in entries]
    assert [e.kind for e in events] == [EventKind.CONNECT, EventKind.BOOT, EventKind.DISCONNECT]
    assert {e.csms for e in events} == {"csms-1"}
    assert events[1].data["firmware"] == "4.2.85"
    last_boot = json.loads(redis_client.hget(last_boot_key("csms-1"), "CP1"))
    assert last_boot["vendor"] == "TestVendor"
    assert last_boot["at"] == events[1].at


@dataclass
class NoSuchAction:
    """A request of an action OCPP does not have (its class name is the action)."""


def test_commands_reach_the_station_and_errors_come_back_with_their_code(
    start_gateway, redis_client
):
    base = start_gateway("csms-1", "--open")

    async def scenario():
        async with station_on(base, "CP1") as station:
            reply = await asyncio.to_thread(
                send_command, redis_client, "CP1", call.GetConfiguration(key=["x"]), timeout=5
            )
            assert reply.outcome is Outcome.RESULT
            assert reply.payload["configuration_key"][0]["value"] == "CP1"
            assert reply.csms == "csms-1"
            assert reply.sent_at <= reply.finished_at

            station.change_configuration_error = GenericError("firmware says no")
            reply = await asyncio.to_thread(
                send_command,
                redis_client,
                "CP1",
                call.ChangeConfiguration(key="A", value="b"),
                timeout=5,
            )
            assert reply.outcome is Outcome.CALL_ERROR
            assert reply.error_code == "GenericError"
            assert reply.error_description == "firmware says no"

            # ClearCache: OCPP, not allowed.
            for request in [NoSuchAction(), call.ClearCache()]:
                reply = await asyncio.to_thread(
                    send_command, redis_client, "CP1", request, timeout=5
                )
                assert reply.outcome is Outcome.REJECTED and reply.sent is False
                action = type(request).__name__
                assert reply.error_description == (
                    f"action {action} is not allowed by this gateway (add it with --allow-action)"
                )

    asyncio.run(scenario())


def test_a_command_to_a_station_no_gateway_holds_fails_at_once(start_gateway, redis_client):
    start_gateway("csms-1", "--open")
    started = time.monotonic()
    with pytest.raises(StationOffline):
        send_command(redis_client, "NOBODY", call.GetConfiguration(), timeout=30)
    assert time.monotonic() - started < 1.0
    # The mark that ended the wait at once was taken with it: nothing is left behind.
    assert not redis_client.keys(f"{REPLY_KEY_PREFIX}*")


def test_a_claimed_command_is_published_once_and_one_taken_back_never(start_gateway, redis_client):
    """The Reset's claim: a worker that finds the claiming run gone takes the claim back
    only if its command never reached a gateway, and a command taken back is never sent."""
    base = start_gateway("csms-1", "--open")
    reset = call.Reset(type=ResetType.hard)

    async def scenario():
        async with station_on(base, "CP1") as station:
            taken_back = claim_command(redis_client, ttl=60)
            assert revoke_command(redis_client, taken_back)
            started = time.monotonic()
            with pytest.raises(CommandRevoked, match="its claim was taken back"):
                await asyncio.to_thread(
                    send_command, redis_client, "CP1", reset, timeout=5, claimed_id=taken_back
                )
            assert time.monotonic() - started < 1.0

            sent = claim_command(redis_client, ttl=60)
            reply = await asyncio.to_thread(
                send_command, redis_client, "CP1", reset, timeout=5, claimed_id=sent
            )
            assert (reply.outcome, reply.command_id) == (Outcome.RESULT, sent)
            assert not revoke_command(redis_client, sent)  # published: it may have been sent
            assert 0 < redis_client.ttl(claim_key(sent)) <= 60  # the claim still expires

            # Taken on another Redis server (before a restart or a failover, which may have
            # lost its "revoked"), or expired: never published, and the sender is told that
            # it may claim anew (not that another run took it).
            for lapsed in ("elsewhere", "expired"):
                if lapsed == "elsewhere":
                    redis_client.set(claim_key(lapsed), "claimed:another-run:another-replid")
                with pytest.raises(CommandNotSent, match="does not stand") as refused:
                    await asyncio.to_thread(
                        send_command, redis_client, "CP1", reset, timeout=5, claimed_id=lapsed
                    )
                assert isinstance(refused.value, ClaimLapsed)
            assert redis_client.get(claim_key("elsewhere")) == b"revoked"
            assert station.resets == 1

    asyncio.run(scenario())
    # Published to no gateway: it reached no station, and may be taken back.
    unheard = claim_command(redis_client, ttl=60)
    with pytest.raises(StationOffline):
        send_command(redis_client, "NOBODY", reset, timeout=5, claimed_id=unheard)
    assert revoke_command(redis_client, unheard)
    # Claimed before Redis restarted (another run id): whether it was published may have
    # been lost with the restart, so it is never taken back.
    redis_client.set(claim_key("before-restart"), "claimed:another-run:another-replid")
    assert not revoke_command(redis_client, "before-restart")
    assert not revoke_command(redis_client, "expired")
    assert not redis_client.keys(f"{REPLY_KEY_PREFIX}*")


def test_a_claim_redis_refuses_says_why_and_is_not_an_outage(redis_client):
    """A Redis user that may not run INFO cannot claim a Reset: a clear error the step counts
    as a failure (bounded attempts), not a Redis outage retried without end."""
    redis_client.acl_setuser(
        "no-info", enabled=True, passwords=["+pw"], commands=["+@all", "-info"], keys=["*"]
    )
    kwargs = redis_client.connection_pool.connection_kwargs
    limited = redis.Redis(
        host=kwargs["host"], port=kwargs["port"], username="no-info", password="pw"
    )
    try:
        with pytest.raises(ClaimRefused, match="Redis refused the claim") as refused:
            claim_command(limited, ttl=60)
        assert not isinstance(refused.value, redis.RedisError)
    finally:
        limited.close()
        redis_client.acl_deluser("no-info")


def test_a_command_redis_refuses_is_known_not_sent():
    """The Reset claim is given back only for a command that cannot have left: the PUBLISH
    itself failed (here: no Redis listens on the port)."""
    unreachable = redis.Redis(port=free_port(), socket_connect_timeout=1)
    with pytest.raises(CommandNotSent, match="command not published"):
        send_command(unreachable, "CP-1", call.Reset(type=ResetType.hard), timeout=5)


def test_a_station_that_never_answers_yields_a_timeout_within_the_deadline(
    start_gateway, redis_client
):
    base = start_gateway("csms-1", "--open")

    async def scenario():
        async with station_on(base, "CP1") as station:
            station.silent = True
            started = time.monotonic()
            reply = await asyncio.to_thread(
                send_command, redis_client, "CP1", call.GetConfiguration(), timeout=1.5
            )
            return reply, time.monotonic() - started

    reply, took = asyncio.run(scenario())
    assert reply.outcome is Outcome.TIMEOUT
    assert reply.csms == "csms-1"  # the gateway's own verdict, not the caller giving up
    assert 1.4 <= took < 1.5 + 1.0


def test_a_reconnecting_station_replaces_its_dead_connection(start_gateway, redis_client):
    base = start_gateway("csms-1", "--open")

    async def scenario():
        async with station_on(base, "CP1") as first:
            # Power lost: the old socket answers nothing, not even a ping.
            first._connection.transport.pause_reading()
            async with station_on(base, "CP1", boot=False):
                reply = await asyncio.to_thread(
                    send_command, redis_client, "CP1", call.GetConfiguration(), timeout=5
                )
                assert reply.outcome is Outcome.RESULT
            first._connection.transport.abort()  # what is left of the dead one
            # The stale connection's end must not unsubscribe the live one; now it is gone.
            await asyncio.sleep(0)

    asyncio.run(scenario())
    wait_until(lambda: redis_client.pubsub_numsub("ocpp:cmd:CP1")[0][1] == 0, 5, "unsubscribed")


def test_a_malformed_frame_gets_a_callerror(start_gateway):
    base = start_gateway("csms-1", "--open")

    async def scenario():
        async with connect(f"{base}/CP1", subprotocols=["ocpp1.6"]) as ws:
            await ws.send('[2, "abc", "BootNotification"]')  # no payload
            return json.loads(await asyncio.wait_for(ws.recv(), 5))

    frame = asyncio.run(scenario())
    assert frame[0] == 4 and frame[1] == "abc"
    assert frame[2] in {"FormationViolation", "FormatViolation", "ProtocolError"}


def test_an_oversized_frame_closes_the_connection(start_gateway):
    base = start_gateway("csms-1", "--open", "--max-frame-bytes", "1024")

    async def scenario():
        async with connect(f"{base}/CP1", subprotocols=["ocpp1.6"]) as ws:
            await ws.send(json.dumps([2, "x", "DataTransfer", {"vendorId": "v" * 4096}]))
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5)
            return ws.close_code

    assert asyncio.run(scenario()) == 1009


def test_sigterm_closes_station_connections_with_going_away(start_gateway, redis_client):
    base = start_gateway("csms-1", "--open")

    async def scenario():
        async with station_on(base, "CP1") as station:
            pid = _gateway_pid(base)
            import os

            os.kill(pid, signal.SIGTERM)
            await asyncio.wait_for(station._connection.wait_closed(), 10)
            return station._connection.close_code

    assert asyncio.run(scenario()) == 1001


def _gateway_pid(base: str) -> int:
    import subprocess

    port = base.rsplit(":", 1)[1].split("/")[0]
    out = subprocess.run(
        ["pgrep", "-f", f"ocpp_gateway .*--port {port}"], capture_output=True, text=True
    )
    return int(out.stdout.split()[0])


def test_it_serves_wss_with_a_certificate(start_gateway, tmp_path, redis_client):
    import shutil
    import ssl
    import subprocess

    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed: cannot make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    base = start_gateway("csms-1", "--open", "--certfile", str(cert), "--keyfile", str(key))
    secure = base.replace("ws://", "wss://")
    context = ssl.create_default_context(cafile=str(cert))

    async def scenario():
        async with station_on(secure, "CP1", ssl=context) as station:
            reply = await asyncio.to_thread(
                send_command, redis_client, "CP1", call.GetConfiguration(key=["x"]), timeout=5
            )
            return station.id, reply

    identity, reply = asyncio.run(scenario())
    assert identity == "CP1" and reply.outcome is Outcome.RESULT

    async def plain_text():
        async with connect(f"{base}/CP2", subprotocols=["ocpp1.6"], open_timeout=3):
            pass

    with pytest.raises(InvalidMessage):  # a plain-text handshake gets no HTTP answer
        asyncio.run(plain_text())


def test_a_station_that_reconnects_at_once_gets_commands_at_once(start_gateway, redis_client):
    base = start_gateway("csms-1", "--open")

    async def scenario():
        for _ in range(5):  # the UNSUBSCRIBE of the closed connection races the SUBSCRIBE
            async with station_on(base, "CP1"):
                pass
            async with station_on(base, "CP1"):
                reply = await asyncio.to_thread(
                    send_command, redis_client, "CP1", call.GetConfiguration(), timeout=5
                )
                assert reply.outcome is Outcome.RESULT

    asyncio.run(scenario())


def test_the_command_line_refuses_an_unknown_action_and_bad_timings(monkeypatch, capsys):
    from ocpp_gateway.__main__ import parse_args

    monkeypatch.setenv("OCPP_GATEWAY_ALLOWED_ACTIONS", "ClearCache")
    config = parse_args(["--csms", "c", "--allow-action", "UnlockConnector", "--open"])
    assert {"ClearCache", "UnlockConnector", "Reset"} <= config.allowed_actions
    assert config.open_admission and config.rejected_hold == 60 and config.registry_refresh == 2
    for argv in (["--allow-action", "Nope"], ["--registry-refresh", "0"]):
        with pytest.raises(SystemExit):
            parse_args(["--csms", "c", *argv])
    assert "'Nope' is not an OCPP 1.6 action" in capsys.readouterr().err
