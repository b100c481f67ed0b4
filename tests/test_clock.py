"""The injectable clock: a ManualClock's waits end when it is moved, and the budget's day,
the breaker's cool-off and the dispatcher's retries follow it without any sleep."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp

from hapsms_relay.breaker import CLOSED, HALF_OPEN, OPEN, BreakerConfig, Breakers
from hapsms_relay.budget import ALL, Budget, day_start
from hapsms_relay.clock import SYSTEM, ManualClock
from hapsms_relay.errors import TransientError
from hapsms_relay.limits import LimitsConfig
from hapsms_relay.metrics import Metrics
from hapsms_relay.outbox import State
from hapsms_relay.providers import Sent
from tests.fakes import FakeAPI, Reply
from tests.helpers import SMS_BODY, base_config, eventually, http_provider, settled


async def test_manual_sleep_ends_only_when_moved() -> None:
    """A sleep on a ManualClock ends once the clock passes its end, not before."""
    clock = ManualClock()
    sleeper = asyncio.ensure_future(clock.sleep(10))
    await eventually(lambda: clock.waiting == 1, what="the sleep to start")
    clock.advance(9.5)
    await asyncio.sleep(0)
    assert not sleeper.done()
    clock.advance(0.5)
    await asyncio.wait_for(sleeper, 5)


async def test_manual_wait_returns_on_event_or_timeout() -> None:
    """wait() says True when the event is set first, False when the clock ran out first."""
    clock = ManualClock()
    event = asyncio.Event()
    first = asyncio.ensure_future(clock.wait(event, 5))
    await eventually(lambda: clock.waiting == 1, what="the wait to start")
    event.set()
    assert await asyncio.wait_for(first, 5) is True
    event.clear()
    second = asyncio.ensure_future(clock.wait(event, 5))
    await eventually(lambda: clock.waiting == 1, what="the second wait to start")
    clock.advance(5)
    assert await asyncio.wait_for(second, 5) is False
    assert clock.waiting == 0


async def test_manual_wait_counts_from_its_call() -> None:
    """A wait's deadline is taken when it is called: a move of the clock right after the
    call (before any helper task of the wait has run) still ends it."""
    clock = ManualClock()
    event = asyncio.Event()
    waiter = asyncio.ensure_future(clock.wait(event, 5))
    await asyncio.sleep(0)  # the wait has been called, and nothing more
    clock.advance(5)
    assert await asyncio.wait_for(waiter, 5) is False


async def test_system_wait_times_out() -> None:
    """The real clock's wait gives up after its timeout with the event unset."""
    assert await SYSTEM.wait(asyncio.Event(), 0.01) is False
    event = asyncio.Event()
    event.set()
    assert await SYSTEM.wait(event, 0) is True


async def test_budget_rolls_over_at_local_midnight() -> None:
    """A day's use of the budget is forgotten at the next local midnight, not a second before."""
    midnight = day_start(time.time()) + 86400 * 3
    clock = ManualClock(midnight - 60)
    budget = Budget(LimitsConfig(daily_budget=2), Metrics(), clock)
    assert await budget.reserve("p", 2) == 2
    await budget.settle("p", 2, 2)
    assert budget.exhausted()
    clock.advance(59)
    assert budget.exhausted() and budget.left(ALL) == 0
    clock.advance(1)
    assert not budget.exhausted() and budget.left(ALL) == 2


def test_breaker_cool_off_follows_the_clock() -> None:
    """An open circuit lets a probe through once the clock has moved past its cool-off."""
    clock = ManualClock()
    breakers = Breakers(BreakerConfig(failures=2, cool_off=30.0), Metrics(), clock)
    err = TransientError("p", "http_500", "down")
    breakers.record("p", [err])
    breakers.record("p", [err])
    assert breakers.state("p") == OPEN
    clock.advance(29)
    assert breakers.allow("p") == 1.0
    clock.advance(1)
    assert breakers.state("p") == HALF_OPEN and breakers.allow("p") == 0.0
    assert breakers.allow("p") > 0  # one probe at a time
    breakers.record("p", [Sent()])
    assert breakers.state("p") == CLOSED


async def test_retry_waits_for_the_clock(tmp_path: Path, relay_factory: Any,
                                         session: aiohttp.ClientSession, fake_api: FakeAPI) -> None:
    """A retry scheduled in an hour goes when the relay's clock is moved an hour, at once."""
    clock = ManualClock(time.time())
    fake_api.script.append(Reply(429, "later", {"Retry-After": "3600"}))
    doc = base_config(tmp_path, providers=[http_provider("api", fake_api.url)],
                      routes={"sms": ["api"]}, queue={"ttl": "2h"})
    relay = await relay_factory(doc, clock=clock)
    status, answer = await relay.post(session, SMS_BODY)
    assert status == 200

    async def retry_scheduled() -> bool:
        rows = await relay.relay.outbox.list(State.PENDING, 10)
        return len(rows) == 1 and rows[0].attempts == 1

    await eventually(retry_scheduled, what="the retry to be scheduled")
    (row,) = await relay.relay.outbox.list(State.PENDING, 10)
    assert row.due >= clock.time() + 3600
    assert len(fake_api.requests) == 1
    clock.advance(3601)
    rows = await settled(relay, answer["ids"])
    assert rows[answer["ids"][0]].state == State.SENT
    assert len(fake_api.requests) == 2
