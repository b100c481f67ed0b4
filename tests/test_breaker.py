"""The per-provider circuit breaker: opens after consecutive transient failures, the route
fails over past it, a probe after the cool-off closes it; visible in /readyz and /metrics,
which always agree. The relays run on a ManualClock: a cool-off passes when the test moves
the clock, never while a slow machine runs the test."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from hapsms_relay.breaker import CLOSED, HALF_OPEN, OPEN, BreakerConfig, Breakers, parse
from hapsms_relay.clock import ManualClock
from hapsms_relay.errors import ConfigError, PermanentError, TransientError, UnsupportedError
from hapsms_relay.metrics import Metrics
from hapsms_relay.outbox import State
from hapsms_relay.providers.base import Sent
from hapsms_relay.table import Table
from tests.fakes import FakeAPI, Recorded, Reply
from tests.helpers import base_config, eventually, outbox_rows, outbox_states


def providers(api: FakeAPI) -> list[dict[str, Any]]:
    return [{"name": n, "type": "http", "url": f"{api.url}/{n}",
             "body": {"to": "{to}", "text": "{message}"}} for n in ("a", "b")]


async def readyz(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url + "/readyz") as r:
        body: dict[str, Any] = await r.json()
        return body


async def circuit_gauge(session: aiohttp.ClientSession, url: str, provider: str) -> float:
    async with session.get(url + "/metrics") as r:
        text = await r.text()
    prefix = f'hapsms_relay_circuit_state{{provider="{provider}"}} '
    (line,) = [x for x in text.splitlines() if x.startswith(prefix)]
    return float(line.removeprefix(prefix))


async def circuit(session: aiohttp.ClientSession, url: str, provider: str) -> str:
    """The circuit's state as /readyz shows it, checked against /metrics' gauge."""
    state: str = (await readyz(session, url))["circuits"][provider]
    gauge = {"closed": 0.0, "open": 1.0, "half_open": 2.0}[state]
    assert await circuit_gauge(session, url, provider) == gauge, f"/metrics disagrees: {state}"
    return state


async def moving(relay: Any, clock: ManualClock, step: float, done: Callable[[], Any],
                 what: str) -> None:
    """Move the clock ``step`` at a time, letting the relay catch up after each move, until
    ``done()`` (at most 100 steps)."""
    for _ in range(100):
        await relay.caught_up()
        result = done()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        clock.advance(step)
    raise AssertionError(f"{what}: not reached after 100 steps of {step}s")


def sms(i: int) -> dict[str, Any]:
    return {"Type": 1, "Data": {"Mobiles": [f"1380013800{i}"], "Message": "m"}}


async def test_breaker_opens_fails_over_and_closes(tmp_path: Path, relay_factory, session,
                                                   fake_api: FakeAPI, caplog) -> None:
    """Three 500s open a's circuit; b carries the rest without a being called; once the
    cool-off has passed /readyz and /metrics both say half_open; a probe closes it."""
    healthy = {"a": False}

    def respond(rec: Recorded) -> Reply:
        return Reply() if rec.path == "/b" or healthy["a"] else Reply(500, {"error": "down"})

    fake_api.respond = respond
    clock = ManualClock(time.time())
    doc = base_config(tmp_path, providers=providers(fake_api), routes={"sms": ["a", "b"]},
                      breaker={"failures": 3, "cool_off": "30s"})
    relay = await relay_factory(doc, clock=clock)

    def calls(path: str) -> int:
        return sum(1 for r in fake_api.requests if r.path == path)

    assert await circuit(session, relay.url, "a") == "closed"
    for i in range(3):  # one at a time: each fails on a, then goes through b
        assert (await relay.post(session, sms(i)))[0] == 200
        await eventually(lambda i=i: calls("/b") == i + 1, what=f"message {i} through b")
    assert calls("/a") == 3
    assert await circuit(session, relay.url, "a") == "open"
    assert await circuit(session, relay.url, "b") == "closed"
    assert "circuit_open provider=a failures=3" in caplog.text

    clock.advance(29.9)  # not yet: a is still skipped, b sends at once
    for i in range(3, 6):
        assert (await relay.post(session, sms(i)))[0] == 200
    await eventually(lambda: calls("/b") == 6, what="three more through b")
    assert calls("/a") == 3
    assert await circuit(session, relay.url, "a") == "open"

    healthy["a"] = True
    clock.advance(0.1)  # the cool-off is over: both views say so before any probe
    assert await circuit(session, relay.url, "a") == "half_open"
    assert (await relay.post(session, sms(9)))[0] == 200
    await eventually(lambda: calls("/a") == 4, what="the probe through a")
    await eventually(lambda: relay.relay.dispatcher.breakers.state("a") == "closed",
                     what="the circuit to close")
    assert await circuit(session, relay.url, "a") == "closed"
    assert calls("/b") == 6
    assert "circuit_closed provider=a" in caplog.text


async def test_failed_probe_reopens(tmp_path: Path, relay_factory, session, fake_api: FakeAPI) -> None:
    """With a single provider, an open circuit holds messages back; a failed probe reopens it
    for a whole cool-off, and the message is delivered once the provider recovers."""
    state = {"ok": False}
    fake_api.respond = lambda rec: Reply() if state["ok"] else Reply(503, {"error": "busy"})
    clock = ManualClock(time.time())
    doc = base_config(tmp_path, providers=providers(fake_api)[:1], routes={"sms": ["a"]},
                      breaker={"failures": 2, "cool_off": "60s"},
                      queue={"retry_base": "10ms", "retry_max": "50ms"})
    relay = await relay_factory(doc, clock=clock)
    assert (await relay.post(session, sms(0)))[0] == 200
    await moving(relay, clock, 0.05, lambda: len(fake_api.requests) == 2, "a second failure")
    await eventually(lambda: relay.relay.dispatcher.breakers.state("a") == "open", what="open")
    assert await circuit(session, relay.url, "a") == "open"

    clock.advance(59)  # held back: no call during the cool-off
    await relay.caught_up()
    assert len(fake_api.requests) == 2
    await moving(relay, clock, 0.5, lambda: len(fake_api.requests) == 3, "the probe")
    await eventually(lambda: relay.relay.dispatcher.breakers.state("a") == "open", what="reopened")
    assert await circuit(session, relay.url, "a") == "open"  # a whole cool-off again

    state["ok"] = True
    clock.advance(59)
    await relay.caught_up()
    assert len(fake_api.requests) == 3
    await moving(relay, clock, 0.5, lambda: len(fake_api.accepted) == 1, "delivery after recovery")
    await eventually(lambda: relay.relay.dispatcher.breakers.state("a") == "closed", what="closed")
    assert await circuit(session, relay.url, "a") == "closed"


async def test_message_dead_behind_an_open_circuit_keeps_the_providers_failure(
        tmp_path: Path, relay_factory, session, fake_api: FakeAPI) -> None:
    """A message whose only provider's circuit stayed open past its TTL is dead with a reason
    that names the open circuit and the provider's own last failure."""
    fake_api.respond = lambda rec: Reply(503, "maintenance")
    clock = ManualClock(time.time())
    doc = base_config(tmp_path, providers=providers(fake_api)[:1], routes={"sms": ["a"]},
                      breaker={"failures": 2, "cool_off": "10s"},
                      queue={"ttl": "400ms", "retry_base": "20ms", "retry_max": "50ms"})
    relay = await relay_factory(doc, clock=clock)
    assert (await relay.post(session, sms(0)))[0] == 200

    async def dead() -> bool:
        return await outbox_states(tmp_path / "outbox.db") == [State.DEAD]

    await moving(relay, clock, 0.05, dead, "the entry dead")
    (row,) = await outbox_rows(tmp_path / "outbox.db")
    assert "circuit_open" in row.error and "http_503: maintenance" in row.error
    assert len(fake_api.requests) == 2  # the open circuit kept the provider from more calls


