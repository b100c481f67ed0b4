"""The dispatcher alone, fast and deterministic: a real ``Dispatcher`` over a real SQLite
outbox in a temp dir, providers of this process that implement the Provider protocol (they
answer from a script, can hold their calls at a gate and take clock time), and a
ManualClock for every wait. Pins the claim loop (paused, the workers' low water, held
entries, the wait until the next entry is due, TTL expiry at claim), each outcome (sent,
retry with its due time, dead with its error, and their records when a write fails), lease
renewal while a delivery is slow, and deliveries cut at shutdown released."""

from __future__ import annotations

import asyncio
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import pytest

from hapsms_relay import config
from hapsms_relay.budget import Budget
from hapsms_relay.clock import ManualClock
from hapsms_relay.dispatcher import Dispatcher
from hapsms_relay.errors import PermanentError, StorageError, TransientError
from hapsms_relay.kinds import KIND_SMS
from hapsms_relay.log import LOGGER
from hapsms_relay.metrics import Metrics
from hapsms_relay.outbox import Detail, Entry, Event, NewEntry, Row, Sending, State
from hapsms_relay.outbox_sqlite import SQLiteOutbox
from hapsms_relay.providers import Message, Outcome, Sent
from hapsms_relay.providers.base import BaseProvider, Common
from tests.helpers import base_config, eventually, leaked, to_toml

T0 = 1_800_000_000.0  # the ManualClock's start
NUMBER, MASKED = "+8613800138000", "+86*******8000"
SPINNING = 1000  # claims and looks for the next due entry in one test (see Rig.alive)


def ok(m: Message) -> Outcome:
    return Sent((f"ref-{m.id}",), 1)


@dataclass
class Scripted(BaseProvider):
    """A provider of this process: ``answer`` decides each message's outcome; calls wait
    at ``gate`` while it is set up and not opened; each call takes ``took`` clock seconds."""

    answer: Callable[[Message], Outcome] = ok
    clock: ManualClock | None = None
    took: float = 0.0
    gate: asyncio.Event | None = None
    calls: list[Message] = field(default_factory=list)
    holding: int = 0  # messages waiting at the gate

    async def send(self, batch: Sequence[Message]) -> Sequence[Outcome]:
        self.calls.extend(batch)
        if self.gate is not None:
            self.holding += len(batch)
            try:
                await self.gate.wait()
            finally:
                self.holding -= len(batch)
        if self.took and self.clock is not None:
            self.clock.advance(self.took)
        return [self.answer(m) for m in batch]


@dataclass
class Batching(Scripted):
    """A provider whose calls carry up to three recipients (the claim fills one)."""

    max_batch: ClassVar[int] = 3


class Faulty(SQLiteOutbox):
    """The real SQLite outbox; ``fail[op] = n`` makes its next n calls of ``op`` raise
    StorageError before touching the database, as a full disk would."""

    def __init__(self, path: str, clock: ManualClock) -> None:
        super().__init__(path, clock=clock)
        self.fail: dict[str, int] = {}
        self.renewals = 0
        self.looks = 0  # claims and looks for the next due entry

    def _check(self, op: str) -> None:
        if self.fail.get(op, 0) > 0:
            self.fail[op] -= 1
            raise StorageError("outbox: database or disk is full")

    async def claim(self, owner: str, limit: int, now: float, lease: float) -> list[Entry]:
        self.looks += 1
        self._check("claim")
        return await super().claim(owner, limit, now, lease)

    async def next_due(self) -> float | None:
        self.looks += 1
        self._check("next_due")
        return await super().next_due()

    async def renew(self, owner: str, ids: Sequence[int], until: float) -> int:
        self._check("renew")
        held = await super().renew(owner, ids, until)
        self.renewals += 1
        return held

    async def sent(self, provider: str, entries: Sequence[Sending]) -> None:
        self._check("sent")
        await super().sent(provider, entries)

    async def retry(self, owner: str, id: int, due: float, provider: str, error: str,
                    trail: Sequence[Event] = ()) -> None:
        self._check("retry")
        await super().retry(owner, id, due, provider, error, trail)

    async def dead(self, owner: str, id: int, provider: str, error: str,
                   trail: Sequence[Event] = ()) -> None:
        self._check("dead")
        await super().dead(owner, id, provider, error, trail)

    async def release(self, owner: str, ids: Sequence[int]) -> None:
        self._check("release")
        await super().release(owner, ids)


