"""The outbox contract: every backend, through the Queue and Admin interfaces only, stores
what it acknowledges, hands each entry to one owner at a time for a lease, and keeps keys,
counts and outcomes as the relay relies on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from hapsms_relay.clock import ManualClock
from hapsms_relay.kinds import KIND_SMS, KIND_VOICE
from hapsms_relay.outbox import Event, NewEntry, Outbox, Sending, State
from hapsms_relay.receipts import Receipt
from tests.backends import BACKEND_PARAMS, Backend
from tests.helpers import sending
from tests.helpers import sms_entry as sms

DAY = 86400.0
A, B = "relay-a/1", "relay-b/2"


Open = Callable[[], Awaitable[Outbox]]


@pytest.fixture(params=BACKEND_PARAMS)
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    b: Backend = request.getfixturevalue(request.param)
    yield b


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def box(backend: Backend, clock: ManualClock) -> AsyncIterator[Outbox]:
    outbox = backend.make(clock)
    await outbox.open()
    yield outbox
    await outbox.close()


async def test_enqueue_stores_what_it_acknowledges(backend: Backend, clock: ManualClock) -> None:
    """Every acknowledged entry is there, field for field, after the outbox is reopened."""
    outbox = backend.make(clock)
    await outbox.open()
    voice = NewEntry(KIND_VOICE, "+8613900000009", "CN", "13900000009", "", "", "123456")
    ids = await outbox.enqueue([sms(1, "héllo 短信"), sms(2)], 60)
    (vid,) = await outbox.enqueue([voice], 60)
    assert outbox.undelivered == 3
    await outbox.close()
    again = backend.make(clock)
    await again.open()
    try:
        assert again.undelivered == 3
        claimed = {e.id: e for e in await again.claim(A, 10, clock.time(), 30)}
        assert set(claimed) == {*ids, vid}
        e = claimed[ids[0]]
        assert (e.kind, e.recipient, e.region, e.national, e.text, e.signature, e.code) == \
            (KIND_SMS, "+8613900000001", "CN", "13900000001", "héllo 短信", "Acme", "")
        assert e.batch == claimed[ids[1]].batch != claimed[vid].batch
        assert (e.created, e.expires, e.attempts) == (clock.time(), clock.time() + 60, 1)
        assert (claimed[vid].kind, claimed[vid].code) == (KIND_VOICE, "123456")
    finally:
        await again.close()


async def test_ids_are_unique_under_concurrent_enqueues(box: Outbox) -> None:
    """Two hundred concurrent enqueues get distinct ids, each body's in the order given."""
    results = await asyncio.gather(*(
        box.enqueue([sms(i * 3 + k) for k in range(1 + i % 3)], 60) for i in range(200)))
    ids = [i for r in results for i in r]
    assert len(set(ids)) == len(ids) == sum(1 + i % 3 for i in range(200))
    assert all(r == sorted(r) for r in results)
    assert (await box.stats()).pending == len(ids) == box.undelivered


async def test_claim_takes_due_entries_once(box: Outbox, clock: ManualClock) -> None:
    """A claim takes only due pending entries, up to its limit; what one owner holds another
    cannot claim while the lease lasts."""
    ids = await box.enqueue([sms(i) for i in range(5)], 60)
    now = clock.time()
    first = await box.claim(A, 3, now, 30)
    assert len(first) == 3 and {e.attempts for e in first} == {1}
    rest = await box.claim(B, 10, now, 30)
    assert {e.id for e in first} | {e.id for e in rest} == set(ids)
    assert not {e.id for e in first} & {e.id for e in rest}
    assert await box.claim(B, 10, now + 29, 30) == []
    st = await box.stats()
    assert (st.pending, st.inflight) == (0, 5)


async def test_lease_runs_out_unless_renewed(box: Outbox, clock: ManualClock) -> None:
    """An expired lease makes the entry claimable by another owner (attempt 2); a renewed one
    is not, and only its owner can renew it."""
    (gone, kept) = await box.enqueue([sms(1), sms(2)], 600)
    now = clock.time()
    assert len(await box.claim(A, 10, now, 30)) == 2
    assert await box.renew(B, [kept], now + 100) == 0  # not B's
    assert await box.renew(A, [kept], now + 100) == 1
    taken = await box.claim(B, 10, now + 30, 100)
    assert [(e.id, e.attempts) for e in taken] == [(gone, 2)]
    assert await box.claim(B, 10, now + 99, 30) == []
    assert [e.id for e in await box.claim(B, 10, now + 100, 30)] == [kept]


