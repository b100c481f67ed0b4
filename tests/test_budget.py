"""Daily budgets on a ManualClock: reservations keep concurrent rounds from overshooting,
what was delivered is counted, warnings come once each, counts are seeded at start and
forgotten at local midnight; /metrics shows what is left. One suite for both
implementations: in memory (``Budget``) and shared by relays through a PostgreSQL outbox
(``SharedBudget``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest

from hapsms_relay.budget import ALL, Budget, SharedBudget, day_start
from hapsms_relay.clock import ManualClock
from hapsms_relay.kinds import KIND_SMS
from hapsms_relay.limits import LimitsConfig
from hapsms_relay.metrics import Metrics
from hapsms_relay.outbox import NewEntry, Sending
from hapsms_relay.outbox_postgres import PostgresOutbox
from hapsms_relay.secret import Secret
from tests.helpers import eventually

NOON = day_start(time.time()) + 86400 * 2 + 12 * 3600

Make = Callable[..., tuple[Budget, ManualClock, Metrics]]


@pytest.fixture(params=["memory", "shared"])
async def budget(request: pytest.FixtureRequest) -> AsyncIterator[Make]:
    """Budgets on a ManualClock at noon: ``Budget``, or ``SharedBudget`` on a new database."""
    clock, metrics = ManualClock(NOON), Metrics()
    outbox = None
    if request.param == "shared":
        outbox = PostgresOutbox(Secret(request.getfixturevalue("pg_url")), clock=clock, node="t")
        await outbox.open()

    def make(**cfg: object) -> tuple[Budget, ManualClock, Metrics]:
        limits = LimitsConfig(**cfg)  # type: ignore[arg-type]
        if outbox is None:
            return Budget(limits, metrics, clock), clock, metrics
        return SharedBudget(limits, metrics, outbox, clock), clock, metrics

    yield make
    if outbox is not None:
        await outbox.close()


@pytest.fixture
def memory_budget() -> Make:
    """``Budget`` alone, for what only the in-memory one does (``load``)."""
    def make(**cfg: object) -> tuple[Budget, ManualClock, Metrics]:
        clock, metrics = ManualClock(NOON), Metrics()
        return Budget(LimitsConfig(**cfg), metrics, clock), clock, metrics  # type: ignore[arg-type]
    return make


def remaining(metrics: Metrics, name: str) -> float | None:
    value: float | None = metrics.registry.get_sample_value(
        "hapsms_relay_budget_remaining", {"provider": name})
    return value


async def test_no_budget_no_limit(budget: Make) -> None:
    """Without budgets every reservation is granted and nothing is shown."""
    b, _, metrics = budget()
    assert await b.reserve("a", 1000) == 1000 and b.left("a") is None and b.left(ALL) is None
    assert not b.exhausted() and remaining(metrics, ALL) is None


async def test_reservations_cap_concurrent_rounds(budget: Make) -> None:
    """Reserved sends count against the budget until settled: two rounds cannot overshoot."""
    b, _, metrics = budget(daily_budget=10)
    assert await b.reserve("a", 6) == 6
    assert await b.reserve("b", 6) == 4  # only 4 left while the first round is out
    assert b.left(ALL) == 0 and b.exhausted()
    await b.settle("a", 6, 2)  # two of six delivered: four freed
    assert b.left(ALL) == 4 and not b.exhausted()
    assert remaining(metrics, ALL) == 8  # what is left once reservations settle
    await b.settle("b", 4, 4)
    assert b.left(ALL) == 4 and remaining(metrics, ALL) == 4
    assert await b.reserve("a", 0) == 0


async def test_provider_budget_and_overall_budget_both_apply(budget: Make) -> None:
    """A provider's own budget and the overall one: the smaller of what each leaves."""
    b, _, metrics = budget(daily_budget=5, provider_budgets={"a": 3})
    assert remaining(metrics, "a") == 3 and remaining(metrics, ALL) == 5
    assert await b.reserve("a", 10) == 3
    await b.settle("a", 3, 3)
    assert b.left("a") == 0 and b.left(ALL) == 2
    assert await b.reserve("a", 1) == 0
    assert await b.reserve("b", 10) == 2  # b has no budget of its own: the overall one caps it
    await b.settle("b", 2, 2)
    assert b.exhausted() and remaining(metrics, ALL) == 0 and remaining(metrics, "a") == 0
    assert b.left("b") is None


async def test_exhausted_only_when_nothing_is_left(budget: Make) -> None:
    """One message left is not exhausted; none left is."""
    b, _, _ = budget(daily_budget=2)
    await b.settle("a", await b.reserve("a", 1), 1)
    assert b.left(ALL) == 1 and not b.exhausted()
    await b.settle("a", await b.reserve("a", 1), 1)
    assert b.exhausted()


