"""Relay processes sharing one PostgreSQL: under load, ``kill -9`` of one relay after another
and an immediate restart of PostgreSQL itself lose nothing that was acknowledged; posts
spread over the relays at once meet one daily budget and one ``queue.max_pending``."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.fakes import FakeAPI
from tests.helpers import AUTH, TOKEN, base_config, eventually, http_provider, write_config
from tests.pg_server import PostgresServer
from tests.process import RelayProcess, run_cli


def cluster_config(tmp_path: Path, url: str, api: FakeAPI, node: str,
                   queue: dict[str, Any] | None = None, **sections: Any) -> Path:
    doc = base_config(
        tmp_path, queue={"backend": "postgres", "url": url, "node": node, "lease": "2s",
                         "retry_base": "50ms", "retry_max": "200ms", **(queue or {})},
        providers=[http_provider("api", api.url, concurrency=8)], routes={"sms": ["api"]},
        server={"listen": "127.0.0.1:0", "tokens": [TOKEN]}, **sections)
    doc["queue"].pop("path")
    return write_config(tmp_path, doc, f"{node}.toml")


@pytest.fixture
async def spawn() -> AsyncIterator[Callable[..., Any]]:
    started: list[RelayProcess] = []

    async def start(config: Path, **kwargs: Any) -> RelayProcess:
        relay = await RelayProcess(config, **kwargs).start()
        started.append(relay)
        return relay

    yield start
    for r in started:
        await r.stop()


class Load:
    """Posts one body after another to whichever relays are up; what got a 200 is kept."""

    def __init__(self, session: aiohttp.ClientSession, relays: list[RelayProcess]) -> None:
        self.session = session
        self.relays = relays
        self.acked: list[str] = []
        self.refused: Counter[int | str] = Counter()
        self.sent = 0

    async def run(self, count: int, concurrency: int = 8) -> None:
        queue = iter(range(count))

        async def worker() -> None:
            for i in queue:
                relay = self.relays[i % len(self.relays)]
                body = {"Type": 1, "Data": {"Mobiles": [f"1390{i:07d}"], "Message": f"m{i}"}}
                self.sent += 1
                try:
                    async with self.session.post(relay.url + "/sms/webhook", json=body,
                                                 headers=AUTH) as r:
                        if r.status == 200:
                            self.acked.extend((await r.json())["ids"])
                        else:
                            self.refused[r.status] += 1
                except (aiohttp.ClientError, ValueError):  # a relay killed mid-request
                    self.refused["connection"] += 1
                await asyncio.sleep(0.002)  # a steady stream, not a burst

        await asyncio.gather(*(worker() for _ in range(concurrency)))


def _refs(api: FakeAPI) -> Counter[str]:
    return Counter(r.json()["ref"] for r in api.accepted)


async def test_three_relays_survive_kill_9_repeatedly(
    tmp_path: Path, pg_url: str, spawn: Callable[..., Any], fake_api: FakeAPI,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Three relays on one database under load; one after another is killed with SIGKILL and
    started again. Every acknowledged message reaches the provider; only what was in flight
    at a crash may arrive twice (the count is reported)."""
    fake_api.delay = 0.02
    configs = [cluster_config(tmp_path, pg_url, fake_api, f"node{n}") for n in range(3)]
    relays = [await spawn(c) for c in configs]
    async with aiohttp.ClientSession() as session:
        load = Load(session, relays)
        posting = asyncio.create_task(load.run(600))
        for victim in range(3):
            floor = len(fake_api.accepted) + 20
            await eventually(lambda floor=floor: len(fake_api.accepted) >= floor or posting.done(),
                             timeout=60, what="deliveries under way")
            relays[victim].signal(signal.SIGKILL)
            assert await relays[victim].wait() == -signal.SIGKILL
            relays[victim] = await spawn(configs[victim])  # the same node, a new process
        await posting
    assert len(load.acked) >= 300, (load.acked[:5], load.refused)
    await eventually(lambda: set(load.acked) <= set(_refs(fake_api)), timeout=90,
                     what="every acknowledged message delivered")
    refs = _refs(fake_api)
    twice = sum(n - 1 for n in refs.values() if n > 1)
    with capsys.disabled():
        print(f"\n  kill -9 x3: {len(load.acked)} acknowledged, {sum(refs.values())} deliveries, "
              f"{twice} duplicates, refused {dict(load.refused)}")
    # a duplicate was in flight on a killed relay: at most what it had claimed (queue.workers)
    assert twice <= 3 * 64


