"""The outbox contract: every backend, through the Queue and Admin interfaces only, stores
what it acknowledges, hands each entry to one owner at a time for a lease, and keeps keys,
counts and outcomes as the relay relies on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from hapsms_relay.clock import ManualClock
from hapsms_relay.outbox import KIND_SMS, KIND_VOICE, NewEntry, Outbox, State
from tests.backends import BACKEND_PARAMS, Backend

DAY = 86400.0
A, B = "relay-a/1", "relay-b/2"


def sms(n: int, text: str = "hi") -> NewEntry:
    national = f"139{n:08d}"
    return NewEntry(KIND_SMS, "+86" + national, "CN", national, text, "Acme")


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
    await box.delivered([i], "p")
    (row,) = await box.list(None, 10)
    assert (row.state, row.provider) == (State.DELIVERED, "p")


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
    assert (st.pending, st.inflight, st.delivered, st.dead) == (0, 3, 0, 0)
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


async def test_recent_and_delivered_since_rebuild_the_limits(box: Outbox, clock: ManualClock) -> None:
    """recent gives entries accepted since a time by id in chunks; delivered_since counts
    deliveries by provider since a time."""
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
    await box.delivered(old, "a")
    clock.advance(1)
    cut = clock.time()
    await box.delivered(new, "b")
    await box.delivered(newest, "a")
    assert await box.delivered_since(cut) == {"a": 1, "b": 2}
    assert await box.delivered_since(cut + 1) == {}


async def test_cleanup_forgets_old_delivered_only(box: Outbox, clock: ManualClock) -> None:
    """cleanup removes delivered entries accepted before the cut and nothing else."""
    old = await box.enqueue([sms(i) for i in range(6)], DAY)
    await box.claim(A, 10, clock.time(), 30)
    await box.delivered(old[:3], "p")
    await box.dead(A, old[3], "p", "refused")
    clock.advance(60)
    newer = await box.enqueue([sms(9)], DAY)
    await box.claim(A, 10, clock.time(), 30)
    await box.delivered(newer, "p")
    assert await box.cleanup(clock.time() - 30) == 3
    assert sorted(r.id for r in await box.list(None, 10)) == [*old[3:], *newer]
    assert box.undelivered == 2 == await box.refresh()