@dataclass
class Rig:
    dispatcher: Dispatcher
    outbox: Faulty
    clock: ManualClock
    a: Scripted
    b: Scripted
    metrics: Metrics

    async def post(self, *numbers: str, ttl: float = 900.0, text: str = "code 1234") -> list[int]:
        """One body to ``numbers`` stored, the dispatcher told."""
        ids = await self.outbox.enqueue(
            [NewEntry(KIND_SMS, n, "CN", n[3:], text, "明道云") for n in numbers or (NUMBER,)], ttl)
        self.dispatcher.notify()
        return ids

    async def row(self, id: int) -> Row:
        detail = await self.detail(id)
        return detail.row

    async def detail(self, id: int) -> Detail:
        found = await self.outbox.show(id)
        assert found is not None
        return found

    async def reached(self, id: int, state: State) -> Row:
        """The entry's row once it is in ``state``."""
        async def there() -> bool:
            return (await self.row(id)).state == state

        await self.until(there, f"entry {id} {state.name}")
        return await self.row(id)

    async def asleep(self, *, delivering: bool = False) -> None:
        """The claim loop waits on the clock, its wake-up consumed (so it has seen every
        entry stored and every delivery done so far), beside the lease renewer's wait;
        unless ``delivering``, no delivery is running (one that ended wakes the loop)."""
        d = self.dispatcher
        await eventually(lambda: self.waiting() and (delivering or not d.inflight),
                         what="the claim loop asleep")

    def waiting(self) -> bool:
        """The claim loop and the lease renewer both wait on the clock, the loop's wake-up
        consumed; fails at once if they never will again (``alive``)."""
        self.alive()
        return not self.dispatcher._wakeup.is_set() and self.clock.waiting == 2

    def alive(self) -> None:
        """A dispatcher that can no longer do what a test waits for fails the wait at once,
        not at its deadline: the claim loop or the lease renewer has ended (both run until
        stop), or the claim loop spins (it looks at the outbox once per wake-up: 15 times at
        most in any test here, so a thousand is a loop that no longer waits)."""
        running = {t.get_name() for t in asyncio.all_tasks()}
        for name in ("dispatcher", "lease_renewal"):
            assert name in running, f"the dispatcher's {name} task ended"
        assert self.outbox.looks < SPINNING, f"the claim loop spins: {self.outbox.looks} looks"

    def settled(self) -> bool:
        """Nothing can move until the test acts (the clock is the test's): the claim loop and
        the renewer waiting on the clock (``waiting``), and every delivery in flight held at
        a closed gate."""
        held = sum(p.holding for p in (self.a, self.b)
                   if p.gate is not None and not p.gate.is_set())
        return self.waiting() and self.dispatcher.inflight == held

    async def until(self, predicate: Callable[[], bool | Awaitable[bool]], what: str) -> None:
        """``predicate`` true; fails as soon as it cannot be (``settled``), not at the
        deadline."""
        await eventually(predicate, what=what, settled=self.settled)

    def hold(self) -> None:
        """Provider a's calls wait at a gate from now on, until ``release``."""
        self.a.gate = asyncio.Event()

    def release(self) -> None:
        assert self.a.gate is not None
        self.a.gate.set()

    async def next_renewal(self) -> None:
        """The clock moved a third of the lease (30 s) on, and the renewal it brings made."""
        done = self.outbox.renewals
        self.clock.advance(10.0)
        await self.until(lambda: self.outbox.renewals > done, "a renewal")

    async def at_gate(self, n: int) -> None:
        await self.until(lambda: self.a.holding == n, f"{n} messages at the gate")

    def count(self, metric: str, **labels: str) -> float:
        self.metrics.flush()
        value = self.metrics.registry.get_sample_value(f"hapsms_relay_{metric}_total", labels)
        return value or 0.0