async def test_delivered_without_a_reservation_counts(budget: Make) -> None:
    """A delivery settled with nothing reserved (a round that was out before a reload set
    the budget) counts, and reserves nothing."""
    b, _, _ = budget(daily_budget=10)
    await b.settle("a", 0, 1)
    assert b.left(ALL) == 9


async def test_settle_never_goes_negative(budget: Make) -> None:
    """Settling more than was reserved leaves no negative reservation behind."""
    b, _, _ = budget(daily_budget=10)
    await b.reserve("a", 2)
    await b.settle("a", 5, 0)
    assert b.left(ALL) == 10


async def test_warnings_once_each(caplog, budget: Make) -> None:
    """budget_low once at the warning share, budget_exhausted once when used up."""
    b, _, _ = budget(daily_budget=10, budget_warning=0.5)
    for _ in range(4):
        await b.settle("a", await b.reserve("a", 1), 1)
    assert "budget_low" not in caplog.text
    await b.settle("a", await b.reserve("a", 1), 1)
    assert caplog.text.count("budget_low provider=all used=5 budget=10") == 1
    for _ in range(4):
        await b.settle("a", await b.reserve("a", 1), 1)
    assert caplog.text.count("budget_low") == 1 and "budget_exhausted" not in caplog.text
    await b.settle("a", await b.reserve("a", 1), 1)
    assert caplog.text.count("budget_exhausted provider=all used=10 budget=10 then=hold") == 1
    await b.settle("a", 0, 1)  # delivered past the budget (a round that was out): no new warning
    assert caplog.text.count("budget_exhausted") == 1


async def test_refuse_mode_is_named_in_the_warning(caplog, budget: Make) -> None:
    """over_budget = "refuse": hold is off and the warning says what follows."""
    b, _, _ = budget(provider_budgets={"a": 1}, over_budget="refuse")
    assert not b.hold
    await b.settle("a", await b.reserve("a", 1), 1)
    assert "budget_exhausted provider=a used=1 budget=1 then=refuse" in caplog.text
    assert budget(daily_budget=1)[0].hold


async def test_nothing_delivered_warns_nothing(caplog, budget: Make) -> None:
    """A round that delivered nothing does not warn, even at a budget of one."""
    b, _, _ = budget(daily_budget=1, budget_warning=0.1)
    await b.settle("a", await b.reserve("a", 1), 0)
    assert "budget_" not in caplog.text


def test_load_seeds_todays_counts(memory_budget: Make) -> None:
    """Counts rebuilt from the outbox at start count against today's budgets."""
    b, _, metrics = memory_budget(daily_budget=10, provider_budgets={"a": 4})
    b.load({"a": (3, 4), "b": (2, 2), "": (1, 1)})  # "": sent by a provider since removed
    assert b.left("a") == 1 and b.left(ALL) == 4
    assert remaining(metrics, "a") == 1 and remaining(metrics, ALL) == 4


async def test_midnight_forgets_the_day(budget: Make) -> None:
    """At the next local midnight the counts and warnings start again; not a second before."""
    b, clock, metrics = budget(daily_budget=2)
    await b.settle("a", await b.reserve("a", 2), 2)
    assert b.exhausted()
    clock.set(day_start(NOON) + 86400 - 1)
    assert b.exhausted()
    clock.advance(1)
    assert not b.exhausted() and b.left(ALL) == 2 and remaining(metrics, ALL) == 2
    clock.advance(86400 * 3)  # days without traffic
    assert await b.reserve("a", 5) == 2


async def test_set_config_applies_new_budgets(budget: Make) -> None:
    """A reload's budgets apply at once, keeping today's counts."""
    b, _, metrics = budget(daily_budget=2)
    await b.settle("a", await b.reserve("a", 2), 2)
    assert b.exhausted()
    b.set_config(LimitsConfig(daily_budget=5))
    assert b.left(ALL) == 3 and remaining(metrics, ALL) == 3
    b.set_config(LimitsConfig())
    assert b.left(ALL) is None and not b.exhausted()


def test_day_start_is_local_midnight() -> None:
    """day_start is the local midnight at or before the given time."""
    start = day_start(NOON)
    assert start <= NOON < start + 86400 + 3600
    assert time.localtime(start)[3:6] == (0, 0, 0)
    assert day_start(start) == start
    assert day_start(start - 1) < start


def segments_left(metrics: Metrics, name: str) -> float | None:
    value: float | None = metrics.registry.get_sample_value(
        "hapsms_relay_budget_segments_remaining", {"provider": name})
    return value


