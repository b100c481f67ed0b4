"""An outbox written by the release before receipts (schema 2) opens upgraded: entries
sent then keep counting in today's budgets, and get a history from now on."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

from hapsms_relay.clock import ManualClock
from hapsms_relay.kinds import KIND_SMS
from hapsms_relay.outbox import NewEntry, State
from hapsms_relay.outbox_sqlite import SCHEMA_VERSION, SQLiteOutbox
from hapsms_relay.receipts import Receipt
from tests.helpers import sending


async def test_schema_2_is_upgraded(tmp_path: Path) -> None:
    """A schema-2 file (no receipt columns, no history) opens as schema 3, its sent entry
    counted by sent_since and able to take a receipt."""
    path = str(tmp_path / "outbox.db")
    clock = ManualClock()
    box = SQLiteOutbox(path, clock=clock)
    await box.open()
    (i,) = await box.enqueue([NewEntry(KIND_SMS, "+8613900000001", "CN", "13900000001", "hi")], 60)
    await box.claim("a", 10, clock.time(), 30)
    await box.sent("p", sending([i]))
    await box.close()
    with contextlib.closing(sqlite3.connect(path)) as conn:  # back to what schema 2 was
        for column in ("refs", "parts", "segments", "sent_at", "receipt", "receipt_at"):
            conn.execute(f"ALTER TABLE messages DROP COLUMN {column}")
        conn.execute("DROP TABLE events")
        conn.execute("DROP TABLE refs")
        conn.execute("PRAGMA user_version = 2")
        conn.commit()
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
