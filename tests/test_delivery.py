"""Delivery against fake provider APIs that fail: retry, backoff, Retry-After, failover,
the random strategy, TTL, dead-lettering, voice fallback and per-provider concurrency."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hapsms_relay.clock import ManualClock
from hapsms_relay.dispatcher import backoff
from hapsms_relay.outbox import State
from tests.fakes import Action, FakeAPI, Hang, Reply, Reset
from tests.helpers import (
    SMS_BODY,
    VOICE_BODY,
    base_config,
    eventually,
    http_provider,
    outbox_rows,
    outbox_states,
    settled,
    start_relay,
    write_config,
)
from tests.process import run_cli


def _doc(tmp_path: Path, providers: list[dict[str, Any]], **sections: Any) -> dict[str, Any]:
    names = [p["name"] for p in providers]
    routes = {"sms": names, "voice": names, **sections.pop("routes", {})}
    return base_config(tmp_path, providers=providers, routes=routes, **sections)


async def _states_are(tmp_path: Path, wanted: list[State]) -> bool:
    return await outbox_states(tmp_path / "outbox.db") == wanted


async def _error_recorded(tmp_path: Path) -> bool:
    return (await outbox_rows(tmp_path / "outbox.db"))[0].error != ""


TRANSIENT: list[tuple[str, Action, str]] = [
    ("500", Reply(500, {"error": "boom"}), "http_500"),
    ("503", Reply(503, "busy"), "http_503"),
    ("408", Reply(408, "slow"), "http_408"),
    ("429 with Retry-After", Reply(429, "slow down", {"Retry-After": "1"}), "http_429"),
    ("hang past the timeout", Hang(30), ""),
    ("connection reset", Reset(), ""),
]


@pytest.mark.parametrize(("action", "code"), [(a, c) for _, a, c in TRANSIENT],
                         ids=[i for i, _, _ in TRANSIENT])
async def test_transient_failure_is_retried(
    action: Action, code: str, tmp_path: Path, relay_factory: Any, session: aiohttp.ClientSession,
    fake_api: FakeAPI,
) -> None:
    """A transient failure of the only provider is retried until the provider accepts."""
    fake_api.script.append(action)
    doc = _doc(tmp_path, [http_provider("api", fake_api.url, timeout="300ms")],
               queue={"retry_base": "10ms", "retry_max": "50ms"})
    relay = await relay_factory(doc)
    status, answer = await relay.post(session, SMS_BODY)
    assert status == 200
    await eventually(lambda: len(fake_api.accepted) == 1, what="delivery after the retry")
    assert len(fake_api.requests) == 2
    assert fake_api.accepted[0].json()["ref"] == answer["ids"][0]
    await eventually(lambda: _states_are(tmp_path, [State.SENT]), what="the entry delivered")
    (row,) = await outbox_rows(tmp_path / "outbox.db")
    assert row.attempts == 2 and row.provider == "api"
    assert code in row.error  # the failure is kept on the delivered row
    assert row.error.startswith("api ")


@pytest.mark.parametrize(("action", "code"), [(a, c) for _, a, c in TRANSIENT],
                         ids=[i for i, _, _ in TRANSIENT])
async def test_transient_failure_fails_over(
    action: Action, code: str, tmp_path: Path, relay_factory: Any, session: aiohttp.ClientSession,
    fake_api: FakeAPI, second_api: FakeAPI,
) -> None:
    """A transient failure of the first provider hands the message to the second at once."""
    fake_api.script.append(action)
    doc = _doc(tmp_path, [http_provider("first", fake_api.url, timeout="300ms"),
                          http_provider("second", second_api.url)],
               queue={"retry_base": "1h", "retry_max": "1h"})  # a retry would never come in time
    relay = await relay_factory(doc)
    status, answer = await relay.post(session, SMS_BODY)
    assert status == 200
    await eventually(lambda: _states_are(tmp_path, [State.SENT]), what="delivery via failover")
    assert len(fake_api.requests) == 1 and not fake_api.accepted
    assert [r.json()["ref"] for r in second_api.accepted] == answer["ids"]
    (row,) = await outbox_rows(tmp_path / "outbox.db")
    assert row.attempts == 1 and row.provider == "second"


async def test_retry_after_is_honoured(
    tmp_path: Path, relay_factory: Any, session: aiohttp.ClientSession, fake_api: FakeAPI
) -> None:
    """After a 429 with ``Retry-After: 30`` the entry is not due again for 30 seconds."""
    fake_api.script.append(Reply(429, "slow down", {"Retry-After": "30"}))
    doc = _doc(tmp_path, [http_provider("api", fake_api.url)],
               queue={"retry_base": "10ms", "retry_max": "60s"})
    relay = await relay_factory(doc)
    assert (await relay.post(session, SMS_BODY))[0] == 200
    await eventually(lambda: _error_recorded(tmp_path),
                     what="the retry scheduled")
    (row,) = await outbox_rows(tmp_path / "outbox.db")
    assert row.state == State.PENDING and "http_429" in row.error
    assert row.due - fake_api.requests[0].at >= 30
    assert len(fake_api.requests) == 1


async def test_first_retry_waits_retry_base(
    tmp_path: Path, relay_factory: Any, session: aiohttp.ClientSession, fake_api: FakeAPI
) -> None:
    """The first retry after a 500 is due ``retry_base`` later (no provider hint given)."""
    fake_api.script.append(Reply(500, "boom"))
    doc = _doc(tmp_path, [http_provider("api", fake_api.url)],
               queue={"retry_base": "20s", "retry_max": "60s"})
    relay = await relay_factory(doc)
    assert (await relay.post(session, SMS_BODY))[0] == 200
    await eventually(lambda: _error_recorded(tmp_path),
                     what="the retry scheduled")
    (row,) = await outbox_rows(tmp_path / "outbox.db")
    assert row.due - fake_api.requests[0].at >= 20
    assert row.due - row.updated <= 20


@given(attempt=st.integers(min_value=1, max_value=10**6),
       base=st.floats(min_value=0.001, max_value=60),
       cap_factor=st.floats(min_value=1, max_value=1000),
       retry_after=st.none() | st.floats(min_value=0, max_value=10**6))
def test_backoff_stays_in_bounds(attempt: int, base: float, cap_factor: float,
                                 retry_after: float | None) -> None:
    """Backoff is within [retry_base, min(retry_max, base * 2**(attempt-1))], or exactly the
    provider's Retry-After when that is longer, and never overflows however many attempts."""
    cap = base * cap_factor
    delay = backoff(attempt, base, cap, retry_after)
    ceiling = min(cap, base * 2.0 ** min(attempt - 1, 64))
    assert base <= delay <= max(ceiling, retry_after or 0)
    if retry_after is not None:
        assert delay >= retry_after


