"""Daily spending budgets: messages per calendar day (server local time), per provider and
overall, counted when a provider accepts a message. Sends are reserved before they go, so
concurrent deliveries cannot overshoot; counts are rebuilt from the outbox at start.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from hapsms_relay import log
from hapsms_relay.clock import SYSTEM, Clock
from hapsms_relay.limits import LimitsConfig
from hapsms_relay.metrics import Metrics

ALL = "all"  # the overall budget's name in logs and metrics


def day_start(now: float) -> float:
    """Local midnight before ``now``."""
    t = time.localtime(now)
    return time.mktime((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0, 0, 0, -1))


class Budget:
    def __init__(self, cfg: LimitsConfig, metrics: Metrics, clock: Clock = SYSTEM) -> None:
        self.metrics = metrics
        self.clock = clock
        self.used: dict[str, int] = {}  # provider -> delivered today; ALL: the sum
        self.reserved: dict[str, int] = {}
        self._warned: set[tuple[str, str]] = set()
        self._day = day_start(clock.time())
        self._next_day = day_start(self._day + 90000)  # the next local midnight, DST or not
        self.set_config(cfg)

    def set_config(self, cfg: LimitsConfig) -> None:
        self.cfg = cfg
        self.limits: dict[str, int] = dict(cfg.provider_budgets)
        if cfg.daily_budget:
            self.limits[ALL] = cfg.daily_budget
        for name in self.limits:
            self._publish(name)

    @property
    def hold(self) -> bool:
        return self.cfg.over_budget == "hold"

    def load(self, delivered_today: Mapping[str, int]) -> None:
        """Seed today's counts (``Queue.sent_since(day_start)``, messages)."""
        for name, n in delivered_today.items():
            if name:
                self.used[name] = self.used.get(name, 0) + n
            self.used[ALL] = self.used.get(ALL, 0) + n
        for name in self.limits:
            self._publish(name)

    def left(self, name: str) -> int | None:
        """Messages ``name`` (or ALL) may still send today; None without a budget."""
        self._roll()
        limit = self.limits.get(name)
        if limit is None:
            return None
        return max(0, limit - self.used.get(name, 0) - self.reserved.get(name, 0))

    def exhausted(self) -> bool:
        """The overall budget is used up (the webhook refuses in ``refuse`` mode)."""
        left = self.left(ALL)
        return left is not None and left <= 0

    def reserve(self, name: str, wanted: int) -> int:
        """Reserve up to ``wanted`` sends through ``name``; return how many may go."""
        n = wanted
        for scope in (name, ALL):
            left = self.left(scope)
            if left is not None:
                n = min(n, left)
        for scope in (name, ALL):
            if scope in self.limits:
                self.reserved[scope] = self.reserved.get(scope, 0) + n
        return n

    def settle(self, name: str, reserved: int, delivered: int) -> None:
        """A round through ``name`` is over: release its reservation, count what was sent."""
        for scope in (name, ALL):
            if scope in self.limits:
                self.reserved[scope] = max(0, self.reserved.get(scope, 0) - reserved)
            self.used[scope] = self.used.get(scope, 0) + delivered
            if scope in self.limits and delivered:
                self._check(scope)

    def _check(self, name: str) -> None:
        limit = self.limits[name]
        used = self.used.get(name, 0)
        self._publish(name)
        if used >= limit and (name, "out") not in self._warned:
            self._warned.add((name, "out"))
            log.warning("budget_exhausted", provider=name, used=used, budget=limit,
                        then="hold" if self.hold else "refuse")
        elif used >= limit * self.cfg.budget_warning and (name, "low") not in self._warned:
            self._warned.add((name, "low"))
            log.warning("budget_low", provider=name, used=used, budget=limit)

    def _publish(self, name: str) -> None:
        limit = self.limits.get(name)
        if limit is not None:
            left = max(0, limit - self.used.get(name, 0))
            self.metrics.budget_remaining.labels(name).set(left)

    def _roll(self) -> None:
        now = self.clock.time()
        if now < self._next_day:
            return
        today = day_start(now)
        if today != self._day:
            self._day = today
            self.used.clear()
            self._warned.clear()
            for name in self.limits:
                self._publish(name)
        self._next_day = day_start(today + 90000)
