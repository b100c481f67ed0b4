"""An outbox written by the release before receipts (schema 2) opens upgraded: entries
sent then keep counting in today's budgets, and get a history from now on; one of schema 1
too; a newer schema is refused, and a queue command upgrades nothing."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest

from hapsms_relay.clock import ManualClock
from hapsms_relay.errors import StorageError
from hapsms_relay.kinds import KIND_SMS
from hapsms_relay.outbox import NewEntry, State
from hapsms_relay.outbox_sqlite import SCHEMA_VERSION, SQLiteOutbox
from hapsms_relay.receipts import Receipt
from tests.helpers import sending


async def _claimed_one(path: str, clock: ManualClock) -> tuple[SQLiteOutbox, int]:
    """A new outbox at ``path``, open, with one entry claimed by "a"; and its id."""
    box = SQLiteOutbox(path, clock=clock)
    await box.open()
    (i,) = await box.enqueue([NewEntry(KIND_SMS, "+8613900000001", "CN", "13900000001", "hi")], 60)
    await box.claim("a", 10, clock.time(), 30)
    return box, i


async def test_schema_2_is_upgraded(tmp_path: Path) -> None:
    """A schema-2 file (no receipt columns, no history) opens as schema 3, its sent entry
    counted by sent_since and able to take a receipt."""
    path = str(tmp_path / "outbox.db")
    clock = ManualClock()
    box, i = await _claimed_one(path, clock)
    await box.sent("p", sending([i]))
    await box.close()
    _back_to(path, 2)
    clock.advance(10)
    box = SQLiteOutbox(path, clock=clock)
    await box.open()
    try:
        assert await box.sent_since(clock.time() - 60) == {"p": (1, 0)}
        applied = await box.receipt("p", Receipt("delivered", i, "x", "DELIVRD"), clock.time())
        assert (applied.outcome, applied.state) == ("changed", State.DELIVERED)
    finally:
        await box.close()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3


def _back_to(path: str, version: int) -> None:
    """Make an outbox written now look as one of schema ``version`` (1 or 2) was."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        dropped = ["refs", "parts", "segments", "sent_at", "receipt", "receipt_at"]
        if version == 1:
            dropped += ["owner", "lease"]
        for column in dropped:
            conn.execute(f"ALTER TABLE messages DROP COLUMN {column}")
        conn.execute("DROP TABLE events")
        conn.execute("DROP TABLE refs")
        conn.execute(f"PRAGMA user_version = {version}")
        conn.commit()


async def test_schema_1_is_upgraded_and_its_claims_are_free(tmp_path: Path) -> None:
    """A schema-1 file (claims without owner or lease) opens as schema 3, an entry it held in
    flight claimable at once."""
    path = str(tmp_path / "outbox.db")
    clock = ManualClock()
    box, i = await _claimed_one(path, clock)
    await box.close()
    _back_to(path, 1)
    box = SQLiteOutbox(path, clock=clock)
    await box.open()
    try:
        assert [e.id for e in await box.claim("b", 10, clock.time(), 30)] == [i]
    finally:
        await box.close()
    assert _version(path) == SCHEMA_VERSION


def _version(path: str) -> int:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    return version


async def test_other_schemas_are_refused_as_they_are(tmp_path: Path) -> None:
    """A file of a newer relay is refused (upgrade this one); a queue command does not
    upgrade an older file (the relay does, once started). Neither is rewritten."""
    path = str(tmp_path / "outbox.db")
    box = SQLiteOutbox(path)
    await box.open()
    await box.close()
    _back_to(path, 2)
    with pytest.raises(StorageError) as info:
        await SQLiteOutbox(path, exclusive=False).open()
    assert str(info.value) == (f"{path} has an older schema (2); start the relay once to "
                               "upgrade it")
    assert _version(path) == 2
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA user_version = 4")
    with pytest.raises(StorageError) as info:
        await SQLiteOutbox(path).open()
    assert str(info.value) == (f"{path} was written by a newer hapsms-relay (schema 4); "
                               "upgrade this one")
    assert _version(path) == 4