PERMANENT: list[tuple[str, Reply, dict[str, Any], str]] = [
    ("400", Reply(400, '{"code":"E_NUMBER","msg":"invalid recipient"}'), {},
     'api http_400: {"code":"E_NUMBER","msg":"invalid recipient"}'),
    ("401", Reply(401, "bad credentials"), {}, "api http_401: bad credentials"),
    ("success_field mismatch", Reply(200, '{"status":"9","why":"blocked"}'),
     {"success_field": "status", "success_value": "0"}, 'api rejected: {"status":"9","why":"blocked"}'),
    ("success_regex mismatch", Reply(200, "ERR 17"), {"success_regex": "^OK"}, "api rejected: ERR 17"),
]


@pytest.mark.parametrize(("reply", "settings", "reason"), [p[1:] for p in PERMANENT],
                         ids=[p[0] for p in PERMANENT])
async def test_permanent_failure_is_dead_with_the_providers_words(
    reply: Reply, settings: dict[str, Any], reason: str, tmp_path: Path, relay_factory: Any,
    session: aiohttp.ClientSession, fake_api: FakeAPI, second_api: FakeAPI,
) -> None:
    """A permanent refusal is dead at once, with no retry and no failover, keeping the
    provider's code and text as the reason, which ``queue list --dead`` shows."""
    fake_api.script.append(reply)
    doc = _doc(tmp_path, [http_provider("api", fake_api.url, **settings),
                          http_provider("second", second_api.url)],
               queue={"retry_base": "10ms", "retry_max": "50ms"})
    relay = await relay_factory(doc)
    status, answer = await relay.post(session, SMS_BODY)
    assert status == 200
    await eventually(lambda: _states_are(tmp_path, [State.DEAD]), what="the entry dead")
    # The relay's own count drops once the commit's result reaches the event loop, a moment
    # after another connection can see the row: wait for it rather than race it.
    await eventually(lambda: relay.relay.outbox.undelivered == 0, what="undelivered count 0")
    (row,) = await outbox_rows(tmp_path / "outbox.db")
    assert (row.provider, row.error, row.attempts) == ("api", reason, 1)
    assert len(fake_api.requests) == 1 and not second_api.requests

    config = write_config(tmp_path, doc)
    proc = await run_cli("queue", "list", "--dead", "--config", str(config))
    assert proc[0] == 0
    (line,) = proc[1].splitlines()
    assert f"id={answer['ids'][0]}" in line and "state=dead" in line and "+86*******8000" in line
    assert reason.replace('"', "") in line.replace('"', "").replace("\\", "")


