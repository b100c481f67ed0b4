"""The PostgreSQL outbox's admission in the enqueue's own transaction, through
``enqueue_checked`` on a throwaway server: keys claimed, answered and released (a refused
body's, an expired one's, the duplicates of one batch), ``max_pending`` over the bodies of a
batch and every change to the count, ids taken from the sequence a block at a time, and a
batch (group commit) written in one transaction."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence

import psycopg
import pytest

from hapsms_relay.clock import ManualClock
from hapsms_relay.kinds import KIND_SMS
from hapsms_relay.outbox import Checked, Event, History, NewEntry, Sending
from hapsms_relay.outbox_postgres import _PENDING_LOCK, ID_BLOCK, PostgresOutbox
from hapsms_relay.secret import Secret
from tests.helpers import Book, eventually
from tests.helpers import sms_entry as sms
from tests.pg_server import PostgresServer

OWNER = "relay-a/1"
NOW = 1_800_000_000  # an int: a clock may give either an int or a float


async def admit(box: PostgresOutbox, entries: Sequence[NewEntry], *keys: bytes,
                store: bool = True, note: bytes = b"", max_pending: int = 1000,
                key_ttl: float = 60) -> Checked:
    """One body through admission: every entry stored (``store``) or every one refused with
    ``note``; its keys live ``key_ttl`` seconds."""
    now = box.clock.time()

    def decide(book: History) -> tuple[list[NewEntry], bytes]:
        return (list(entries) if store else []), note

    return await box.enqueue_checked(
        entries, 600, keys=[(k, now + key_ttl) for k in keys], since=now - 3600, history=Book,
        decide=decide, max_pending=max_pending)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(NOW)


@pytest.fixture
async def box(pg_url: str, clock: ManualClock) -> AsyncIterator[PostgresOutbox]:
    outbox = PostgresOutbox(Secret(pg_url), clock=clock, node="a")
    await outbox.open()
    yield outbox
    await outbox.close()


def writers(pg_server: PostgresServer, pg_url: str, ids: Iterable[int]) -> int:
    """How many transactions wrote the entries ``ids`` last (their rows' xmin)."""
    return int(pg_server.sql(
        "SELECT count(DISTINCT xmin::text) FROM hapsms_messages WHERE id IN "
        f"({', '.join(str(i) for i in ids)})", PostgresServer.name(pg_url)))


async def first_id_of_another_relay(pg_url: str) -> int:
    """The id a relay that starts now gives its first entry: where the sequence stands."""
    other = PostgresOutbox(Secret(pg_url), node="other")
    await other.open()
    try:
        (i,) = await other.enqueue([sms(0)], 600)
    finally:
        await other.close()
    return i


async def test_the_history_holds_the_numbers_entries_since_the_window(
    box: PostgresOutbox, clock: ManualClock,
) -> None:
    """Admission sees the entries stored for the batch's numbers since the earliest window,
    oldest first, in one history the bodies of a batch share in turn (a later body sees
    what an earlier one took)."""
    await box.enqueue([sms(1), sms(2)], 600)  # before the window
    clock.advance(10)
    cut = clock.time()
    (one,) = await box.enqueue([sms(1)], 600)
    clock.advance(5)
    two, _ = await box.enqueue([sms(2), sms(3)], 600)
    clock.advance(5)
    seen: list[tuple[Book, list[tuple[int, int, str, float]]]] = []

    async def body(n: int, since: float) -> Checked:
        def decide(book: History) -> tuple[list[NewEntry], bytes]:
            assert isinstance(book, Book)
            seen.append((book, list(book.rows)))
            book.rows.append((0, KIND_SMS, sms(n).recipient, clock.time()))  # what it took
            return [sms(n)], b""

        return await box.enqueue_checked([sms(n)], 600, keys=[], since=since, history=Book,
                                         decide=decide, max_pending=1000)

    await asyncio.gather(body(1, cut + 1), body(2, cut))
    (book, rows), (again, later) = seen
    assert again is book
    assert rows == [(one, KIND_SMS, sms(1).recipient, cut),
                    (two, KIND_SMS, sms(2).recipient, cut + 5)]
    assert later == [*rows, (0, KIND_SMS, sms(1).recipient, clock.time())]


async def test_a_refused_body_leaves_its_key_free(box: PostgresOutbox) -> None:
    """A body admission refuses whole stores nothing under its key: the same key later
    admits a body, and then answers with that body's ids."""
    refused = await admit(box, [sms(1)], b"k", store=False, note=b"limited")
    assert refused == Checked([], b"limited", False)
    stored = await admit(box, [sms(1)], b"k", note=b"")
    assert len(stored.ids) == 1 and not stored.duplicate
    assert await admit(box, [sms(1)], b"k") == Checked(stored.ids, b"", True)
    assert (await box.stats()).pending == 1


async def test_keys_of_bodies_that_stored_nothing_in_one_batch_are_all_free(
    box: PostgresOutbox,
) -> None:
    """In one batch, two refused bodies and one answered by an earlier key's answer: none of
    the keys they claimed keeps an answer (each admits a body afterwards), while the earlier
    key still answers."""
    (old,) = (await admit(box, [sms(9)], b"old")).ids
    first, second, answered = await asyncio.gather(
        admit(box, [sms(1)], b"r1", store=False, note=b"no 1"),
        admit(box, [sms(2)], b"r2", store=False, note=b"no 2"),
        admit(box, [sms(3)], b"old", b"new"))
    assert (first, second) == (Checked([], b"no 1", False), Checked([], b"no 2", False))
    assert answered == Checked([old], b"", True)
    for n, key in enumerate((b"r1", b"r2", b"new")):
        again = await admit(box, [sms(n)], key)
        assert len(again.ids) == 1 and not again.duplicate, key
    assert await admit(box, [sms(3)], b"old") == Checked([old], b"", True)


async def test_every_body_of_a_batch_is_decided_after_duplicates(
    box: PostgresOutbox, pg_server: PostgresServer, pg_url: str,
) -> None:
    """In one batch, bodies after a duplicate (answered by an earlier key, or a copy of an
    earlier body of the batch) are each still decided, refused or stored as their own
    decision says, and what is stored is written by the batch's one transaction."""
    (old,) = (await admit(box, [sms(9)], b"old")).ids
    answered, first, copy, refused, stored = await asyncio.gather(
        admit(box, [sms(1)], b"old"), admit(box, [sms(2)], b"k"), admit(box, [sms(2)], b"k"),
        admit(box, [sms(3)], b"r", store=False, note=b"no"), admit(box, [sms(4)], b"s"))
    assert answered == Checked([old], b"", True)
    assert len(first.ids) == 1 and copy == Checked(first.ids, b"", True)
    assert refused == Checked([], b"no", False)
    assert len(stored.ids) == 1 and not stored.duplicate
    assert (await box.stats()).pending == 3
    assert writers(pg_server, pg_url, [*first.ids, *stored.ids]) == 1


async def test_an_expired_key_is_claimed_again(box: PostgresOutbox, clock: ManualClock) -> None:
    """A key whose answer has expired (not yet cleaned up) answers for the next body with
    it, which is stored, not taken for a duplicate."""
    before = await admit(box, [sms(1)], b"k", key_ttl=10)
    clock.advance(9)
    assert await admit(box, [sms(1)], b"k") == Checked(before.ids, b"", True)
    clock.advance(1)
    after = await admit(box, [sms(1)], b"k", key_ttl=10)
    assert not after.duplicate and len(after.ids) == 1 and after.ids != before.ids
    assert await admit(box, [sms(1)], b"k") == Checked(after.ids, b"", True)
    assert (await box.stats()).pending == 2


async def test_the_same_body_twice_in_one_batch_is_stored_once(box: PostgresOutbox) -> None:
    """Two bodies with one key admitted together: the first is stored, the second gets its
    ids and note as a duplicate."""
    first, second = await asyncio.gather(admit(box, [sms(1), sms(2)], b"k", note=b"n"),
                                         admit(box, [sms(1), sms(2)], b"k", note=b"n"))
    assert len(first.ids) == 2 and not first.duplicate
    assert second == Checked(first.ids, b"n", True)
    assert (await box.stats()).pending == 2


async def test_a_full_outbox_refuses_both_copies_of_a_body_in_one_batch(
    box: PostgresOutbox,
) -> None:
    """With max_pending reached, a body and its copy admitted together are both refused as
    full, with no note and no ids; the key is free for the body once there is room."""
    await box.enqueue([sms(0)], 600)
    full = Checked([], b"", False, True)
    got = await asyncio.gather(*(admit(box, [sms(1)], b"k", note=b"n", max_pending=1)
                                 for _ in range(2)))
    assert got == [full, full]
    stored = await admit(box, [sms(1)], b"k", max_pending=2)
    assert len(stored.ids) == 1 and not stored.duplicate


async def test_max_pending_counts_the_bodies_of_one_batch(box: PostgresOutbox) -> None:
    """Bodies admitted together count towards max_pending in turn, on top of what is
    undelivered already: the one that would pass the bound is refused."""
    await box.enqueue([sms(0), sms(1), sms(2)], 600)
    one, two = await asyncio.gather(admit(box, [sms(3)], max_pending=5),
                                    admit(box, [sms(4), sms(5)], max_pending=5))
    assert len(one.ids) == 1 and two == Checked([], b"", False, True)
    assert (await box.stats()).pending == 4 == box.undelivered


async def test_max_pending_follows_retry_sent_and_dead(
    box: PostgresOutbox, clock: ManualClock,
) -> None:
    """An entry put back to wait by retry is still undelivered: the bound stays reached;
    once it is sent, or dead, there is room."""
    full = Checked([], b"", False, True)
    (i,) = (await admit(box, [sms(1)], max_pending=1)).ids
    await box.claim(OWNER, 10, clock.time(), 30)
    await box.retry(OWNER, i, clock.time() + 60, "p", "p http_503: busy")
    assert await admit(box, [sms(2)], max_pending=1) == full
    clock.advance(60)
    assert [e.id for e in await box.claim(OWNER, 10, clock.time(), 30)] == [i]
    await box.sent("p", [Sending(i, ("r",), 1, 0.1)])
    (j,) = (await admit(box, [sms(2)], max_pending=1)).ids
    assert await admit(box, [sms(3)], max_pending=1) == full
    await box.claim(OWNER, 10, clock.time(), 30)
    await box.dead(OWNER, j, "p", "p http_400: no")
    assert len((await admit(box, [sms(3)], max_pending=1)).ids) == 1


async def test_ids_come_from_the_sequence_a_block_at_a_time(
    box: PostgresOutbox, pg_url: str,
) -> None:
    """A relay takes ids a block of 1,024 at a time and asks for more only when its block
    cannot cover a batch, then for what the batch lacks or a block, whichever is more: the
    next relay's ids start right after what it took."""
    (start,) = await box.enqueue([sms(0)], 600)
    rest = await box.enqueue([sms(n) for n in range(ID_BLOCK - 1)], 600)
    assert rest == list(range(start + 1, start + ID_BLOCK))  # the block, used up exactly
    other = await first_id_of_another_relay(pg_url)
    assert other == start + ID_BLOCK  # (which took the next block)
    (again,) = await box.enqueue([sms(0)], 600)
    assert again == other + ID_BLOCK  # a new block: ID_BLOCK - 1 left in hand
    big = await box.enqueue([sms(n) for n in range(ID_BLOCK + 76)], 600)
    assert big == list(range(again + 1, again + ID_BLOCK + 77))
    # it lacked 77 ids, and took a block: the sequence moved on by one block
    assert await first_id_of_another_relay(pg_url) == again + 2 * ID_BLOCK


async def test_the_bodies_of_one_batch_are_written_in_one_transaction(
    box: PostgresOutbox, pg_server: PostgresServer, pg_url: str,
) -> None:
    """Bodies of different sizes admitted together (group commit) are stored by one
    transaction, each key answering with its own body's ids."""
    sizes = [1, 3, 2, 1]
    got = await asyncio.gather(*(
        admit(box, [sms(10 * n + i) for i in range(size)], f"k{n}".encode())
        for n, size in enumerate(sizes)))
    assert [len(c.ids) for c in got] == sizes
    assert len({i for c in got for i in c.ids}) == sum(sizes)
    assert writers(pg_server, pg_url, [i for c in got for i in c.ids]) == 1
    for n, c in enumerate(got):
        assert await admit(box, [sms(10 * n)], f"k{n}".encode()) == Checked(c.ids, b"", True)


async def test_sends_at_an_int_and_a_float_time_are_written_in_one_transaction(
    box: PostgresOutbox, clock: ManualClock, pg_server: PostgresServer, pg_url: str,
) -> None:
    """Two sent calls of one batch, one at an int time and with int latencies, the other at a
    float time: recorded together by one transaction (a column that mixed ints and floats
    would fail the batch)."""
    a, b = await box.enqueue([sms(1), sms(2)], 600)
    await box.claim(OWNER, 10, clock.time(), 30)

    async def later() -> None:
        clock.advance(0.5)
        failed = Event(NOW, "attempt", "q", "http_500", "down", 2)
        await box.sent("p", [Sending(b, ("rb",), 1, 0.25, (failed,))])

    await asyncio.gather(box.sent("p", [Sending(a, ("ra",), 1, 1)]), later())
    assert writers(pg_server, pg_url, [a, b]) == 1
    assert pg_server.sql("SELECT string_agg(sent_at::text, ' ' ORDER BY id) FROM hapsms_messages",
                         PostgresServer.name(pg_url)) == f"{NOW} {NOW}.5"


async def test_relays_admitting_one_number_take_turns(pg_url: str, clock: ManualClock) -> None:
    """Two relays admitting one number at once take turns on its lock: the second reads its
    history only once the first has committed, so a window of one admits one of them (the
    count's lock held meanwhile, which both would otherwise wait on)."""
    boxes = [PostgresOutbox(Secret(pg_url), clock=clock, node=f"n{i}") for i in range(2)]
    for b in boxes:
        await b.open()
    holder = await psycopg.AsyncConnection.connect(pg_url, autocommit=True)
    try:
        await holder.execute("SELECT pg_advisory_lock(%s, %s)", _PENDING_LOCK)

        def once(book: History) -> tuple[list[NewEntry], bytes]:
            assert isinstance(book, Book)
            return ([], b"limited") if book.rows else ([sms(1)], b"")

        tasks = [asyncio.create_task(b.enqueue_checked(
            [sms(1)], 600, keys=[], since=0, history=Book, decide=once, max_pending=1000))
            for b in boxes]

        async def both_wait() -> bool:
            cur = await holder.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock' AND wait_event = 'advisory'")
            row = await cur.fetchone()
            return row is not None and row[0] == 2

        await eventually(both_wait, what="both relays waiting on a lock")
        await holder.execute("SELECT pg_advisory_unlock(%s, %s)", _PENDING_LOCK)
        got = sorted(await asyncio.gather(*tasks), key=lambda c: len(c.ids))
        assert got[0] == Checked([], b"limited", False)
        assert len(got[1].ids) == 1 and not got[1].duplicate
    finally:
        await holder.close()
        for b in boxes:
            await b.close()
