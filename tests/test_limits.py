"""Spending and abuse limits through a relay on a real socket: per-number windows, countries,
number types, daily budgets, dedup and Idempotency-Key, including across a restart."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from hapsms_relay import config
from hapsms_relay.clock import ManualClock
from hapsms_relay.limits import Window
from tests.fakes import FakeAPI
from tests.helpers import AUTH, base_config, eventually, start_relay

LIMITS_ON = {"sms": ["5/10m", "20/1d"], "voice": ["3/10m"], "dedup_window": "10s"}


def sms(*mobiles: str, text: str = "hello") -> dict[str, Any]:
    return {"Type": 1, "Data": {"Mobiles": list(mobiles), "Message": text, "Signature": "Acme"}}


def voice(mobile: str, code: str = "123456") -> dict[str, Any]:
    return {"Type": 2, "Data": {"Mobile": mobile, "Code": code}}


def sent(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "sent.jsonl"
    return [orjson.loads(x) for x in path.read_bytes().splitlines()] if path.exists() else []


def limited(tmp_path: Path, **limits: Any) -> dict[str, Any]:
    doc = base_config(tmp_path, routes={"sms": ["dev"], "voice": ["dev"]})
    doc["limits"] = {**LIMITS_ON, **limits}
    return doc


async def metric(session: aiohttp.ClientSession, url: str, name: str) -> float:
    async with session.get(url + "/metrics") as r:
        text = await r.text()
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric {name}")


async def test_sms_window_refuses_sixth_message(tmp_path: Path, relay_factory, session) -> None:
    """Five SMS to one number in 10 minutes pass; the sixth gets 429 naming the limit."""
    relay = await relay_factory(limited(tmp_path))
    for i in range(5):
        status, body = await relay.post(session, sms("13800138000", text=f"code {i}"))
        assert status == 200, body
    status, body = await relay.post(session, sms("13800138000", text="code 5"))
    assert status == 429
    assert body["ok"] is False and body["error"] == "rate_limited"
    assert "5 sms messages per 10 minutes" in body["detail"]
    assert body["refused"] == [{"mobile": "+8613800138000", "error": "rate_limited",
                                "detail": body["detail"]}]
    status, _ = await relay.post(session, sms("13800138001", text="code 5"))
    assert status == 200  # another number is not affected
    await eventually(lambda: len(sent(tmp_path)) == 6, what="six messages delivered")
    assert await metric(session, relay.url, "hapsms_relay_recipients_refused_total") == 1


async def test_daily_window_counts_beyond_the_short_one(tmp_path: Path, relay_factory, session) -> None:
    """With "2/10m" and "3/1d" the fourth message is refused by the daily window."""
    relay = await relay_factory(limited(tmp_path, sms=["9/10m", "3/1d"]))
    for i in range(3):
        assert (await relay.post(session, sms("13800138000", text=f"m{i}")))[0] == 200
    status, body = await relay.post(session, sms("13800138000", text="m3"))
    assert status == 429 and "3 sms messages per 1 day" in body["detail"]


async def test_voice_window_is_separate(tmp_path: Path, relay_factory, session) -> None:
    """Three voice codes to a number pass, the fourth is refused; SMS to it still go."""
    relay = await relay_factory(limited(tmp_path))
    for code in ("1111", "2222", "3333"):
        assert (await relay.post(session, voice("13800138000", code)))[0] == 200
    status, body = await relay.post(session, voice("13800138000", "4444"))
    assert status == 429 and "3 voice messages per 10 minutes" in body["detail"]
    assert (await relay.post(session, sms("13800138000")))[0] == 200


async def test_windows_survive_a_restart(tmp_path: Path, session) -> None:
    """A number at its limit stays limited after the relay restarts on the same outbox."""
    doc = limited(tmp_path, sms=["2/10m"])
    relay = await start_relay(doc)
    try:
        for i in range(2):
            assert (await relay.post(session, sms("13800138000", text=f"m{i}")))[0] == 200
    finally:
        await relay.stop()
    relay = await start_relay(doc)
    try:
        status, body = await relay.post(session, sms("13800138000", text="m2"))
        assert status == 429 and body["error"] == "rate_limited"
    finally:
        await relay.stop()


async def test_multi_recipient_body_sends_to_the_others(tmp_path: Path, relay_factory, session) -> None:
    """A body with a limited and a free number: 200, one id, the limited one under refused."""
    relay = await relay_factory(limited(tmp_path, sms=["1/10m"]))
    assert (await relay.post(session, sms("13800138000", text="first")))[0] == 200
    status, body = await relay.post(session, sms("13800138000", "13800138001", text="second"))
    assert status == 200 and body["ok"] is True and len(body["ids"]) == 1
    assert [r["mobile"] for r in body["refused"]] == ["+8613800138000"]
    assert body["refused"][0]["error"] == "rate_limited"
    await eventually(lambda: len(sent(tmp_path)) == 2, what="two deliveries")
    assert sorted(r["to"] for r in sent(tmp_path)) == ["+8613800138000", "+8613800138001"]


@pytest.mark.parametrize(("limits", "number", "allowed"), [
    ({"allow_countries": ["CN", "HK"]}, "+85251234567", True),
    ({"allow_countries": ["CN", "HK"]}, "+12025550123", False),
    ({"deny_countries": ["US"]}, "+12025550123", False),
    ({"deny_countries": ["US"]}, "+8613800138000", True),
])
async def test_countries(tmp_path: Path, relay_factory, session, limits: dict[str, Any],
                         number: str, allowed: bool) -> None:
    """allow_countries admits only the listed regions; deny_countries refuses the listed ones."""
    relay = await relay_factory(limited(tmp_path, **limits))
    status, body = await relay.post(session, sms(number))
    if allowed:
        assert status == 200, body
    else:
        assert status == 403 and body["error"] == "country_not_allowed"
        assert "US" in body["detail"]


@pytest.mark.parametrize(("number", "kind"), [
    ("+19005550123", "premium-rate"),  # US 900
    ("+611300123456", "shared-cost"),  # AU 1300
])
async def test_premium_and_shared_cost_numbers_refused(tmp_path: Path, relay_factory, session,
                                                      number: str, kind: str) -> None:
    """Premium-rate and shared-cost numbers are refused by default, an SMS or a voice code,
    and nothing is sent."""
    relay = await relay_factory(limited(tmp_path))
    for refused in (sms(number), voice(number)):
        status, body = await relay.post(session, refused)
        assert status == 403 and body["error"] == "number_type_not_allowed"
        assert kind in body["detail"]
    assert (await relay.post(session, sms("+12025550123")))[0] == 200
    await eventually(lambda: len(sent(tmp_path)) == 1, what="the allowed one delivered")
    assert sent(tmp_path)[0]["to"] == "+12025550123"


async def test_number_types_can_be_allowed(tmp_path: Path, relay_factory, session) -> None:
    """deny_number_types = [] lets a premium-rate number through: stored and delivered."""
    relay = await relay_factory(limited(tmp_path, deny_number_types=[]))
    status, body = await relay.post(session, sms("+19005550123"))
    assert status == 200 and "refused" not in body
    await eventually(lambda: len(sent(tmp_path)) == 1, what="the premium-rate number delivered")
    assert sent(tmp_path)[0]["to"] == "+19005550123"


async def test_identical_body_is_acknowledged_again(tmp_path: Path, relay_factory, session) -> None:
    """The same body twice within dedup_window: the first ids again, duplicate: true, one send."""
    relay = await relay_factory(limited(tmp_path))
    status, first = await relay.post(session, sms("13800138000", "13800138001"))
    assert status == 200 and "duplicate" not in first
    status, again = await relay.post(session, sms("13800138001", "13800138000"))
    assert status == 200 and again["duplicate"] is True and again["ids"] == first["ids"]
    status, other = await relay.post(session, sms("13800138000", text="another text"))
    assert status == 200 and "duplicate" not in other
    await eventually(lambda: len(sent(tmp_path)) == 3, what="three deliveries")
    st = await relay.relay.outbox.stats()
    assert st.pending + st.inflight + st.sent + st.dead == 3  # the duplicate stored nothing
    assert await metric(session, relay.url, "hapsms_relay_duplicates_total") == 1


async def test_concurrent_duplicates_send_once(tmp_path: Path, relay_factory, session) -> None:
    """Ten identical bodies at once: one set of ids, nine duplicates, one message sent."""
    relay = await relay_factory(limited(tmp_path))
    answers = await asyncio.gather(*(relay.post(session, sms("13800138000")) for _ in range(10)))
    assert all(s == 200 for s, _ in answers)
    assert len({tuple(b["ids"]) for _, b in answers}) == 1
    assert sum(1 for _, b in answers if b.get("duplicate")) == 9
    await eventually(lambda: len(sent(tmp_path)) == 1, what="one delivery")


async def test_dedup_window_expires(tmp_path: Path, relay_factory, session) -> None:
    """Inside dedup_window the same body is a duplicate (the first ids, nothing sent again);
    from the window's end on it is a new message."""
    clock = ManualClock(time.time())
    relay = await relay_factory(limited(tmp_path, dedup_window="10s"), clock=clock)
    _, first = await relay.post(session, sms("13800138000"))
    clock.advance(9.999)
    status, again = await relay.post(session, sms("13800138000"))
    assert status == 200 and again == {**first, "duplicate": True}
    clock.advance(0.001)
    status, fresh = await relay.post(session, sms("13800138000"))
    assert status == 200 and "duplicate" not in fresh and fresh["ids"] != first["ids"]
    await eventually(lambda: len(sent(tmp_path)) == 2, what="two deliveries")
    assert await metric(session, relay.url, "hapsms_relay_duplicates_total") == 1