async def test_ttl_makes_an_entry_dead(
    tmp_path: Path, relay_factory: Any, session: aiohttp.ClientSession, fake_api: FakeAPI
) -> None:
    """A message the provider keeps refusing transiently is dead once its TTL has passed,
    with the last failure in the reason."""
    fake_api.respond = lambda rec: Reply(503, "maintenance")
    # No circuit breaker here: it would hold the next message back for its cool-off (the
    # breaker's own tests cover that, and that the reason keeps the provider's failure).
    doc = _doc(tmp_path, [http_provider("api", fake_api.url)],
               queue={"ttl": "300ms", "retry_base": "20ms", "retry_max": "50ms"},
               breaker={"failures": 0})
    relay = await relay_factory(doc)
    assert (await relay.post(session, SMS_BODY))[0] == 200
    await eventually(lambda: _states_are(tmp_path, [State.DEAD]), what="the entry dead")
    (row,) = await outbox_rows(tmp_path / "outbox.db")
    assert row.error.startswith("expired")
    assert "api http_503: maintenance" in row.error
    assert len(fake_api.requests) >= 1 and not fake_api.accepted
    count = len(fake_api.requests)
    # dead means dead: another message goes through and the dead one is never tried again
    fake_api.respond = None
    assert (await relay.post(session, SMS_BODY))[0] == 200
    await eventually(lambda: len(fake_api.accepted) == 1, what="the next message delivered")
    assert len(fake_api.requests) == count + 1


async def test_ttl_passed_while_paused_is_dead_without_a_call(
    tmp_path: Path, session: aiohttp.ClientSession, fake_api: FakeAPI
) -> None:
    """Entries whose TTL passed while delivery was paused (``serve --pause-delivery``, then a
    restart) are dead when claimed, with zero provider calls, from exactly their TTL on; one
    still inside its TTL is delivered."""
    clock = ManualClock(time.time())
    doc = _doc(tmp_path, [http_provider("api", fake_api.url)], queue={"ttl": "10m"})
    late = {"Type": 1, "Data": {"Mobiles": ["13800138001"], "Message": "in time"}}
    relay = await start_relay(doc, paused=True, clock=clock)
    try:
        status, first = await relay.post(session, SMS_BODY)
        assert status == 200
        clock.advance(1)
        status, second = await relay.post(session, late)
        assert status == 200
    finally:
        await relay.stop()
    clock.advance(599)  # the first is exactly 10 minutes old, the second has a second left
    relay = await start_relay(doc, clock=clock)
    try:
        rows = await settled(relay, first["ids"] + second["ids"])
        expired, delivered = rows[first["ids"][0]], rows[second["ids"][0]]
        assert expired.state == State.DEAD and expired.error == "expired: ttl passed before delivery"
        assert delivered.state == State.SENT
        assert [r.json()["to"] for r in fake_api.requests] == ["+8613800138001"]
    finally:
        await relay.stop()


