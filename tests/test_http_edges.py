"""HTTP at the edges, as attackers and real clients send it: request-line versions,
``Expect: 100-continue``, clients leaving mid-body, and header bytes that must never be
echoed or logged."""

from __future__ import annotations

import asyncio
import gzip
import io
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


@pytest.mark.parametrize("version", ["2.0", "0.9"])
async def test_other_http_versions_get_505(tmp_path: Path, relay_factory: Any,
                                           version: str) -> None:
    """A request line claiming HTTP/2.0 or HTTP/0.9 is answered 505 and closed, not served."""
    relay = await relay_factory(base_config(tmp_path), paused=True)
    answer = await exchange(port_of(relay), head(version=version) + BODY)
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.split(b" ")[1] == b"505", answer
    body = orjson.loads(rest.split(b"\r\n\r\n", 1)[1])
    assert body["error"] == "http_version_not_supported"
    assert relay.relay.outbox.undelivered == 0


async def test_expect_100_continue(tmp_path: Path, relay_factory: Any) -> None:
    """``Expect: 100-continue`` is answered 100 once the headers pass, then the body gets
    its 200 on the same connection."""
    relay = await relay_factory(base_config(tmp_path), paused=True)
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(relay))
    try:
        writer.write(head(extra="Expect: 100-continue\r\n"))
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(BODY)
        final = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert final.startswith(b"HTTP/1.1 200 ")
    finally:
        writer.close()
    assert relay.relay.outbox.undelivered == 1


async def test_expect_100_continue_from_aiohttp(tmp_path: Path, relay_factory: Any,
                                                session: aiohttp.ClientSession) -> None:
    """A real client that waits for 100 Continue (aiohttp's ``expect100``) gets its 200."""
    relay = await relay_factory(base_config(tmp_path), paused=True)
    big = {"Type": 1, "Data": {"Mobiles": [f"1380013{i:04d}" for i in range(200)],
                               "Message": "many recipients"}}
    async with session.post(relay.webhook_url, json=big, expect100=True,
                            headers={"Authorization": f"Bearer {TOKEN}"},
                            timeout=aiohttp.ClientTimeout(total=10)) as r:
        assert r.status == 200 and len((await r.json())["ids"]) == 200


@pytest.mark.parametrize(("token", "extra", "status", "error"), [
    ("wrong", "Expect: 100-continue\r\n", 401, "unauthorized"),
    (TOKEN, "Expect: 100-continue\r\nContent-Encoding: gzip\r\n", 415, "unsupported_encoding"),
    (TOKEN, "Expect: something-else\r\n", 417, "expectation_failed"),
])
async def test_expect_gets_the_final_error_at_once(tmp_path: Path, relay_factory: Any,
                                                   token: str, extra: str, status: int,
                                                   error: str) -> None:
    """A request waiting for 100 Continue that fails a check needing no body gets its error
    at once, without 100, and the connection is closed (its body never comes)."""
    relay = await relay_factory(base_config(tmp_path), paused=True)
    answer = await exchange(port_of(relay), head(token, extra=extra))  # no body sent
    assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer
    assert b"100 Continue" not in answer
    assert orjson.loads(answer.split(b"\r\n\r\n", 1)[1])["error"] == error
    assert relay.relay.outbox.undelivered == 0


async def test_expect_is_not_answered_to_http_1_0(tmp_path: Path, relay_factory: Any) -> None:
    """An HTTP/1.0 client never gets a 100 (RFC 9110 15.2.1); its request is served."""
    relay = await relay_factory(base_config(tmp_path), paused=True)
    answer = await exchange(port_of(relay),
                            head(version="1.0", extra="Expect: 100-continue\r\n") + BODY)
    assert answer.startswith(b"HTTP/1.0 200 "), answer
    assert b" 100 " not in answer


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


async def test_declared_length_over_the_limit_is_refused_unread(tmp_path: Path,
                                                                 relay_factory: Any) -> None:
    """A Content-Length over max_body_bytes is answered 413 at once, without waiting for a
    body that may never come (here: never sent, with body_timeout far away)."""
    relay = await relay_factory(base_config(tmp_path, server={"max_body_bytes": 4096,
                                                              "body_timeout": "60s"}),
                                paused=True)
    reader, writer = await asyncio.open_connection("127.0.0.1", port_of(relay))
    try:
        writer.write(head(length=4097) + BODY[:10])
        status_line = await asyncio.wait_for(reader.readline(), 10)
    finally:
        writer.close()
    assert status_line.split(b" ")[1] == b"413", status_line
    assert relay.relay.outbox.undelivered == 0


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_body_of_exactly_max_body_bytes_is_accepted(
    tmp_path: Path, relay_factory: Any, session: aiohttp.ClientSession, chunked: bool
) -> None:
    """max_body_bytes is the largest body accepted, with a Content-Length or chunked (a MiB:
    read as it arrives, not found whole): one byte more is 413."""
    limit = 1_048_576
    relay = await relay_factory(base_config(tmp_path, server={"max_body_bytes": limit}),
                                paused=True)
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    for size, status in ((limit, 200), (limit + 1, 413)):
        body = BODY + b" " * (size - len(BODY))  # JSON allows trailing white space

        async def pieces(body: bytes = body) -> Any:
            for i in range(0, len(body), 65536):
                yield body[i : i + 65536]

        async with session.post(relay.webhook_url, data=pieces() if chunked else io.BytesIO(body),
                                headers=headers) as r:
            assert r.status == status, await r.text()
    assert relay.relay.outbox.undelivered == 1


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_whole_small_body_of_exactly_max_body_bytes_is_accepted(
    tmp_path: Path, relay_factory: Any, chunked: bool
) -> None:
    """A body that arrives whole with its headers (read at once, not as it arrives) is
    accepted at exactly max_body_bytes, with a Content-Length or chunked; one byte more,
    chunked (no length to refuse it early), is 413."""
    limit = 512
    relay = await relay_factory(base_config(tmp_path, server={"max_body_bytes": limit}),
                                paused=True)
    for size, status in ((limit, b"200"), (limit + 1, b"413")):
        body = BODY + b" " * (size - len(BODY))  # JSON allows trailing white space
        if chunked:
            request = head(extra="Connection: close\r\n").replace(
                f"Content-Length: {len(BODY)}\r\n".encode(), b"Transfer-Encoding: chunked\r\n")
            request += f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
        elif size > limit:
            continue  # its Content-Length is refused before the body (the test above)
        else:
            request = head(length=len(body), extra="Connection: close\r\n") + body
        answer = await exchange(port_of(relay), request)  # one write: headers and body
        assert answer.split(b" ")[1] == status, answer
    assert relay.relay.outbox.undelivered == 1


async def test_non_utf8_token_bytes_are_a_wrong_token(tmp_path: Path, relay_factory: Any,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """A token header with bytes that are not UTF-8 is compared like any wrong token: 401,
    logged as auth_failed with the client and the header's name, and no internal error."""
    relay = await relay_factory(base_config(tmp_path), paused=True)
    request = head(auth="Authorization: Bearer \xff\xfe", extra="Connection: close\r\n")
    answer = await exchange(port_of(relay), request.replace("\xff\xfe".encode(), b"\xff\xfe")
                            + BODY)
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.split(b" ")[1] == b"401", answer
    assert orjson.loads(rest.split(b"\r\n\r\n", 1)[1])["error"] == "unauthorized"
    assert "auth_failed client=127.0.0.1 header=Authorization" in caplog.text
    assert relay.relay.outbox.undelivered == 0
