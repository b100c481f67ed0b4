"""Stopping without losing a request: requests on open connections are served during the
drain with ``Connection: close``, and quiet kept-alive connections are closed."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson

from tests.helpers import SMS_BODY, TOKEN, base_config, eventually, outbox_rows

BODY = orjson.dumps(SMS_BODY)
HEAD = (b"POST /sms/webhook HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {TOKEN}\r\nContent-Length: {len(BODY)}\r\n\r\n".encode())


async def _answer(reader: asyncio.StreamReader) -> tuple[bytes, dict[str, str], Any]:
    """One HTTP response read off a raw connection: status line, headers, JSON body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 15)
    status, *lines = head.decode().split("\r\n")[:-2]
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    body = orjson.loads(await reader.readexactly(int(headers["content-length"])))
    return status.encode(), headers, body


async def test_request_in_progress_at_stop_is_served_with_connection_close(
    tmp_path: Path, relay_factory: Any
) -> None:
    """A request whose body is still arriving when the relay stops is stored and answered
    200 with Connection: close, the connection is closed after it, and stop then ends."""
    relay = await relay_factory(base_config(tmp_path), paused=True)
    host, port = relay.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(HEAD + BODY[:10])
    await writer.drain()
    await eventually(lambda: relay.relay.webhook.handling == 1, what="the request in flight")
    stopping = asyncio.create_task(relay.stop())
    await eventually(lambda: not relay.relay.webhook.accepting, what="the relay stopping")
    assert not stopping.done()
    writer.write(BODY[10:])
    await writer.drain()
    status, headers, answer = await _answer(reader)
    assert status.startswith(b"HTTP/1.1 200 ") and answer["ok"] is True
    assert headers["connection"] == "close"
    assert await asyncio.wait_for(reader.read(), 15) == b""  # closed by the relay after the answer
    writer.close()
    await asyncio.wait_for(stopping, 15)
    assert [str(r.id) for r in await outbox_rows(tmp_path / "outbox.db")] == answer["ids"]


async def test_pipelined_request_behind_the_last_answer_gets_no_byte(
    tmp_path: Path, relay_factory: Any
) -> None:
    """A request pipelined behind one in progress at stop: the first is answered with
    Connection: close, the second is not taken and gets no byte of an answer (the case a
    client retries, README "Shutdown"), and nothing of it is stored."""
    relay = await relay_factory(base_config(tmp_path), paused=True)
    host, port = relay.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(HEAD + BODY[:10])
    await writer.drain()
    await eventually(lambda: relay.relay.webhook.handling == 1, what="the request in flight")
    stopping = asyncio.create_task(relay.stop())
    await eventually(lambda: not relay.relay.webhook.accepting, what="the relay stopping")
    writer.write(BODY[10:] + HEAD + BODY)
    await writer.drain()
    status, headers, _ = await _answer(reader)
    assert status.startswith(b"HTTP/1.1 200 ") and headers["connection"] == "close"
    assert await asyncio.wait_for(reader.read(), 15) == b""  # nothing of an answer to the second one
    writer.close()
    await asyncio.wait_for(stopping, 15)
    assert len(await outbox_rows(tmp_path / "outbox.db")) == 1  # the second was never taken


async def test_quiet_kept_alive_connections_are_closed_without_waiting_for_the_timeout(
    tmp_path: Path, relay_factory: Any
) -> None:
    """Idle kept-alive connections do not hold the stop for server.shutdown_timeout (60 s
    here): each is closed (EOF, no bytes) once quiet, and stop ends."""
    doc = base_config(tmp_path, server={"shutdown_timeout": "60s", "header_timeout": "60s"})
    relay = await relay_factory(doc, paused=True)
    host, port = relay.url.removeprefix("http://").rsplit(":", 1)
    conns = [await asyncio.open_connection(host, int(port)) for _ in range(3)]
    for reader, writer in conns:
        writer.write(HEAD + BODY)
        await writer.drain()
        status, headers, _ = await _answer(reader)
        assert status.startswith(b"HTTP/1.1 200 ") and "connection" not in headers
    await asyncio.wait_for(relay.stop(), 15)
    for reader, writer in conns:
        assert await asyncio.wait_for(reader.read(), 15) == b""
        writer.close()
    assert len(await outbox_rows(tmp_path / "outbox.db")) == 3
