"""Daily spending budgets: messages, or segments (billed SMS parts), per calendar day (server
local time), per provider and overall, counted when a provider accepts a message. Sends are
reserved before they go (segments as ``segments.count`` expects them), so concurrent
deliveries cannot overshoot; counts are rebuilt from the outbox at start.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from hapsms_relay import log
from hapsms_relay.clock import SYSTEM, Clock
from hapsms_relay.limits import LimitsConfig
from hapsms_relay.metrics import Metrics

ALL = "all"  # the overall budget's name in logs and metrics


def day_start(now: float) -> float:
    """Local midnight before ``now``."""
    t = time.localtime(now)
    return time.mktime((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0, 0, 0, -1))


#: what a budget counts: messages sent, or the segments (billed parts) they cost
MESSAGES, SEGMENTS = "messages", "segments"
Unit = str


class Budget:
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

    def reserve(self, name: str, wanted: int, costs: Sequence[int] = ()) -> int:
        """Reserve up to ``wanted`` sends through ``name`` (``costs``: each one's expected
        segments, for segment budgets); return how many, from the first, may go."""
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
        cost = sum(costs[:n])
        for scope in (name, ALL):
            for unit, amount in ((MESSAGES, n), (SEGMENTS, cost)):
                if (unit, scope) in self.limits:
                    self.reserved[unit, scope] = self.reserved.get((unit, scope), 0) + amount
        return n

    def settle(self, name: str, reserved: int, sent: int, reserved_segments: int = 0,
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


def _shown(unit: Unit) -> str | None:
    """The unit in a log line: said for segments, messages being the default."""
    return unit if unit == SEGMENTS else None
