"""Daily spending budgets: messages, or segments (billed SMS parts), per calendar day (server
local time), per provider and overall, counted when a provider accepts a message. Sends are
reserved before they go (segments as ``segments.count`` expects them), so concurrent
deliveries cannot overshoot. ``Budget`` counts in memory, rebuilt from the outbox at start;
``SharedBudget`` keeps the counts in a database that several relays share.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from hapsms_relay import log
from hapsms_relay.clock import SYSTEM, Clock
from hapsms_relay.errors import StorageError
from hapsms_relay.limits import LimitsConfig
from hapsms_relay.metrics import Metrics
from hapsms_relay.outbox import BudgetKey, CheckingQueue, Spent

ALL = "all"  # the overall budget's name in logs and metrics


def day_start(now: float) -> float:
    """Local midnight before ``now``."""
    t = time.localtime(now)
    return time.mktime((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0, 0, 0, -1))


#: what a budget counts: messages sent, or the segments (billed parts) they cost
MESSAGES, SEGMENTS = "messages", "segments"
Unit = str


class Budget:
    """The budgets of one relay, counted in this process."""

    def __init__(self, cfg: LimitsConfig, metrics: Metrics, clock: Clock = SYSTEM) -> None:
        self.metrics = metrics
        self.clock = clock
        # (unit, provider) -> sent today; (unit, ALL): the sum
        self.used: dict[tuple[Unit, str], int] = {}
        self.reserved: dict[tuple[Unit, str], int] = {}
        self._warned: set[tuple[Unit, str, str]] = set()
        self._day = day_start(clock.time())
        self._next_day = day_start(self._day + 90000)  # the next local midnight, DST or not
        self.set_config(cfg)

    def set_config(self, cfg: LimitsConfig) -> None:
        self.cfg = cfg
        self.limits: dict[tuple[Unit, str], int] = {
            (MESSAGES, n): v for n, v in cfg.provider_budgets.items()}
        self.limits.update({(SEGMENTS, n): v for n, v in cfg.provider_segment_budgets.items()})
        if cfg.daily_budget:
            self.limits[MESSAGES, ALL] = cfg.daily_budget
        if cfg.daily_segment_budget:
            self.limits[SEGMENTS, ALL] = cfg.daily_segment_budget
        self.counts_segments = any(unit == SEGMENTS for unit, _ in self.limits)
        for key in self.limits:
            self._publish(key)

    @property
    def hold(self) -> bool:
        return self.cfg.over_budget == "hold"

    def load(self, sent_today: Mapping[str, tuple[int, int]]) -> None:
        """Seed today's counts (``Queue.sent_since(day_start)``: messages, segments)."""
        for name, counts in sent_today.items():
            for unit, n in zip((MESSAGES, SEGMENTS), counts, strict=True):
                if name:
                    self.used[unit, name] = self.used.get((unit, name), 0) + n
                self.used[unit, ALL] = self.used.get((unit, ALL), 0) + n
        for key in self.limits:
            self._publish(key)

    def left(self, name: str, unit: Unit = MESSAGES) -> int | None:
        """What ``name`` (or ALL) may still send today in ``unit``; None without a budget."""
        self._roll()
        limit = self.limits.get((unit, name))
        if limit is None:
            return None
        return max(0, limit - self.used.get((unit, name), 0) - self.reserved.get((unit, name), 0))

    def exhausted(self) -> bool:
        """An overall budget is used up (the webhook refuses in ``refuse`` mode)."""
        return any((left := self.left(ALL, unit)) is not None and left <= 0
                   for unit in (MESSAGES, SEGMENTS))

    async def reserve(self, name: str, wanted: int, costs: Sequence[int] = ()) -> int:
        """Reserve up to ``wanted`` sends through ``name`` (``costs``: each one's expected
        segments, for segment budgets); return how many, from the first, may go."""
        n = self._fit(name, wanted, costs)
        cost = sum(costs[:n])
        for scope in (name, ALL):
            for unit, amount in ((MESSAGES, n), (SEGMENTS, cost)):
                if (unit, scope) in self.limits:
                    self.reserved[unit, scope] = self.reserved.get((unit, scope), 0) + amount
        return n

    def _fit(self, name: str, wanted: int, costs: Sequence[int]) -> int:
        """How many of ``wanted`` sends through ``name`` what is left allows, from the first."""
        if not self.limits:  # no budget (the usual case): all, and the day still rolls over
            self._roll()
            return wanted
        n = wanted
        for scope in (name, ALL):
            left = self.left(scope)
            if left is not None:
                n = min(n, left)
            left = self.left(scope, SEGMENTS)
            if left is not None:
                fit, total = 0, 0
                for cost in costs[:n]:
                    if total + cost > left:
                        break
                    fit, total = fit + 1, total + cost
                n = fit
        return n

    async def settle(self, name: str, reserved: int, sent: int, reserved_segments: int = 0,
               sent_segments: int = 0) -> None:
        """A round through ``name`` is over: release its reservation, count what was sent."""
        for scope in (name, ALL):
            for unit, held, done in ((MESSAGES, reserved, sent),
                                     (SEGMENTS, reserved_segments, sent_segments)):
                key = (unit, scope)
                if key in self.limits:
                    self.reserved[key] = max(0, self.reserved.get(key, 0) - held)
                self.used[key] = self.used.get(key, 0) + done
                if key in self.limits and done:
                    self._check(key)

    def _check(self, key: tuple[Unit, str]) -> None:
        unit, name = key
        limit = self.limits[key]
        used = self.used.get(key, 0)
        self._publish(key)
        if used >= limit and (unit, name, "out") not in self._warned:
            self._warned.add((unit, name, "out"))
            log.warning("budget_exhausted", provider=name, used=used, budget=limit,
                        then="hold" if self.hold else "refuse", unit=_shown(unit))
        elif used >= limit * self.cfg.budget_warning and (unit, name, "low") not in self._warned:
            self._warned.add((unit, name, "low"))
            log.warning("budget_low", provider=name, used=used, budget=limit, unit=_shown(unit))

    def _publish(self, key: tuple[Unit, str]) -> None:
        limit = self.limits.get(key)
        if limit is not None:
            left = max(0, limit - self.used.get(key, 0))
            gauge = self.metrics.budget_remaining if key[0] == MESSAGES \
                else self.metrics.budget_segments_remaining
            gauge.labels(key[1]).set(left)

    def _roll(self) -> None:
        now = self.clock.time()
        if now < self._next_day:
            return
        today = day_start(now)
        if today != self._day:
            self._day = today
            self.used.clear()
            self._warned.clear()
            for key in self.limits:
                self._publish(key)
        self._next_day = day_start(today + 90000)


