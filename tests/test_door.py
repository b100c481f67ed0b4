"""The front door: allow_ips, failed-auth accounting, TLS with reload, slow clients
(slowloris, slow bodies) and connection limits."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import trustme

from tests.helpers import AUTH, SMS_BODY, TOKEN, base_config, eventually, write_config


async def metrics_text(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url + "/metrics") as r:
        return await r.text()


@pytest.mark.parametrize(("allow", "served"), [
    (["10.0.0.0/8", "192.168.1.7"], False),
    (["10.0.0.0/8", "127.0.0.0/8"], True),
    (["::1", "127.0.0.1/32"], True),
])
async def test_allow_ips(tmp_path: Path, relay_factory, session, allow: list[str],
                         served: bool) -> None:
    """Only clients inside server.allow_ips are served; others are closed when they connect,
    without an answer, and counted."""
    relay = await relay_factory(base_config(tmp_path, server={"allow_ips": allow}))
    if served:
        assert (await relay.post(session, SMS_BODY))[0] == 200
        return
    with pytest.raises(aiohttp.ClientConnectionError):
        await relay.post(session, SMS_BODY)
    port = int(relay.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await reader.read() == b""  # closed at once, before any request
    writer.close()
    assert relay.relay.outbox.undelivered == 0
    assert await refused(session, relay, "allow_ips") >= 2


async def refused(session: aiohttp.ClientSession, relay: Any, reason: str) -> float:
    """hapsms_relay_connections_refused_total{reason}, read without using the relay's
    socket (allow_ips may refuse this client): from its registry."""
    from prometheus_client import generate_latest

    text = generate_latest(relay.relay.metrics.registry).decode()
    line = next((x for x in text.splitlines()
                 if x.startswith(f'hapsms_relay_connections_refused_total{{reason="{reason}"}}')),
                None)
    return float(line.rsplit(" ", 1)[1]) if line else 0.0


async def _idle_flood(host: str, port: int, stop: asyncio.Event, opened: list[int]) -> None:
    """Connections that send nothing, opened again as soon as the relay closes one."""
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(host, 0))
        except OSError:
            await asyncio.sleep(0.01)
            continue
        opened[0] += 1
        try:
            stop_wait = asyncio.ensure_future(stop.wait())
            closed = asyncio.ensure_future(reader.read())
            await asyncio.wait([stop_wait, closed], return_when=asyncio.FIRST_COMPLETED)
            stop_wait.cancel()
            closed.cancel()
        except ConnectionError:
            pass
        finally:
            writer.close()


async def _served(relay: Any, n: int) -> int:
    """How many of ``n`` requests from 127.0.0.1, each on a new connection, got a 200."""
    ok = 0
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as client:
        for i in range(n):
            try:
                status, _ = await relay.post(client, {"Type": 1, "Data": {
                    "Mobiles": [f"138001380{i % 100:02d}"], "Message": "still served"}})
            except aiohttp.ClientError:
                continue
            ok += status == 200
    return ok


async def test_flood_from_outside_allow_ips_takes_no_slot(tmp_path: Path, relay_factory,
                                                          session) -> None:
    """With allow_ips = 127.0.0.1/32, idle connections from 8 other addresses, far more than
    max_connections, are refused when made: every request of the allowed client is served."""
    relay = await relay_factory(base_config(tmp_path, server={
        "allow_ips": ["127.0.0.1/32"], "max_connections": 50, "header_timeout": "30s",
    }), paused=True)
    port = int(relay.url.rsplit(":", 1)[1])
    stop = asyncio.Event()
    opened = [0]
    flood = [asyncio.create_task(_idle_flood(f"127.0.0.{2 + i % 8}", port, stop, opened))
             for i in range(400)]
    try:
        await eventually(lambda: opened[0] >= 400, what="the flood connected")
        assert await _served(relay, 40) == 40
        assert len(relay.relay.runner.server.connections) <= 1
    finally:
        stop.set()
        await asyncio.gather(*flood, return_exceptions=True)
    assert await refused(session, relay, "allow_ips") >= 400


async def test_idle_flood_without_allow_ips_does_not_lock_out(tmp_path: Path, relay_factory,
                                                              session) -> None:
    """Without allow_ips, 8 addresses holding every slot with idle connections (reopened as
    soon as closed) do not lock another client out: a full door closes the longest idle
    connection of the address holding the most, so each new client's connection stays."""
    relay = await relay_factory(base_config(tmp_path, server={
        "max_connections": 100, "max_connections_per_client": 50, "header_timeout": "30s",
    }), paused=True)
    port = int(relay.url.rsplit(":", 1)[1])
    stop = asyncio.Event()
    opened = [0]
    flood = [asyncio.create_task(_idle_flood(f"127.0.0.{2 + i % 8}", port, stop, opened))
             for i in range(400)]
    try:
        await eventually(lambda: len(relay.relay.runner.server.connections) >= 100,
                         what="the flood holding every slot")
        assert await _served(relay, 40) == 40
    finally:
        stop.set()
        await asyncio.gather(*flood, return_exceptions=True)
    assert await refused(session, relay, "idle_evicted") >= 40