Make = Callable[..., Awaitable[Rig]]


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Make]:
    """Builds a started dispatcher: providers ``a`` then ``b`` on the SMS route, leases of
    30 s, retries from 0.5 s to 2 s, 4 workers, no circuit breaker (override any)."""
    made: list[Rig] = []

    async def make(*, paused: bool = False, batching: bool = False, **queue: Any) -> Rig:
        clock = ManualClock(T0)
        doc = base_config(
            tmp_path, queue={"retry_base": "500ms", "retry_max": "2s", "lease": "30s",
                             "workers": 4, **queue},
            providers=[{"name": "a", "type": "log"}, {"name": "b", "type": "log"}],
            routes={"sms": ["a", "b"]}, breaker={"failures": 0})
        parsed = config.parse(tomllib.loads(to_toml(doc)))
        a = Scripted(Common("a", "test"), clock=clock)
        b = (Batching if batching else Scripted)(Common("b", "test"), clock=clock)
        cfg = replace(parsed, providers={"a": a, "b": b})
        outbox = Faulty(str(tmp_path / f"outbox{len(made)}.db"), clock)
        await outbox.open()
        metrics = Metrics()
        d = Dispatcher(outbox, cfg, metrics, Budget(cfg.limits, metrics, clock), paused=paused,
                       clock=clock, owner="relay")
        r = Rig(d, outbox, clock, a, b, metrics)
        made.append(r)
        d.start()
        return r

    yield make
    for r in made:
        for p in (r.a, r.b):
            if p.gate is not None:
                p.gate.set()
        await r.dispatcher.stop(5.0)
        await r.outbox.close()


def logged(capsys: pytest.CaptureFixture[str]) -> list[str]:
    """The log lines so far (none leaking a number or a secret), without their priority."""
    for h in LOGGER.handlers:
        h.flush()
    lines = capsys.readouterr().out.splitlines()
    assert not [x for x in lines if leaked(x)]
    return [x[3:] if x.startswith("<") else x for x in lines]


# -- sent ----------------------------------------------------------------------------------


async def test_sent_is_recorded_counted_and_logged(rig: Make, capsys: pytest.CaptureFixture[str]) -> None:
    """A message the provider accepts is stored sent with its refs, segments and latency,
    counted (activity and metrics) and logged with one ref, several, or none."""
    r = await rig()
    r.a.took = 0.01234
    answers = iter([Sent(("m-1",), 2), Sent(("p-1", "p-2"), 3), Sent((), 0)])
    r.a.answer = lambda m: next(answers)
    ids = []
    for _ in range(3):  # one round each, one after the other
        (i,) = await r.post()
        await r.reached(i, State.SENT)
        ids.append(i)
    details = [await r.detail(i) for i in ids]
    assert [(d.row.provider, d.refs, d.segments) for d in details] == [
        ("a", ("m-1",), 2), ("a", ("p-1", "p-2"), 3), ("a", (), 0)]
    for d in details:
        (event,) = [e for e in d.events if e.kind == "sent"]
        assert event.provider == "a" and event.latency == pytest.approx(0.01234, abs=1e-6)
    assert r.dispatcher.activity.sent == 3
    assert r.count("messages_sent", provider="a", type="sms") == 3
    assert r.count("segments", provider="a") == 5
    lines = logged(capsys)
    head = f"to={MASKED} provider=a type=sms attempt=1 latency_ms=12.3"
    assert f"sent id={ids[0]} {head} ref=m-1 segments=2" in lines
    assert f'sent id={ids[1]} {head} ref="p-1 p-2" segments=3' in lines
    assert f"sent id={ids[2]} {head}" in lines


async def test_failover_keeps_the_first_providers_failure_in_the_history(rig: Make) -> None:
    """Sent by the second provider after the first failed transiently: the sent record
    carries the first one's failure (the round's trail) before it."""
    r = await rig()
    r.a.answer = lambda m: TransientError("a", "http_500", "boom")
    (i,) = await r.post()
    row = await r.reached(i, State.SENT)
    assert row.provider == "b"
    events = [(e.kind, e.provider, e.code, e.text) for e in (await r.detail(i)).events]
    assert events == [("attempt", "a", "http_500", "boom"), ("sent", "b", "", f"ref-{i}")]


