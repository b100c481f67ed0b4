"""The PostgreSQL outbox: several relays share one database (cluster mode).

Operations are queued to one connection and run a batch at a time, one transaction each
(group commit, as the SQLite outbox does): every caller's future resolves after its COMMIT
returned, so a 200 is only sent for what is on the primary's disk (and on a synchronous
standby, if the database has one). Entries are claimed with ``FOR UPDATE SKIP LOCKED`` for
an owner and a lease; ids come from a sequence, unique across relays.

The driver is psycopg 3: it is libpq itself, so ``queue.url`` means exactly what it means to
psql (several hosts, ``target_session_attrs=read-write``, service files, TLS settings), and
its pipeline mode sends a batch without a round trip per statement.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NamedTuple

import orjson
import psycopg
from psycopg import errors as pgerrors
from psycopg.types.json import Jsonb

from hapsms_relay import log
from hapsms_relay.budget import ALL, SEGMENTS
from hapsms_relay.clock import SYSTEM, Clock
from hapsms_relay.errors import StorageError
from hapsms_relay.outbox import (
    SENT_STATES,
    Applied,
    Backlog,
    BudgetKey,
    Checked,
    Decide,
    Detail,
    Entry,
    Event,
    History,
    NewEntry,
    Node,
    Row,
    Sending,
    Spent,
    State,
    Stats,
)
from hapsms_relay.receipts import Receipt
from hapsms_relay.secret import Secret

# 2: receipts and history; 3: cluster heartbeats (hapsms_nodes); 4: the undelivered count
# and the daily budgets across relays (hapsms_pending, hapsms_budget); 5: the index of
# pending entries by acceptance time
SCHEMA_VERSION = 5
# One key for every relay of every version: schema changes are made by one at a time. Two
# int4 keys: a space apart from the one-bigint keys that lock phone numbers (admission).
_SCHEMA_LOCK = (0x48415053, 1)
# queue.max_pending: one enqueue at a time across relays checks and adds
_PENDING_LOCK = (0x48415053, 2)
# the budget counters, reserved and settled one relay at a time
_BUDGET_LOCK = (0x48415053, 3)
_RECONNECT_EVERY = 1.0  # seconds between attempts while the database is unreachable
_CONNECT_TIMEOUT = 5

_SCHEMA = """
CREATE TABLE IF NOT EXISTS hapsms_meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);
CREATE SEQUENCE IF NOT EXISTS hapsms_messages_id_seq;
CREATE TABLE IF NOT EXISTS hapsms_messages (
    id        bigint PRIMARY KEY,
    batch     bigint   NOT NULL,
    kind      smallint NOT NULL,
    recipient text     NOT NULL,
    region    text     NOT NULL,
    national  text     NOT NULL,
    text      text     NOT NULL,
    signature text     NOT NULL,
    code      text     NOT NULL,
    created   float8   NOT NULL,
    due       float8   NOT NULL,
    expires   float8   NOT NULL,
    attempts  integer  NOT NULL DEFAULT 0,
    state     smallint NOT NULL DEFAULT 0,
    provider  text     NOT NULL DEFAULT '',
    error     text     NOT NULL DEFAULT '',
    updated   float8   NOT NULL,
    owner     text     NOT NULL DEFAULT '',
    lease     float8   NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS hapsms_pending_due ON hapsms_messages (due) WHERE state = 0;
CREATE INDEX IF NOT EXISTS hapsms_inflight_lease ON hapsms_messages (lease) WHERE state = 1;
CREATE INDEX IF NOT EXISTS hapsms_dead_id ON hapsms_messages (id) WHERE state = 3;
-- ids from several relays do not follow acceptance time: windows and cleanup read this
CREATE INDEX IF NOT EXISTS hapsms_created ON hapsms_messages (created);
-- per-number windows across relays count from here (admission in the enqueue)
CREATE INDEX IF NOT EXISTS hapsms_recipient ON hapsms_messages (recipient, created);
CREATE TABLE IF NOT EXISTS hapsms_replies (
    pos     bigserial PRIMARY KEY,
    key     bytea    NOT NULL UNIQUE,
    ids     bigint[] NOT NULL,
    note    bytea    NOT NULL,
    expires float8   NOT NULL
);
CREATE INDEX IF NOT EXISTS hapsms_replies_expires ON hapsms_replies (expires);
-- schema 2: what a provider returned, receipts, and each entry's append-only history
ALTER TABLE hapsms_messages ADD COLUMN IF NOT EXISTS refs text NOT NULL DEFAULT '',
    ADD COLUMN IF NOT EXISTS parts integer NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS segments integer NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS sent_at float8 NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS receipt text NOT NULL DEFAULT '',
    ADD COLUMN IF NOT EXISTS receipt_at float8 NOT NULL DEFAULT 0;
CREATE TABLE IF NOT EXISTS hapsms_events (
    seq      bigserial PRIMARY KEY,
    entry    bigint NOT NULL,
    at       float8 NOT NULL,
    kind     text   NOT NULL,
    provider text   NOT NULL,
    code     text   NOT NULL,
    text     text   NOT NULL,
    latency  float8,
    status   text   NOT NULL,
    part     text   NOT NULL
);
CREATE INDEX IF NOT EXISTS hapsms_events_entry ON hapsms_events (entry);
CREATE TABLE IF NOT EXISTS hapsms_refs (
    provider text   NOT NULL,
    ref      text   NOT NULL,
    entry    bigint NOT NULL,
    PRIMARY KEY (provider, ref)
);
CREATE INDEX IF NOT EXISTS hapsms_refs_entry ON hapsms_refs (entry);
-- one row per running relay (cluster status)
CREATE TABLE IF NOT EXISTS hapsms_nodes (
    owner     text PRIMARY KEY,
    node      text    NOT NULL,
    version   text    NOT NULL,
    digest    text    NOT NULL,
    started   float8  NOT NULL,
    heartbeat float8  NOT NULL,
    inflight  integer NOT NULL
);
-- schema 4: the undelivered entries (pending or in flight) as the changes each relay made
-- to their number (their sum is the count), so queue.max_pending is checked in the
-- enqueue without counting rows, and relays do not wait on one row
CREATE TABLE IF NOT EXISTS hapsms_pending (
    node text   PRIMARY KEY,
    n    bigint NOT NULL
);
-- the daily budgets: sent, and reserved by sends under way, per local day (budget.py)
CREATE TABLE IF NOT EXISTS hapsms_budget (
    day   float8 NOT NULL,
    unit  text   NOT NULL,
    scope text   NOT NULL,
    sent     bigint NOT NULL,
    reserved bigint NOT NULL,
    PRIMARY KEY (day, unit, scope)
);
-- schema 5: the oldest pending entry (the oldest undelivered one's age is a metric), one
-- look-up at the index's first row (hapsms_created would walk every entry sent since);
-- those in flight are few (hapsms_inflight_lease). Pending only, as in the SQLite outbox.
CREATE INDEX IF NOT EXISTS hapsms_pending_created ON hapsms_messages (created) WHERE state = 0;
"""
# A relay's change to the undelivered count (hapsms_pending), in the transaction of the
# change itself.
_ADDED = "ON CONFLICT (node) DO UPDATE SET n = hapsms_pending.n + excluded.n"
_ADD_PENDING = f"INSERT INTO hapsms_pending VALUES (%s, %s) {_ADDED}"
_PENDING = "SELECT coalesce(sum(n), 0) FROM hapsms_pending"
_COUNT_UNDELIVERED = ("(SELECT count(*) FROM hapsms_messages WHERE state = 0) + "
                      "(SELECT count(*) FROM hapsms_messages WHERE state = 1)")
# how many are pending or in flight (n), and the oldest of them: each part over its partial
# index (tests check the plan)
UNDELIVERED = (
    f"SELECT {_COUNT_UNDELIVERED} AS n, "
    "(SELECT min(c) FROM (SELECT min(created) AS c FROM hapsms_messages WHERE state = 0 "
    "UNION ALL SELECT min(created) FROM hapsms_messages WHERE state = 1) m) AS oldest"
)
# A budget counter first used today starts from what was sent today (sent before the budget
# was set, or by relays of an older version); the scan runs only for a counter not there.
_SEED_BUDGET = (
    "INSERT INTO hapsms_budget SELECT %(day)s, %(unit)s, %(scope)s, CASE WHEN %(unit)s = "
    f"'{SEGMENTS}' THEN coalesce(sum(segments), 0) ELSE count(*) END, 0 FROM hapsms_messages "
    "WHERE state IN (2, 4, 5) AND sent_at >= %(day)s "
    f"AND (%(scope)s = '{ALL}' OR provider = %(scope)s) AND NOT EXISTS (SELECT 1 FROM "
    "hapsms_budget WHERE day = %(day)s AND unit = %(unit)s AND scope = %(scope)s) "
    "ON CONFLICT DO NOTHING"
)

_EVENT_INTO = "INSERT INTO hapsms_events (entry, at, kind, provider, code, text, latency, status, part) "
_INSERT_EVENT = _EVENT_INTO + "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
# Any number of events in one statement, a column an array (``_columns``): psycopg's work
# and a statement's are per statement, and a batch's events cost about one row's.
_INSERT_EVENTS = (
    _EVENT_INTO + "SELECT * FROM unnest(%s::bigint[], %s::float8[], %s::text[], %s::text[], %s::text[], "
    "%s::text[], %s::float8[], %s::text[], %s::text[])"
)
_EVENT_FLOATS = (1, 6)  # at, latency
# As in the SQLite outbox: a receipt recorded before the send decides the state at once,
# computed in the statement itself. A batch's sends are one statement: their events, the
# provider's ids and every entry's update, each a set of arrays (``_Sends``). It and
# ``_RECEIPT`` run after the rows were locked (FOR UPDATE) in an earlier statement, so in
# READ COMMITTED they see what a concurrent relay's receipt or send committed meanwhile:
# nothing is lost between two relays. (The update does not see the events inserted beside
# it: it looks for receipts only, and a send inserts none.)
_SENT = (
    f"WITH ev AS ({_INSERT_EVENTS}), rf AS (INSERT INTO hapsms_refs SELECT * FROM "
    "unnest(%s::text[], %s::text[], %s::bigint[]) ON CONFLICT DO NOTHING) "
    "UPDATE hapsms_messages m SET state = CASE WHEN NOT EXISTS (SELECT 1 FROM hapsms_events e "
    "WHERE e.entry = u.id AND e.kind = 'receipt') THEN 2 "  # most entries: one look-up
    "WHEN EXISTS (SELECT 1 FROM hapsms_events e WHERE e.entry = u.id AND e.kind = 'receipt' "
    "AND e.provider = u.provider AND e.status = 'undelivered') THEN 5 "
    "WHEN (SELECT count(DISTINCT e.part) FROM hapsms_events e WHERE e.entry = u.id "
    "AND e.kind = 'receipt' AND e.provider = u.provider AND e.status = 'delivered') "
    ">= greatest(u.parts, 1) THEN 4 ELSE 2 END, "
    "parts = u.parts, refs = u.refs, segments = u.segments, provider = u.provider, "
    "sent_at = u.now, updated = u.now FROM unnest(%s::bigint[], %s::integer[], %s::text[], "
    "%s::integer[], %s::text[], %s::float8[]) AS u(id, parts, refs, segments, provider, now) "
    "WHERE m.id = u.id AND m.state IN (0, 1)"
)
_RECEIPT = (
    "UPDATE hapsms_messages SET state = CASE WHEN %(status)s = 'undelivered' THEN 5 "
    "WHEN state = 2 AND (SELECT count(DISTINCT part) FROM hapsms_events WHERE entry = %(id)s "
    "AND kind = 'receipt' AND status = 'delivered') >= greatest(parts, 1) THEN 4 "
    "ELSE state END, receipt = %(code)s, receipt_at = %(now)s, updated = %(now)s, "
    "error = CASE WHEN %(status)s = 'undelivered' THEN %(reason)s ELSE error END "
    "WHERE id = %(id)s AND provider = %(provider)s AND state = 2 AND %(status)s <> 'progress' "
    "RETURNING state, sent_at"
)
_ROW_COLS = "id, kind, recipient, state, created, due, attempts, provider, error, updated"

_ENTRY_COLS = (
    "id, batch, kind, recipient, region, national, text, signature, code, created, expires, attempts,"
    " error"
)
# The keys claimed in admission answer for the ids stored: every key of a batch at once,
# each naming its body's ids as a slice of the batch's (lo, hi: 1-based, inclusive). The
# keys again as ``key = ANY(...)``: the server keeps a generic plan for a statement
# psycopg prepared, and one made while hapsms_replies was small joins by scanning it whole
# (1.2 ms a batch and growing, measured) unless the keys can be looked up on their own.
_ANSWER = (
    "UPDATE hapsms_replies r SET ids = (%s::bigint[])[u.lo:u.hi], note = u.note FROM "
    "unnest(%s::bytea[], %s::integer[], %s::integer[], %s::bytea[]) AS u(key, lo, hi, note) "
    "WHERE r.key = u.key AND r.key = ANY(%s::bytea[])"
)
# A batch's entries, and as many more undelivered in the count (hapsms_pending), and the
# keys claimed in admission answering for them (``_ANSWER``): one statement. The entries
# come as one JSON array of rows (orjson writes it in C), not as an array a column: psycopg
# adapts a list element by element in Python, a sixth of the relay's time at ingest.
_INSERT = (
    "WITH i AS (INSERT INTO hapsms_messages (id, batch, kind, recipient, region, national, text,"
    " signature, code, created, due, expires, updated) SELECT (r->>0)::bigint, (r->>1)::bigint,"
    " (r->>2)::smallint, r->>3, r->>4, r->>5, r->>6, r->>7, r->>8, (r->>9)::float8,"
    " (r->>10)::float8, (r->>11)::float8, (r->>12)::float8 FROM jsonb_array_elements(%s) r"
    f" RETURNING 1), a AS ({_ANSWER}) INSERT INTO hapsms_pending SELECT %s, count(*) FROM i"
    f" {_ADDED}"
)
# A key whose answer expired (not yet cleaned up) answers for the new body.
_INSERT_REPLY = (
    "INSERT INTO hapsms_replies (key, ids, note, expires) VALUES (%s, %s, %s, %s) "
    "ON CONFLICT (key) DO UPDATE SET ids = excluded.ids, note = excluded.note, "
    "expires = excluded.expires WHERE hapsms_replies.expires <= %s"
)
# Leases run out first (an entry whose outcome could not be written), then due entries, in
# one statement: a claim is one round trip. Due rows locked beyond the limit stay pending
# and are skipped by other relays only until this transaction commits.
_CLAIM = (
    "WITH expired AS (SELECT id FROM hapsms_messages WHERE state = 1 AND lease <= %(now)s "
    "LIMIT %(limit)s FOR UPDATE SKIP LOCKED), "
    "due AS (SELECT id FROM hapsms_messages WHERE state = 0 AND due <= %(now)s ORDER BY due "
    "LIMIT %(limit)s FOR UPDATE SKIP LOCKED), "
    "c AS (SELECT id FROM expired UNION ALL SELECT id FROM due LIMIT %(limit)s) "
    "UPDATE hapsms_messages m SET state = 1, attempts = m.attempts + 1, updated = %(now)s, "
    "owner = %(owner)s, lease = %(until)s FROM c WHERE m.id = c.id RETURNING "
    + ", ".join(f"m.{c.strip()}" for c in _ENTRY_COLS.split(","))
)
CLEANUP_CHUNK = 5000
# Ids taken from the sequence at a time: an enqueue usually finds its ids in hand rather
# than asking the database (relays leave gaps in the sequence, never reuse an id).
ID_BLOCK = 1024

Conn = psycopg.AsyncConnection[tuple[Any, ...]]
_Fn = Callable[[Conn], Awaitable[Any]]
# A write that reads nothing back before the batch's end: it queues its statements in the
# pipeline and returns what reads its result once the pipeline has synced (or None).
_Piped = Callable[[Conn], Awaitable[Callable[[], Awaitable[Any]] | None]]


class _Op:
    __slots__ = ("args", "fn", "fut", "piped", "sql")

    def __init__(self, fn: _Fn | None, sql: str | None, args: Any,
                 fut: asyncio.Future[Any], piped: _Piped | None = None) -> None:
        self.fn = fn  # a function of the connection; None for an enqueue, a sent call or a
        # merged write
        self.piped = piped  # or one that runs in the pipeline
        self.sql = sql  # a write merged with its like (executemany); None: an enqueue or a sent call
        self.args = args  # an enqueue's (_Enqueue), a sent call's (_Sends)
        self.fut = fut


class _Same(NamedTuple):
    first: int  # the index in the batch of the body this one duplicates


class _Enqueue:
    """One enqueue of a batch; ``decide`` set: admission decided in the transaction."""

    __slots__ = ("decide", "entries", "history", "keys", "max_pending", "note", "now", "since",
                 "ttl")

    def __init__(self, entries: Sequence[NewEntry], now: float, ttl: float,
                 keys: Sequence[tuple[bytes, float]], note: bytes, since: float = 0.0,
                 history: Callable[[], History] | None = None, decide: Decide | None = None,
                 max_pending: int = 0) -> None:
        self.entries, self.now, self.ttl, self.keys, self.note = entries, now, ttl, keys, note
        self.since, self.history, self.decide = since, history, decide
        self.max_pending = max_pending


class _Sends(NamedTuple):
    """One ``sent`` call's rows: the sends of a batch are written together."""

    ids: list[int]
    events: list[tuple[Any, ...]]  # hapsms_events' columns
    updates: list[tuple[Any, ...]]  # (id, parts, refs, segments, provider, now): _SENT's
    refs: list[tuple[str, str, int]]


class _Admission:
    """Admission's reads for one batch, queued in the pipeline (see ``_admit_reads``)."""

    __slots__ = ("answers", "checked", "claimed", "history", "owner", "pending", "release")

    def __init__(self, checked: list[int]) -> None:
        self.checked = checked  # the bodies of the batch that ask for admission
        self.owner: dict[bytes, int] = {}  # key -> the first body of the batch that has it
        self.claimed: psycopg.AsyncCursor[tuple[Any, ...]] | None = None
        self.answers: psycopg.AsyncCursor[tuple[Any, ...]] | None = None
        self.history: psycopg.AsyncCursor[tuple[Any, ...]] | None = None
        self.pending: psycopg.AsyncCursor[tuple[Any, ...]] | None = None
        self.release: list[bytes] = []  # keys claimed for bodies that stored nothing


class PostgresOutbox:
    """``Outbox`` on a PostgreSQL database that several relays may share."""

    def __init__(self, url: Secret, *, clock: Clock = SYSTEM, node: str = "",
                 admin: bool = False) -> None:
        self._url = url
        self.clock = clock
        self.node = node
        self._admin = admin
        self._conn: Conn | None = None
        self._ops: list[_Op] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._backlog = Backlog()
        self._next_connect = 0.0
        self._problem = ""  # why the last batch failed ("" once one committed)
        self._ids: list[int] = []  # taken from the sequence, not yet given to an entry

    def __repr__(self) -> str:  # never the URL: it may hold a password
        return f"PostgresOutbox(node={self.node!r})"

    @property
    def undelivered(self) -> int:
        return self._backlog.count

    @property
    def oldest_undelivered(self) -> float | None:
        return self._backlog.oldest

    @property
    def writable(self) -> bool:
        # the dispatcher's claims (every second at least) retry the database on their own
        return not self._problem

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        self._conn = await self._connect()
        try:
            await self._schema(self._conn)
            self._backlog.counted(*await self._count(self._conn))
            await self._conn.commit()
        except BaseException:
            await self._drop()
            raise
        self._task = asyncio.create_task(self._run(), name="hapsms-outbox-postgres")

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._drop()

    async def _connect(self) -> Conn:
        try:
            conn: Conn = await psycopg.AsyncConnection.connect(
                self._url.reveal(), connect_timeout=_CONNECT_TIMEOUT,
                application_name=f"hapsms-relay {self.node}"[:63],
            )
        except psycopg.Error as exc:
            raise StorageError(_describe(exc)) from None
        return conn

    async def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None

    async def _schema(self, conn: Conn) -> None:
        """Create or upgrade the schema, one relay at a time (an advisory lock held to the
        end of the transaction), refusing a schema newer than this relay knows. A schema
        already current is only read: DDL would lock the tables the running relays write,
        and could deadlock with them."""
        try:
            for attempt in range(5):
                try:
                    if await self._upgrade(conn):
                        return
                except (pgerrors.DeadlockDetected, pgerrors.LockNotAvailable):
                    await conn.rollback()  # relays of an older version were busy: again
                    await asyncio.sleep(0.2 * (attempt + 1))
            raise StorageError("database: the schema could not be upgraded while other relays "
                               "held its tables (deadlocks); start again")
        except psycopg.Error as exc:
            raise StorageError(_describe(exc)) from None

    async def _upgrade(self, conn: Conn) -> bool:
        # (libpq has it from the connection's start: no query)
        encoding = conn.info.parameter_status("server_encoding")
        if encoding != "UTF8":
            # SQL_ASCII hands text back as bytes, LATIN1 and the like garble what they can
            # store and refuse the rest (Chinese): messages' text would be lost
            raise StorageError(
                f"the database (queue.url) has encoding {encoding}; the outbox needs UTF8: "
                "CREATE DATABASE ... ENCODING 'UTF8' LOCALE 'C.UTF-8' TEMPLATE template0")
        version = await self._version(conn)
        if not version and self._admin:
            # as with SQLite: a queue command does not create the outbox a relay would own
            raise StorageError("there is no outbox in this database (queue.url) yet; a relay "
                               "creates it when it starts, and queue import-sqlite copies one in")
        if version < SCHEMA_VERSION:
            await conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", _SCHEMA_LOCK)
            version = await self._version(conn)  # another relay may have done it meanwhile
        if version > SCHEMA_VERSION:
            raise StorageError(
                f"the database was written by a newer hapsms-relay (schema {version}, this "
                f"one knows {SCHEMA_VERSION}); upgrade this relay")
        if version < SCHEMA_VERSION:
            await conn.execute(_SCHEMA)
            if version == 1:  # entries sent before keep counting in today's budgets
                await conn.execute("UPDATE hapsms_messages SET sent_at = updated "
                                   "WHERE state = 2 AND sent_at = 0")
            if version < 4:  # the count so far; relays of version 3 still running do not
                # keep it: refresh() mends it
                await conn.execute(f"INSERT INTO hapsms_pending SELECT '', {_COUNT_UNDELIVERED} "
                                   "ON CONFLICT (node) DO NOTHING")
            await conn.execute(
                "INSERT INTO hapsms_meta VALUES ('schema', %s) ON CONFLICT (key) DO UPDATE "
                "SET value = excluded.value", (str(SCHEMA_VERSION),))
        await conn.commit()
        return True

    async def _version(self, conn: Conn) -> int:
        """The schema's version; 0 for a database without one."""
        cur = await conn.execute("SELECT to_regclass('hapsms_meta') IS NOT NULL")
        row = await cur.fetchone()
        if not row or not row[0]:
            return 0
        cur = await conn.execute("SELECT value FROM hapsms_meta WHERE key = 'schema'")
        row = await cur.fetchone()
        return int(row[0]) if row else 0

    # -- the batch loop --------------------------------------------------------------------

    def _submit(self, fn: _Fn | None, sql: str | None, args: Any,
                piped: _Piped | None = None) -> asyncio.Future[Any]:
        if self._task is None or self._closing:
            raise StorageError("the outbox is not open")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._ops.append(_Op(fn, sql, args, fut, piped))
        self._wake.set()
        return fut

    def _call(self, fn: _Fn) -> asyncio.Future[Any]:
        return self._submit(fn, None, None)

    def _pipe(self, piped: _Piped) -> asyncio.Future[Any]:
        return self._submit(None, None, None, piped)

    async def _run(self) -> None:
        while True:
            if not self._ops:
                if self._closing:
                    return
                await self._wake.wait()
                self._wake.clear()
                continue
            batch, self._ops = self._ops, []
            await self._execute(batch)

    async def _execute(self, batch: list[_Op]) -> None:
        conn = await self._usable()
        if conn is None:
            _fail(batch, StorageError(self._problem))
            return
        try:
            results = await self._transaction(conn, batch)
        except Exception as exc:
            if isinstance(exc, pgerrors.Error) and (_connection_lost(exc) or conn.closed):
                await self._lost(exc)
                _fail(batch, StorageError(self._problem))
                return
            # one op's data was refused: the others should not fail with it
            with contextlib.suppress(Exception):
                await conn.rollback()
            log.warning("database_batch_failed", error=_describe(exc), ops=len(batch))
            if len(batch) == 1:
                _fail(batch, exc if isinstance(exc, StorageError) else StorageError(_describe(exc)))
                return
            for op in batch:
                await self._execute([op])
            return
        self._problem = ""
        for op, value in zip(batch, results, strict=True):
            if not op.fut.done():
                op.fut.set_result(value)

    async def _transaction(self, conn: Conn, batch: list[_Op]) -> list[Any]:
        """The batch in one transaction. Enqueues and merged writes go in pipeline mode:
        statements whose results nothing waits for go out together, and the COMMIT with them,
        so a batch of enqueues costs two round trips (admission's reads, then every write
        and the COMMIT) whatever its size, where it took one per statement (eight or more)."""
        results: list[Any] = [None] * len(batch)
        enqueues = [i for i, op in enumerate(batch) if isinstance(op.args, _Enqueue)]
        # functions of the connection read their results (row counts among them) as they go:
        # they run after the pipeline, and the COMMIT with them
        fns = [i for i, op in enumerate(batch) if op.fn is not None]
        async with conn.pipeline() as pipe:
            if enqueues:
                ids = await self._insert(conn, pipe, [batch[i] for i in enqueues])
                for i, op_ids in zip(enqueues, ids, strict=True):
                    results[i] = op_ids
            merged: dict[str, list[tuple[Any, ...]]] = {}
            for op in batch:
                if op.sql is not None:
                    merged.setdefault(op.sql, []).extend(op.args)
            async with conn.cursor() as cur:
                for sql, params in merged.items():
                    await cur.executemany(sql, params)
            sends = [op.args for op in batch if isinstance(op.args, _Sends)]
            if sends:
                await self._record_sent(conn, sends)
            collect = {i: await op.piped(conn) for i, op in enumerate(batch)
                       if op.piped is not None}
            if not fns:
                await conn.commit()
        for i, read in collect.items():
            if read is not None:
                results[i] = await read()
        for i in fns:
            fn = batch[i].fn
            assert fn is not None
            results[i] = await fn(conn)
        if fns:
            await conn.commit()
        return results

    async def _insert(self, conn: Conn, pipe: psycopg.AsyncPipeline,
                      ops: list[_Op]) -> list[Any]:
        """Every enqueue of the batch: admission for those that ask for it, their ids, all
        rows in one INSERT, the keys' answers; each op's result. The reads admission needs
        and a new block of ids share one round trip; the writes are left in the pipeline."""
        reqs: list[_Enqueue] = [op.args for op in ops]
        results: list[Any] = [None] * len(reqs)
        stored: list[Sequence[NewEntry]] = [r.entries for r in reqs]
        notes = [r.note for r in reqs]
        need = sum(len(e) for e in stored)
        refill = None
        if len(self._ids) < need:
            refill = conn.cursor()
            await refill.execute(
                "SELECT nextval('hapsms_messages_id_seq') FROM generate_series(1, %s)",
                (max(need - len(self._ids), ID_BLOCK),))
        admission = None
        if any(r.decide is not None for r in reqs):
            admission = await self._admit_reads(conn, reqs)
        if refill is not None or admission is not None:
            await pipe.sync()
        if refill is not None:
            self._ids.extend(r[0] for r in await refill.fetchall())
        if admission is not None:
            await self._admit(admission, reqs, results, stored, notes)
            if admission.release:
                await conn.execute("DELETE FROM hapsms_replies WHERE key = ANY(%s)",
                                   (admission.release,))
        total = sum(len(e) for n, e in enumerate(stored) if results[n] is None)
        # taken from the block for good: a batch that fails leaves a gap, never a reuse
        fresh, self._ids = self._ids[:total], self._ids[total:]
        rows: list[tuple[Any, ...]] = []
        replies: list[tuple[Any, ...]] = []
        answers: list[tuple[Any, ...]] = []
        at = 0
        for n, r in enumerate(reqs):
            if results[n] is not None:  # a duplicate
                continue
            entries = stored[n]
            ids = fresh[at : at + len(entries)]
            at += len(entries)
            now, expires = float(r.now), float(r.now + r.ttl)
            rows.extend((i, ids[0], *e[:7], now, now, expires, now)
                        for i, e in zip(ids, entries, strict=True))
            if r.decide is None:
                replies.extend((k, ids, r.note, exp, r.now) for k, exp in r.keys)
            elif ids:  # the keys claimed in _admit now answer for these ids
                answers.extend((k, at - len(ids) + 1, at, notes[n]) for k, _ in r.keys)
            results[n] = Checked(ids, notes[n], False) if r.decide is not None else ids
        for n, res in enumerate(results):
            if isinstance(res, _Same):  # the earlier body's answer (its refusal, if refused)
                ids, note, _, full = results[res.first]
                results[n] = Checked(ids, note, bool(ids), full)
        if total:  # answers name ids: there are none without entries
            keys = _columns(answers, 4)
            # not prepared (planned with the tables as they are): see _admit_reads
            await conn.execute(_INSERT, (Jsonb(rows, dumps=orjson.dumps), fresh, *keys, keys[0],
                                         self.node), prepare=False)
        if replies:
            async with conn.cursor() as c:
                await c.executemany(_INSERT_REPLY, replies)
        return results

    async def _record_sent(self, conn: Conn, sends: list[_Sends]) -> None:
        """The ``sent`` calls of a batch in two statements whatever their number (a
        statement per call and table cost more than the rows themselves): the entries
        locked, in order, and those still undelivered (not those another relay had recorded
        sent already) out of the count, in one statement (in the pipeline no row count
        comes back before the COMMIT); their history, the provider's ids and their state
        in the other (``_SENT``). Both planned each time (not prepared), as the enqueue's
        reads (``_admit_reads``): a generic plan kept from a new cluster's first minutes,
        when hapsms_messages was small and had no statistics, read every entry to find a
        batch's ids (measured: 1 ms a batch at 4,000 entries, growing with the table) until
        the next ANALYZE."""
        ids = sorted(i for s in sends for i in s.ids)
        await conn.execute(
            "WITH e AS (SELECT id, state FROM hapsms_messages WHERE id = ANY(%s) ORDER BY id "
            "FOR UPDATE) INSERT INTO hapsms_pending SELECT %s, -count(*) FROM e "
            f"WHERE state IN (0, 1) {_ADDED}", (ids, self.node), prepare=False)
        # an entry twice in the batch: its first send is recorded, as one statement a call
        # did (the second found it sent); one UPDATE would apply either
        first: dict[int, tuple[Any, ...]] = {}
        for s in sends:
            for u in s.updates:
                first.setdefault(u[0], u)
        await conn.execute(_SENT, (
            *_columns([e for s in sends for e in s.events], 9, _EVENT_FLOATS),
            *_columns([r for s in sends for r in s.refs], 3),
            *_columns(list(first.values()), 6, (5,))), prepare=False)

    async def _admit_reads(self, conn: Conn, reqs: list[_Enqueue]) -> _Admission:
        """Admission's reads, queued in the pipeline: the batch's numbers locked (in order:
        no deadlock between relays), its keys claimed (a key another relay holds is its
        answer), the numbers' history since the earliest window."""
        checked = [n for n, r in enumerate(reqs) if r.decide is not None]
        a = _Admission(checked)
        numbers = sorted({int(e.recipient) for n in checked for e in reqs[n].entries})
        await conn.execute(
            "SELECT pg_advisory_xact_lock(k) FROM (SELECT unnest(%s::bigint[]) AS k) s", (numbers,))
        now = min(reqs[n].now for n in checked)
        claims: list[tuple[bytes, float]] = []
        for n in checked:
            for k, exp in reqs[n].keys:
                if k not in a.owner:
                    a.owner[k] = n
                    claims.append((k, exp))
        if claims:
            keys = [k for k, _ in claims]
            a.claimed = conn.cursor()
            await a.claimed.execute(
                "INSERT INTO hapsms_replies (key, ids, note, expires) SELECT k, '{}', '', e "
                "FROM unnest(%s::bytea[], %s::float8[]) AS c(k, e) ON CONFLICT (key) DO UPDATE "
                "SET ids = '{}', note = '', expires = excluded.expires "
                "WHERE hapsms_replies.expires <= %s RETURNING key",
                (keys, [e for _, e in claims], now))
            # after the claims: a key this transaction holds reads as its placeholder
            a.answers = conn.cursor()
            await a.answers.execute(
                "SELECT key, ids, note, expires FROM hapsms_replies WHERE key = ANY(%s)", (keys,),
                prepare=False)
        a.history = conn.cursor()
        # Each number looked up on its own in hapsms_recipient (OFFSET 0: not flattened
        # into one join), planned each time (not prepared). ``recipient = ANY(...)`` was
        # planned, on tables without statistics yet (a new database, its first minute), as
        # a scan of every entry (4 ms a batch with 10,000 entries, most of the server's time
        # per message). Not prepared, as every statement of an enqueue that reads a table
        # that grows with each message: psycopg prepares a statement run five times, and
        # the server then keeps one generic plan for it, made while the tables were small
        # (scans of all of hapsms_replies, measured at 3 ms a batch), until the next ANALYZE.
        # (These three look up by number and by key and scan nothing prepared either, as
        # test_outbox_indexes.py shows; but prepared, make bench-cluster's relay ingested
        # 1,103 and 1,255 posts/s against 2,270 planned each time, in one quiet hour.)
        await a.history.execute(
            "SELECT m.id, m.kind, m.recipient, m.created FROM unnest(%s::text[]) AS r(n) "
            "CROSS JOIN LATERAL (SELECT id, kind, recipient, created FROM hapsms_messages "
            "WHERE recipient = r.n AND created >= %s OFFSET 0) m ORDER BY m.created, m.id",
            (sorted({e.recipient for n in checked for e in reqs[n].entries}),
             min(reqs[n].since for n in checked)), prepare=False)
        # last, held to the commit: what another relay stores meanwhile is not visible to
        # this transaction, so checking without it lets several relays pass the bound at once
        await conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", _PENDING_LOCK)
        a.pending = conn.cursor()
        await a.pending.execute(_PENDING)
        return a

    async def _admit(self, a: _Admission, reqs: list[_Enqueue], results: list[Any],
                     stored: list[Sequence[NewEntry]], notes: list[bytes]) -> None:
        """Each body decided in turn, once admission's reads have come back; the keys of
        bodies that stored nothing go in ``a.release``."""
        mine: set[bytes] = set()  # keys this transaction holds (placeholders to fill or drop)
        held: dict[bytes, tuple[Any, ...]] = {}
        if a.claimed is not None and a.answers is not None:
            mine = {bytes(r[0]) for r in await a.claimed.fetchall()}
            held = {bytes(r[0]): tuple(r[1:]) for r in await a.answers.fetchall()
                    if bytes(r[0]) not in mine}
        history = reqs[a.checked[0]].history
        assert history is not None and a.history is not None
        book = history()
        book.load(await a.history.fetchall())
        assert a.pending is not None
        row = await a.pending.fetchone()
        # the undelivered entries of every relay together (queue.max_pending)
        pending = self._backlog.count = int(row[0]) if row else 0
        owner = a.owner
        for n in a.checked:
            r = reqs[n]
            answer = next((held[k] for k, _ in r.keys if k in held), None)
            first = next((owner[k] for k, _ in r.keys if owner[k] != n), None)
            if answer is not None:
                results[n] = Checked(list(answer[0]), bytes(answer[1]), True)
                stored[n] = []
                a.release += [k for k, _ in r.keys if owner[k] == n and k in mine]
                continue
            if first is not None:  # a duplicate of an earlier body of this batch
                results[n] = _Same(first)
                stored[n] = []
                continue
            assert r.decide is not None
            stored[n], notes[n] = r.decide(book)
            if pending + len(stored[n]) > r.max_pending:
                # its window counts stay in this transaction's book: a later body of the batch
                # for the same number errs on refusing
                results[n] = Checked([], b"", False, True)
                stored[n] = []
            pending += len(stored[n])
            if not stored[n]:
                a.release += [k for k, _ in r.keys if owner[k] == n and k in mine]

    async def _usable(self) -> Conn | None:
        """The connection, reconnecting (at most once a second) if it was lost."""
        if self._conn is not None and not self._conn.closed:
            return self._conn
        now = self.clock.monotonic()
        if now < self._next_connect:
            return None
        self._next_connect = now + _RECONNECT_EVERY
        try:
            self._conn = await self._connect()
        except StorageError as exc:
            self._problem = str(exc)
            return None
        log.info("database_reconnected", node=self.node)
        return self._conn

    async def _lost(self, exc: BaseException) -> None:
        self._problem = _describe(exc)
        log.error("database_unavailable", error=self._problem)
        await self._drop()

    # -- the Outbox interface --------------------------------------------------------------

    async def enqueue(
        self, entries: Sequence[NewEntry], ttl: float, *, keys: Sequence[tuple[bytes, float]] = (),
        note: bytes = b"",
    ) -> list[int]:
        now = self.clock.time()
        ids: list[int] = await self._submit(None, None, _Enqueue(entries, now, ttl, keys, note))
        self._backlog.added(len(ids), now)
        return ids

    async def enqueue_checked(
        self, entries: Sequence[NewEntry], ttl: float, *, keys: Sequence[tuple[bytes, float]],
        since: float, history: Callable[[], History], decide: Decide, max_pending: int,
    ) -> Checked:
        now = self.clock.time()
        done: Checked = await self._submit(
            None, None, _Enqueue(entries, now, ttl, keys, b"", since, history, decide,
                                 max_pending))
        if not done.duplicate:
            self._backlog.added(len(done.ids), now)
        return done

    async def claim(self, owner: str, limit: int, now: float, lease: float) -> list[Entry]:
        until = now + lease

        async def run(conn: Conn) -> Callable[[], Awaitable[list[Entry]]]:
            cur = conn.cursor()
            await cur.execute(_CLAIM, {"now": now, "owner": owner, "until": until,
                                       "limit": limit})

            async def read() -> list[Entry]:
                return sorted((Entry(*r) for r in await cur.fetchall()), key=lambda e: e.id)

            return read

        entries: list[Entry] = await self._pipe(run)
        return entries

    async def renew(self, owner: str, ids: Sequence[int], until: float) -> int:
        return await self._change(
            "UPDATE hapsms_messages SET lease = %s WHERE id = ANY(%s) AND state = 1 AND owner = %s",
            (until, list(ids), owner))

    async def next_due(self) -> float | None:
        due: float | None = await self._one("SELECT min(due) FROM hapsms_messages WHERE state = 0", ())
        return due

    async def sent(self, provider: str, entries: Sequence[Sending]) -> None:
        now = self.clock.time()
        ids = [s.id for s in entries]
        events = [(s.id, *_event(e)) for s in entries for e in s.trail]
        events += [(s.id, now, "sent", provider, "", " ".join(s.refs), s.latency, "", "")
                   for s in entries]
        updates = [(s.id, len(s.refs), " ".join(s.refs), s.segments, provider, now)
                   for s in entries]
        refs = [(provider, ref, s.id) for s in entries for ref in s.refs if ref]
        await self._submit(None, None, _Sends(ids, events, updates, refs))
        self._backlog.removed(len(entries))

    async def retry(self, owner: str, id: int, due: float, provider: str, error: str,
                    trail: Sequence[Event] = ()) -> None:
        now = self.clock.time()
        await self._outcome(
            "UPDATE hapsms_messages SET state = 0, due = %s, provider = %s, error = %s, "
            "updated = %s WHERE id = %s AND state = 1 AND owner = %s",
            (due, provider, error, now, id, owner),
            [(id, *_event(e)) for e in trail] + [(id, now, "retry", provider, "", error, None, "", "")],
            leaves=False)

    async def dead(self, owner: str, id: int, provider: str, error: str,
                   trail: Sequence[Event] = ()) -> None:
        now = self.clock.time()
        await self._outcome(
            "UPDATE hapsms_messages SET state = 3, provider = %s, error = %s, updated = %s "
            "WHERE id = %s AND state = 1 AND owner = %s",
            (provider, error, now, id, owner),
            [(id, *_event(e)) for e in trail] + [(id, now, "dead", provider, "", error, None, "", "")],
            leaves=True)
        self._backlog.removed(1)

    async def _outcome(self, sql: str, params: tuple[Any, ...],
                       events: builtins.list[tuple[Any, ...]], *, leaves: bool) -> None:
        """``leaves``: the entry is no longer undelivered once ``sql`` changed it."""
        async def run(conn: Conn) -> None:
            await conn.execute(_INSERT_EVENTS, _columns(events, 9, _EVENT_FLOATS))
            if leaves:  # what it changed leaves the count, in the same statement
                await conn.execute(
                    f"WITH u AS ({sql} RETURNING 1) INSERT INTO hapsms_pending SELECT %s, "
                    f"-count(*) FROM u {_ADDED}", (*params, self.node))
            else:
                await conn.execute(sql, params)

        await self._pipe(run)

    async def receipt(self, provider: str, receipt: Receipt, now: float) -> Applied:
        r = receipt

        async def run(conn: Conn) -> Applied:
            if r.entry is not None:
                cur = await conn.execute("SELECT id, provider, state FROM hapsms_messages "
                                         "WHERE id = %s FOR UPDATE", (r.entry,))
            else:
                cur = await conn.execute(
                    "SELECT m.id, m.provider, m.state FROM hapsms_refs f JOIN hapsms_messages m "
                    "ON m.id = f.entry WHERE f.provider = %s AND f.ref = %s FOR UPDATE OF m",
                    (provider, r.ref))
            found = await cur.fetchone()
            if found is None or (found[2] in SENT_STATES and found[1] != provider):
                return Applied("unknown")
            id = found[0]
            await conn.execute(_INSERT_EVENT, (id, now, "receipt", provider, r.code, r.text,
                                               None, r.status, r.ref))
            reason = f"{provider} {r.code}" + (f": {r.text}" if r.text else "")
            cur = await conn.execute(_RECEIPT, {
                "id": id, "status": r.status, "code": r.code, "now": now,
                "reason": reason[:500], "provider": provider})
            row = await cur.fetchone()
            if row is None or row[0] == found[2]:
                return Applied("recorded", id, State(found[2]))
            return Applied("changed", id, State(row[0]), row[1])

        applied: Applied = await self._call(run)
        return applied

    async def release(self, owner: str, ids: Sequence[int]) -> None:
        await self._submit(
            None, "UPDATE hapsms_messages SET state = 0, due = %s, attempts = greatest(attempts - 1, 0) "
            "WHERE id = %s AND state = 1 AND owner = %s",
            [(self.clock.time(), i, owner) for i in ids])

    async def refresh(self) -> int:
        """Count the undelivered entries of every relay, and when the oldest was accepted, and
        mend hapsms_pending's sum to that count should it differ (a relay of an older version,
        a change made by hand): one statement, so the count and the sum are of one snapshot."""
        ((count, oldest),) = await self._rows(
            f"WITH c AS ({UNDELIVERED}), m AS (INSERT INTO hapsms_pending SELECT %s, c.n - "
            f"({_PENDING}) FROM c WHERE c.n <> ({_PENDING}) {_ADDED}) SELECT n, oldest FROM c",
            (self.node,))
        return self._backlog.counted(int(count), oldest)

    async def stats(self) -> Stats:
        rows = await self._rows(
            "SELECT state, count(*), min(created) FROM hapsms_messages GROUP BY state", ())
        return Stats.from_rows(rows)

    async def list(self, state: State | None, limit: int) -> builtins.list[Row]:
        where = "WHERE state = %s" if state is not None else ""
        params: tuple[Any, ...] = (int(state), limit) if state is not None else (limit,)
        rows = await self._rows(
            f"SELECT {_ROW_COLS} FROM hapsms_messages {where} ORDER BY id DESC LIMIT %s", params)
        return [_row(r) for r in rows]

    async def requeue(self, ids: Sequence[int] | None, ttl: float) -> int:
        now = self.clock.time()
        sql = ("UPDATE hapsms_messages SET state = 0, due = %s, expires = %s, attempts = 0, "
               "updated = %s WHERE state = 3")
        if ids is not None:
            sql += " AND id = ANY(%s)"

        async def run(conn: Conn) -> int:
            cur = await conn.execute(
                sql, (now, now + ttl, now) + ((list(ids),) if ids is not None else ()))
            if cur.rowcount:
                await conn.execute(_ADD_PENDING, (self.node, cur.rowcount))
            return cur.rowcount

        n: int = await self._call(run)
        if n:  # entries of any age wait again
            await self.refresh()
        return n

    async def purge_dead(self) -> int:
        return await self._change(
            "WITH gone AS (DELETE FROM hapsms_messages WHERE state = 3 RETURNING id), "
            "e AS (DELETE FROM hapsms_events WHERE entry IN (SELECT id FROM gone)) "
            "SELECT count(*) FROM gone", (), counted=True)

    async def show(self, id: int) -> Detail | None:
        rows = await self._rows(
            f"SELECT {_ROW_COLS}, refs, segments, sent_at, receipt, receipt_at "
            "FROM hapsms_messages WHERE id = %s", (id,))
        if not rows:
            return None
        r = rows[0]
        events = await self._rows(
            "SELECT at, kind, provider, code, text, latency, status, part FROM hapsms_events "
            "WHERE entry = %s ORDER BY seq", (id,))
        return Detail(_row(r[:10]), tuple(r[10].split()), r[11], r[12], r[13], r[14],
                      [Event(*e) for e in events])

    async def find(self, recipient: str, since: float, limit: int) -> builtins.list[Row]:
        rows = await self._rows(
            f"SELECT {_ROW_COLS} FROM hapsms_messages WHERE recipient = %s AND created >= %s "
            "ORDER BY id DESC LIMIT %s", (recipient, since, limit))
        return [_row(r) for r in rows]

    async def cleanup(self, delivered_before: float) -> int:
        n = 0
        while True:  # in chunks: other relays' writes go on between them
            # the entries' history and provider ids go with them
            deleted = await self._change(
                "WITH gone AS (DELETE FROM hapsms_messages WHERE id IN (SELECT id FROM "
                "hapsms_messages WHERE created < %s AND state IN (2, 4, 5) LIMIT %s) RETURNING id), "
                "e AS (DELETE FROM hapsms_events WHERE entry IN (SELECT id FROM gone)), "
                "f AS (DELETE FROM hapsms_refs WHERE entry IN (SELECT id FROM gone)) "
                "SELECT count(*) FROM gone", (delivered_before, CLEANUP_CHUNK), counted=True)
            n += deleted
            if deleted < CLEANUP_CHUNK:
                break
        now = self.clock.time()
        while await self._change(
            "DELETE FROM hapsms_replies WHERE pos IN (SELECT pos FROM hapsms_replies WHERE "
            "expires <= %s LIMIT %s)", (now, CLEANUP_CHUNK)) == CLEANUP_CHUNK:
            pass
        await self._change("DELETE FROM hapsms_budget WHERE day < %s", (now - 3 * 86400,))
        return n

    async def recent(self, since: float, after: int,
                     limit: int) -> builtins.list[tuple[int, int, str, float]]:
        rows: builtins.list[tuple[int, int, str, float]] = await self._rows(
            "SELECT id, kind, recipient, created FROM hapsms_messages WHERE created >= %s "
            "AND id > %s ORDER BY id LIMIT %s", (since, after, limit))
        return rows

    async def replies(
        self, now: float, after: int, limit: int,
    ) -> builtins.list[tuple[int, bytes, Sequence[int], bytes, float]]:
        rows: builtins.list[tuple[int, bytes, Sequence[int], bytes, float]] = await self._rows(
            "SELECT pos, key, ids, note, expires FROM hapsms_replies WHERE pos > %s AND "
            "expires > %s ORDER BY pos LIMIT %s", (after, now, limit))
        return rows

    async def sent_since(self, since: float) -> dict[str, tuple[int, int]]:
        rows = await self._rows(
            "SELECT provider, count(*), sum(segments) FROM hapsms_messages WHERE "
            "state IN (2, 4, 5) AND sent_at >= %s GROUP BY provider", (since,))
        return {p: (int(n), int(s or 0)) for p, n, s in rows}

    async def spend(
        self, day: float, keys: Sequence[BudgetKey],
        change: Callable[[dict[BudgetKey, Spent]], dict[BudgetKey, Spent]],
    ) -> dict[BudgetKey, Spent]:
        async def run(conn: Conn) -> dict[BudgetKey, Spent]:
            await conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", _BUDGET_LOCK)
            async with conn.cursor() as c:
                await c.executemany(_SEED_BUDGET, [{"day": day, "unit": u, "scope": s}
                                                   for u, s in keys])
            cur = await conn.execute(
                "SELECT unit, scope, sent, reserved FROM hapsms_budget WHERE day = %s AND "
                "(unit, scope) IN (SELECT * FROM unnest(%s::text[], %s::text[]))",
                (day, [u for u, _ in keys], [s for _, s in keys]))
            now = {(u, s): (int(n), int(r)) for u, s, n, r in await cur.fetchall()}
            added = {k: d for k, d in change(dict(now)).items() if any(d)}
            if added:
                async with conn.cursor() as c:
                    await c.executemany(
                        "UPDATE hapsms_budget SET sent = greatest(sent + %s, 0), reserved = "
                        "greatest(reserved + %s, 0) WHERE day = %s AND unit = %s AND scope = %s",
                        [(n, r, day, u, s) for (u, s), (n, r) in added.items()])
            return {k: (max(0, n + added.get(k, (0, 0))[0]), max(0, r + added.get(k, (0, 0))[1]))
                    for k, (n, r) in now.items()}

        counts: dict[BudgetKey, Spent] = await self._call(run)
        return counts

    # -- moving from one relay ------------------------------------------------------------

    async def import_entries(self, entries: Sequence[tuple[Any, ...]],
                             keys: Sequence[tuple[Any, ...]]) -> tuple[int, int]:
        """Entries and keys of a single relay's outbox (``outbox_sqlite.export``), with their
        ids (the answers HAP holds name them), in one transaction; what is there already is
        skipped, so a second run adds nothing. An id that another entry holds here already
        is refused: nothing is imported then. The id sequence is moved past them."""

        async def run(conn: Conn) -> tuple[int, int]:
            cols = ("id, batch, kind, recipient, region, national, text, signature, code, "
                    "created, due, expires, attempts, state, provider, error, updated")
            ids = [e[0] for e in entries]
            cur = await conn.execute(
                "SELECT id, recipient, created FROM hapsms_messages WHERE id = ANY(%s)", (ids,))
            theirs = {e[0]: (e[3], e[9]) for e in entries}
            clash = [i for i, rcpt, created in await cur.fetchall()
                     if theirs[i] != (rcpt, created)]
            if clash:
                raise StorageError(
                    f"{len(clash)} ids of the SQLite outbox (first {clash[0]}) belong to other "
                    "entries here: import into the cluster's database before its relays "
                    "accept messages")
            added = undelivered = 0
            async with conn.cursor() as c:
                for e in entries:
                    await c.execute(
                        f"INSERT INTO hapsms_messages ({cols}) VALUES ({', '.join(['%s'] * 17)}) "
                        "ON CONFLICT (id) DO NOTHING", e)
                    added += c.rowcount
                    undelivered += c.rowcount if e[13] in (State.PENDING, State.INFLIGHT) else 0
                if undelivered:
                    await c.execute(_ADD_PENDING, (self.node, undelivered))
                for k in keys:
                    await c.execute(
                        "INSERT INTO hapsms_replies (key, ids, note, expires) VALUES "
                        "(%s, %s, %s, %s) ON CONFLICT (key) DO NOTHING", k)
            await conn.execute(
                "SELECT setval('hapsms_messages_id_seq', greatest((SELECT max(id) FROM "
                "hapsms_messages), (SELECT last_value FROM hapsms_messages_id_seq)))")
            return added, len(keys)

        done: tuple[int, int] = await self._call(run)
        return done

    # -- the Cluster interface -------------------------------------------------------------

    async def heartbeat(self, node: Node) -> None:
        await self._change(
            "INSERT INTO hapsms_nodes VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (owner) "
            "DO UPDATE SET heartbeat = excluded.heartbeat, inflight = excluded.inflight, "
            "digest = excluded.digest, version = excluded.version", tuple(node))

    async def leave(self, owner: str) -> None:
        await self._change("DELETE FROM hapsms_nodes WHERE owner = %s", (owner,))

    async def nodes(self) -> builtins.list[Node]:
        rows = await self._rows("SELECT owner, node, version, digest, started, heartbeat, "
                                "inflight FROM hapsms_nodes ORDER BY heartbeat DESC", ())
        return [Node(*r) for r in rows]

    # -- helpers ---------------------------------------------------------------------------

    async def _rows(self, sql: str, params: tuple[Any, ...]) -> builtins.list[Any]:
        async def run(conn: Conn) -> builtins.list[Any]:
            cur = await conn.execute(sql, params)
            return [tuple(r) for r in await cur.fetchall()]

        rows: builtins.list[Any] = await self._call(run)
        return rows

    async def _one(self, sql: str, params: tuple[Any, ...]) -> Any:
        rows = await self._rows(sql, params)
        return rows[0][0] if rows else None

    async def _change(self, sql: str, params: tuple[Any, ...], *, counted: bool = False) -> int:
        """Run a change; how many rows it changed (``counted``: what its SELECT counts)."""
        async def run(conn: Conn) -> int:
            cur = await conn.execute(sql, params)
            if counted:
                row = await cur.fetchone()
                return int(row[0]) if row else 0
            return cur.rowcount

        n: int = await self._call(run)
        return n

    async def _count(self, conn: Conn) -> tuple[int, float | None]:
        cur = await conn.execute(UNDELIVERED)
        row = await cur.fetchone()
        return (int(row[0]), row[1]) if row else (0, None)


def _row(r: Sequence[Any]) -> Row:
    return Row(r[0], r[1], r[2], State(r[3]), *r[4:10])


def _event(e: Event) -> tuple[Any, ...]:
    """An event's columns after ``entry``."""
    return (e.at, e.kind, e.provider, e.code, e.text, e.latency, e.status, e.part)


def _columns(rows: Sequence[Sequence[Any]], width: int,
             floats: Sequence[int] = ()) -> list[list[Any]]:
    """Rows as the arrays of one ``unnest(...)`` statement, a column each; the columns at
    ``floats`` as floats (psycopg refuses a list that mixes ints and floats, and a clock or
    a latency may give either)."""
    if not rows:
        return [[] for _ in range(width)]
    cols = [list(c) for c in zip(*rows, strict=True)]
    for i in floats:
        cols[i] = [None if v is None else float(v) for v in cols[i]]
    return cols


def _fail(batch: list[_Op], exc: BaseException) -> None:
    for op in batch:
        if not op.fut.done():
            op.fut.set_exception(exc)


def _connection_lost(exc: BaseException) -> bool:
    """The connection cannot go on: reconnect (possibly to another host) before the next
    batch. A read-only server (a standby after a failover) counts: the next connection
    looks for one that is writable (target_session_attrs=read-write)."""
    return isinstance(exc, psycopg.OperationalError | pgerrors.ReadOnlySqlTransaction
                      | pgerrors.AdminShutdown | pgerrors.CannotConnectNow)


def _describe(exc: BaseException) -> str:
    """A database error for logs and answers: libpq's own first line (which names hosts,
    never passwords)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"database: {text}"