async def test_a_claim_of_stranded_and_due_entries_keeps_its_limit(
    box: Outbox, clock: ManualClock
) -> None:
    """Entries whose lease ran out come first, then due ones, and together no more than the
    claim's limit: the rest waits for the next claim."""
    stranded = await box.enqueue([sms(i) for i in range(2)], 600)
    now = clock.time()
    assert len(await box.claim(A, 10, now, 30)) == 2
    due = await box.enqueue([sms(i) for i in range(2, 6)], 600)
    taken = await box.claim(B, 3, now + 30, 30)
    assert len(taken) == 3 and set(stranded) <= {e.id for e in taken}
    rest = await box.claim(B, 10, now + 30, 30)
    assert {e.id for e in taken} | {e.id for e in rest} == set(stranded) | set(due)
    assert len(rest) == 3


async def test_outcomes_of_a_lost_claim_are_ignored(box: Outbox, clock: ManualClock) -> None:
    """Once another owner holds an entry, the old owner's retry, dead or release leaves it
    alone; a delivery is recorded whoever reports it."""
    (i,) = await box.enqueue([sms(1)], 600)
    now = clock.time()
    await box.claim(A, 1, now, 30)
    await box.claim(B, 1, now + 31, 30)
    await box.retry(A, i, now + 40, "p", "late")
    await box.dead(A, i, "p", "late")
    await box.release(A, [i])
    (row,) = await box.list(None, 10)
    assert (row.state, row.attempts, row.error) == (State.INFLIGHT, 2, "")
    await box.sent("p", sending([i]))
    (row,) = await box.list(None, 10)
    assert (row.state, row.provider) == (State.SENT, "p")


async def test_retry_dead_release_and_next_due(box: Outbox, clock: ManualClock) -> None:
    """retry waits until its due time with the reason kept, dead keeps the reason, release
    makes an entry due at once without counting the attempt."""
    r, d, rel = await box.enqueue([sms(1), sms(2), sms(3)], 600)
    now = clock.time()
    await box.claim(A, 10, now, 30)
    await box.retry(A, r, now + 50, "p", "p http_503: busy")
    await box.dead(A, d, "p", "p http_400: no such number")
    await box.release(A, [rel])
    assert await box.next_due() == now
    rows = {row.id: row for row in await box.list(None, 10)}
    assert (rows[r].state, rows[r].due, rows[r].error) == (State.PENDING, now + 50, "p http_503: busy")
    assert (rows[d].state, rows[d].error) == (State.DEAD, "p http_400: no such number")
    assert (rows[rel].state, rows[rel].attempts) == (State.PENDING, 0)
    assert [e.id for e in await box.claim(A, 10, now, 100)] == [rel]
    assert await box.next_due() == now + 50
    assert await box.claim(A, 10, now + 49, 30) == []
    assert [e.id for e in await box.claim(A, 10, now + 50, 30)] == [r]
    assert [row.id for row in await box.list(State.DEAD, 10)] == [d]
    assert box.undelivered == 2 == await box.refresh()


async def test_admin_requeue_and_purge(box: Outbox, clock: ManualClock) -> None:
    """Dead entries go back to pending with a fresh TTL (one, or all), or are purged."""
    ids = await box.enqueue([sms(i) for i in range(4)], 60)
    now = clock.time()
    await box.claim(A, 10, now, 30)
    for i in ids:
        await box.dead(A, i, "p", "refused")
    clock.advance(100)
    assert await box.requeue([ids[0]], 900) == 1
    assert await box.requeue([ids[0]], 900) == 0  # not dead any more
    (e,) = await box.claim(A, 10, clock.time(), 30)
    assert (e.id, e.expires, e.attempts) == (ids[0], clock.time() + 900, 1)
    assert await box.requeue(None, 900) == 3
    await box.claim(A, 10, clock.time(), 30)
    await box.dead(A, ids[1], "p", "refused")
    assert await box.purge_dead() == 1
    st = await box.stats()
    assert (st.pending, st.inflight, st.sent, st.dead) == (0, 3, 0, 0)
    assert st.oldest_pending == now
    assert ids[1] not in {row.id for row in await box.list(None, 10)}