async def test_sent_but_not_recorded_is_still_counted_and_logged(
    rig: Make, capsys: pytest.CaptureFixture[str],
) -> None:
    """A send whose record fails is logged as such and as sent, counted, and its entry left
    in flight for its lease to run out (at least once)."""
    r = await rig()
    r.outbox.fail["sent"] = 1
    (i,) = await r.post()
    await r.until(lambda: r.dispatcher.activity.sent == 1, "the send counted")
    await r.asleep()
    assert (await r.row(i)).state == State.INFLIGHT
    lines = logged(capsys)
    assert 'outbox_update_failed error="outbox: database or disk is full" count=1' in lines
    assert any(x.startswith(f"sent id={i} ") for x in lines)


# -- retry -----------------------------------------------------------------------------------


async def test_retry_is_due_after_the_backoff(rig: Make, capsys: pytest.CaptureFixture[str]) -> None:
    """A transient failure on every provider puts the entry back due after the backoff (the
    first: retry_base itself), with the failures in its history, and logs it."""
    r = await rig()
    r.a.answer = lambda m: TransientError("a", "http_500", "boom")
    r.b.answer = lambda m: TransientError("b", "http_503", "busy")
    (i,) = await r.post()
    row = await r.reached(i, State.PENDING)
    assert (row.due, row.attempts, row.provider, row.error) == (T0 + 0.5, 1, "b", "b http_503: busy")
    events = [(e.kind, e.provider, e.code) for e in (await r.detail(i)).events]
    assert events == [("attempt", "a", "http_500"), ("attempt", "b", "http_503"), ("retry", "b", "")]
    await r.asleep()
    assert f"retry_scheduled id={i} to={MASKED} in_s=0.5 attempt=1" in logged(capsys)


async def test_retry_after_is_honoured(rig: Make, capsys: pytest.CaptureFixture[str]) -> None:
    """The provider's Retry-After past retry_max sets the due time; the log rounds it."""
    r = await rig()
    r.a.answer = lambda m: TransientError("a", "http_429", "slow down", retry_after=7.125)
    r.b.answer = r.a.answer
    (i,) = await r.post()
    row = await r.reached(i, State.PENDING)
    assert row.due == T0 + 7.125
    await r.asleep()
    assert f"retry_scheduled id={i} to={MASKED} in_s=7.12 attempt=1" in logged(capsys)


async def test_retry_grows_and_is_sent_when_due(rig: Make) -> None:
    """The claim loop sleeps exactly until the retry is due (not a poll later, not sooner),
    then the second attempt waits between base and twice the base."""
    r = await rig()
    r.a.answer = lambda m: TransientError("a", "http_500", "boom")
    r.b.answer = lambda m: TransientError("b", "http_503", "busy")
    (i,) = await r.post()
    await r.reached(i, State.PENDING)
    await r.asleep()
    r.clock.advance(0.49)
    assert r.clock.waiting == 2  # neither the loop's wait (0.5 s) nor the renewer's ended
    r.clock.advance(0.01)
    assert r.clock.waiting == 1  # the loop's did
    await r.until(lambda: len(r.a.calls) == 2, "the second attempt")
    row = await r.reached(i, State.PENDING)
    assert row.attempts == 2 and T0 + 0.5 + 0.5 <= row.due <= T0 + 0.5 + 1.0


async def test_loop_looks_at_least_every_idle_poll(rig: Make) -> None:
    """With the next entry due far later, the claim loop still looks again after a second
    (IDLE_POLL): other relays and admin commands change the outbox too."""
    r = await rig()
    r.a.answer = r.b.answer = lambda m: TransientError("a", "http_429", "x", retry_after=60.0)
    (i,) = await r.post()
    await r.reached(i, State.PENDING)
    await r.asleep()
    r.clock.advance(0.99)
    assert r.clock.waiting == 2
    r.clock.advance(0.01)
    assert r.clock.waiting == 1


async def test_retry_that_would_pass_the_ttl_is_dead(rig: Make, capsys: pytest.CaptureFixture[str]) -> None:
    """A retry due at or past the entry's TTL is dead at once, saying how many attempts
    were made and the last failure; one due just before it is retried."""
    r = await rig()
    r.a.answer = lambda m: TransientError("a", "http_500", "boom")
    r.b.answer = lambda m: TransientError("b", "http_503", "busy")
    (late,) = await r.post(ttl=0.5)  # the first retry (retry_base, 0.5 s) is due at its TTL
    (early,) = await r.post(ttl=0.5 + 1e-6)
    row = await r.reached(late, State.DEAD)
    assert (row.provider, row.error) == ("b", "expired after 1 attempts; last: b http_503: busy")
    assert [e.kind for e in (await r.detail(late)).events] == ["attempt", "attempt", "dead"]
    assert (await r.reached(early, State.PENDING)).due == T0 + 0.5
    await r.asleep()
    assert (f'dead id={late} to={MASKED} provider=b code=http_503 reason="expired after 1 '
            'attempts; last: b http_503: busy" attempt=1') in logged(capsys)