async def test_postgres_restart_immediate_under_load(
    tmp_path: Path, pg_server: PostgresServer, pg_url: str, spawn: Callable[..., Any],
    fake_api: FakeAPI, capsys: pytest.CaptureFixture[str],
) -> None:
    """PostgreSQL restarted with ``-m immediate`` under load: posts get 503 while it is down,
    /readyz says not ready, the relays recover without a restart and every acknowledged
    message is delivered."""
    configs = [cluster_config(tmp_path, pg_url, fake_api, f"node{n}") for n in range(2)]
    relays = [await spawn(c) for c in configs]
    async with aiohttp.ClientSession() as session:
        load = Load(session, relays)
        posting = asyncio.create_task(load.run(800, concurrency=4))
        await eventually(lambda: len(load.acked) >= 100, what="posts acknowledged")
        await asyncio.to_thread(pg_server.stop, "immediate")
        try:
            await eventually(lambda: load.refused[503] >= 5, what="503 while the database is down")

            async def not_ready() -> bool:
                async with session.get(relays[0].url + "/readyz") as r:
                    return r.status == 503
            await eventually(not_ready, what="/readyz not ready")
        finally:
            await asyncio.to_thread(pg_server.start)
        await posting

        async def ready() -> bool:
            async with session.get(relays[1].url + "/readyz") as r:
                return r.status == 200
        await eventually(ready, timeout=30, what="/readyz ready again")
        for relay in relays:  # both reconnected by themselves

            async def accepts(relay: RelayProcess = relay) -> bool:
                body = {"Type": 1, "Data": {"Mobiles": ["13700137000"], "Message": "back"}}
                async with session.post(relay.url + "/sms/webhook", json=body, headers=AUTH) as r:
                    if r.status == 200:
                        load.acked.extend((await r.json())["ids"])
                    return r.status == 200
            await eventually(accepts, timeout=30, what="accepting again")
        after = Load(session, relays)
        await after.run(100, concurrency=4)
        assert len(after.acked) == 100 and not after.refused
        load.acked += after.acked
    assert all(r.proc is not None and r.proc.returncode is None for r in relays)
    await eventually(lambda: set(load.acked) <= set(_refs(fake_api)), timeout=90,
                     what="every acknowledged message delivered")
    with capsys.disabled():
        print(f"\n  pg restart: {len(load.acked)} acknowledged, refused {dict(load.refused)}, "
              f"{sum(_refs(fake_api).values())} deliveries")


async def _post_spread(session: aiohttp.ClientSession, relays: list[RelayProcess],
                       count: int) -> tuple[list[str], Counter[tuple[int, str]]]:
    """``count`` one-number bodies posted at once, spread over the relays in turn: the ids
    acknowledged, and the other answers by (status, error)."""
    async def post(i: int) -> tuple[int, dict[str, Any]]:
        body = {"Type": 1, "Data": {"Mobiles": [f"1390{i:07d}"], "Message": f"m{i}"}}
        async with session.post(relays[i % len(relays)].url + "/sms/webhook", json=body,
                                headers=AUTH) as r:
            return r.status, await r.json()

    acked: list[str] = []
    other: Counter[tuple[int, str]] = Counter()
    for status, answer in await asyncio.gather(*(post(i) for i in range(count))):
        if status == 200:
            acked += answer["ids"]
        else:
            other[status, answer["error"]] += 1
    return acked, other


async def test_max_pending_holds_across_relays(
    tmp_path: Path, pg_url: str, spawn: Callable[..., Any], fake_api: FakeAPI,
) -> None:
    """queue.max_pending = 20 on three relays (delivery paused): 60 posts at once, spread over
    them, store exactly 20 in total; the other 40 get 503 queue_full, as does every relay
    afterwards."""
    relays = [await spawn(cluster_config(tmp_path, pg_url, fake_api, f"node{n}",
                                         queue={"max_pending": 20}), paused=True)
              for n in range(3)]
    async with aiohttp.ClientSession() as session:
        acked, other = await _post_spread(session, relays, 60)
        assert len(set(acked)) == 20 and other == {(503, "queue_full"): 40}
        late, other = await _post_spread(session, relays, 3)
        assert late == [] and other == {(503, "queue_full"): 3}
    code, out, _ = await run_cli("queue", "stats", "--config", str(tmp_path / "node0.toml"))
    assert code == 0 and out.startswith("pending 20\n")


async def test_daily_budget_holds_across_relays(
    tmp_path: Path, pg_url: str, spawn: Callable[..., Any], fake_api: FakeAPI,
) -> None:
    """limits.daily_budget = 10 with over_budget = "refuse" on three relays: 40 posts at once
    spread over them, the provider gets exactly 10 messages in total, the rest are dead as
    over budget, and soon every relay answers new posts 429 and shows no budget left."""
    fake_api.delay = 0.01  # sends overlap across the relays
    relays = [await spawn(cluster_config(tmp_path, pg_url, fake_api, f"node{n}",
                                         limits={"daily_budget": 10, "over_budget": "refuse"}))
              for n in range(3)]
    async with aiohttp.ClientSession() as session:
        acked, other = await _post_spread(session, relays, 40)
        assert len(acked) >= 10 and set(other) <= {(429, "rate_limited")}
        path = str(tmp_path / "node0.toml")

        async def settled() -> bool:
            code, out, _ = await run_cli("queue", "stats", "--config", path)
            counts = dict(line.split(" ", 1) for line in out.splitlines())
            return code == 0 and int(counts["sent"]) + int(counts["dead"]) == len(acked)

        await eventually(settled, timeout=30, what="every acknowledged message sent or dead")
        assert len(fake_api.accepted) == 10
        code, out, _ = await run_cli("queue", "list", "--dead", "--json", "--limit", "100",
                                     "--config", path)
        assert code == 0
        dead = [orjson.loads(line) for line in out.splitlines()]
        assert len(dead) == len(acked) - 10
        assert all("daily budget used up" in d["error"] for d in dead)
        for relay in relays:

            async def refused(relay: RelayProcess = relay) -> bool:
                _, other = await _post_spread(session, [relay], 1)
                return other == {(429, "rate_limited"): 1}

            await eventually(refused, what="429 once the budget is used up elsewhere too")
            async with session.get(relay.url + "/metrics") as r:
                assert 'hapsms_relay_budget_remaining{provider="all"} 0.0' in await r.text()