async def test_list_is_newest_first_and_limited(box: Outbox) -> None:
    """list gives the newest entries first, at most ``limit``, optionally of one state."""
    ids = await box.enqueue([sms(i) for i in range(5)], 60)
    assert [r.id for r in await box.list(None, 3)] == ids[::-1][:3]
    assert [r.id for r in await box.list(State.PENDING, 10)] == ids[::-1]
    assert await box.list(State.DEAD, 10) == []


async def test_keys_answer_for_their_ids_until_they_expire(box: Outbox, clock: ManualClock) -> None:
    """Keys stored with an enqueue come back with its ids and note, in the order stored,
    a chunk at a time, until they expire; cleanup forgets the expired ones."""
    now = clock.time()
    first = await box.enqueue([sms(1), sms(2)], 60, keys=[(b"k1", now + 10), (b"k2", now + 100)],
                              note=b'[{"mobile":"+1"}]')
    second = await box.enqueue([sms(3)], 60, keys=[(b"k3", now + 100)])
    rows = await box.replies(now, -1, 2)
    assert [(r[1], list(r[2]), r[3], r[4]) for r in rows] == [
        (b"k1", first, b'[{"mobile":"+1"}]', now + 10), (b"k2", first, b'[{"mobile":"+1"}]', now + 100)]
    more = await box.replies(now, rows[-1][0], 2)
    assert [(r[1], list(r[2]), r[3]) for r in more] == [(b"k3", second, b"")]
    assert [r[1] for r in await box.replies(now + 10, -1, 10)] == [b"k2", b"k3"]
    clock.advance(10)
    await box.cleanup(now - DAY)
    assert [r[1] for r in await box.replies(now, -1, 10)] == [b"k2", b"k3"]


async def test_recent_and_sent_since_rebuild_the_limits(box: Outbox, clock: ManualClock) -> None:
    """recent gives entries accepted since a time by id in chunks; sent_since counts what
    each provider sent since a time, messages and segments."""
    old = await box.enqueue([sms(1)], DAY)
    clock.advance(100)
    since = clock.time()
    new = await box.enqueue([sms(2), sms(3)], DAY)
    clock.advance(1)
    newest = await box.enqueue([sms(2)], DAY)
    chunk = await box.recent(since, -1, 2)
    assert [(r[0], r[1], r[2], r[3]) for r in chunk] == [
        (new[0], KIND_SMS, "+8613900000002", since), (new[1], KIND_SMS, "+8613900000003", since)]
    assert [r[0] for r in await box.recent(since, chunk[-1][0], 2)] == newest
    claimed = await box.claim(A, 10, clock.time(), 30)
    assert len(claimed) == 4
    await box.sent("a", sending(old))
    clock.advance(1)
    cut = clock.time()
    await box.sent("b", [Sending(i, (), 2, 0.1) for i in new])
    await box.sent("a", sending(newest))
    assert await box.sent_since(cut) == {"a": (1, 0), "b": (2, 4)}
    assert await box.sent_since(cut + 1) == {}


async def test_cleanup_forgets_old_delivered_only(box: Outbox, clock: ManualClock) -> None:
    """cleanup removes sent entries accepted before the cut and nothing else."""
    old = await box.enqueue([sms(i) for i in range(6)], DAY)
    await box.claim(A, 10, clock.time(), 30)
    await box.sent("p", sending(old[:3]))
    await box.dead(A, old[3], "p", "refused")
    clock.advance(60)
    newer = await box.enqueue([sms(9)], DAY)
    await box.claim(A, 10, clock.time(), 30)
    await box.sent("p", sending(newer))
    assert await box.cleanup(clock.time() - 30) == 3
    assert sorted(r.id for r in await box.list(None, 10)) == [*old[3:], *newer]
    assert box.undelivered == 2 == await box.refresh()