async def test_segment_budgets(budget: Make) -> None:
    """A segment budget lets through the first messages whose expected segments fit, counts
    the segments the provider billed, and is exhausted when they are used up; both units
    are shown in /metrics."""
    b, _, metrics = budget(daily_segment_budget=10, provider_segment_budgets={"a": 6},
                           daily_budget=100)
    assert await b.reserve("a", 4, [2, 3, 2, 1]) == 2  # 2 + 3 fit a's 6; 2 more would not
    assert b.left("a", "segments") == 1 and b.left(ALL, "segments") == 5
    await b.settle("a", 2, 2, 5, 6)  # the provider billed 6
    assert b.left("a", "segments") == 0 and segments_left(metrics, "a") == 0
    assert b.left(ALL) == 98 and remaining(metrics, ALL) == 98
    assert await b.reserve("b", 3, [1, 1, 5]) == 2 and not b.exhausted()
    await b.settle("b", 2, 2, 2, 4)
    assert b.left(ALL, "segments") == 0 and b.exhausted()


def test_segments_seeded_at_start(memory_budget: Make) -> None:
    """The segments sent today, rebuilt from the outbox, count against segment budgets."""
    b, _, metrics = memory_budget(daily_segment_budget=10)
    b.load({"a": (3, 7)})
    assert b.left(ALL, "segments") == 3 and segments_left(metrics, ALL) == 3


async def test_a_round_without_segments_gives_back_none(budget: Make) -> None:
    """A round that costs no segments (a voice code), settled without naming any, leaves
    the segments another round reserved where they are."""
    b, _, _ = budget(daily_segment_budget=5)
    assert await b.reserve("a", 1, [2]) == 1
    assert await b.reserve("b", 1, [0]) == 1
    await b.settle("b", 1, 1)
    assert b.left(ALL, "segments") == 3


async def test_segments_that_fit_exactly_go(budget: Make) -> None:
    """Messages whose expected segments add up to exactly what is left all go; one more
    segment would not."""
    b, _, _ = budget(provider_segment_budgets={"a": 5})
    assert await b.reserve("a", 3, [2, 3, 1]) == 2
    assert b.left("a", "segments") == 0


async def test_a_round_that_sent_nothing_counts_no_segments(budget: Make) -> None:
    """A round settled with its reserved segments and nothing sent (the dispatcher's failed
    round) gives them all back and counts none."""
    b, _, _ = budget(daily_segment_budget=5)
    assert await b.reserve("a", 1, [2]) == 1 and b.left(ALL, "segments") == 3
    await b.settle("a", 1, 0, 2)
    assert b.left(ALL, "segments") == 5


async def test_warnings_name_the_unit_only_for_segments(budget: Make, caplog) -> None:
    """budget_low and budget_exhausted of a segment budget say unit=segments; those of a
    message budget say no unit (messages being the default)."""
    b, _, _ = budget(daily_budget=2, daily_segment_budget=4, budget_warning=0.5)
    await b.settle("a", await b.reserve("a", 1, [2]), 1, 2, 2)
    await b.settle("a", await b.reserve("a", 1, [2]), 1, 2, 2)
    assert caplog.messages == [
        "budget_low provider=all used=1 budget=2",
        "budget_low provider=all used=2 budget=4 unit=segments",
        "budget_exhausted provider=all used=2 budget=2 then=hold",
        "budget_exhausted provider=all used=4 budget=4 then=hold unit=segments",
    ]


# -- shared by relays: what only a database holds ----------------------------------------------

async def _outboxes(pg_url: str, n: int, clock: ManualClock) -> list[PostgresOutbox]:
    boxes = [PostgresOutbox(Secret(pg_url), clock=clock, node=f"relay-{i}") for i in range(n)]
    for box in boxes:
        await box.open()
    return boxes


async def test_shared_budget_holds_for_relays_together(pg_url: str) -> None:
    """Two relays' budgets on one database, reserving at once a send at a time: 25 granted
    in total for a budget of 25, and both see it used up once the sends are settled."""
    clock = ManualClock(NOON)
    boxes = await _outboxes(pg_url, 2, clock)
    try:
        budgets = [SharedBudget(LimitsConfig(daily_budget=25), Metrics(), box, clock)
                   for box in boxes]
        granted = await asyncio.gather(*(b.reserve("a", 1) for b in budgets for _ in range(20)))
        assert sum(granted) == 25
        await asyncio.gather(*(budgets[i % 2].settle("a", 1, 1)
                               for i, g in enumerate(granted) if g))
        for b in budgets:
            await b.refresh()
            assert b.exhausted() and b.left(ALL) == 0
    finally:
        for box in boxes:
            await box.close()


