"""The relay as a subprocess: nothing acknowledged is lost to ``kill -9``, and SIGTERM
finishes requests in flight, keeps the undelivered, and exits 0."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from hapsms_relay.outbox import State
from tests.fakes import FakeAPI
from tests.helpers import (
    TOKEN,
    base_config,
    eventually,
    http_provider,
    outbox_rows,
    outbox_states,
    write_config,
)
from tests.process import RelayProcess

ENV = {"HAPSMS_TEST_TOKEN": TOKEN}
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def spawn() -> AsyncIterator[Callable[..., Any]]:
    procs: list[RelayProcess] = []

    async def start(config: Path, **kwargs: Any) -> RelayProcess:
        p = RelayProcess(config, env=ENV, **kwargs)
        procs.append(p)
        return await p.start()

    yield start
    for p in procs:
        await p.stop()


def _config(tmp_path: Path, api: FakeAPI, **sections: Any) -> Path:
    doc = base_config(
        tmp_path,
        server={"tokens": [{"env": "HAPSMS_TEST_TOKEN"}], "shutdown_timeout": "2s",
                **sections.pop("server", {})},
        providers=[http_provider("api", api.url, **sections.pop("provider", {}))],
        routes={"sms": ["api"]}, **sections,
    )
    return write_config(tmp_path, doc)


def _body(i: int) -> dict[str, Any]:
    return {"Type": 1, "Data": {"Mobiles": [f"1390000{i:04d}"], "Message": f"message {i}"}}


def _refs(api: FakeAPI) -> set[str]:
    return {r.json()["ref"] for r in api.accepted}


async def test_kill_9_loses_nothing_acknowledged(
    tmp_path: Path, spawn: Callable[..., Any], fake_api: FakeAPI
) -> None:
    """Posts are acknowledged while a slow provider delivers; after ``kill -9`` and a restart
    every message that got a 200 reaches the provider at least once."""
    fake_api.delay = 0.05
    config = _config(tmp_path, fake_api, provider={"concurrency": 4})
    relay = await spawn(config)
    acked: list[str] = []
    refused = 0

    async def post_all(session: aiohttp.ClientSession) -> None:
        nonlocal refused
        sem = asyncio.Semaphore(16)

        async def one(i: int) -> None:
            nonlocal refused
            async with sem:
                try:
                    async with session.post(relay.url + "/sms/webhook", json=_body(i),
                                            headers=AUTH) as r:
                        if r.status == 200:
                            acked.extend((await r.json())["ids"])
                        else:
                            refused += 1
                except aiohttp.ClientError:
                    refused += 1  # the relay was killed mid-request: not acknowledged

        await asyncio.gather(*(one(i) for i in range(400)))

    async with aiohttp.ClientSession() as session:
        posting = asyncio.create_task(post_all(session))
        await eventually(lambda: len(fake_api.accepted) >= 30, what="deliveries under way")
        relay.signal(signal.SIGKILL)
        assert await relay.wait() == -signal.SIGKILL
        await posting
    delivered_before = _refs(fake_api)
    assert len(acked) >= 30 and len(acked) + refused == 400
    assert not set(acked) <= delivered_before, "the kill came too late to test anything"

    fake_api.delay = 0
    relay = await spawn(config)
    await eventually(lambda: set(acked) <= _refs(fake_api), timeout=60,
                     what="every acknowledged message delivered after the restart")
    # what was committed but not acknowledged (killed before the answer) is delivered too
    async def all_delivered() -> bool:
        return set(await outbox_states(tmp_path / "outbox.db")) == {State.SENT}

    await eventually(all_delivered, what="the whole outbox delivered")
    relay.signal(signal.SIGTERM)
    assert await relay.wait() == 0


async def test_sigterm_finishes_requests_keeps_undelivered_and_exits_0(
    tmp_path: Path, spawn: Callable[..., Any], fake_api: FakeAPI
) -> None:
    """On SIGTERM a request in flight is answered 200 and stored, new connections are
    refused, the process exits 0, undelivered entries stay pending (none left in flight),
    and they are delivered after the restart."""
    fake_api.delay = 0.5
    config = _config(tmp_path, fake_api, provider={"concurrency": 1})
    relay = await spawn(config)
    host, port = relay.address.rsplit(":", 1)
    async with aiohttp.ClientSession() as session:
        acked = []
        for i in range(10):
            async with session.post(relay.url + "/sms/webhook", json=_body(i), headers=AUTH) as r:
                assert r.status == 200
                acked += (await r.json())["ids"]
        await eventually(lambda: len(fake_api.requests) >= 1, what="a delivery in flight")

        # A request in flight: headers and half of the body sent before the SIGTERM.
        body = orjson.dumps(_body(99))
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"POST /sms/webhook HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {TOKEN}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body[:10]
        )
        await writer.drain()
        # A complete request on a second connection, answered after the first one's headers
        # were read: by then the first request's handler is running.
        async with session.get(relay.url + "/healthz") as r:
            assert r.status == 200

        relay.signal(signal.SIGTERM)
        await eventually(lambda: relay.saw("stopping"), what="the stopping line")

        async def refused() -> bool:
            try:
                async with session.get(relay.url + "/healthz",
                                       headers={"Connection": "close"}) as r:
                    return r.status == 503
            except aiohttp.ClientConnectionError:
                return True

        await eventually(refused, what="new connections refused")

        writer.write(body[10:])
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 "), head
        length = int(next(h.split(b":")[1] for h in head.split(b"\r\n")
                          if h.lower().startswith(b"content-length:")))
        answer = orjson.loads(await reader.readexactly(length))
        writer.close()
        acked += answer["ids"]

    assert await relay.wait() == 0
    assert relay.saw("stopped")
    rows = {str(r.id): r.state for r in await outbox_rows(tmp_path / "outbox.db")}
    assert set(rows) == set(acked)
    assert State.INFLIGHT not in rows.values()
    assert State.PENDING in rows.values()  # the slow provider could not take them all

    fake_api.delay = 0
    relay = await spawn(config)
    await eventually(lambda: set(acked) <= _refs(fake_api), what="the rest delivered after restart")
    relay.signal(signal.SIGTERM)
    assert await relay.wait() == 0
