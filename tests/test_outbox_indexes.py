"""The recount the relay runs at every housekeeping round reads indexes, never the whole
table, on both backends; an outbox of an earlier release gets the new index when it opens."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

from hapsms_relay import outbox_postgres, outbox_sqlite
from hapsms_relay.clock import ManualClock
from hapsms_relay.outbox_postgres import PostgresOutbox
from hapsms_relay.outbox_sqlite import SQLiteOutbox
from hapsms_relay.secret import Secret
from tests.pg_server import PostgresServer


async def test_sqlite_finds_the_oldest_undelivered_by_index(tmp_path: Path) -> None:
    """An outbox without the index (an earlier release's) has it once opened, and the
    recount reads indexes only: the oldest pending entry at the first row of
    pending_created."""
    path = str(tmp_path / "outbox.db")
    box = SQLiteOutbox(path, clock=ManualClock())
    await box.open()
    await box.close()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("DROP INDEX pending_created")
    box = SQLiteOutbox(path, clock=ManualClock())
    await box.open()
    await box.close()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + outbox_sqlite.UNDELIVERED)]
    assert {"SEARCH messages USING INDEX pending_created",
            "SEARCH messages USING INDEX inflight_id"} <= set(plan)
    assert [step for step in plan if " messages" in step and "INDEX" not in step] == []


async def test_postgres_upgrade_adds_the_index_of_the_oldest(pg_server: PostgresServer,
                                                              pg_url: str) -> None:
    """A schema-4 database is upgraded to schema 5 with hapsms_pending_created, and the
    recount reads the oldest pending entry from it, however many entries were sent."""
    name = PostgresServer.name(pg_url)
    box = PostgresOutbox(Secret(pg_url), clock=ManualClock())
    await box.open()
    await box.close()
    pg_server.sql("DROP INDEX hapsms_pending_created", name)
    pg_server.sql("UPDATE hapsms_meta SET value = '4' WHERE key = 'schema'", name)
    box = PostgresOutbox(Secret(pg_url), clock=ManualClock())
    await box.open()
    await box.close()
    assert pg_server.sql("SELECT value FROM hapsms_meta WHERE key = 'schema'", name) \
        == str(outbox_postgres.SCHEMA_VERSION) == "5"
    # 100,000 entries sent, then ten waiting and ten in flight: what a busy day leaves
    pg_server.sql(
        "INSERT INTO hapsms_messages (id, batch, kind, recipient, region, national, text, "
        "signature, code, created, due, expires, updated, state) SELECT i, i, 1, '+8613900000001', "
        "'CN', '13900000001', 'hi', '', '', i, i, i + 86400, i, CASE WHEN i > 99990 THEN 0 "
        "WHEN i > 99980 THEN 1 ELSE 2 END FROM generate_series(1, 100000) i; ANALYZE hapsms_messages", name)
    plan = pg_server.sql("EXPLAIN " + outbox_postgres.UNDELIVERED, name)
    assert "Index Only Scan using hapsms_pending_created" in plan, plan
    assert "Index Scan using hapsms_inflight_lease" in plan, plan
    assert "Seq Scan" not in plan, plan