async def test_retry_not_recorded_is_logged_not_scheduled(
    rig: Make, capsys: pytest.CaptureFixture[str],
) -> None:
    """A retry whose record fails is logged as such and not as scheduled; the entry stays
    in flight for its lease to run out."""
    r = await rig()
    r.outbox.fail["retry"] = 1
    r.a.answer = r.b.answer = lambda m: TransientError("b", "http_503", "busy")
    (i,) = await r.post()
    await r.until(lambda: len(r.b.calls) == 1, "the attempt")
    await r.asleep()
    assert (await r.row(i)).state == State.INFLIGHT
    lines = logged(capsys)
    assert f'outbox_update_failed error="outbox: database or disk is full" id={i}' in lines
    assert not [x for x in lines if x.startswith("retry_scheduled")]


# -- dead ------------------------------------------------------------------------------------


async def test_permanent_failure_is_dead(rig: Make, capsys: pytest.CaptureFixture[str]) -> None:
    """A permanent failure is dead at once with the provider's reason, counted (activity,
    metrics by provider) and logged; the next provider is not tried."""
    r = await rig()
    r.a.answer = lambda m: PermanentError("a", "http_400", "bad number")
    dead = []
    for _ in range(2):
        (i,) = await r.post()
        row = await r.reached(i, State.DEAD)
        assert (row.provider, row.error) == ("a", "a http_400: bad number")
        dead.append(i)
    assert r.b.calls == []
    assert r.dispatcher.activity.dead == 2
    assert r.count("messages_dead", provider="a", type="sms") == 2
    await r.asleep()
    assert (f'dead id={dead[0]} to={MASKED} provider=a code=http_400 reason="a http_400: bad '
            'number" attempt=1') in logged(capsys)


async def test_dead_not_recorded_is_not_counted(rig: Make, capsys: pytest.CaptureFixture[str]) -> None:
    """A dead outcome whose record fails is logged as such, not counted, not logged dead."""
    r = await rig()
    r.outbox.fail["dead"] = 1
    r.a.answer = lambda m: PermanentError("a", "http_400", "bad number")
    (i,) = await r.post()
    await r.until(lambda: len(r.a.calls) == 1, "the attempt")
    await r.asleep()
    assert (await r.row(i)).state == State.INFLIGHT
    assert r.dispatcher.activity.dead == 0
    assert r.count("messages_dead", provider="a", type="sms") == 0
    lines = logged(capsys)
    assert f'outbox_update_failed error="outbox: database or disk is full" id={i}' in lines
    assert not [x for x in lines if x.startswith("dead ")]


# -- TTL at claim ------------------------------------------------------------------------------


async def test_entry_past_its_ttl_when_claimed_is_dead_unsent(
    rig: Make, capsys: pytest.CaptureFixture[str],
) -> None:
    """An entry claimed at or after its TTL is dead without a provider call; one claimed
    before it is sent."""
    r = await rig(paused=True)
    (expired,) = await r.post(ttl=5.0)
    (live,) = await r.post(ttl=5.0 + 1e-6)
    await r.asleep()
    r.clock.advance(5.0)
    r.dispatcher.paused = False
    r.dispatcher.notify()
    row = await r.reached(expired, State.DEAD)
    assert (row.provider, row.error) == ("", "expired: ttl passed before delivery")
    await r.reached(live, State.SENT)
    assert [m.id for m in r.a.calls] == [live]
    assert r.count("messages_dead", provider="none", type="sms") == 1
    await r.asleep()
    assert (f'dead id={expired} to={MASKED} reason="expired: ttl passed before delivery" '
            'attempt=1') in logged(capsys)


