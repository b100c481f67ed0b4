"""The webhook's token comparison and body reading, fast: real requests on
a real loopback socket to a tiny aiohttp app whose handler is the relay's webhook up to the
parse (``check_request``, ``read_body``, ``parse``) and answers how many entries it made, or
the error the relay would answer. Nothing is stored: the relay is built, not started.

The relay tests of test_http_edges.py and test_door.py hold the same promises end to end;
these are the ones ``make mutation`` runs for every mutant of those functions."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from hapsms_relay.errors import BadRequest
from hapsms_relay.webhook import Webhook, error_response
from tests.helpers import SMS_BODY, TOKEN, base_config, webhook_of

BODY = orjson.dumps(SMS_BODY)
LIMIT = 512  # max_body_bytes of the app below

Serve = Callable[..., Awaitable[int]]


def webhook(tmp_path: Path, **server: Any) -> Webhook:
    return webhook_of(base_config(tmp_path, server={"path": "/hap", "max_body_bytes": LIMIT,
                                                    **server}))


@pytest.fixture
async def serve(tmp_path: Path) -> AsyncIterator[Serve]:
    """Starts the app for a relay's webhook with these server settings; its port."""
    runners: list[web.ServerRunner] = []

    async def start(**server: Any) -> int:
        hook = webhook(tmp_path, **server)

        async def handle(request: web.BaseRequest) -> web.Response:
            try:
                hook.check_request(request)
                body = await hook.read_body(request, request.headers.get("Expect"))
                return web.json_response({"entries": len(hook.parse(body))})
            except BadRequest as exc:
                return error_response(exc)

        # a bare server, as the relay's (no router: no 100 Continue but the webhook's own)
        runner = web.ServerRunner(web.Server(handle, auto_decompress=False), handle_signals=False)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return int(runner.addresses[0][1])

    yield start
    for runner in runners:
        await runner.cleanup()


def head(*, length: int | None = len(BODY), token: bytes = TOKEN.encode(),
         extra: bytes = b"") -> bytes:
    framing = b"Transfer-Encoding: chunked" if length is None else b"Content-Length: %d" % length
    return (b"POST /hap HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + token + b"\r\n" + framing + b"\r\n"
            b"Connection: close\r\n" + extra + b"\r\n")


def padded(size: int) -> bytes:
    """SMS_BODY with trailing white space (JSON allows it) to ``size`` bytes."""
    return BODY + b" " * (size - len(BODY))


def chunked(body: bytes) -> bytes:
    return b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"


def parsed(answer: bytes) -> tuple[int, Any]:
    """An HTTP answer's status and JSON body."""
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split(b" ")[1]), orjson.loads(rest.split(b"\r\n\r\n", 1)[1])


async def exchange(port: int, *parts: bytes) -> bytes:
    """Sends ``parts`` on a new connection (after the first, each once the app has answered
    100 Continue); the answer, its head and its body. The 10 s are a guard against a hang,
    not a measure: every answer here comes at once."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(parts[0])
        for part in parts[1:]:
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(part)
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = next(int(line.split(b":")[1]) for line in answer.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        return answer + await asyncio.wait_for(reader.readexactly(length), 10)
    finally:
        writer.close()


async def test_non_utf8_token_bytes_are_a_wrong_token(serve: Serve,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """Token bytes that are not UTF-8 are hashed like any wrong token: 401, logged as
    auth_failed with the client and the header's name; not an internal error."""
    port = await serve()
    caplog.set_level(logging.WARNING)
    status, body = parsed(await exchange(port, head(token=b"\xff\xfe" + TOKEN.encode()) + BODY))
    assert (status, body["error"]) == (401, "unauthorized")
    assert "auth_failed client=127.0.0.1 header=Authorization" in caplog.text


async def test_declared_length_at_the_limit_is_read(serve: Serve) -> None:
    """A Content-Length of exactly max_body_bytes is read and parsed."""
    port = await serve()
    assert parsed(await exchange(port, head(length=LIMIT) + padded(LIMIT))) == (200, {"entries": 1})


async def test_declared_length_over_the_limit_is_refused_unread(serve: Serve) -> None:
    """A Content-Length over max_body_bytes is 413 at once, without waiting for a body
    that never comes (body_timeout far away)."""
    port = await serve(body_timeout="60s")
    status, body = parsed(await exchange(port, head(length=LIMIT + 1)))
    assert (status, body["error"]) == (413, "body_too_large")


@pytest.mark.parametrize(("size", "status"), [(LIMIT, 200), (LIMIT + 1, 413)])
async def test_whole_chunked_body_at_the_limit(serve: Serve, size: int, status: int) -> None:
    """A chunked body that arrives whole with its headers (no length to refuse it early)
    is read at exactly max_body_bytes and refused one byte over."""
    port = await serve()
    answer, _ = parsed(await exchange(port, head(length=None) + chunked(padded(size))))
    assert answer == status


@pytest.mark.parametrize(("size", "status"), [(LIMIT, 200), (LIMIT + 1, 413)])
async def test_streamed_chunked_body_at_the_limit(serve: Serve, size: int, status: int) -> None:
    """A chunked body sent after 100 Continue (read as it arrives) is read at exactly
    max_body_bytes and refused one byte over."""
    port = await serve()
    answer, _ = parsed(await exchange(port, head(length=None, extra=b"Expect: 100-continue\r\n"),
                                      chunked(padded(size))))
    assert answer == status


async def test_body_that_stops_arriving_is_408(serve: Serve) -> None:
    """A body that stops arriving is answered 408 request_timeout after body_timeout."""
    port = await serve(body_timeout="200ms")
    answer = await exchange(port, head(extra=b"Expect: 100-continue\r\n"), BODY[:10])
    assert parsed(answer) == (408, {"ok": False, "error": "request_timeout",
                                    "detail": "the body did not arrive within 0.2s"})