async def test_idempotency_key_across_restart(tmp_path: Path, session) -> None:
    """An Idempotency-Key seen before a restart returns the first ids after it, whatever the body."""
    doc = limited(tmp_path)
    headers = {**AUTH, "Idempotency-Key": "hap-7f3a-0001"}
    relay = await start_relay(doc)
    try:
        status, first = await relay.post(session, sms("13800138000", text="a"), headers)
        assert status == 200
    finally:
        await relay.stop()
    relay = await start_relay(doc)
    try:
        status, again = await relay.post(session, sms("13800138001", text="b"), headers)
        assert status == 200 and again == {**first, "duplicate": True}
        status, dup = await relay.post(session, sms("13800138000", text="a"))
        assert status == 200 and dup["duplicate"] is True  # the body key survived too
    finally:
        await relay.stop()
    assert len(sent(tmp_path)) == 1


@pytest.mark.parametrize("key", ["", "x" * 256, "é-key", "tab\there"])
async def test_invalid_idempotency_key(tmp_path: Path, relay_factory, session, key: str) -> None:
    """An empty, overlong or non-printable-ASCII Idempotency-Key is a 400, nothing stored."""
    relay = await relay_factory(limited(tmp_path))
    raw_headers = {**AUTH, "Content-Type": "application/json"}
    async with session.post(relay.webhook_url, data=orjson.dumps(sms("13800138000")),
                            headers=[*raw_headers.items(), ("Idempotency-Key", key)]) as r:
        assert r.status == 400
        assert (await r.json())["error"] == "invalid_idempotency_key"
    assert relay.relay.outbox.undelivered == 0


