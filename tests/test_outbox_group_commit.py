"""Group commit: writes of concurrent callers share one transaction and one statement, and
every acknowledged write is on disk when its caller resumes."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hapsms_relay.errors import StorageError
from hapsms_relay.kinds import KIND_SMS
from hapsms_relay.outbox import NewEntry, State
from hapsms_relay.outbox_sqlite import SQLiteOutbox
from tests.helpers import sending, sms_entry


def _states(path: Path) -> dict[int, int]:
    with sqlite3.connect(path) as conn:  # a second reader: only what was committed
        return dict(conn.execute("SELECT id, state FROM messages").fetchall())


@pytest.fixture
async def outbox(tmp_path: Path) -> AsyncIterator[SQLiteOutbox]:
    box = SQLiteOutbox(str(tmp_path / "outbox.db"))
    await box.open()
    yield box
    await box.close()


async def test_concurrent_enqueues_are_all_on_disk(outbox: SQLiteOutbox) -> None:
    """Two hundred concurrent enqueues of one to three entries: every id returned is committed."""
    path = Path(outbox.path)
    results = await asyncio.gather(*(
        outbox.enqueue([sms_entry(i * 3 + k) for k in range(1 + i % 3)], 60) for i in range(200)
    ))
    ids = [i for batch in results for i in batch]
    assert len(set(ids)) == len(ids) == sum(1 + i % 3 for i in range(200))
    on_disk = _states(path)
    assert set(ids) <= set(on_disk)
    assert outbox.undelivered == len(ids)


async def test_concurrent_status_updates_all_apply(outbox: SQLiteOutbox) -> None:
    """Concurrent delivered/dead updates of claimed entries each land on their own entry."""
    path = Path(outbox.path)
    await asyncio.gather(*(outbox.enqueue([sms_entry(i)], 60) for i in range(100)))
    claimed = await outbox.claim("test", 100, 1e12, 30)
    assert len(claimed) == 100
    delivered = [e.id for e in claimed[:70]]
    dead = [e.id for e in claimed[70:]]
    await asyncio.gather(
        *(outbox.sent("p", sending([i])) for i in delivered),
        *(outbox.dead("test", i, "p", "refused") for i in dead),
    )
    states = _states(path)
    assert {states[i] for i in delivered} == {State.SENT}
    assert {states[i] for i in dead} == {State.DEAD}
    assert outbox.undelivered == 0


async def test_one_failing_write_fails_alone(outbox: SQLiteOutbox) -> None:
    """A write SQLite refuses fails with StorageError; the writes grouped with it commit."""
    path = Path(outbox.path)
    bad = NewEntry(KIND_SMS, "+8613900000000", "CN", "13900000000", None)  # type: ignore[arg-type]
    results = await asyncio.gather(
        *(outbox.enqueue([sms_entry(i)], 60) for i in range(10)),
        outbox.enqueue([bad], 60),
        *(outbox.enqueue([sms_entry(i)], 60) for i in range(10, 20)),
        return_exceptions=True,
    )
    assert [type(r).__name__ for r in results].count("StorageError") == 1
    assert isinstance(results[10], StorageError)
    ids = [i for r in results if isinstance(r, list) for i in r]
    assert len(ids) == 20 and set(ids) <= set(_states(path))
    assert len(_states(path)) == 20


async def test_a_bug_in_a_grouped_write_fails_it_alone(outbox: SQLiteOutbox) -> None:
    """A write that fails outside SQLite (here a number too large for it: the kind of bug a
    caller could bring) fails alone with its own error; the writes grouped with it commit
    and the writer thread goes on serving (it had died, and every later write hung)."""
    path = Path(outbox.path)
    bad = NewEntry(KIND_SMS, "+8613900000000", "CN", "13900000000", 2**64)  # type: ignore[arg-type]
    results = await asyncio.gather(
        *(outbox.enqueue([sms_entry(i)], 60) for i in range(10)),
        outbox.enqueue([bad], 60),
        *(outbox.enqueue([sms_entry(i)], 60) for i in range(10, 20)),
        return_exceptions=True,
    )
    assert isinstance(results[10], OverflowError)
    ids = [i for r in results if isinstance(r, list) for i in r]
    assert len(ids) == 20 and set(ids) <= set(_states(path))
    assert len(await outbox.enqueue([sms_entry(20)], 60)) == 1
    assert len(_states(path)) == 21


async def test_a_write_waits_for_another_process_lock(outbox: SQLiteOutbox) -> None:
    """A queue command (another process) holding the outbox's write lock for a moment makes
    the relay's write wait for it (busy_timeout, 5 s), not fail: the write commits once the
    lock is let go half a second later, and the relay answers its 200."""
    path = Path(outbox.path)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        write = asyncio.ensure_future(outbox.enqueue([sms_entry(1)], 60))
        # (how long the lock is held: a tenth of the relay's patience, many times what a
        # busy_timeout in milliseconds instead of seconds would wait)
        done, _ = await asyncio.wait([write], timeout=0.5)
        assert not done
    finally:
        other.execute("ROLLBACK")
        other.close()
    (n,) = await write
    assert _states(path) == {n: State.PENDING}
