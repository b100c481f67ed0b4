"""The webhook's admission step for a valid body: duplicates, per-recipient limits, budget.

``Admitter`` is the step's interface: ``admit`` decides (synchronously: it runs on the hot
path), then ``commit`` or ``abort`` closes the admission once the enqueue has committed or
failed, so concurrent requests see each other's reservations and duplicates of a body being
stored wait for its answer. ``Guard`` is the in-memory implementation, rebuilt from the
outbox at start: right for one relay on its own outbox. ``SharedGuard`` leaves duplicates,
windows and ``queue.max_pending`` to the transaction of the enqueue itself
(``CheckingQueue``), and reads the budgets the relays share (``SharedBudget``), so that they
hold across the relays that share a database.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import orjson

from hapsms_relay import log
from hapsms_relay.budget import Budget, SharedBudget, day_start
from hapsms_relay.clock import SYSTEM, Clock
from hapsms_relay.dedup import Replies, Reply, body_key, header_key
from hapsms_relay.limits import RATE_LIMITED, Limiter, LimitsConfig, Refusal
from hapsms_relay.metrics import Metrics
from hapsms_relay.outbox import Checked, CheckingQueue, History, NewEntry, Queue

LOAD_CHUNK = 10_000  # rows read at a time at start


@dataclass
class Admission:
    entries: list[NewEntry] = field(default_factory=list)  # to enqueue
    refused: list[tuple[NewEntry, Refusal]] = field(default_factory=list)
    keys: list[tuple[bytes, float]] = field(default_factory=list)  # stored with the entries
    at: float = 0.0
    duplicate: Reply | asyncio.Future[Reply | None] | None = None
    #: decided by the storage in the enqueue's transaction: ``Admitter.store`` stores it
    deferred: bool = False

    def note(self) -> bytes:
        """The refused recipients as the response lists them (JSON), or b""."""
        if not self.refused:
            return b""
        return orjson.dumps([{"mobile": e.recipient, "error": r.code, "detail": r.detail}
                             for e, r in self.refused])


class Admitter(Protocol):
    """Admission of webhook bodies: duplicates, limits and budgets."""

    def admit(self, entries: Sequence[NewEntry], idempotency_key: str | None) -> Admission:
        """What of a valid body may be stored (``entries``, with ``keys`` to store with
        them), what is refused, or the answer of a duplicate."""

    def commit(self, adm: Admission, ids: Sequence[int]) -> None:
        """The enqueue of ``adm.entries`` committed with these ids."""

    def abort(self, adm: Admission) -> None:
        """The enqueue failed (or was refused): give back what ``admit`` reserved."""

    def set_config(self, cfg: LimitsConfig) -> None: ...

    async def load(self, outbox: Queue) -> None:
        """Rebuild what admission needs from the outbox (at start)."""

    def prune(self, now: float, limit: int = 1 << 62) -> int:
        """Forget up to ``limit`` expired things; return how many."""

    async def store(self, adm: Admission, ttl: float, max_pending: int) -> Checked:
        """Enqueue a ``deferred`` admission, deciding it (and ``queue.max_pending``) in the
        same transaction."""


class Guard:
    """``Admitter`` in memory: windows, answers and budget use of this process."""

    def __init__(self, cfg: LimitsConfig, budget: Budget, metrics: Metrics,
                 clock: Clock = SYSTEM) -> None:
        self.clock = clock
        self.limiter = Limiter(cfg)
        self.replies = Replies()
        self.budget = budget
        self.metrics = metrics
        self.cfg = cfg
        self._full = False  # limits_full was logged for the sketch now live
        metrics.limits_numbers.set_function(lambda: self.limiter.held)

    def set_config(self, cfg: LimitsConfig) -> None:
        self.cfg = cfg
        self.limiter.cfg = cfg
        self.budget.set_config(cfg)

    def admit(self, entries: Sequence[NewEntry], idempotency_key: str | None) -> Admission:
        now = self.clock.time()
        cfg = self.cfg
        adm = Admission(at=now)
        keys = []
        if idempotency_key is not None:
            keys.append((header_key(idempotency_key), now + cfg.idempotency_ttl))
        if cfg.dedup_window > 0:
            keys.append((body_key(entries), now + cfg.dedup_window))
        if keys:
            found = self.replies.find((k for k, _ in keys), now)
            if found is not None:
                adm.duplicate = found
                return adm
        over = _budget_refusal(self.budget, cfg)
        for e in entries:
            refusal = over or self.limiter.check(e.kind, e.recipient, e.region, now, e.number_type)
            if refusal is None:
                adm.entries.append(e)
                if not self.limiter.take(e.kind, e.recipient, now):
                    self._overflow()
            else:
                adm.refused.append((e, refusal))
                self.metrics.refused.labels(refusal.code).inc()
        if adm.entries:
            adm.keys = keys
            self.replies.storing(k for k, _ in keys)
        return adm

    def _overflow(self) -> None:
        """A new number past limits.max_numbers: counted in a sketch (limits.py)."""
        self.metrics.limits_overflow.inc()
        if not self._full:
            self._full = True
            log.warning("limits_full", numbers=self.limiter.held,
                        max_numbers=self.cfg.max_numbers)

    def commit(self, adm: Admission, ids: Sequence[int]) -> None:
        self.replies.stored(adm.keys, ids, adm.note())

    def abort(self, adm: Admission) -> None:
        for e in adm.entries:
            self.limiter.untake(e.kind, e.recipient, adm.at)
        self.replies.failed(k for k, _ in adm.keys)

    async def load(self, outbox: Queue) -> None:
        """Windows, answers and today's budget use from what the outbox holds."""
        now = self.clock.time()
        # a chunk at a time: a day of rows in one list (1,000,000 of a backlog) was ~230 MB
        after = -1
        while rows := await outbox.recent(now - self.cfg.retention, after, LOAD_CHUNK):
            self.limiter.load(rows)
            after = rows[-1][0]
        after = -1
        while keys := await outbox.replies(now, after, LOAD_CHUNK):
            self.replies.load(k[1:] for k in keys)
            after = keys[-1][0]
        sent = await outbox.sent_since(day_start(now))
        self.budget.load(sent)

    def prune(self, now: float, limit: int = 1 << 62) -> int:
        """Forget up to ``limit`` expired windows and answers; return how many."""
        n = self.limiter.prune(now, limit)
        if self._full and not self.limiter.sketched:
            self._full = False
        return n + self.replies.prune(now, limit - n)

    async def store(self, adm: Admission, ttl: float, max_pending: int) -> Checked:
        raise NotImplementedError("Guard admissions are never deferred")