async def test_all_providers_failing_transiently_retries_through_the_route(
    tmp_path: Path, relay_factory: Any, session: aiohttp.ClientSession, fake_api: FakeAPI,
    second_api: FakeAPI,
) -> None:
    """When every provider fails transiently the entry is retried later, again from the first."""
    fake_api.script.append(Reply(500, "a down"))
    second_api.script.append(Reply(502, "b down"))
    doc = _doc(tmp_path, [http_provider("a", fake_api.url), http_provider("b", second_api.url)],
               queue={"retry_base": "10ms", "retry_max": "50ms"})
    relay = await relay_factory(doc)
    assert (await relay.post(session, SMS_BODY))[0] == 200
    await eventually(lambda: _states_are(tmp_path, [State.SENT]), what="delivery on retry")
    assert (len(fake_api.requests), len(second_api.requests)) == (2, 1)
    (row,) = await outbox_rows(tmp_path / "outbox.db")
    assert (row.provider, row.attempts) == ("a", 2)


async def test_random_strategy_spreads_and_still_fails_over(
    tmp_path: Path, relay_factory: Any, session: aiohttp.ClientSession, fake_api: FakeAPI,
    second_api: FakeAPI,
) -> None:
    """``strategy = "random"`` starts each body with either provider, and a failing one still
    fails over to the other (each assertion fails by chance with probability 2**-39)."""
    doc = _doc(tmp_path, [http_provider("a", fake_api.url), http_provider("b", second_api.url)],
               routes={"strategy": "random"})
    relay = await relay_factory(doc)

    async def post_40() -> None:
        for i in range(40):
            body = {"Type": 1, "Data": {"Mobiles": [f"1380013{i:04d}"], "Message": "m"}}
            assert (await relay.post(session, body))[0] == 200

    await post_40()
    await eventually(lambda: len(fake_api.accepted) + len(second_api.accepted) == 40,
                     what="40 deliveries")
    assert fake_api.accepted and second_api.accepted

    fake_api.respond = lambda rec: Reply(500, "down")
    await post_40()
    await eventually(lambda: len(second_api.accepted) == 80 - len(fake_api.accepted),
                     what="40 more deliveries, all through b")
    tried_a_first = len(fake_api.requests) - len(fake_api.accepted)
    assert 0 < tried_a_first < 40  # a was first for some bodies, and they failed over to b


async def test_random_strategy_keeps_a_body_together(
    tmp_path: Path, relay_factory: Any, session: aiohttp.ClientSession, fake_api: FakeAPI,
    second_api: FakeAPI,
) -> None:
    """Under ``random`` the recipients of one body share one provider order (for batching)."""
    doc = _doc(tmp_path, [http_provider("a", fake_api.url), http_provider("b", second_api.url)],
               routes={"strategy": "random"})
    relay = await relay_factory(doc)
    many = {"Type": 1, "Data": {"Mobiles": [f"1380013{i:04d}" for i in range(20)], "Message": "m"}}
    assert (await relay.post(session, many))[0] == 200
    await eventually(lambda: len(fake_api.accepted) + len(second_api.accepted) == 20,
                     what="20 deliveries")
    assert sorted([len(fake_api.accepted), len(second_api.accepted)]) == [0, 20]


@pytest.mark.parametrize(("voice", "text"), [(False, "Your code: 123456"), (True, "123456")],
                         ids=["provider without voice", "provider with voice"])
async def test_voice_code_falls_back_to_sms_text(
    voice: bool, text: str, tmp_path: Path, relay_factory: Any, session: aiohttp.ClientSession,
    fake_api: FakeAPI,
) -> None:
    """A voice code goes to a provider without voice as an SMS with ``voice_fallback_text``;
    a provider with voice gets the code itself."""
    provider = http_provider("api", fake_api.url, voice=voice)
    if voice:
        provider["body"] = {"to": "{to}", "text": "{code}", "ref": "{id}"}
    doc = _doc(tmp_path, [provider], routes={"voice_fallback_text": "Your code: {code}"})
    relay = await relay_factory(doc)
    status, answer = await relay.post(session, VOICE_BODY)
    assert status == 200
    await eventually(lambda: len(fake_api.accepted) == 1, what="the voice code delivered")
    assert fake_api.accepted[0].json() == {"to": "+8613800138000", "text": text,
                                           "ref": answer["ids"][0]}