async def test_shared_counts_start_from_what_was_sent_today(pg_url: str) -> None:
    """A counter first used today starts with what the outbox sent today (before the
    budget was set, say), in messages and segments, per provider and overall."""
    clock = ManualClock(NOON)
    (box,) = await _outboxes(pg_url, 1, clock)
    try:
        ids = await box.enqueue([NewEntry(KIND_SMS, f"+861380013800{i}", "CN", "x", "t")
                                 for i in range(3)], 3600)
        await box.claim("me", 10, clock.time(), 30)
        await box.sent("a", [Sending(ids[0], (), 2, 0.1), Sending(ids[1], (), 1, 0.1)])
        await box.sent("b", [Sending(ids[2], (), 4, 0.1)])
        b = SharedBudget(LimitsConfig(daily_budget=10, provider_budgets={"a": 5},
                                      daily_segment_budget=20), Metrics(), box, clock)
        await b.refresh()
        assert (b.left("a"), b.left(ALL), b.left(ALL, "segments")) == (3, 7, 13)
    finally:
        await box.close()


async def test_shared_round_past_midnight_settles_with_its_day(pg_url: str) -> None:
    """A round reserved before midnight and settled after it gives back to the day it
    reserved from: the new day's budget is whole, the old day counts what was sent."""
    clock = ManualClock(day_start(NOON) + 86400 - 1)
    (box,) = await _outboxes(pg_url, 1, clock)
    try:
        b = SharedBudget(LimitsConfig(daily_budget=10), Metrics(), box, clock)
        assert await b.reserve("a", 6) == 6
        clock.advance(2)
        await b.refresh()  # the relay has seen the new day (watch) before the round settles
        assert b.left(ALL) == 10
        await b.settle("a", 6, 2)
        await b.refresh()
        assert b.left(ALL) == 10
        before = SharedBudget(LimitsConfig(daily_budget=10), Metrics(), box,
                              ManualClock(day_start(NOON) + 3600))
        await before.refresh()
        assert before.left(ALL) == 8
    finally:
        await box.close()


def test_shared_counts_are_not_loaded() -> None:
    """A shared budget is never seeded from one relay's outbox: its counts are the
    database's, read by refresh()."""
    store = PostgresOutbox(Secret("postgresql:///never-opened"), node="t")
    shared = SharedBudget(LimitsConfig(daily_budget=10), Metrics(), store, ManualClock(NOON))
    with pytest.raises(NotImplementedError,
                       match=r"^a shared budget's counts are in the database: refresh\(\)$"):
        shared.load({"a": (1, 1)})


async def test_watch_refreshes_every_second_and_survives_failures(pg_url: str, caplog) -> None:
    """watch() reads every relay's counts once a second; a refresh that fails is logged and
    the next second's is tried again."""
    clock = ManualClock(NOON)
    boxes = await _outboxes(pg_url, 2, clock)
    watching = None
    try:
        mine, other = (SharedBudget(LimitsConfig(daily_budget=10), Metrics(), box, clock)
                       for box in boxes)
        watching = asyncio.create_task(mine.watch())

        def asleep() -> bool:
            """watch() waits on the test's clock: nothing moves until the test does."""
            assert not watching.done(), "watch() ended"
            return clock.waiting > 0

        await other.settle("a", await other.reserve("a", 3), 3)
        assert mine.left(ALL) == 10  # not seen yet
        await eventually(asleep, what="watch waiting")
        clock.advance(1)
        await eventually(lambda: mine.left(ALL) == 7, what="the other relay's sends seen",
                         settled=asleep)
        await boxes[0].close()
        failed = 'budget_refresh_failed error="the outbox is not open"'
        for times in (1, 2):  # fails, and is tried again a second later
            await eventually(asleep, what="watch waiting")
            clock.advance(1)
            await eventually(lambda t=times: caplog.text.count(failed) == t,
                             what=f"failure {times}", settled=asleep)
        assert not watching.done()
    finally:
        if watching is not None:
            watching.cancel()
        for box in boxes:
            await box.close()


async def test_a_settlement_that_fails_is_logged(pg_url: str, caplog) -> None:
    """A settlement the database cannot take is logged with the provider and the error; its
    reservation stands (less is sent, never more)."""
    clock = ManualClock(NOON)
    (box,) = await _outboxes(pg_url, 1, clock)
    b = SharedBudget(LimitsConfig(daily_budget=10), Metrics(), box, clock)
    assert await b.reserve("a", 4) == 4
    await box.close()
    await b.settle("a", 4, 1)
    assert 'budget_settle_failed provider=a error="the outbox is not open"' in caplog.text
    assert b.left(ALL) == 6