# -- the state machine, on a ManualClock --------------------------------------------------

SENT = Sent(("msg-1",), 1)
FAIL = TransientError("p", "http_500", "down")
REFUSED = PermanentError("p", "21211", "bad number")
CANNOT = UnsupportedError("p", "no_template", "no template matches")


def breakers(failures: int = 3, cool_off: float = 30.0) -> tuple[Breakers, ManualClock, Metrics]:
    clock, metrics = ManualClock(), Metrics()
    b = Breakers(BreakerConfig(failures, cool_off), metrics, clock)
    b.track(["p"])
    return b, clock, metrics


def gauge(metrics: Metrics, name: str = "p") -> float | None:
    value: float | None = metrics.registry.get_sample_value(
        "hapsms_relay_circuit_state", {"provider": name})
    return value


def test_opens_after_exactly_n_consecutive_transient_calls(caplog) -> None:
    """failures=3: two failed calls leave it closed, the third opens it (logged once)."""
    b, _, metrics = breakers()
    for _ in range(2):
        b.record("p", [FAIL])
        assert b.state("p") == CLOSED and b.allow("p") == 0.0 and gauge(metrics) == 0
    b.record("p", [FAIL])
    assert b.state("p") == OPEN and gauge(metrics) == 1
    assert b.allow("p") == 30.0
    assert caplog.text.count("circuit_open provider=p failures=3 cool_off_s=30.0") == 1


def test_an_answer_resets_the_count() -> None:
    """A delivery or a permanent refusal between failures starts the count again."""
    for answer in (SENT, REFUSED):
        b, _, _ = breakers()
        b.record("p", [FAIL])
        b.record("p", [FAIL])
        b.record("p", [answer])
        b.record("p", [FAIL])
        b.record("p", [FAIL])
        assert b.state("p") == CLOSED
        b.record("p", [FAIL])
        assert b.state("p") == OPEN