async def test_budget_refuse(tmp_path: Path, relay_factory, session, caplog) -> None:
    """daily_budget = 3, refuse: three are delivered (a warning past half), then 429."""
    relay = await relay_factory(limited(tmp_path, daily_budget=3, over_budget="refuse",
                                        budget_warning=0.5))
    for i in range(3):
        assert (await relay.post(session, sms(f"1380013800{i}")))[0] == 200
    await eventually(lambda: len(sent(tmp_path)) == 3, what="three deliveries")
    status, body = await relay.post(session, sms("13800138009"))
    assert status == 429 and body["error"] == "rate_limited" and "daily budget" in body["detail"]
    assert await metric(session, relay.url, "hapsms_relay_budget_remaining") == 0
    assert "budget_low provider=all used=2 budget=3" in caplog.text
    assert "budget_exhausted provider=all used=3 budget=3 then=refuse" in caplog.text


async def test_budget_hold_then_reload(tmp_path: Path, session) -> None:
    """daily_budget = 2, hold: the third waits in the outbox and goes once a reload raises it."""
    doc = limited(tmp_path, daily_budget=2, over_budget="hold")
    path = tmp_path / "config.toml"
    from tests.helpers import write_config

    write_config(tmp_path, doc)
    relay = await start_relay(doc)
    try:
        for i in range(3):
            assert (await relay.post(session, sms(f"1380013800{i}")))[0] == 200
        await eventually(lambda: len(sent(tmp_path)) == 2, what="two deliveries")
        await eventually(lambda: relay.relay.outbox.undelivered == 1, what="one held back")
        doc["limits"]["daily_budget"] = 10
        write_config(tmp_path, doc)
        assert await relay.relay.reload(str(path)) is None
        await eventually(lambda: len(sent(tmp_path)) == 3, what="the held one delivered")
    finally:
        await relay.stop()