async def test_provider_concurrency_limit_is_honoured(
    tmp_path: Path, relay_factory: Any, session: aiohttp.ClientSession, fake_api: FakeAPI,
    second_api: FakeAPI,
) -> None:
    """No provider is sent more requests at once than its ``concurrency`` setting, and each
    is sent that many: the fakes hold requests until the limit is in flight."""
    fake_api.hold(2)
    second_api.hold(5)
    doc = _doc(tmp_path, [http_provider("a", fake_api.url, concurrency=2),
                          http_provider("b", second_api.url, concurrency=5)],
               routes={"sms": ["a"], "voice": ["b"]})
    relay = await relay_factory(doc)
    many = {"Type": 1, "Data": {"Mobiles": [f"1380013{i:04d}" for i in range(12)], "Message": "m"}}
    assert (await relay.post(session, many))[0] == 200
    for i in range(15):
        voice = {"Type": 2, "Data": {"Mobile": f"1390013{i:04d}", "Code": "1234"}}
        assert (await relay.post(session, voice))[0] == 200
    await eventually(lambda: len(fake_api.accepted) == 12 and len(second_api.accepted) == 15,
                     what="all delivered")
    assert fake_api.max_inflight == 2
    assert second_api.max_inflight == 5


def _fields(caplog: Any, event: str) -> list[dict[str, str]]:
    """The key=value fields of each ``event`` line the relay logged."""
    import shlex

    out = []
    for line in caplog.text.splitlines():
        words = shlex.split(line.split(":0 ", 1)[-1])
        if words and words[0] == event:
            out.append(dict(w.split("=", 1) for w in words[1:]))
    return out


async def test_each_outcome_is_logged_with_its_fields(
    tmp_path: Path, relay_factory: Any, session: aiohttp.ClientSession, fake_api: FakeAPI,
    caplog: Any,
) -> None:
    """attempt_failed, retry_scheduled, sent and dead lines carry the id, the masked
    number, the provider, the code and the attempt, as the operations docs list them."""
    fake_api.script.append(Reply(503, "busy"))
    fake_api.respond = lambda rec: Reply(400, "bad number") if "+8613800138001" in rec.body.decode() \
        else Reply()
    doc = _doc(tmp_path, [http_provider("api", fake_api.url)], breaker={"failures": 0})
    relay = await relay_factory(doc)
    status, answer = await relay.post(session, SMS_BODY)
    assert status == 200
    (first,) = answer["ids"]
    await settled(relay, [first])
    status, other = await relay.post(session, {"Type": 1, "Data": {"Mobiles": ["13800138001"],
                                                                  "Message": "m"}})
    await settled(relay, other["ids"])
    (failed,) = _fields(caplog, "attempt_failed")
    assert failed == {"id": first, "to": "+86*******8000", "provider": "api", "code": "http_503",
                      "error": "busy", "attempt": "1"}
    (retry,) = _fields(caplog, "retry_scheduled")
    assert retry["id"] == first and retry["to"] == "+86*******8000" and retry["attempt"] == "1"
    assert float(retry["in_s"]) == 0.05  # retry_base 50ms: attempt 1 waits the base
    (sent,) = _fields(caplog, "sent")
    assert {k: sent[k] for k in ("id", "to", "provider", "type", "attempt", "segments")} == {
        "id": first, "to": "+86*******8000", "provider": "api", "type": "sms", "attempt": "2",
        "segments": "1"}
    assert float(sent["latency_ms"]) >= 0
    (dead,) = _fields(caplog, "dead")
    assert dead == {"id": other["ids"][0], "to": "+86*******8001", "provider": "api",
                    "code": "http_400", "reason": "api http_400: bad number", "attempt": "1"}
    assert relay.relay.dispatcher.activity.sent == 1
    assert relay.relay.dispatcher.activity.dead == 1
    assert relay.relay.dispatcher.activity.last_error == "api http_400"