async def test_busy_connections_are_never_evicted(tmp_path: Path, relay_factory) -> None:
    """A full door whose connections all have a request in progress refuses a new one
    rather than cutting a request short."""
    relay = await relay_factory(base_config(tmp_path, server={
        "max_connections": 3, "body_timeout": "30s"}), paused=True)
    port = int(relay.url.rsplit(":", 1)[1])
    body = orjson.dumps(SMS_BODY)
    held = []
    for _ in range(3):  # each sends its header and half its body: busy
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /sms/webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                     + f"\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {len(body)}\r\n"
                       "\r\n".encode() + body[:10])
        held.append((reader, writer))
    await eventually(lambda: relay.relay.webhook.handling == 3, what="three requests in flight")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await reader.read() == b""  # refused: nobody idle to close
    writer.close()
    for reader, writer in held:
        writer.write(body[10:])
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
        writer.close()


async def test_reload_closes_connections_no_longer_allowed(tmp_path: Path, session) -> None:
    """A reload that narrows allow_ips closes kept-alive connections from addresses it no
    longer allows."""
    from tests.helpers import start_relay

    doc = base_config(tmp_path)
    path = write_config(tmp_path, doc)
    relay = await start_relay(doc, paused=True)
    try:
        assert (await relay.post(session, SMS_BODY))[0] == 200  # leaves a kept-alive one
        assert len(relay.relay.runner.server.connections) == 1
        doc["server"] = {**doc["server"], "allow_ips": ["10.0.0.0/8"]}
        write_config(tmp_path, doc)
        assert await relay.relay.reload(str(path)) is None
        await eventually(lambda: not relay.relay.runner.server.connections,
                         what="the kept-alive connection closed")
        with pytest.raises(aiohttp.ClientConnectionError):
            await relay.post(session, SMS_BODY)
    finally:
        await relay.stop()


async def test_failed_auth_counted_and_logged_without_token(tmp_path: Path, relay_factory, session,
                                                            caplog) -> None:
    """A wrong token is counted in metrics and logged with the client address, never the token."""
    relay = await relay_factory(base_config(tmp_path))
    wrong = "Bearer sup3r-s3cret-guess"
    status, body = await relay.post(session, SMS_BODY, {"Authorization": wrong})
    assert status == 401 and body["error"] == "unauthorized"
    assert "hapsms_relay_auth_failures_total 1.0" in await metrics_text(session, relay.url)
    line = next(x for x in caplog.text.splitlines() if "auth_failed" in x)
    assert "client=127.0.0.1" in line
    assert "sup3r" not in caplog.text and TOKEN not in caplog.text


def _issue(ca: trustme.CA, tmp_path: Path, name: str) -> tuple[Path, Path, bytes]:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_path, key_path = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    der = ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())
    return cert_path, key_path, der


async def _peer_cert(port: int, ctx: ssl.SSLContext) -> bytes:
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        assert der is not None
        return bytes(der)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


async def test_tls_listener_and_reload(tmp_path: Path, session) -> None:
    """With tls_cert/tls_key the webhook is served over TLS; a reload swaps the certificate."""
    from tests.helpers import start_relay

    ca = trustme.CA()
    cert, key, der1 = _issue(ca, tmp_path, "one")
    doc = base_config(tmp_path, server={"tls_cert": str(cert), "tls_key": str(key)})
    path = write_config(tmp_path, doc)
    relay = await start_relay(doc)
    try:
        port = int(relay.url.rsplit(":", 1)[1])
        client = ssl.create_default_context()
        ca.configure_trust(client)
        url = f"https://127.0.0.1:{port}{relay.relay.config.server.path}"
        async with session.post(url, json=SMS_BODY, headers=AUTH, ssl=client) as r:
            assert r.status == 200 and (await r.json())["ok"] is True
        assert await _peer_cert(port, client) == der1
        with pytest.raises(aiohttp.ClientError):  # plain HTTP is not served
            async with session.post(relay.webhook_url, json=SMS_BODY, headers=AUTH) as r:
                await r.read()

        cert2, key2, der2 = _issue(ca, tmp_path, "two")
        doc["server"] = {**doc["server"], "tls_cert": str(cert2), "tls_key": str(key2)}
        write_config(tmp_path, doc)
        assert await relay.relay.reload(str(path)) is None
        assert await _peer_cert(port, client) == der2

        doc["server"]["tls_key"] = str(tmp_path / "missing.key")
        write_config(tmp_path, doc)
        assert "missing.key" in (await relay.relay.reload(str(path)) or "")
        assert await _peer_cert(port, client) == der2  # a failed reload keeps the old one
    finally:
        await relay.stop()