class SharedBudget(Budget):
    """The budgets of relays sharing a database: each day's counts are rows there (what was
    sent, and what sends under way on every relay reserved), reserved and settled in
    transactions that lock them across relays (``CheckingQueue.spend``), so a budget holds
    for the relays in total. ``used`` and ``reserved`` are this relay's view of those rows:
    as of its last reservation or settlement, and of ``refresh``, which ``watch`` runs
    every second (the webhook's refusal reads it).

    A relay that dies mid-send leaves its reservation standing until the day is over: a
    budget errs on the side of sending less, never more.
    """

    def __init__(self, cfg: LimitsConfig, metrics: Metrics, store: CheckingQueue,
                 clock: Clock = SYSTEM) -> None:
        super().__init__(cfg, metrics, clock)
        self.store = store
        # each provider's reservations' days, in order, until settled: a round that ran past
        # midnight settles with the day it reserved from
        self._days: dict[str, list[float]] = {}

    async def reserve(self, name: str, wanted: int, costs: Sequence[int] = ()) -> int:
        keys = self._keys(name)
        if not keys or not wanted:  # no budget counts these sends: nothing to ask the database
            return wanted
        self._roll()
        day, granted = self._day, 0

        def take(counts: dict[BudgetKey, Spent]) -> dict[BudgetKey, Spent]:
            nonlocal granted
            self._view(counts)
            granted = self._fit(name, wanted, costs)
            cost = sum(costs[:granted])
            return {key: (0, granted if key[0] == MESSAGES else cost) for key in keys}

        self._seen(day, await self.store.spend(day, keys, take))
        if granted:
            self._days.setdefault(name, []).append(day)
        return granted

    async def settle(self, name: str, reserved: int, sent: int, reserved_segments: int = 0,
                     sent_segments: int = 0) -> None:
        days = self._days.get(name)
        day = days.pop(0) if days else self._day
        change = {key: (sent_segments, -reserved_segments) if key[0] == SEGMENTS
                  else (sent, -reserved) for key in self._keys(name)}
        if not any(any(d) for d in change.values()):
            return
        try:
            self._seen(day, await self.store.spend(day, list(change), lambda _: change))
        except StorageError as exc:
            # the reservation stands for the day: less is sent, never more
            log.warning("budget_settle_failed", provider=name, error=str(exc))

    def load(self, sent_today: Mapping[str, tuple[int, int]]) -> None:
        raise NotImplementedError("a shared budget's counts are in the database: refresh()")

    async def refresh(self) -> None:
        """Today's counts as the database holds them (every relay's sends)."""
        if self.limits:
            self._roll()
            self._seen(self._day, await self.store.spend(self._day, list(self.limits),
                                                         lambda _: {}))

    async def watch(self, every: float = 1.0) -> None:
        """``refresh`` every ``every`` seconds, for as long as the relay runs."""
        while True:
            await self.clock.sleep(every)
            try:
                await self.refresh()
            except StorageError as exc:  # the outbox reports it; the view waits
                log.debug("budget_refresh_failed", error=str(exc))

    def _keys(self, name: str) -> list[BudgetKey]:
        """The counters a send through ``name`` counts in."""
        return [(unit, scope) for scope in (name, ALL) for unit in (MESSAGES, SEGMENTS)
                if (unit, scope) in self.limits]

    def _view(self, counts: Mapping[BudgetKey, Spent]) -> None:
        for key, (sent, reserved) in counts.items():
            self.used[key], self.reserved[key] = sent, reserved

    def _seen(self, day: float, counts: Mapping[BudgetKey, Spent]) -> None:
        """The database's counts of ``day``: this relay's view, gauges and warnings."""
        if day != self._day:
            return
        self._view(counts)
        for key in counts:
            if key in self.limits:
                self._check(key)


def _shown(unit: Unit) -> str | None:
    """The unit in a log line: said for segments, messages being the default."""
    return unit if unit == SEGMENTS else None
