"""The dispatcher: claims due outbox entries and delivers them through their route.

Transient failures fail over to the next provider of the route at once; when every provider
failed transiently the entry is retried later with exponential backoff and full jitter
(honouring ``Retry-After``) until its TTL. Permanent failures are dead at once. A provider
that cannot carry a message (no template, no voice) hands it on without counting a failure.

Entries are claimed for ``owner`` with a lease (``queue.lease``) renewed while they are
being delivered; one whose outcome could not be written is no longer renewed, so it is
claimed again once its lease runs out (here or on another relay): at least once.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hapsms_relay import log, segments
from hapsms_relay.breaker import Breakers
from hapsms_relay.budget import Budget
from hapsms_relay.clock import SYSTEM, Clock
from hapsms_relay.config import Config
from hapsms_relay.errors import DeliveryError, StorageError, TransientError, UnsupportedError
from hapsms_relay.kinds import KIND_VOICE, Kind, kind_name
from hapsms_relay.metrics import Metrics
from hapsms_relay.outbox import Entry, Event, Outbox, Sending
from hapsms_relay.providers import Message, Outcome, Provider, Sent
from hapsms_relay.rate import RateLimiter

CLAIM_BATCH = 256
IDLE_POLL = 1.0  # seconds between looks at the outbox when nothing wakes the dispatcher
# A provider call still running this long after its own timeout is a provider bug: the
# watchdog cancels it (looking once a second) and the call's messages are retried.
CALL_GRACE = 5.0
WATCHDOG_EVERY = 1.0


@dataclass
class Activity:
    """What the status line and ``/readyz`` report."""

    sent: int = 0
    dead: int = 0
    last_error: str = ""
    last_error_at: float = 0.0


@dataclass
class Attempt:
    """What one entry went through in one delivery round."""

    transient: TransientError | None = None
    unsupported: UnsupportedError | None = None
    sent: bool = False
    segments: int = 0  # what the provider that sent it bills
    trail: list[Event] = field(default_factory=list)  # the round's failures, for the history

    def failed(self, err: DeliveryError, at: float, latency: float) -> None:
        self.trail.append(Event(at, "attempt", err.provider, err.code, err.text, latency))


@dataclass
class Dispatcher:
    outbox: Outbox
    config: Config
    metrics: Metrics
    budget: Budget  # shared with the webhook, which refuses when it is used up
    activity: Activity = field(default_factory=Activity)
    paused: bool = False
    _wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    _inflight: dict[asyncio.Task[None], list[int]] = field(default_factory=dict)
    _inflight_entries: int = 0
    _busy: int = 0  # workers in use: provider calls started or planned by running deliveries
    _costs: dict[asyncio.Task[None], int] = field(default_factory=dict)  # each one's calls
    _held: list[Entry] = field(default_factory=list)  # claimed; started when workers free up
    _semaphores: dict[str, asyncio.Semaphore] = field(default_factory=dict)
    _limiters: dict[str, RateLimiter] = field(default_factory=dict)  # kept across reloads
    _stopping: bool = False
    _task: asyncio.Task[None] | None = None
    _renewer: asyncio.Task[None] | None = None
    _watchdog: asyncio.Task[None] | None = None
    # provider calls in progress: the task making each, and when (loop time) it is overdue
    _calls: dict[asyncio.Task[Any], float] = field(default_factory=dict)
    _overdue: set[asyncio.Task[Any]] = field(default_factory=set)
    owner: str = "relay"  # who claims: unique to this process among the storage's writers
    renewed_at: float = 0.0  # when leases were last renewed (clock time)
    clock: Clock = SYSTEM
    breakers: Breakers = field(init=False)

    def __post_init__(self) -> None:
        self.breakers = Breakers(self.config.breaker, self.metrics, self.clock)
        self.breakers.track(list(self.config.providers))

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="dispatcher")
        self._renewer = asyncio.create_task(self._renew(), name="lease_renewal")
        self._watchdog = asyncio.create_task(self._watch(), name="provider_watchdog")

    def notify(self) -> None:
        """Something was enqueued: look now rather than at the next poll."""
        if not self.paused:
            self._wakeup.set()

    def set_config(self, config: Config) -> None:
        """Use a new config from the next claim on; deliveries in flight finish as they were.

        Providers get new concurrency limits with it: a delivery round keeps the config and
        the limits it started with, so old and new providers never share a semaphore.
        """
        self.config = config
        self._semaphores = {}
        self.breakers.cfg = config.breaker
        self.breakers.track(list(config.providers))

    async def stop(self, timeout: float) -> None:
        """Claim nothing more; give deliveries in flight ``timeout`` seconds, then stop them."""
        self._stopping = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        claimed = dict(self._inflight)  # a task's ids leave _inflight once it is done
        held, self._held = self._held, []
        try:
            if held:  # claimed, never started: pending again at once
                with contextlib.suppress(StorageError):
                    await self.outbox.release(self.owner, [e.id for e in held])
            await self._stop_deliveries(claimed, timeout)
        finally:
            for task in (self._renewer, self._watchdog):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task

    async def _stop_deliveries(self, claimed: dict[asyncio.Task[None], list[int]],
                               timeout: float) -> None:
        if claimed:
            _, late = await asyncio.wait(claimed, timeout=timeout)
            for t in late:
                t.cancel()
            if late:
                await asyncio.wait(late)
                ids = [i for t in late for i in claimed[t]]
                log.warning("shutdown_cut_deliveries", count=len(ids))
                with contextlib.suppress(StorageError):
                    await self.outbox.release(self.owner, ids)

    async def drain_current(self) -> None:
        """Wait for the deliveries in flight now (not those started later) to finish."""
        tasks = list(self._inflight)
        if tasks:
            await asyncio.wait(tasks)

    async def _renew(self) -> None:
        """Keep the leases of the entries being delivered; the others run out."""
        while True:
            lease = self.config.queue.lease
            await self.clock.sleep(lease / 3)
            ids = [i for ids in self._inflight.values() for i in ids]
            ids += [e.id for e in self._held]
            if not ids:
                continue
            try:
                held = await self.outbox.renew(self.owner, ids, self.clock.time() + lease)
            except StorageError as exc:
                log.error("lease_renewal_failed", error=str(exc), count=len(ids))
                continue
            self.renewed_at = self.clock.time()
            if held < len(ids):  # finished meanwhile, or this relay was too slow to renew
                log.debug("leases_not_renewed", count=len(ids) - held)

    async def _watch(self) -> None:
        """Cancel provider calls overdue by ``CALL_GRACE`` past their own timeout. One sweep a
        second instead of an ``asyncio.timeout`` per call: a timeout's timer handle, its
        context manager and its reschedule cost ~29,000 instructions per message."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(WATCHDOG_EVERY)
            now = loop.time()
            for task, due in list(self._calls.items()):
                if due <= now and task not in self._overdue:
                    self._overdue.add(task)
                    task.cancel()

    # -- the claim loop ----------------------------------------------------------------------

    async def _run(self) -> None:
        workers = self.config.queue.workers
        while not self._stopping:
            # Claim in batches: wait until a quarter of the workers are free (or none is
            # busy) rather than claiming one entry per finished delivery; a claim is a
            # transaction, and one per message cost more than the message's status update.
            if self.paused or (self._busy and self._busy > _low_water(workers)):
                await self._sleep(IDLE_POLL)
                workers = self.config.queue.workers
                continue
            now = self.clock.time()
            if self._held:  # claimed before, no worker was free for them: first
                entries, self._held = self._held, []
            else:
                # a worker is one call, and a batching provider's call carries up to
                # max_batch recipients of one body: claim enough to fill one
                limit = min(CLAIM_BATCH, workers - self._busy) + self._biggest_batch() - 1
                try:
                    entries = await self.outbox.claim(self.owner, limit, now, self.config.queue.lease)
                except StorageError as exc:
                    log.error("outbox_claim_failed", error=str(exc))
                    await self._sleep(IDLE_POLL)
                    continue
            if not entries:
                try:
                    due = await self.outbox.next_due()
                except StorageError:
                    due = None
                wait = IDLE_POLL if due is None else min(max(due - self.clock.time(), 0.0), IDLE_POLL)
                await self._sleep(wait)
                continue
            live = []
            for e in entries:
                if e.expires <= now:
                    # its retry came due before its TTL, the claim after (a busy relay): the
                    # reason keeps the last failure, as when a retry would pass the TTL
                    reason = (f"expired after {e.attempts - 1} attempts; last: {e.error}"
                              if e.error else "expired: ttl passed before delivery")
                    await self._dead(e, "", reason, "")
                else:
                    live.append(e)
            for group in self._groups(live):
                self._start(group, workers)

    def _start(self, group: list[Entry], workers: int) -> None:
        """Deliver as much of ``group`` as free workers can call now; hold the rest."""
        size = self._batch_size(group)
        room = max(0, workers - self._busy) * size
        start, rest = group[:room], group[room:]
        self._held.extend(rest)
        if not start:
            return
        cost = -(-len(start) // size)  # calls: one per max_batch recipients
        task = asyncio.create_task(self._deliver(start))
        self._inflight[task] = [e.id for e in start]
        self._inflight_entries += len(start)
        self._costs[task] = cost
        self._busy += cost
        task.add_done_callback(self._done)

    def _batch_size(self, group: list[Entry]) -> int:
        """Recipients per call of the first provider of the group's route."""
        route = self.config.routes.route(_kind(group[0]), group[0].recipient)
        return max(1, self.config.providers[route[0]].max_batch)

    def _biggest_batch(self) -> int:
        return max((max(1, p.max_batch) for p in self.config.providers.values()), default=1)

    async def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            await self.clock.wait(self._wakeup, seconds)
        self._wakeup.clear()

    def _done(self, task: asyncio.Task[None]) -> None:
        ids = self._inflight.pop(task, [])
        self._inflight_entries -= len(ids)
        self._busy -= self._costs.pop(task, 0)  # most gave theirs back already (_calls_done)
        if not task.cancelled() and task.exception() is not None:
            # its entries' leases are no longer renewed: they are claimed again later
            log.error("delivery_task_failed", error=repr(task.exception()))
        # it may have put an entry back due sooner than the claim loop's next look
        self._wakeup.set()

    def _free(self, cost: int) -> None:
        """Workers given back: wake the claim loop if it waits for them (held entries, or
        the low water just reached), not when it waits for entries: a claim that finds
        nothing is a round trip to the outbox for nothing."""
        if not cost:
            return
        low_water = _low_water(self.config.queue.workers)
        before = self._busy
        self._busy -= cost
        if self._held or self._stopping or before > low_water >= self._busy:
            self._wakeup.set()

    def _groups(self, entries: Sequence[Entry]) -> list[list[Entry]]:
        """Entries of one body, kind and route travel together (batching providers)."""
        groups: dict[tuple[int, int, tuple[str, ...]], list[Entry]] = {}
        for e in entries:
            route = self.config.routes.route(_kind(e), e.recipient)
            groups.setdefault((e.batch, e.kind, route), []).append(e)
        return list(groups.values())

    # -- one delivery round --------------------------------------------------------------------

    async def _deliver(self, entries: list[Entry]) -> None:
        config, semaphores = self.config, self._semaphores
        route = list(config.routes.route(_kind(entries[0]), entries[0].recipient))
        if config.routes.strategy == "random":
            random.shuffle(route)
        attempts = {e.id: Attempt() for e in entries}
        pending = entries
        for name in route:
            if not pending:
                break
            provider = config.providers[name]
            pending, sent = await self._try_gated(provider, pending, attempts, semaphores)
            if sent:
                if not pending:
                    self._calls_done()
                # recorded before the rest fails over: a crash meanwhile resends only those
                await self._sent(provider, sent, attempts)
        self._calls_done()
        for e in pending:
            a = attempts[e.id]
            if a.transient is not None:
                await self._retry(e, a.transient, a.trail)
            else:
                assert a.unsupported is not None
                await self._dead(e, a.unsupported.provider, a.unsupported.reason(),
                                 a.unsupported.code, a.trail)

    def _calls_done(self) -> None:
        """The running delivery makes no more provider calls: its workers are free while it
        records its outcomes. A claim need not wait for those writes (a round trip to a
        database, where a cluster's outbox is): workers bound calls, not writes."""
        task = asyncio.current_task()
        if task is not None:
            self._free(self._costs.pop(task, 0))

    async def _try_gated(
        self, provider: Provider, entries: list[Entry], attempts: dict[int, Attempt],
        semaphores: dict[str, asyncio.Semaphore],
    ) -> tuple[list[Entry], list[tuple[Entry, Sent, float]]]:
        """``_try_provider`` within the provider's daily budget and circuit breaker: what
        either holds back is handed on to the next provider of the route, with what the
        provider sent (to be recorded)."""
        name = provider.common.name
        limiter = self._limiter(provider)
        if limiter is not None and limiter.waiting and (
            limiter.waiting + len(entries) > limiter.rate.count + provider.common.concurrency
        ):
            await self._defer(entries, name, limiter)
            return [], []
        budget = self.budget
        # segment budgets reserve what each text is expected to cost; the provider's own
        # count is what is settled
        costs = [expected_segments(e) for e in entries] if budget.counts_segments else []
        try:
            n = await budget.reserve(name, len(entries), costs)
        except StorageError as exc:  # a budget the relays share, out of reach: none goes now
            for e in entries:
                if attempts[e.id].transient is None:
                    attempts[e.id].transient = TransientError(name, "storage_unavailable", str(exc))
            return entries, []
        cost = sum(costs[:n])
        held = entries[n:]
        for e in held:
            a = attempts[e.id]
            if budget.hold and a.transient is None:
                # no Retry-After: the usual backoff (at most retry_max) looks again, so a
                # reload that raises the budget, or midnight, releases it soon
                a.transient = TransientError(name, "over_budget", "daily budget used up")
            elif not budget.hold and a.unsupported is None:
                a.unsupported = UnsupportedError(name, "over_budget", "daily budget used up")
        if not n:
            return held, []
        wait = self.breakers.allow(name)
        if wait:
            await budget.settle(name, n, 0, cost)
            for e in entries[:n]:
                if attempts[e.id].transient is None:
                    attempts[e.id].transient = TransientError(
                        name, "circuit_open", "skipped while its circuit is open (last failure: "
                        f"{self.breakers.last_error(name) or 'unknown'})", retry_after=wait)
            return entries, []
        try:
            carried, sent = await self._try_provider(provider, entries[:n], attempts, semaphores)
        finally:  # the reservation becomes what was sent; the rest is freed
            await budget.settle(name, n, sum(attempts[e.id].sent for e in entries[:n]), cost,
                                sum(attempts[e.id].segments for e in entries[:n]))
        return carried + held, sent

    async def _try_provider(
        self, provider: Provider, entries: list[Entry], attempts: dict[int, Attempt],
        semaphores: dict[str, asyncio.Semaphore],
    ) -> tuple[list[Entry], list[tuple[Entry, Sent, float]]]:
        """Send through one provider; return the entries the next provider should try, and
        those it sent (``_sent`` records them)."""
        size = max(1, provider.max_batch)
        chunks = [entries[i : i + size] for i in range(0, len(entries), size)]
        if len(chunks) == 1:  # the common case: no gather, no task of its own
            results = [await self._send(provider, chunks[0], semaphores)]
        else:
            results = await asyncio.gather(*(self._send(provider, c, semaphores) for c in chunks))
        carried: list[Entry] = []
        sent: list[tuple[Entry, Sent, float]] = []
        now = self.clock.time()
        for chunk, (outcomes, elapsed) in zip(chunks, results, strict=True):
            for e, outcome in zip(chunk, outcomes, strict=True):
                if isinstance(outcome, Sent):
                    sent.append((e, outcome, elapsed))
                    attempts[e.id].sent = True
                    attempts[e.id].segments = outcome.segments
                    continue
                attempts[e.id].failed(outcome, now, elapsed)
                if isinstance(outcome, UnsupportedError):
                    attempts[e.id].unsupported = outcome
                    carried.append(e)
                elif isinstance(outcome, TransientError):
                    attempts[e.id].transient = outcome
                    self._note_error(outcome)
                    self.metrics.retried.labels(provider.common.name, _kind(e)).inc()
                    log.warning(
                        "attempt_failed", id=e.id, to=log.mask(e.recipient),
                        provider=provider.common.name, code=outcome.code, error=outcome.text,
                        attempt=e.attempts,
                    )
                    carried.append(e)
                else:
                    self._note_error(outcome)
                    await self._dead(e, provider.common.name, outcome.reason(), outcome.code,
                                     attempts[e.id].trail[:-1])
        return carried, sent

    async def _send(
        self, provider: Provider, entries: list[Entry], semaphores: dict[str, asyncio.Semaphore]
    ) -> tuple[Sequence[Outcome], float]:
        """One call to the provider: its outcomes, and how long it took."""
        name = provider.common.name
        sem = semaphores.get(name)
        if sem is None:
            sem = semaphores[name] = asyncio.Semaphore(provider.common.concurrency)
        messages = [self._message(e, provider) for e in entries]
        limiter = self._limiter(provider)
        if limiter is not None:
            # waiting for its rate, this call is no worker: other providers' messages go on
            self._busy -= 1
            self._wakeup.set()
            try:
                await limiter.acquire()
            finally:
                self._busy += 1
        task = asyncio.current_task()
        assert task is not None
        try:
            async with sem:
                started = self.clock.monotonic()
                # above the provider's own timeout: a provider bug must not hang a slot
                self._calls[task] = asyncio.get_running_loop().time() + (
                    provider.common.timeout + CALL_GRACE)
                try:
                    outcomes = await provider.send(messages)
                except asyncio.CancelledError:
                    # the watchdog's cancel, and nobody else's: the call timed out
                    if task not in self._overdue or task.uncancel():
                        raise
                    outcomes = [TransientError(name, "timeout", "provider did not answer")] * len(entries)
                except TimeoutError:
                    outcomes = [TransientError(name, "timeout", "provider did not answer")] * len(entries)
                except Exception as exc:  # a provider bug: keep the message, say so loudly
                    log.LOGGER.exception("provider_crashed provider=%s", name)
                    outcomes = [TransientError(name, "internal_error", type(exc).__name__)] * len(entries)
                finally:
                    del self._calls[task]
                    self._overdue.discard(task)
                elapsed = self.clock.monotonic() - started
        finally:
            if limiter is not None:
                limiter.release()
        self.metrics.provider_latency(name).observe(elapsed)
        if len(outcomes) != len(entries):
            err = TransientError(name, "internal_error", "provider returned a wrong outcome count")
            outcomes = [err] * len(entries)
        self.breakers.record(name, outcomes)
        return outcomes, elapsed

    def _limiter(self, provider: Provider) -> RateLimiter | None:
        """The provider's rate limiter, the same one across reloads while its rate stays."""
        rate, name = provider.common.rate, provider.common.name
        if rate is None:
            return None
        limiter = self._limiters.get(name)
        if limiter is None or limiter.rate != rate:
            limiter = self._limiters[name] = RateLimiter(rate, self.clock)
        return limiter

    async def _defer(self, entries: list[Entry], name: str, limiter: RateLimiter) -> None:
        """More is waiting for the provider's rate than a window and its concurrency: these
        wait in the outbox instead, due when the queue ahead should have drained. Not a
        failure: no provider is tried instead, nothing is logged above debug."""
        due = self.clock.time() + limiter.expected_wait(len(entries))
        for e in entries:
            if due >= e.expires:
                await self._dead(e, name, f"expired waiting for its rate {limiter.rate}", "rate")
                continue
            try:
                await self.outbox.retry(self.owner, e.id, due, name,
                                        f"waiting for its rate {limiter.rate}")
            except StorageError as exc:
                log.error("outbox_update_failed", error=str(exc), id=e.id)
        log.debug("rate_deferred", provider=name, count=len(entries),
                  in_s=round(due - self.clock.time(), 2))

    def _message(self, e: Entry, provider: Provider) -> Message:
        return make_message(e, provider, self.config.routes.voice_fallback_text)

    # -- outcomes ------------------------------------------------------------------------------

    async def _sent(self, provider: Provider, entries: list[tuple[Entry, Sent, float]],
                    attempts: dict[int, Attempt]) -> None:
        name = provider.common.name
        try:
            await self.outbox.sent(name, [
                Sending(e.id, s.ids, s.segments, elapsed, tuple(attempts[e.id].trail))
                for e, s, elapsed in entries])
        except StorageError as exc:
            # Sent, but not recorded: its lease runs out and it is sent again (at least once).
            log.error("outbox_update_failed", error=str(exc), count=len(entries))
        self.activity.sent += len(entries)
        for e, s, elapsed in entries:
            self.metrics.sent_to(name, _kind(e), s.segments)
            log.info(
                "sent", id=e.id, to=log.mask(e.recipient), provider=name,
                type=_kind(e), attempt=e.attempts, latency_ms=round(elapsed * 1000, 1),
                ref=s.ids[0] if len(s.ids) == 1 else " ".join(s.ids) or None,
                segments=s.segments or None,
            )

    async def _retry(self, e: Entry, err: TransientError, trail: Sequence[Event] = ()) -> None:
        q = self.config.queue
        now = self.clock.time()
        delay = backoff(e.attempts, q.retry_base, q.retry_max, err.retry_after)
        due = now + delay
        if due >= e.expires:
            await self._dead(
                e, err.provider, f"expired after {e.attempts} attempts; last: {err.reason()}",
                err.code, trail,
            )
            return
        try:
            await self.outbox.retry(self.owner, e.id, due, err.provider, err.reason(), trail)
        except StorageError as exc:
            log.error("outbox_update_failed", error=str(exc), id=e.id)
            return
        log.info("retry_scheduled", id=e.id, to=log.mask(e.recipient), in_s=round(delay, 2),
                 attempt=e.attempts)

    async def _dead(self, e: Entry, provider: str, reason: str, code: str,
                    trail: Sequence[Event] = ()) -> None:
        try:
            await self.outbox.dead(self.owner, e.id, provider, reason, trail)
        except StorageError as exc:
            log.error("outbox_update_failed", error=str(exc), id=e.id)
            return
        self.activity.dead += 1
        self.metrics.dead.labels(provider or "none", _kind(e)).inc()
        log.warning("dead", id=e.id, to=log.mask(e.recipient), provider=provider or None,
                    code=code or None, reason=reason, attempt=e.attempts)

    def _note_error(self, err: DeliveryError) -> None:
        self.activity.last_error = f"{err.provider} {err.code}"
        self.activity.last_error_at = self.clock.time()

    @property
    def inflight(self) -> int:
        return self._inflight_entries


def backoff(attempt: int, base: float, cap: float, retry_after: float | None = None) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1, 2, ...): full jitter between
    ``base`` and ``base * 2**(attempt - 1)`` capped at ``cap``, and never less than the
    provider's ``retry_after``: its own word wins over ``cap`` (the TTL still bounds it)."""
    # The exponent is bounded: a long TTL allows thousands of attempts, and 2.0**1024 overflows.
    ceiling = min(cap, base * 2.0 ** min(max(attempt - 1, 0), 64))
    delay = random.uniform(base, max(base, ceiling))
    if retry_after is not None:
        delay = max(delay, retry_after)
    return delay


def expected_segments(e: Entry) -> int:
    """What an entry should cost before a provider says: its text with HAP's signature in
    【】 (as Tencent and Alibaba count it); a voice code, none."""
    if e.kind == KIND_VOICE:
        return 0
    return segments.count(f"【{e.signature}】{e.text}" if e.signature else e.text).count


def make_message(e: Entry, provider: Provider, voice_fallback_text: str) -> Message:
    """What ``provider`` is handed for entry ``e``: a voice code goes as an SMS with the
    fallback text to a provider that cannot place calls."""
    if e.kind == KIND_VOICE:
        text = voice_fallback_text.format(code=e.code)
        kind: Kind = "voice" if provider.supports_voice else "sms"
        return Message(e.id, kind, e.recipient, e.region, e.national, text, "", e.code)
    return Message(e.id, "sms", e.recipient, e.region, e.national, e.text, e.signature, "")


def _low_water(workers: int) -> int:
    """Workers busy at most for the claim loop to claim again: a quarter of them free."""
    return workers - max(1, workers // 4)


def _kind(e: Entry) -> str:
    return kind_name(e.kind)