async def test_budget_survives_restart(tmp_path: Path, session) -> None:
    """Deliveries counted before a restart still count against today's budget after it."""
    doc = limited(tmp_path, daily_budget=1, over_budget="refuse")
    relay = await start_relay(doc)
    try:
        assert (await relay.post(session, sms("13800138000")))[0] == 200
        await eventually(lambda: len(sent(tmp_path)) == 1, what="one delivery")
    finally:
        await relay.stop()
    relay = await start_relay(doc)
    try:
        status, body = await relay.post(session, sms("13800138001"))
        assert status == 429 and "daily budget" in body["detail"]
    finally:
        await relay.stop()


async def test_provider_budget_fails_over(tmp_path: Path, relay_factory, session,
                                          fake_api: FakeAPI) -> None:
    """A provider with its budget used up is skipped; the next provider of the route sends."""
    providers = [
        {"name": "cheap", "type": "http", "url": fake_api.url + "/cheap",
         "body": {"to": "{to}", "text": "{message}"}},
        {"name": "dear", "type": "http", "url": fake_api.url + "/dear",
         "body": {"to": "{to}", "text": "{message}"}},
    ]
    doc = base_config(tmp_path, providers=providers, routes={"sms": ["cheap", "dear"]})
    doc["limits"] = {**LIMITS_ON, "provider_budgets": {"cheap": 2}}
    relay = await relay_factory(doc)
    for i in range(5):
        assert (await relay.post(session, sms(f"1380013800{i}")))[0] == 200
    await eventually(lambda: len(fake_api.accepted) == 5, what="five sends")
    paths = sorted(r.path for r in fake_api.accepted)
    assert paths == ["/cheap"] * 2 + ["/dear"] * 3


@pytest.mark.parametrize(("limits", "problem"), [
    ({"sms": ["5 per 10m"]}, r"limits\.sms: expected COUNT/DURATION"),
    ({"sms": ["0/10m"]}, r"limits\.sms: expected COUNT/DURATION"),
    ({"allow_countries": ["CN"], "deny_countries": ["US"]}, r"limits\.deny_countries: set"),
    ({"allow_countries": ["XX"]}, r"limits\.allow_countries: unknown region 'XX'"),
    ({"deny_number_types": ["premium"]}, r"limits\.deny_number_types: unknown number type"),
    ({"provider_budgets": {"nope": 3}}, r"limits\.provider_budgets\.nope: unknown provider"),
    ({"over_budget": "drop"}, r"limits\.over_budget: must be one of"),
    ({"budget_warning": 1.5}, r"limits\.budget_warning: expected a share"),
    ({"windows": []}, r"limits\.windows: unknown setting"),
])
def test_limits_config_errors(tmp_path: Path, limits: dict[str, Any], problem: str) -> None:
    """Bad [limits] settings are refused with the key named."""
    from hapsms_relay.errors import ConfigError

    doc = base_config(tmp_path)
    doc["limits"] = limits
    with pytest.raises(ConfigError, match=problem):
        config.parse(doc)


def test_window_parse(tmp_path: Path) -> None:
    """"5/10m" is five per 600 seconds; the default SMS windows are 5/10m and 20/1d."""
    assert Window.parse("5/10m") == Window(5, 600.0, "5/10m")
    doc = base_config(tmp_path)
    doc["limits"] = {}
    assert [w.text for w in config.parse(doc).limits.sms] == ["5/10m", "20/1d"]
