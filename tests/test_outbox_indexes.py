"""The recount the relay runs at every housekeeping round reads indexes, never the whole
table, on both backends; an outbox of an earlier release gets the new index when it opens."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

from hapsms_relay import outbox_postgres, outbox_sqlite
from hapsms_relay.clock import ManualClock
from hapsms_relay.kinds import KIND_SMS
from hapsms_relay.outbox import History, NewEntry, Sending
from hapsms_relay.outbox_postgres import PostgresOutbox
from hapsms_relay.outbox_sqlite import SQLiteOutbox
from hapsms_relay.secret import Secret
from tests.helpers import Book, eventually
from tests.pg_server import PostgresServer

# what the relay reads on its hot path, and that grows with every message
TABLES = ("hapsms_messages", "hapsms_replies")


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




async def test_postgres_hot_path_never_scans_every_entry(pg_server: PostgresServer,
                                                         pg_url: str) -> None:
    """A relay's admission (the numbers' history, the dedup keys), claims, lease renewals
    and sends find the rows they read and change by index, also once their statements'
    plans were settled on small tables (a new cluster's first minutes, no statistics yet)
    and the tables grew: a plan kept from then would read every row at every batch."""
    clock = ManualClock(1_000_000.0)
    name = PostgresServer.name(pg_url)
    box = PostgresOutbox(Secret(pg_url), clock=clock)
    await box.open()
    await box.close()
    # no ANALYZE behind the test's back (it would replace a stale plan by chance)
    for table in TABLES:
        pg_server.sql(f"ALTER TABLE {table} SET (autovacuum_enabled = off)", name)
    scans = ("SELECT sum(seq_scan) FROM pg_stat_user_tables WHERE relname IN "
             f"({', '.join(repr(t) for t in TABLES)})")

    def ended() -> bool:  # a session's statistics reach the server when it ends
        return pg_server.sql("SELECT count(*) FROM pg_stat_activity WHERE datname = "
                             f"'{name}' AND application_name LIKE 'hapsms-relay%'", name) == "0"

    entries: list[NewEntry] = []  # the body being admitted

    def decide(book: History) -> tuple[list[NewEntry], bytes]:
        return list(entries), b""

    async def rounds(n: int) -> None:
        for _ in range(n):
            now = clock.time()
            number = f"139{round(now) % 100_000_000:08d}"
            entries[:] = [NewEntry(KIND_SMS, "+86" + number, "CN", number, "hi")]
            done = await box.enqueue_checked(
                entries, 3600, keys=[(f"key-{now}".encode(), now + 600)], since=now - 3600,
                history=Book, decide=decide, max_pending=1_000_000)
            claimed = await box.claim("node-a", 10, now, 60)
            assert [e.id for e in claimed] == list(done.ids)
            await box.renew("node-a", done.ids, now + 60)
            await box.sent("fake", [Sending(e.id, (f"ref-{e.id}",), 1, 0.01) for e in claimed])
            clock.advance(1)

    await eventually(ended, what="the first session to end")
    before = int(pg_server.sql(scans, name))
    box = PostgresOutbox(Secret(pg_url), clock=clock)
    await box.open()
    # more rounds than psycopg (5 runs) and the server (5 custom plans) take to keep a
    # generic plan for a statement; on tables this small a scan is the right plan
    await rounds(20)
    # a busy day later: 50,000 entries sent and as many dedup keys live (ids far above the
    # relay's own)
    pg_server.sql(
        "INSERT INTO hapsms_messages (id, batch, kind, recipient, region, national, text, "
        "signature, code, created, due, expires, updated, state) SELECT i, i, 1, "
        "'+86' || (13900000000 + i % 1000)::text, 'CN', (13900000000 + i % 1000)::text, "
        "'hi', '', '', 0, 0, 86400, 0, 2 FROM generate_series(10000000000, 10000049999) i; "
        "INSERT INTO hapsms_replies (key, ids, note, expires) SELECT ('k' || i)::bytea, "
        "ARRAY[i], '', 1e12 FROM generate_series(1, 50000) i", name)
    big = 100
    await rounds(big)
    await box.close()
    await eventually(ended, what="the second session to end")
    # each round on the small tables may scan them (a few times at most); a plan that
    # scans a grown table does so at every one of the last rounds
    scanned = int(pg_server.sql(scans, name)) - before
    assert scanned < big, scanned
