"""A provider's send rate: the limiter on a moved clock, and a burst through the relay."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from hapsms_relay import config
from hapsms_relay.clock import ManualClock
from hapsms_relay.errors import ConfigError
from hapsms_relay.outbox import State
from hapsms_relay.rate import Rate, RateLimiter, parse_rate
from tests.fakes import FakeAPI
from tests.helpers import base_config, eventually, http_provider, outbox_states


@pytest.mark.parametrize(("text", "rate"), [
    ("10/s", (10, 1.0)), ("600/m", (600, 60.0)), ("1000/h", (1000, 3600.0)), (" 5 / s ", (5, 1.0)),
    ("0/s", None), ("10", None), ("10/d", None), ("-1/s", None), ("1.5/s", None), ("", None),
])
def test_parse_rate(text: str, rate: tuple[int, float] | None) -> None:
    """Calls per second, minute or hour; anything else is not a rate."""
    parsed = parse_rate(text)
    assert (parsed and (parsed.count, parsed.per)) == rate


def test_bad_rate_names_the_key(tmp_path: Path) -> None:
    """A provider's bad rate is refused with its key named."""
    doc = base_config(tmp_path, providers=[http_provider("a", "http://127.0.0.1:9", rate="fast")],
                      routes={"sms": ["a"]})
    with pytest.raises(ConfigError) as info:
        config.parse(doc)
    assert str(info.value).startswith("providers[0].rate: expected calls per second")


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_window_admits_count_calls_from_their_end() -> None:
    """2/s: two calls start at once; a third waits until one second after a call ended."""
    clock = ManualClock()
    limiter = RateLimiter(Rate(2, 1.0, "2/s"), clock)
    started: list[int] = []

    async def call(i: int) -> None:
        await limiter.acquire()
        started.append(i)

    tasks = [asyncio.create_task(call(i)) for i in range(3)]
    await settle()
    assert started == [0, 1]
    clock.advance(5.0)  # both still running: time alone frees nothing
    await settle()
    assert started == [0, 1]
    limiter.release()
    limiter.release()
    clock.advance(0.999)
    await settle()
    assert started == [0, 1]
    clock.advance(0.001)
    await settle()
    assert started == [0, 1, 2]
    await asyncio.gather(*tasks)


async def test_waiters_are_served_in_order_and_a_cancelled_one_leaves() -> None:
    """First come, first served; a waiter cancelled in the queue holds nobody up."""
    clock = ManualClock()
    limiter = RateLimiter(Rate(1, 1.0, "1/s"), clock)
    order: list[int] = []

    async def call(i: int) -> None:
        await limiter.acquire()
        order.append(i)
        limiter.release()

    await limiter.acquire()
    tasks = [asyncio.create_task(call(i)) for i in range(4)]
    await settle()
    assert limiter.waiting == 4
    tasks[1].cancel()
    await settle()
    assert limiter.waiting == 3
    limiter.release()
    for _ in range(3):
        clock.advance(1.0)
        await settle()
    assert order == [0, 2, 3]
    await asyncio.gather(tasks[0], tasks[2], tasks[3])


async def test_burst_of_200_arrives_no_faster_than_the_rate(
    tmp_path: Path, relay_factory, session: aiohttp.ClientSession, fake_api: FakeAPI,
    second_api: FakeAPI,
) -> None:
    """200 messages to a provider with rate = "50/s": all 200 arrive, and no second of the
    fake's arrival times holds more than 50; a provider without a rate is not held up."""
    doc = base_config(
        tmp_path,
        providers=[http_provider("slow", fake_api.url, rate="50/s"),
                   http_provider("other", second_api.url)],
        routes={"sms": ["slow"], "rules": [{"prefix": "+8613900", "sms": ["other"]}]})
    relay = await relay_factory(doc)
    numbers = [f"+861380013{i:04d}" for i in range(200)]
    for i in range(0, 200, 50):
        status, _ = await relay.post(session, {"Type": 1, "Data": {
            "Mobiles": numbers[i:i + 50], "Message": "burst"}})
        assert status == 200
    status, _ = await relay.post(session, {"Type": 1, "Data": {
        "Mobiles": ["+8613900139000"], "Message": "x"}})
    assert status == 200

    await eventually(lambda: len(second_api.requests) == 1, what="the other provider's message")
    # it did not wait behind the burst, which takes at least 3 s at 50/s
    assert len(fake_api.requests) < 200
    await eventually(lambda: len(fake_api.accepted) == 200, timeout=60, what="the whole burst")
    await relay.settled(sent=201)
    arrived = sorted(r.arrived for r in fake_api.requests)
    assert len(fake_api.requests) == 200  # none sent twice
    assert sorted(r.json()["to"] for r in fake_api.requests) == numbers  # none dropped
    for first, last in zip(arrived, arrived[50:], strict=False):
        assert last - first >= 1.0, "51 calls within one second"
    assert set(await outbox_states(doc["queue"]["path"])) == {State.SENT}


def test_check_config_shows_the_rate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """check-config shows each provider's rate, or that it has none."""
    from hapsms_relay import cli
    from tests.helpers import write_config

    doc = base_config(tmp_path, providers=[http_provider("a", "http://127.0.0.1:9", rate="600/m"),
                                           http_provider("b", "http://127.0.0.1:9")],
                      routes={"sms": ["a", "b"]})
    assert cli.main(["check-config", "--config", str(write_config(tmp_path, doc))]) == cli.EX_OK
    out = capsys.readouterr().out
    assert "provider a: http  concurrency 16  rate 600/m" in out
    assert "provider b: http  concurrency 16  rate unlimited" in out
