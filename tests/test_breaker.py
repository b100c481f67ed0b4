"""The per-provider circuit breaker: opens after consecutive transient failures, the route
fails over past it, a probe after the cool-off closes it; visible in /readyz and /metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp

from hapsms_relay.outbox import State
from tests.fakes import FakeAPI, Recorded, Reply
from tests.helpers import base_config, eventually, outbox_rows, outbox_states


def providers(api: FakeAPI) -> list[dict[str, Any]]:
    return [{"name": n, "type": "http", "url": f"{api.url}/{n}",
             "body": {"to": "{to}", "text": "{message}"}} for n in ("a", "b")]


async def readyz(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url + "/readyz") as r:
        body: dict[str, Any] = await r.json()
        return body


async def test_breaker_opens_fails_over_and_closes(tmp_path: Path, relay_factory, session,
                                                   fake_api: FakeAPI, caplog) -> None:
    """Three 500s open a's circuit; b carries the rest without a being called; a probe closes it."""
    healthy = {"a": False}

    def respond(rec: Recorded) -> Reply:
        return Reply() if rec.path == "/b" or healthy["a"] else Reply(500, {"error": "down"})

    fake_api.respond = respond
    doc = base_config(tmp_path, providers=providers(fake_api), routes={"sms": ["a", "b"]},
                      breaker={"failures": 3, "cool_off": "500ms"})
    relay = await relay_factory(doc)

    def calls(path: str) -> int:
        return sum(1 for r in fake_api.requests if r.path == path)

    for i in range(3):  # one at a time: each fails on a, then goes through b
        assert (await relay.post(session, {"Type": 1, "Data": {"Mobiles": [f"1380013800{i}"],
                                                              "Message": "m"}}))[0] == 200
        await eventually(lambda i=i: calls("/b") == i + 1, what=f"message {i} through b")
    assert calls("/a") == 3
    body = await readyz(session, relay.url)
    assert body["circuits"]["a"] == "open" and body["circuits"]["b"] == "closed"
    assert relay.relay.dispatcher.activity.circuits == {"a": "open"}
    assert "circuit_open provider=a failures=3" in caplog.text
    async with session.get(relay.url + "/metrics") as r:
        assert 'hapsms_relay_circuit_state{provider="a"} 1.0' in await r.text()

    for i in range(3, 6):  # open: a is skipped, b sends at once
        assert (await relay.post(session, {"Type": 1, "Data": {"Mobiles": [f"1380013800{i}"],
                                                              "Message": "m"}}))[0] == 200
    await eventually(lambda: calls("/b") == 6, what="three more through b")
    assert calls("/a") == 3

    healthy["a"] = True
    await eventually(lambda: _half_open(relay), what="the cool-off to pass")
    assert (await relay.post(session, {"Type": 1, "Data": {"Mobiles": ["13800138009"],
                                                          "Message": "m"}}))[0] == 200
    await eventually(lambda: calls("/a") == 4, what="the probe through a")
    await eventually(lambda: relay.relay.dispatcher.breakers.state("a") == "closed",
                     what="the circuit to close")
    assert (await readyz(session, relay.url))["circuits"]["a"] == "closed"
    assert relay.relay.dispatcher.activity.circuits == {}
    assert "circuit_closed provider=a" in caplog.text


def _half_open(relay: Any) -> bool:
    return bool(relay.relay.dispatcher.breakers.state("a") == "half_open")


async def test_failed_probe_reopens(tmp_path: Path, relay_factory, session, fake_api: FakeAPI) -> None:
    """With a single provider, an open circuit holds messages back; a failed probe reopens it,
    and the message is delivered once the provider recovers."""
    state = {"ok": False}
    fake_api.respond = lambda rec: Reply() if state["ok"] else Reply(503, {"error": "busy"})
    doc = base_config(tmp_path, providers=providers(fake_api)[:1], routes={"sms": ["a"]},
                      breaker={"failures": 2, "cool_off": "300ms"},
                      queue={"retry_base": "10ms", "retry_max": "50ms"})
    relay = await relay_factory(doc)
    assert (await relay.post(session, {"Type": 1, "Data": {"Mobiles": ["13800138000"],
                                                          "Message": "m"}}))[0] == 200
    breakers = relay.relay.dispatcher.breakers
    await eventually(lambda: breakers.state("a") != "closed", what="the circuit to open")
    await eventually(lambda: len(fake_api.requests) >= 3, what="a failed probe")
    assert breakers.state("a") != "closed"
    state["ok"] = True
    await eventually(lambda: len(fake_api.accepted) == 1, what="delivery after recovery")
    await eventually(lambda: breakers.state("a") == "closed", what="closed")


async def test_message_dead_behind_an_open_circuit_keeps_the_providers_failure(
        tmp_path: Path, relay_factory, session, fake_api: FakeAPI) -> None:
    """A message whose only provider's circuit stayed open past its TTL is dead with a reason
    that names the open circuit and the provider's own last failure."""
    fake_api.respond = lambda rec: Reply(503, "maintenance")
    doc = base_config(tmp_path, providers=providers(fake_api)[:1], routes={"sms": ["a"]},
                      breaker={"failures": 2, "cool_off": "10s"},
                      queue={"ttl": "400ms", "retry_base": "20ms", "retry_max": "50ms"})
    relay = await relay_factory(doc)
    assert (await relay.post(session, {"Type": 1, "Data": {"Mobiles": ["13800138000"],
                                                          "Message": "m"}}))[0] == 200
    async def dead() -> bool:
        return await outbox_states(tmp_path / "outbox.db") == [State.DEAD]

    await eventually(dead, what="the entry dead")
    (row,) = await outbox_rows(tmp_path / "outbox.db")
    assert "circuit_open" in row.error and "http_503: maintenance" in row.error
    assert len(fake_api.requests) == 2  # the open circuit kept the provider from more calls
