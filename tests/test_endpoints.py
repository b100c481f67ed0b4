"""/healthz, /readyz and /metrics; and the group commit: every 200 is on disk already."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from hapsms_relay import __version__
from hapsms_relay.clock import ManualClock
from tests import docs
from tests.fakes import FakeAPI, Reply
from tests.helpers import (
    AUTH,
    SMS_BODY,
    VOICE_BODY,
    base_config,
    eventually,
    http_provider,
    outbox_rows,
)


async def test_healthz_and_readyz(tmp_path: Path, relay_factory: Any,
                                  session: aiohttp.ClientSession) -> None:
    """/healthz answers while the process serves; /readyz names the node and lists
    providers, their circuits and the undelivered count; /metrics names the node and the
    version in hapsms_relay_info."""
    relay = await relay_factory(base_config(tmp_path, queue={"node": "relay-a"}), paused=True)
    for method in ("GET", "HEAD"):
        async with session.request(method, relay.url + "/healthz") as r:
            assert r.status == 200
    assert (await relay.post(session, SMS_BODY))[0] == 200
    async with session.get(relay.url + "/readyz") as r:
        assert r.status == 200
        assert await r.json() == {"ok": True, "node": "relay-a", "accepting": True,
                                  "storage": "ok", "undelivered": 1,
                                  "providers": ["dev"], "circuits": {"dev": "closed"}}
    m = await _metrics(session, relay.url)
    assert m[("hapsms_relay_info", (("node", "relay-a"), ("version", __version__)))] == 1
    assert [k for k in m if k[0] == "hapsms_relay_info"] == [
        ("hapsms_relay_info", (("node", "relay-a"), ("version", __version__)))]


async def _metrics(session: aiohttp.ClientSession, url: str) -> dict[tuple[str, tuple[Any, ...]], float]:
    async with session.get(url + "/metrics") as r:
        assert r.status == 200 and r.content_type == "text/plain"
        text = await r.text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def test_metrics_count_what_happened(
    tmp_path: Path, relay_factory: Any, session: aiohttp.ClientSession, fake_api: FakeAPI
) -> None:
    """Every metric docs/operations.md lists exists and counts requests, accepted, delivered, retried
    and dead messages, provider calls and the queue depth."""
    fake_api.script.append(Reply(500, "once"))
    doc = base_config(tmp_path, providers=[http_provider("api", fake_api.url)],
                      routes={"sms": ["api"], "voice": ["api"]},
                      queue={"retry_base": "10ms", "retry_max": "20ms"})
    relay = await relay_factory(doc)
    two = {"Type": 1, "Data": {"Mobiles": ["13800138000", "13800138001"], "Message": "m"}}
    assert (await relay.post(session, two))[0] == 200
    await eventually(lambda: len(fake_api.accepted) == 2, what="two delivered")
    fake_api.script.append(Reply(400, "no"))
    assert (await relay.post(session, VOICE_BODY))[0] == 200
    assert (await relay.post(session, {"Type": 9}))[0] == 400
    assert (await relay.post(session, SMS_BODY, {"Authorization": "Bearer wrong"}))[0] == 401
    await eventually(lambda: relay.relay.outbox.undelivered == 0, what="the voice code dead")
    async with session.get(relay.url + "/healthz"):
        pass  # probes are not counted

    m = await _metrics(session, relay.url)
    assert m[("hapsms_relay_requests_total", (("status", "200"),))] == 2
    assert m[("hapsms_relay_requests_total", (("status", "400"),))] == 1
    assert m[("hapsms_relay_requests_total", (("status", "401"),))] == 1
    assert m[("hapsms_relay_messages_accepted_total", (("type", "sms"),))] == 2
    assert m[("hapsms_relay_messages_accepted_total", (("type", "voice"),))] == 1
    api_sms = (("provider", "api"), ("type", "sms"))
    assert m[("hapsms_relay_messages_sent_total", api_sms)] == 2
    # the name before receipts, kept for one release, counts the same
    assert m[("hapsms_relay_messages_delivered_total", api_sms)] == 2
    assert m[("hapsms_relay_segments_total", (("provider", "api"),))] == 2
    assert m[("hapsms_relay_messages_retried_total", api_sms)] == 1
    assert m[("hapsms_relay_messages_dead_total", (("provider", "api"), ("type", "voice")))] == 1
    assert m[("hapsms_relay_provider_latency_seconds_count", (("provider", "api"),))] == 4
    assert m[("hapsms_relay_queue_depth", ())] == 0
    assert sum(v for (name, _), v in m.items() if name == "hapsms_relay_requests_total") == 4


async def test_oldest_age_is_how_long_the_oldest_message_waits(
    tmp_path: Path, relay_factory: Any, session: aiohttp.ClientSession, fake_api: FakeAPI
) -> None:
    """hapsms_relay_queue_oldest_age_seconds is how long the oldest message not yet sent has
    waited, by the relay's clock at the scrape: 0 with none, growing while one waits for a
    provider that refuses it, 0 again once it is sent."""
    up = {"ok": False}
    fake_api.respond = lambda rec: Reply() if up["ok"] else Reply(503, {"error": "busy"})
    clock = ManualClock()
    doc = base_config(tmp_path, providers=[http_provider("api", fake_api.url)],
                      routes={"sms": ["api"]}, breaker={"failures": 0},
                      queue={"retry_base": "20s", "retry_max": "20s"})
    relay = await relay_factory(doc, clock=clock)
    age, depth = ("hapsms_relay_queue_oldest_age_seconds", ()), ("hapsms_relay_queue_depth", ())
    assert (await _metrics(session, relay.url))[age] == 0
    assert (await relay.post(session, SMS_BODY))[0] == 200
    await eventually(lambda: len(fake_api.requests) == 1, what="the first attempt")
    await relay.caught_up()
    assert (await _metrics(session, relay.url))[age] == 0  # accepted just now
    clock.advance(45)
    m = await _metrics(session, relay.url)
    assert (m[age], m[depth]) == (45, 1)
    await relay.caught_up()  # retried (and refused) meanwhile: it still waits
    clock.advance(30)
    assert (await _metrics(session, relay.url))[age] == 75
    up["ok"] = True
    for _ in range(10):  # until its retry is due
        await relay.caught_up()
        if fake_api.accepted:
            break
        clock.advance(5)
    await eventually(lambda: relay.relay.outbox.undelivered == 0, what="the message sent")
    m = await _metrics(session, relay.url)
    assert (m[age], m[depth]) == (0, 0)


async def test_docs_list_the_metrics_there_are(
    tmp_path: Path, relay_factory: Any, session: aiohttp.ClientSession
) -> None:
    """The metric names in docs/operations.md's Metrics section are the ones /metrics exposes."""
    section = docs.section(docs.page("docs/operations.md"), "Metrics")
    documented = set(re.findall(r"`(hapsms_relay_[a-z_]+)", section))
    relay = await relay_factory(base_config(tmp_path))
    async with session.get(relay.url + "/metrics") as r:
        families = {f.name for f in text_string_to_metric_families(await r.text())}
    exposed = {f + "_total" if f + "_total" in documented else f for f in families}
    assert documented == exposed


