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


@pytest.mark.parametrize(("allow", "status"), [
    (["10.0.0.0/8", "192.168.1.7"], 403),
    (["10.0.0.0/8", "127.0.0.0/8"], 200),
    (["::1", "127.0.0.1/32"], 200),
])
async def test_allow_ips(tmp_path: Path, relay_factory, session, allow: list[str], status: int) -> None:
    """Only clients inside server.allow_ips are served; others get 403 forbidden JSON."""
    relay = await relay_factory(base_config(tmp_path, server={"allow_ips": allow}))
    got, body = await relay.post(session, SMS_BODY)
    assert got == status
    if status == 403:
        assert body == {"ok": False, "error": "forbidden",
                        "detail": "this address may not use the relay (server.allow_ips)"}
        assert relay.relay.outbox.undelivered == 0


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
            writer.write(bytes([byte]))
            try:
                await asyncio.wait_for(reader.read(1), 0.05)
                return True  # EOF or an answer: the relay gave up on us
            except TimeoutError:
                continue
        return False
    except ConnectionError:
        return True
    finally:
        writer.close()


async def test_slowloris_cannot_starve_others(tmp_path: Path, relay_factory, session) -> None:
    """300 trickling connections from 127.0.0.2 are capped and timed out, while requests from
    127.0.0.1 keep succeeding."""
    relay = await relay_factory(base_config(tmp_path, server={
        "header_timeout": "1s", "max_connections_per_client": 100, "max_connections": 500,
    }))
    port = int(relay.url.rsplit(":", 1)[1])
    stop = asyncio.Event()
    attackers = [asyncio.create_task(_slow_header("127.0.0.2", port, stop)) for _ in range(300)]
    try:
        await eventually(lambda: sum(t.done() for t in attackers) >= 200,
                         what="connections past the per-client cap refused")
        for i in range(20):
            status, body = await relay.post(session, {"Type": 1, "Data": {
                "Mobiles": [f"138001380{i:02d}"], "Message": "still served"}})
            assert status == 200, body
        await eventually(lambda: all(t.done() for t in attackers), what="the header timeout")
        assert all(t.result() for t in attackers)  # every slow connection was closed by the relay
    finally:
        stop.set()
        await asyncio.gather(*attackers, return_exceptions=True)
    text = await metrics_text(session, relay.url)
    assert 'hapsms_relay_connections_refused_total{reason="max_connections_per_client"} 200.0' in text
    timed_out = next(x for x in text.splitlines() if 'reason="header_timeout"' in x)
    assert float(timed_out.rsplit(" ", 1)[1]) > 0


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
    assert b'"error":"request_timeout"' in answer
    assert relay.relay.outbox.undelivered == 0


async def test_connection_limit(tmp_path: Path, relay_factory, session) -> None:
    """Past max_connections a new connection is closed at once; closing one makes room."""
    relay = await relay_factory(base_config(tmp_path, server={"max_connections": 5}))
    port = int(relay.url.rsplit(":", 1)[1])
    held: list[Any] = [await asyncio.open_connection("127.0.0.1", port) for _ in range(5)]
    await eventually(lambda: len(relay.relay.runner.server.connections) == 5, what="5 connections")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await reader.read() == b""  # closed without a word
    writer.close()
    for _, w in held:
        w.close()
    await eventually(lambda: not relay.relay.runner.server.connections, what="connections closed")
    status, _ = await relay.post(session, SMS_BODY)
    assert status == 200
