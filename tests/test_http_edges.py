"""HTTP at the edges, as attackers and real clients send it: request-line versions,
``Expect: 100-continue``, clients leaving mid-body, and header bytes that must never be
echoed or logged."""

from __future__ import annotations

import asyncio
import gzip
import logging
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.helpers import SMS_BODY, TOKEN, base_config, eventually

BODY = orjson.dumps(SMS_BODY)


def head(token: str = TOKEN, *, version: str = "1.1", extra: str = "",
         length: int = len(BODY), auth: str = "Authorization: Bearer {token}") -> bytes:
    return (f"POST /sms/webhook HTTP/{version}\r\nHost: relay\r\n"
            "Content-Type: application/json\r\n" + auth.format(token=token) + "\r\n"
            f"Content-Length: {length}\r\n{extra}\r\n").encode()


async def exchange(port: int, data: bytes) -> bytes:
    """Send ``data`` on a new connection; everything the relay answers until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


def port_of(relay: Any) -> int:
    return int(relay.url.rsplit(":", 1)[1])


async def metric(session: aiohttp.ClientSession, url: str, line_start: str) -> float | None:
    async with session.get(url + "/metrics") as r:
        for line in (await r.text()).splitlines():
            if line.startswith(line_start + " "):
                return float(line.rsplit(" ", 1)[1])
    return None


async def test_client_leaving_mid_body_is_not_an_error(
    tmp_path: Path, relay_factory: Any, session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client that disconnects mid-body: no error line, no 500 in the metrics (counted in
    requests_aborted_total), nothing stored; the relay serves the next request."""
    relay = await relay_factory(base_config(tmp_path), paused=True)
    for i in range(3):
        _, writer = await asyncio.open_connection("127.0.0.1", port_of(relay))
        writer.write(head() + BODY[: 10 + i])
        await writer.drain()
        await eventually(lambda: relay.relay.webhook.handling == 1, what="the request read")
        writer.close()
        await eventually(lambda: relay.relay.webhook.handling == 0, what="the request over")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert "internal_error" not in caplog.text
    aborted = await metric(session, relay.url, "hapsms_relay_requests_aborted_total")
    assert aborted == 3
    async with session.get(relay.url + "/metrics") as r:
        assert 'status="500"' not in await r.text()
    assert relay.relay.outbox.undelivered == 0
    assert (await relay.post(session, SMS_BODY))[0] == 200


@pytest.mark.parametrize("header", ["Authorization", "X-Api-Key"])
@pytest.mark.parametrize("tail", ["\x01", "\x7f", "\r", "\x00"])
async def test_token_with_control_character_is_never_echoed(
    tmp_path: Path, relay_factory: Any, caplog: pytest.LogCaptureFixture, header: str,
    tail: str,
) -> None:
    """At debug level, a token header the parser refuses (a control character after a valid
    token) is neither logged nor echoed in the 400."""
    server = {"token_header": header} if header != "Authorization" else {}
    relay = await relay_factory(base_config(tmp_path, server=server, log_level="debug"),
                                paused=True)
    caplog.set_level(logging.DEBUG)
    auth = "Authorization: Bearer {token}" if header == "Authorization" else header + ": {token}"
    answer = await exchange(port_of(relay), head(TOKEN + tail, auth=auth) + BODY)
    assert b" 400 " in answer.split(b"\r\n", 1)[0], answer
    assert orjson.loads(answer.split(b"\r\n\r\n", 1)[1])["error"] == "bad_request"
    assert TOKEN.encode() not in answer
    assert "bad_http_request" in caplog.text  # it was logged, without the token
    assert TOKEN not in caplog.text
    assert relay.relay.outbox.undelivered == 0


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd", "GZIP", "identity, gzip"])
@pytest.mark.parametrize("compressed", [False, True])
async def test_content_encoding_is_refused(tmp_path: Path, relay_factory: Any,
                                           session: aiohttp.ClientSession,
                                           caplog: pytest.LogCaptureFixture,
                                           encoding: str, compressed: bool) -> None:
    """Any Content-Encoding but identity gets 415 unsupported_encoding, whether or not the
    body really is compressed; never a 500 or an error line."""
    relay = await relay_factory(base_config(tmp_path), paused=True)
    data = gzip.compress(BODY) if compressed else BODY
    async with session.post(relay.webhook_url, data=data, headers={
        "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json",
        "Content-Encoding": encoding,
    }) as r:
        answer = await r.json()
        assert (r.status, answer["error"]) == (415, "unsupported_encoding"), answer
        assert r.headers["Accept-Encoding"] == "identity"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert relay.relay.outbox.undelivered == 0


async def test_gzip_bomb_is_refused_unread(tmp_path: Path, relay_factory: Any,
                                           session: aiohttp.ClientSession) -> None:
    """A gzip bomb (100 MB of zeros in ~100 KB) is refused as an encoding, never inflated."""
    relay = await relay_factory(base_config(tmp_path), paused=True)
    bomb = gzip.compress(b"0" * 100_000_000, compresslevel=9)
    async with session.post(relay.webhook_url, data=bomb, headers={
        "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json",
        "Content-Encoding": "gzip",
    }) as r:
        assert r.status in (413, 415)
        assert (await r.json())["error"] in ("body_too_large", "unsupported_encoding")


async def test_identity_encoding_is_accepted(tmp_path: Path, relay_factory: Any,
                                             session: aiohttp.ClientSession) -> None:
    """``Content-Encoding: identity`` (no encoding) is served as usual."""
    relay = await relay_factory(base_config(tmp_path), paused=True)
    async with session.post(relay.webhook_url, data=BODY, headers={
        "Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json",
        "Content-Encoding": "identity",
    }) as r:
        assert r.status == 200