async def test_oldest_undelivered_follows_the_queue(backend: Backend, clock: ManualClock) -> None:
    """oldest_undelivered is when the oldest pending or in-flight entry was accepted: set by
    an enqueue into an empty outbox, None once the last one is sent or dead, refresh finds
    the next oldest (one in flight, one waiting for its retry, one requeued), and an
    outbox opened again knows it."""
    box = backend.make(clock)
    await box.open()
    assert box.oldest_undelivered is None
    t0 = clock.time()
    (first,) = await box.enqueue([sms(1)], DAY)
    assert box.oldest_undelivered == t0
    clock.advance(10)
    (second,) = await box.enqueue([sms(2)], DAY)
    clock.advance(10)
    (third,) = await box.enqueue([sms(3)], DAY)
    assert box.oldest_undelivered == t0
    await box.claim(A, 10, clock.time(), 30)
    await box.sent("p", sending([first]))
    assert await box.refresh() == 2
    assert box.oldest_undelivered == t0 + 10  # the second, in flight
    await box.retry(A, second, clock.time() + 60, "p", "p http_503")
    await box.dead(A, third, "p", "refused")
    await box.refresh()
    assert box.oldest_undelivered == t0 + 10  # the second, waiting for its retry
    await box.close()
    box = backend.make(clock)
    await box.open()
    try:
        assert box.oldest_undelivered == t0 + 10
        (e,) = await box.claim(A, 10, clock.time() + 60, 30)
        await box.sent("p", sending([e.id]))
        assert box.oldest_undelivered is None
        assert await box.refresh() == 0 and box.oldest_undelivered is None
        clock.advance(5)
        await box.enqueue([sms(4)], DAY)
        assert box.oldest_undelivered == t0 + 25
        assert await box.requeue([third], DAY) == 1
        await box.refresh()
        assert box.oldest_undelivered == t0 + 20  # the dead one waits again
    finally:
        await box.close()


# -- states, history and receipts ---------------------------------------------------------------

def ok(entry: int | None = None, ref: str = "", status: str = "delivered", code: str = "DELIVRD",
       text: str = "") -> Receipt:
    return Receipt(status, entry, ref, code, text)  # type: ignore[arg-type]


async def sent_one(box: Outbox, clock: ManualClock, provider: str = "p",
                   refs: tuple[str, ...] = ("ref-1",), segments: int = 1) -> int:
    (i,) = await box.enqueue([sms(1)], DAY)
    await box.claim(A, 10, clock.time(), 30)
    await box.sent(provider, [Sending(i, refs, segments, 0.25)])
    return i


async def state(box: Outbox, i: int) -> State:
    detail = await box.show(i)
    assert detail is not None
    return detail.row.state


async def test_sent_keeps_ids_segments_and_history(box: Outbox, clock: ManualClock) -> None:
    """sent records the provider's ids, the segments, when, and the round's failed attempts
    before the send, in order; show tells it all."""
    (i,) = await box.enqueue([sms(1)], DAY)
    await box.claim(A, 10, clock.time(), 30)
    clock.advance(2)
    failed = Event(clock.time(), "attempt", "a", "http_500", "down", 0.5)
    await box.sent("b", [Sending(i, ("SM1", "SM2"), 2, 0.125, (failed,))])
    d = await box.show(i)
    assert d is not None
    assert (d.row.state, d.row.provider, d.refs, d.segments, d.sent_at) == (
        State.SENT, "b", ("SM1", "SM2"), 2, clock.time())
    assert d.events == [failed, Event(clock.time(), "sent", "b", "", "SM1 SM2", 0.125)]
    assert await box.show(i + 100) is None


async def test_retry_and_dead_append_to_the_history(box: Outbox, clock: ManualClock) -> None:
    """retry and dead write their step (and the round's attempts) to the history."""
    (i,) = await box.enqueue([sms(1)], DAY)
    await box.claim(A, 10, clock.time(), 30)
    failed = Event(clock.time(), "attempt", "p", "http_503", "", 0.1)
    await box.retry(A, i, clock.time(), "p", "p http_503", [failed])
    retried = clock.time()
    clock.advance(1)
    await box.claim(A, 10, clock.time(), 30)
    await box.dead(A, i, "p", "p 21211: invalid number")
    d = await box.show(i)
    assert d is not None and d.row.state == State.DEAD
    assert d.events == [failed, Event(retried, "retry", "p", "", "p http_503"),
                        Event(clock.time(), "dead", "p", "", "p 21211: invalid number")]