async def _slow_header(host: str, port: int, stop: asyncio.Event) -> bool:
    """One slowloris connection: a header trickled a byte at a time; True if the relay closed it."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(host, 0))
    except OSError:
        return True
    try:
        header = b"POST /sms/webhook HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10_000
        for byte in header:
            if stop.is_set():
                return False
            if writer.is_closing():  # the relay closed it (uvloop refuses writes from then on)
                return True
            writer.write(bytes([byte]))
            try:
                await asyncio.wait_for(reader.read(1), 0.05)
                return True  # EOF or an answer: the relay gave up on us
            except TimeoutError:
                continue
        return False
    except (ConnectionError, RuntimeError):  # RuntimeError: uvloop's "the handler is closed"
        return True
    finally:
        writer.close()


def _from(relay: Any, host: str) -> int:
    """Connections the relay holds open from ``host``."""
    conns = relay.relay.runner.server.connections
    return sum(1 for c in conns if c.transport is not None
               and c.transport.get_extra_info("peername")[0] == host)


async def test_slowloris_cannot_starve_others(tmp_path: Path, relay_factory, session) -> None:
    """Past max_connections_per_client, 200 more connections from 127.0.0.2 are closed at
    once while its 100 trickle on; requests from 127.0.0.1 keep succeeding meanwhile."""
    # a header timeout far beyond the test: the cap alone is tested here, whatever the
    # machine's speed (the timeout has a test of its own below)
    relay = await relay_factory(base_config(tmp_path, server={
        "header_timeout": "120s", "max_connections_per_client": 100, "max_connections": 500,
    }))
    port = int(relay.url.rsplit(":", 1)[1])
    stop = asyncio.Event()
    held = [asyncio.create_task(_slow_header("127.0.0.2", port, stop)) for _ in range(100)]
    try:
        await eventually(lambda: _from(relay, "127.0.0.2") == 100, what="100 connections held")
        extra = [asyncio.create_task(_slow_header("127.0.0.2", port, stop)) for _ in range(200)]
        await eventually(lambda: all(t.done() for t in extra), what="the 200 past the cap closed")
        assert all(t.result() for t in extra)  # each closed by the relay
        assert not any(t.done() for t in held) and _from(relay, "127.0.0.2") == 100
        for i in range(20):
            status, body = await relay.post(session, {"Type": 1, "Data": {
                "Mobiles": [f"138001380{i:02d}"], "Message": "still served"}})
            assert status == 200, body
    finally:
        stop.set()
        await asyncio.gather(*held, return_exceptions=True)
    text = await metrics_text(session, relay.url)
    assert 'hapsms_relay_connections_refused_total{reason="max_connections_per_client"} 200.0' in text


async def test_header_timeout_closes_trickling_connections(tmp_path: Path, relay_factory,
                                                          session) -> None:
    """A connection that has not sent a whole header within header_timeout is closed by the
    relay and counted; a client with a whole request is served meanwhile."""
    relay = await relay_factory(base_config(tmp_path, server={"header_timeout": "300ms"}))
    port = int(relay.url.rsplit(":", 1)[1])
    stop = asyncio.Event()
    slow = [asyncio.create_task(_slow_header("127.0.0.2", port, stop)) for _ in range(5)]
    try:
        status, body = await relay.post(session, {"Type": 1, "Data": {
            "Mobiles": ["13800138000"], "Message": "served"}})
        assert status == 200, body
        await eventually(lambda: all(t.done() for t in slow), what="the header timeout")
        assert all(t.result() for t in slow)  # every slow connection was closed by the relay
    finally:
        stop.set()
        await asyncio.gather(*slow, return_exceptions=True)
    text = await metrics_text(session, relay.url)
    assert 'hapsms_relay_connections_refused_total{reason="header_timeout"} 5.0' in text


async def test_slow_body_gets_408(tmp_path: Path, relay_factory) -> None:
    """A body that stops arriving is answered 408 request_timeout and nothing is stored."""
    relay = await relay_factory(base_config(tmp_path, server={"body_timeout": "300ms"}))
    port = int(relay.url.rsplit(":", 1)[1])
    body = orjson.dumps(SMS_BODY)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /sms/webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {TOKEN}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                 + body[:10])
    answer = await reader.read()  # the relay answers and closes
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b'"error":"request_timeout","detail":"the body did not arrive within 0.3s"' in answer
    assert relay.relay.outbox.undelivered == 0


async def test_connection_limit(tmp_path: Path, relay_factory, session) -> None:
    """Past max_connections a new connection closes the longest idle one (of the address
    holding the most) and is served; closing connections makes room."""
    relay = await relay_factory(base_config(tmp_path, server={"max_connections": 5}))
    port = int(relay.url.rsplit(":", 1)[1])
    held: list[Any] = []
    for _ in range(5):
        held.append(await asyncio.open_connection("127.0.0.1", port))
        await eventually(lambda: len(relay.relay.runner.server.connections) == len(held),
                         what="the connection admitted")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await asyncio.wait_for(held[0][0].read(), 10) == b""  # the longest idle, closed
    body = orjson.dumps(SMS_BODY)
    writer.write(b"POST /sms/webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {TOKEN}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                 + body)
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 ")
    writer.close()
    for _, w in held:
        w.close()
    await eventually(lambda: not relay.relay.runner.server.connections, what="connections closed")
    status, _ = await relay.post(session, SMS_BODY)
    assert status == 200
    assert await refused(session, relay, "idle_evicted") == 1