def test_what_counts_as_a_failed_call() -> None:
    """Only a call whose outcomes are all transient counts; one answer among them closes;
    messages the provider could not carry, or no outcome at all, say nothing."""
    b, _, _ = breakers(failures=1)
    b.record("p", [FAIL, SENT])
    b.record("p", [FAIL, REFUSED])
    b.record("p", [CANNOT])
    b.record("p", [FAIL, CANNOT])
    b.record("p", [])
    assert b.state("p") == CLOSED
    b.record("p", [FAIL, FAIL])
    assert b.state("p") == OPEN


def test_cool_off_then_one_probe_at_a_time() -> None:
    """While open, allow() says how long is left; after the cool-off it lets one probe go,
    and holds others back until the probe's outcome or another cool-off."""
    b, clock, metrics = breakers(failures=1, cool_off=30.0)
    b.record("p", [FAIL])
    clock.advance(10)
    assert b.allow("p") == 20.0 and b.state("p") == OPEN
    clock.advance(20)
    assert b.state("p") == HALF_OPEN and gauge(metrics) == 2  # before any probe: both agree
    assert b.allow("p") == 0.0  # the probe
    clock.advance(5)
    assert b.allow("p") == 25.0  # the next waits for the probe
    assert b.state("p") == HALF_OPEN
    clock.advance(25)
    assert b.allow("p") == 0.0  # a probe lost (a crash) frees the slot after a cool-off
    assert b.allow("p") == 30.0  # and that is the probe now in flight


def test_probe_outcomes() -> None:
    """A failed probe opens the circuit for another whole cool-off (logged again); an
    answer closes it (logged); a probe the provider could not carry frees the slot."""
    b, clock, metrics = breakers(failures=2, cool_off=30.0)
    b.record("p", [FAIL])
    b.record("p", [FAIL])
    clock.advance(30)
    assert b.allow("p") == 0.0
    b.record("p", [CANNOT])
    assert b.allow("p") == 0.0  # the slot is free again: another probe may go
    b.record("p", [FAIL])
    assert b.state("p") == OPEN and gauge(metrics) == 1 and b.allow("p") == 30.0
    clock.advance(30)
    assert b.allow("p") == 0.0
    b.record("p", [SENT])
    assert b.state("p") == CLOSED and gauge(metrics) == 0 and b.allow("p") == 0.0
    b.record("p", [FAIL])
    assert b.state("p") == CLOSED  # counting from zero again


def test_failures_while_open_do_not_log_again(caplog) -> None:
    """Failures reported while open (calls that were in flight) keep it open, logged once;
    a failed probe is logged as a new opening."""
    b, clock, _ = breakers(failures=1)
    b.record("p", [FAIL])
    b.record("p", [FAIL])
    assert caplog.text.count("circuit_open") == 1
    clock.advance(30)
    b.allow("p")
    b.record("p", [FAIL])
    assert caplog.text.count("circuit_open") == 2
    b.record("p", [SENT])
    assert caplog.text.count("circuit_closed provider=p") == 1
    b.record("p", [SENT])
    assert caplog.text.count("circuit_closed") == 1  # closed already: nothing to say


def test_zero_failures_turns_it_off() -> None:
    """failures = 0: never opens, whatever fails."""
    b, _, _ = breakers(failures=0)
    for _ in range(50):
        b.record("p", [FAIL])
    assert b.state("p") == CLOSED and b.allow("p") == 0.0 and b.last_error("p") == ""


def test_last_error_is_the_providers_words() -> None:
    """The last transient failure, "code: text" (or the code alone), for held-back messages."""
    b, _, _ = breakers()
    assert b.last_error("p") == "" and b.last_error("other") == ""
    b.record("p", [FAIL])
    assert b.last_error("p") == "http_500: down"
    b.record("p", [TransientError("p", "timeout", "a"), TransientError("p", "http_503")])
    assert b.last_error("p") == "http_503"


def test_states_and_unknown_providers() -> None:
    """A provider never called is closed; states() maps each name."""
    b, _, metrics = breakers(failures=1)
    b.record("p", [FAIL])
    assert b.states(["p", "q"]) == {"p": OPEN, "q": CLOSED}
    assert b.allow("q") == 0.0
    assert gauge(metrics, "q") is None  # not tracked: not shown
    b.track(["q"])
    assert gauge(metrics, "q") == 0


@pytest.mark.parametrize(("table", "cfg"), [
    ({}, BreakerConfig(5, 30.0)),
    ({"failures": 0}, BreakerConfig(0, 30.0)),
    ({"failures": 2, "cool_off": "500ms"}, BreakerConfig(2, 0.5)),
])
def test_parse(table: dict[str, Any], cfg: BreakerConfig) -> None:
    """[breaker] defaults to 5 failures and a 30 s cool-off."""
    assert parse(Table(table, "breaker")) == cfg


@pytest.mark.parametrize(("table", "error"), [
    ({"failures": -1}, "breaker.failures"), ({"cool_off": "0s"}, "breaker.cool_off"),
    ({"cooloff": "1s"}, "breaker.cooloff"),
])
def test_parse_refuses(table: dict[str, Any], error: str) -> None:
    """A negative count, a zero cool-off or an unknown key is refused, naming the key."""
    with pytest.raises(ConfigError, match=error):
        parse(Table(table, "breaker"))