async def test_receipt_moves_sent_forward_only(box: Outbox, clock: ManualClock) -> None:
    """delivered moves sent to delivered; a repeat, a late "on its way" and a later failure
    change nothing but the history."""
    i = await sent_one(box, clock)
    clock.advance(5)
    applied = await box.receipt("p", ok(ref="ref-1"), clock.time())
    assert (applied.outcome, applied.id, applied.state) == ("changed", i, State.DELIVERED)
    assert applied.sent_at == clock.time() - 5
    for late in (ok(ref="ref-1"), ok(i, status="progress", code="sent"),
                 ok(i, status="undelivered", code="UNDELIV")):
        assert (await box.receipt("p", late, clock.time())).outcome == "recorded"
    d = await box.show(i)
    assert d is not None and (d.row.state, d.receipt) == (State.DELIVERED, "DELIVRD")
    assert [e.status for e in d.events if e.kind == "receipt"] == [
        "delivered", "delivered", "progress", "undelivered"]
    st = await box.stats()
    assert (st.sent, st.delivered, st.undelivered) == (0, 1, 0)


async def test_undelivered_keeps_the_reason(box: Outbox, clock: ManualClock) -> None:
    """A final failure makes the entry undelivered with the provider's code and text; a
    late delivered receipt does not undo it."""
    i = await sent_one(box, clock)
    applied = await box.receipt("p", ok(i, status="undelivered", code="30003",
                                        text="Unreachable handset"), clock.time())
    assert (applied.outcome, applied.state) == ("changed", State.UNDELIVERED)
    assert (await box.receipt("p", ok(i), clock.time())).outcome == "recorded"
    d = await box.show(i)
    assert d is not None and d.row.state == State.UNDELIVERED
    assert d.row.error == "p 30003: Unreachable handset"


async def test_parts_are_delivered_together(box: Outbox, clock: ManualClock) -> None:
    """A message in three parts is delivered once each part's receipt said so (a repeat of
    one part does not count twice); any part's failure makes it undelivered."""
    i = await sent_one(box, clock, refs=("m1", "m2", "m3"), segments=3)
    for part in ("m1", "m1", "m2"):
        assert (await box.receipt("p", ok(i, part), clock.time())).outcome == "recorded"
    assert await state(box, i) == State.SENT
    assert (await box.receipt("p", ok(None, "m3"), clock.time())).state == State.DELIVERED
    j = await sent_one(box, clock, refs=("n1", "n2"), segments=2)
    await box.receipt("p", ok(j, "n1"), clock.time())
    await box.receipt("p", ok(j, "n2", status="undelivered", code="6"), clock.time())
    assert await state(box, j) == State.UNDELIVERED


async def test_unknown_and_foreign_receipts_store_nothing(box: Outbox, clock: ManualClock) -> None:
    """A receipt for no entry, or for an entry another provider sent, is unknown and
    stored nowhere."""
    i = await sent_one(box, clock, provider="p")
    for provider, receipt in (("p", ok(ref="nope")), ("p", ok(i + 1000)), ("q", ok(i)),
                              ("q", ok(ref="ref-1"))):
        assert (await box.receipt(provider, receipt, clock.time())).outcome == "unknown"
    d = await box.show(i)
    assert d is not None and d.row.state == State.SENT
    assert [e.kind for e in d.events] == ["sent"]


async def test_receipt_before_the_send_is_recorded(box: Outbox, clock: ManualClock) -> None:
    """A receipt that arrives while the send is still in flight (a fast vendor) is kept,
    and the entry is delivered the moment the send is recorded."""
    (i,) = await box.enqueue([sms(1)], DAY)
    await box.claim(A, 10, clock.time(), 30)
    assert (await box.receipt("p", ok(i, "ref-1"), clock.time())).outcome == "recorded"
    assert await state(box, i) == State.INFLIGHT
    await box.sent("p", [Sending(i, ("ref-1",), 1, 0.1)])
    assert await state(box, i) == State.DELIVERED


