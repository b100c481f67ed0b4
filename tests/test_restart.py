"""Restarts under socket activation lose no request: kept-alive clients posting without a
pause across two restarts all get 200, and every accepted message is delivered once.

The test holds the listening socket across the restarts, as systemd's socket unit does,
and hands it to each relay process as fd 3 with ``LISTEN_FDS``/``LISTEN_PID``. The clients
do what the README asks of a client: a post whose connection closed before any byte of an
answer is sent again with the same ``Idempotency-Key``.
"""

from __future__ import annotations

import asyncio
import signal
import socket
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from tests.helpers import AUTH, base_config, eventually, write_config
from tests.process import RelayProcess

CLIENTS = 4
RESTARTS = 2


@pytest.fixture
def held_socket() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    yield sock
    sock.close()


class Clients:
    """``CLIENTS`` pooled clients, one kept-alive connection each, posting back to back."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.acked: dict[str, list[str]] = {}  # Idempotency-Key: the ids answered
        self.statuses: Counter[int] = Counter()
        self.retried = 0  # posts sent again after a connection closed before any answer byte
        self.closing = 0  # answers with Connection: close (given while a relay drains)
        self.stop = asyncio.Event()

    async def run(self, i: int) -> None:
        # A bound on every post, so that a relay that stopped answering fails the test.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1),
                                         timeout=aiohttp.ClientTimeout(total=30)) as session:
            n = 0
            while not self.stop.is_set():
                key = f"client{i}-{n}"
                body = {"Type": 1, "Data": {"Mobiles": [f"1390{i:03d}{n % 10000:04d}"],
                                            "Message": f"post {key}"}}
                self.acked[key] = await self.post(session, body, key)
                n += 1

    async def post(self, session: aiohttp.ClientSession, body: object, key: str) -> list[str]:
        for _ in range(10):
            try:
                async with session.post(self.url, json=body,
                                        headers={**AUTH, "Idempotency-Key": key}) as r:
                    self.statuses[r.status] += 1
                    self.closing += r.headers.get("Connection", "").lower() == "close"
                    answer = orjson.loads(await r.read())
                    if r.status != 200:
                        return []
                    ids: list[str] = answer["ids"]
                    return ids
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientConnectionResetError,
                    aiohttp.ClientOSError):
                self.retried += 1  # no byte of an answer: safe to send again, same key
        raise AssertionError(f"{key}: no answer in 10 attempts")


async def test_kept_alive_clients_posting_across_restarts_lose_nothing(
    tmp_path: Path, held_socket: socket.socket
) -> None:
    """Two SIGTERM-and-start cycles on one held socket while 4 kept-alive clients post:
    every post is answered 200 (none 5xx), answers during the drains say Connection: close,
    every process exits 0, and each accepted message is delivered exactly once."""
    config = write_config(tmp_path, base_config(tmp_path, server={"shutdown_timeout": "5s"}))
    host, port = held_socket.getsockname()[:2]
    clients = Clients(f"http://{host}:{port}/sms/webhook")
    procs = [await RelayProcess(config, listen=held_socket).start()]
    try:
        await _run(tmp_path, clients, procs, config, held_socket)
    finally:
        await procs[-1].stop()  # only if a check failed: the last relay was stopped already


async def _run(tmp_path: Path, clients: Clients, procs: list[RelayProcess], config: Path,
               held_socket: socket.socket) -> None:
    posting = [asyncio.create_task(clients.run(i)) for i in range(CLIENTS)]

    async def flowing() -> None:
        """100 more answers; a client that failed meanwhile says why."""
        count = len(clients.acked)

        def more() -> bool:
            for task in posting:
                if task.done():
                    task.result()
            return len(clients.acked) >= count + 100

        await eventually(more, what="posts flowing")

    try:
        for _ in range(RESTARTS):
            await flowing()
            procs[-1].signal(signal.SIGTERM)
            assert await procs[-1].wait() == 0
            assert "inherited_socket=yes" in procs[-1].text()
            procs.append(await RelayProcess(config, listen=held_socket).start())
        await flowing()
    finally:
        clients.stop.set()
        _, late = await asyncio.wait(posting, timeout=60)
        for task in late:
            task.cancel()
    for task in posting:
        task.result()  # a client that failed says why
    print(f"posts {len(clients.acked)}, retried {clients.retried}, "
          f"answered with Connection: close {clients.closing}")
    assert set(clients.statuses) == {200}, clients.statuses
    assert clients.closing >= 1  # the drains served requests rather than dropping them
    ids = [i for answer in clients.acked.values() for i in answer]
    assert len(ids) == len(set(ids)) == len(clients.acked)
    sent = tmp_path / "sent.jsonl"

    def delivered() -> Counter[str]:
        lines = sent.read_bytes().splitlines() if sent.exists() else []
        return Counter(orjson.loads(line)["id"] for line in lines)

    await eventually(lambda: set(delivered()) >= set(ids), what="every accepted message delivered")
    procs[-1].signal(signal.SIGTERM)
    assert await procs[-1].wait() == 0
    twice = [i for i, n in delivered().items() if n > 1]
    assert not twice, f"delivered more than once: {twice[:5]}"