async def test_group_commit_answers_only_what_is_on_disk(
    tmp_path: Path, relay_factory: Any, session: aiohttp.ClientSession
) -> None:
    """Many concurrent posts all get 200, and at the moment each 200 arrives its rows are
    already committed: another connection reading the file finds them."""
    relay = await relay_factory(base_config(tmp_path), paused=True)
    db = tmp_path / "outbox.db"
    reader = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    missing: list[str] = []

    async def post(i: int) -> list[str]:
        body = {"Type": 1, "Data": {"Mobiles": [f"1390000{i:04d}", f"1370000{i:04d}"],
                                    "Message": f"m{i}"}}
        async with session.post(relay.webhook_url, json=body, headers=AUTH) as r:
            assert r.status == 200
            ids: list[str] = (await r.json())["ids"]
        # at once, before anything else runs on this loop: the rows must be readable
        for i in ids:
            if reader.execute("SELECT 1 FROM messages WHERE id = ?", (int(i),)).fetchone() is None:
                missing.append(i)
        return ids

    with contextlib.closing(reader):
        answers = await asyncio.gather(*(post(i) for i in range(300)))
    assert not missing
    ids = {i for a in answers for i in a}
    assert len(ids) == 600
    assert {str(r.id) for r in await outbox_rows(db)} == ids