async def test_sends_recorded_together_keep_each_entrys_outcome(
    box: Outbox, clock: ManualClock,
) -> None:
    """Several sent calls at once (written together where a backend batches them): each
    entry gets its own provider, ids, segments, history and state, a receipt that came
    before its send included, and none stays counted as undelivered."""
    a, b, c, d = await box.enqueue([sms(n) for n in range(4)], DAY)
    await box.claim(A, 10, clock.time(), 30)
    await box.receipt("p", ok(a, "ra"), clock.time())
    await box.receipt("p", ok(b, "rb", status="undelivered", code="UNDELIV"), clock.time())
    clock.advance(1)
    failed = Event(clock.time(), "attempt", "q", "http_500", "down", 0.5)
    await asyncio.gather(
        box.sent("p", [Sending(a, ("ra",), 1, 0.1)]),
        box.sent("p", [Sending(b, ("rb",), 1, 0.2), Sending(c, ("rc1", "rc2"), 2, 0.3, (failed,))]),
        box.sent("q", [Sending(d, ("rd",), 1, 0.4)]))
    want = {a: (State.DELIVERED, "p", ("ra",), 1), b: (State.UNDELIVERED, "p", ("rb",), 1),
            c: (State.SENT, "p", ("rc1", "rc2"), 2), d: (State.SENT, "q", ("rd",), 1)}
    for i, (st, provider, refs, segments) in want.items():
        detail = await box.show(i)
        assert detail is not None
        assert (detail.row.state, detail.row.provider, detail.refs, detail.segments,
                detail.sent_at) == (st, provider, refs, segments, clock.time())
    detail = await box.show(c)
    assert detail is not None
    assert [(e.kind, e.provider, e.latency) for e in detail.events] == [
        ("attempt", "q", 0.5), ("sent", "p", 0.3)]
    assert (await box.receipt("p", ok(ref="rc2"), clock.time())).id == c
    assert (await box.receipt("q", ok(ref="rd"), clock.time())).state == State.DELIVERED
    assert await box.refresh() == 0


async def test_outcomes_take_ints_and_floats_alike(backend: Backend) -> None:
    """Times and latencies may come as ints or floats (a clock, a provider's timing): sent,
    retry and dead record them mixed in one call, as given; a sent call with no entries
    records nothing."""
    clock = ManualClock(1_800_000_000)
    box = backend.make(clock)
    await box.open()
    try:
        a, b, c, d = await box.enqueue([sms(n) for n in range(4)], DAY)
        await box.claim(A, 10, clock.time(), 30)
        tried = Event(1_800_000_000, "attempt", "q", "http_500", "down", 2)
        clock.advance(0.5)
        now = clock.time()
        await box.sent("p", [Sending(a, ("ra",), 1, 1, (tried,)), Sending(b, ("rb",), 1, 0.25)])
        await box.retry(A, c, now + 60, "p", "p http_503: busy", (tried,))
        await box.dead(A, d, "p", "p http_400: no", (tried,))
        await box.sent("p", [])
        histories: dict[int, tuple[State, list[Event]]] = {}
        for i in (a, b, c, d):
            detail = await box.show(i)
            assert detail is not None
            histories[i] = (detail.row.state, detail.events)
        assert histories == {
            a: (State.SENT, [tried, Event(now, "sent", "p", "", "ra", 1)]),
            b: (State.SENT, [Event(now, "sent", "p", "", "rb", 0.25)]),
            c: (State.PENDING, [tried, Event(now, "retry", "p", "", "p http_503: busy")]),
            d: (State.DEAD, [tried, Event(now, "dead", "p", "", "p http_400: no")])}
        assert await box.refresh() == 1 == box.undelivered
    finally:
        await box.close()


async def test_find_by_number(box: Outbox, clock: ManualClock) -> None:
    """find gives one number's entries since a time, newest first."""
    first = await box.enqueue([sms(1), sms(2)], DAY)
    clock.advance(60)
    cut = clock.time()
    later = await box.enqueue([sms(1)], DAY)
    again = await box.enqueue([sms(1)], DAY)
    assert [r.id for r in await box.find("+8613900000001", cut, 10)] == [*again, *later]
    assert [r.id for r in await box.find("+8613900000001", 0, 10)] == [*again, *later, first[0]]
    assert await box.find("+8613900000009", 0, 10) == []


async def test_cleanup_forgets_the_history_too(box: Outbox, clock: ManualClock) -> None:
    """Entries cleanup forgets take their history and provider ids along: a receipt for
    them is unknown afterwards."""
    i = await sent_one(box, clock)
    await box.receipt("p", ok(ref="ref-1"), clock.time())
    clock.advance(60)
    assert await box.cleanup(clock.time()) == 1
    assert await box.show(i) is None
    assert (await box.receipt("p", ok(ref="ref-1"), clock.time())).outcome == "unknown"