async def test_retried_entry_past_its_ttl_keeps_its_last_failure(rig: Make) -> None:
    """An entry retried before and claimed after its TTL is dead with its attempts so far
    and its last failure, without another call."""
    r = await rig(retry_base="1s")
    r.a.answer = r.b.answer = lambda m: TransientError("b", "http_503", "busy")
    (i,) = await r.post(ttl=10.0)
    await r.reached(i, State.PENDING)
    await r.asleep()
    r.clock.advance(10.0)
    row = await r.reached(i, State.DEAD)
    assert (row.provider, row.error) == ("", "expired after 1 attempts; last: b http_503: busy")
    assert (len(r.a.calls), len(r.b.calls)) == (1, 1)


# -- the claim loop ----------------------------------------------------------------------------


async def test_paused_dispatcher_claims_nothing(rig: Make) -> None:
    """Paused, the loop claims nothing however often it looks; resumed, it delivers."""
    r = await rig(paused=True)
    (i,) = await r.post()
    await r.asleep()
    for _ in range(3):
        r.clock.advance(1.0)
        await r.asleep()
    assert (await r.row(i)).state == State.PENDING and r.a.calls == []
    r.dispatcher.paused = False
    r.dispatcher.notify()
    await r.reached(i, State.SENT)


async def test_claims_again_while_a_quarter_of_the_workers_is_free(rig: Make) -> None:
    """With 4 workers, 3 busy still leave room to claim one more; 4 busy do not, and the
    rest wait pending (not claimed) until workers free up."""
    r = await rig(workers=4)
    r.hold()
    first = await r.post("+8613800138001", "+8613800138002", "+8613800138003")
    await r.at_gate(3)
    fourth, fifth = await r.post("+8613800138004"), await r.post("+8613800138005")
    await r.at_gate(4)
    await r.asleep(delivering=True)
    states = [(await r.row(i)).state for i in (*first, *fourth, *fifth)]
    assert states[:3] == [State.INFLIGHT] * 3
    assert sorted(states[3:]) == [State.PENDING, State.INFLIGHT]  # whichever was claimed
    r.release()
    for i in (*first, *fourth, *fifth):
        await r.reached(i, State.SENT)


async def test_one_worker_claims_one_and_holds_a_batch_remainder(rig: Make) -> None:
    """One worker claims one message at a time; with a batching provider configured it
    claims a batch's worth, starts what the worker can carry and holds the rest (claimed),
    then delivers the held ones first, one at a time."""
    r = await rig(workers=1)
    r.hold()
    ids = [(await r.post(f"+861380013800{n}"))[0] for n in range(3)]
    await r.at_gate(1)
    await r.asleep(delivering=True)
    assert sorted([(await r.row(i)).state for i in ids]) == [
        State.PENDING, State.PENDING, State.INFLIGHT]
    r.release()
    for i in ids:
        await r.reached(i, State.SENT)

    r = await rig(workers=1, batching=True)
    r.hold()
    held = await r.post("+8613800138001", "+8613800138002", "+8613800138003")
    await r.at_gate(1)
    await r.asleep(delivering=True)
    assert [(await r.row(i)).state for i in held] == [State.INFLIGHT] * 3
    assert len(r.a.calls) == 1
    r.release()
    for i in held:
        await r.reached(i, State.SENT)
    assert [m.id for m in r.a.calls] == held


async def test_failed_claim_and_look_are_retried_after_a_poll(
    rig: Make, capsys: pytest.CaptureFixture[str],
) -> None:
    """A claim that fails is logged and tried again after IDLE_POLL; so is a failed look
    for the next due entry."""
    r = await rig()
    await r.asleep()
    r.outbox.fail["next_due"] = 1
    r.clock.advance(1.0)  # the next look: nothing to claim, and the look for what is due fails
    await r.until(lambda: r.outbox.fail["next_due"] == 0, "the failed look")
    await r.asleep()
    r.outbox.fail["claim"] = 1
    (i,) = await r.post()
    await r.until(lambda: r.outbox.fail["claim"] == 0, "the failed claim")
    await r.asleep()
    assert (await r.row(i)).state == State.PENDING
    r.clock.advance(1.0)
    await r.reached(i, State.SENT)
    assert 'outbox_claim_failed error="outbox: database or disk is full"' in logged(capsys)


# -- leases ------------------------------------------------------------------------------------