class SharedGuard:
    """``Admitter`` for relays sharing a database: countries, number types and the budget's
    refusal (from the shared budget's view) are decided here, duplicates, per-number windows
    and ``queue.max_pending`` in the enqueue's own transaction (numbers locked, keys unique,
    windows counted from an index), so the same body posted to two relays at once is stored
    once, and windows and the outbox's bound hold in total."""

    def __init__(self, cfg: LimitsConfig, budget: SharedBudget, metrics: Metrics,
                 outbox: CheckingQueue, clock: Clock = SYSTEM) -> None:
        self.clock = clock
        self.budget = budget
        self.metrics = metrics
        self.outbox = outbox
        self.set_config(cfg)

    def set_config(self, cfg: LimitsConfig) -> None:
        self.cfg = cfg
        self._rules = Limiter(cfg)  # never takes: its checks are countries and number types
        self.budget.set_config(cfg)

    def admit(self, entries: Sequence[NewEntry], idempotency_key: str | None) -> Admission:
        now = self.clock.time()
        cfg = self.cfg
        adm = Admission(at=now, deferred=True)
        if idempotency_key is not None:
            adm.keys.append((header_key(idempotency_key), now + cfg.idempotency_ttl))
        if cfg.dedup_window > 0:
            adm.keys.append((body_key(entries), now + cfg.dedup_window))
        over = _budget_refusal(self.budget, cfg)
        for e in entries:
            refusal = over or self._rules.check(e.kind, e.recipient, e.region, now, e.number_type)
            if refusal is None:
                adm.entries.append(e)
            else:
                adm.refused.append((e, refusal))
                self.metrics.refused.labels(refusal.code).inc()
        return adm

    async def store(self, adm: Admission, ttl: float, max_pending: int) -> Checked:
        cfg, now = self.cfg, adm.at
        refused_here = list(adm.refused)

        def history() -> History:
            return Limiter(cfg)

        def decide(book: History) -> tuple[list[NewEntry], bytes]:
            assert isinstance(book, Limiter)
            admitted: list[NewEntry] = []
            adm.refused = list(refused_here)  # decided again if the transaction is retried
            for e in adm.entries:
                refusal = book.check(e.kind, e.recipient, e.region, now, e.number_type or "-")
                if refusal is None:
                    admitted.append(e)
                    book.take(e.kind, e.recipient, now)
                else:
                    adm.refused.append((e, refusal))
            return admitted, adm.note()

        done = await self.outbox.enqueue_checked(
            adm.entries, ttl, keys=adm.keys, since=now - cfg.retention, history=history,
            decide=decide, max_pending=max_pending)
        for _, refusal in adm.refused[len(refused_here):]:
            self.metrics.refused.labels(refusal.code).inc()
        return done

    def commit(self, adm: Admission, ids: Sequence[int]) -> None:
        pass  # in the database already

    def abort(self, adm: Admission) -> None:
        pass  # nothing was reserved here

    async def load(self, outbox: Queue) -> None:
        """Today's budget counts, as the relays share them."""
        await self.budget.refresh()

    def prune(self, now: float, limit: int = 1 << 62) -> int:
        return 0


def _budget_refusal(budget: Budget, cfg: LimitsConfig) -> Refusal | None:
    """The refusal of every entry of a body while the daily budget is used up and refuses."""
    if budget.hold or not budget.exhausted():
        return None
    return Refusal(RATE_LIMITED, 429, f"the daily budget of {cfg.daily_budget} messages "
                   "is used up (limits.daily_budget)")