async def test_leases_renewed_while_delivering_and_held(
    rig: Make, capsys: pytest.CaptureFixture[str],
) -> None:
    """Every third of the lease the entries being delivered and those held are renewed for
    a lease from then (all of them: none noted as lost), so no other relay claims them;
    with none in flight the renewer keeps going."""
    r = await rig(workers=1, batching=True)
    await r.asleep()
    r.clock.advance(9.99)
    assert r.clock.waiting == 1  # the loop's poll ended, not the renewer's wait
    await r.asleep()
    r.clock.advance(0.01)
    assert r.clock.waiting == 1  # now the renewer's: a third of the lease
    await r.asleep()  # nothing in flight: nothing renewed, and it waits again
    assert r.outbox.renewals == 0 and r.dispatcher.renewed_at == 0.0
    r.hold()
    held = await r.post("+8613800138001", "+8613800138002", "+8613800138003")
    await r.at_gate(1)
    await r.next_renewal()
    assert r.dispatcher.renewed_at == T0 + 20.0
    # the claim's lease ran to T0 + 40, the renewal's to T0 + 50
    assert await r.outbox.claim("other", 10, T0 + 45.0, 30.0) == []
    assert not [x for x in logged(capsys) if x.startswith("leases_not_renewed")]  # all held
    r.release()
    for i in held:
        await r.reached(i, State.SENT)


async def test_renewal_failure_is_logged_and_renewal_goes_on(
    rig: Make, capsys: pytest.CaptureFixture[str],
) -> None:
    """A renewal that fails is logged with its count; the next one is made."""
    r = await rig()
    r.hold()
    r.outbox.fail["renew"] = 1
    await r.post()
    await r.at_gate(1)
    r.clock.advance(10.0)
    await r.until(lambda: r.outbox.fail["renew"] == 0, "the failed renewal")
    await r.next_renewal()
    assert r.dispatcher.renewed_at == T0 + 20.0
    assert 'lease_renewal_failed error="outbox: database or disk is full" count=1' in logged(capsys)


async def test_lease_lost_to_another_relay_is_noted(
    rig: Make, capsys: pytest.CaptureFixture[str],
) -> None:
    """Entries another relay claimed after their lease ran out are not renewed, and the
    debug log says how many."""
    r = await rig()
    r.hold()
    ids = await r.post("+8613800138001", "+8613800138002")
    await r.at_gate(2)
    (taken,) = await r.outbox.claim("other", 1, T0 + 30.0, 30.0)  # one of them
    assert taken.id in ids
    await r.next_renewal()
    assert r.dispatcher.renewed_at == T0 + 10.0
    assert "leases_not_renewed count=1" in logged(capsys)


# -- shutdown ----------------------------------------------------------------------------------


async def test_deliveries_cut_at_shutdown_are_released(
    rig: Make, capsys: pytest.CaptureFixture[str],
) -> None:
    """Deliveries still running when stop's timeout ends are cancelled and their entries
    pending again, due now, the attempt not counted; the log says how many."""
    r = await rig()
    r.hold()
    ids = [*await r.post("+8613800138001", "+8613800138002"), *await r.post("+8613800138003")]
    await r.at_gate(3)
    await r.dispatcher.stop(0)
    rows = [await r.row(i) for i in ids]
    assert [(x.state, x.due, x.attempts) for x in rows] == [(State.PENDING, T0, 0)] * 3
    assert r.a.holding == 0
    assert "shutdown_cut_deliveries count=3" in logged(capsys)


async def test_shutdown_waits_for_deliveries_within_its_timeout(rig: Make) -> None:
    """Deliveries that finish within stop's timeout finish (their outcome recorded) before
    stop returns, and nothing is released."""
    r = await rig()
    r.hold()
    (i,) = await r.post()
    await r.at_gate(1)
    stopping = asyncio.create_task(r.dispatcher.stop(60.0))
    r.release()
    await stopping
    assert (await r.row(i)).state == State.SENT


async def test_release_failing_at_shutdown_still_stops(rig: Make) -> None:
    """A release that fails at shutdown leaves the entries to their leases; stop returns."""
    r = await rig()
    r.hold()
    r.outbox.fail["release"] = 1
    (i,) = await r.post()
    await r.at_gate(1)
    await r.dispatcher.stop(0)
    assert (await r.row(i)).state == State.INFLIGHT
