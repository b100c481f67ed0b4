"""The SQLite outbox: WAL, ``synchronous=FULL``, group commit on one writer thread.

Every operation is queued to a single thread that owns the connection. The thread drains
whatever has queued up and runs it in one transaction, so concurrent webhook requests share
one fsync; each caller's future resolves only after that commit (a transaction of nothing
but claims commits without one: ``_sync_for`` says why that loses nothing). The event loop
never blocks on SQLite. One relay owns the file (an flock), so it is the only writer: its ids
come from a counter, and at open no other owner's lease can still be live.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import fcntl
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import orjson

from hapsms_relay.clock import SYSTEM, Clock
from hapsms_relay.errors import StorageError
from hapsms_relay.outbox import (
    SENT_STATES,
    Applied,
    Backlog,
    Detail,
    Entry,
    Event,
    NewEntry,
    Row,
    Sending,
    State,
    Stats,
)
from hapsms_relay.receipts import Receipt

APPLICATION_ID = 0x48415053  # "HAPS": tells our outbox from any other SQLite file
SCHEMA_VERSION = 3  # 2: claims have an owner and a lease; 3: receipts and history

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id        INTEGER PRIMARY KEY,
    batch     INTEGER NOT NULL,
    kind      INTEGER NOT NULL,
    recipient TEXT    NOT NULL,
    region    TEXT    NOT NULL,
    national  TEXT    NOT NULL,
    text      TEXT    NOT NULL,
    signature TEXT    NOT NULL,
    code      TEXT    NOT NULL,
    created   REAL    NOT NULL,
    due       REAL    NOT NULL,
    expires   REAL    NOT NULL,
    attempts  INTEGER NOT NULL DEFAULT 0,
    state     INTEGER NOT NULL DEFAULT 0,
    provider  TEXT    NOT NULL DEFAULT '',
    error     TEXT    NOT NULL DEFAULT '',
    updated   REAL    NOT NULL,
    owner     TEXT    NOT NULL DEFAULT '',
    lease     REAL    NOT NULL DEFAULT 0,
    refs      TEXT    NOT NULL DEFAULT '',  -- the provider's message ids, space-separated
    parts     INTEGER NOT NULL DEFAULT 0,   -- how many (each part has its receipt)
    segments  INTEGER NOT NULL DEFAULT 0,
    sent_at   REAL    NOT NULL DEFAULT 0,
    receipt   TEXT    NOT NULL DEFAULT '',  -- the last receipt's code
    receipt_at REAL   NOT NULL DEFAULT 0
);
-- an entry's history, appended to by the outcome methods and receipts, never updated
CREATE TABLE IF NOT EXISTS events (
    entry    INTEGER NOT NULL,
    at       REAL    NOT NULL,
    kind     TEXT    NOT NULL,
    provider TEXT    NOT NULL,
    code     TEXT    NOT NULL,
    text     TEXT    NOT NULL,
    latency  REAL,
    status   TEXT    NOT NULL,
    part     TEXT    NOT NULL
);
CREATE INDEX IF NOT EXISTS events_entry ON events(entry);
-- the provider's ids of sent entries: what a receipt naming only those (Tencent) finds
CREATE TABLE IF NOT EXISTS refs (
    provider TEXT    NOT NULL,
    ref      TEXT    NOT NULL,
    entry    INTEGER NOT NULL,
    PRIMARY KEY (provider, ref)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS refs_entry ON refs(entry);
CREATE INDEX IF NOT EXISTS pending_due ON messages(due) WHERE state = 0;
CREATE INDEX IF NOT EXISTS dead_id ON messages(id) WHERE state = 3;
-- entries in flight (a few): counting undelivered ones and releasing stranded ones read
-- this and pending_due, not the whole table (a 15 ms scan per 200,000 rows on the writer)
CREATE INDEX IF NOT EXISTS inflight_id ON messages(id) WHERE state = 1;
-- the oldest pending entry (the oldest undelivered one's age is a metric): one look-up at
-- the index's first row, whatever the backlog; those in flight are few (inflight_id).
-- Pending only: an index of in-flight entries too cost ~8,000 instructions more per
-- delivered message (claims rewrite the entry). It needs no schema version: this script
-- creates it at open (on an existing file too), and a relay of an earlier release keeps
-- it up to date.
CREATE INDEX IF NOT EXISTS pending_created ON messages(created) WHERE state = 0;
-- dedup keys (dedup.py): appended in rowid order, read whole at start; a random-key index
-- would touch a random page per request, so the only index is on the (nearly ordered) expiry.
-- The ids of one enqueue are consecutive here (one writer): first and count stand for them.
CREATE TABLE IF NOT EXISTS replies (
    key     BLOB    NOT NULL,
    first   INTEGER NOT NULL,
    count   INTEGER NOT NULL,
    note    BLOB    NOT NULL,
    expires REAL    NOT NULL
);
CREATE INDEX IF NOT EXISTS replies_expires ON replies(expires);
"""

# v1 -> v2: in-flight rows of v1 get no lease (0), so they are claimable at once.
# v2 -> v3: entries sent before keep counting in today's budgets (sent_at).
_UPGRADES = {
    1: "ALTER TABLE messages ADD COLUMN owner TEXT NOT NULL DEFAULT '';"
       "ALTER TABLE messages ADD COLUMN lease REAL NOT NULL DEFAULT 0;",
    2: "ALTER TABLE messages ADD COLUMN refs TEXT NOT NULL DEFAULT '';"
       "ALTER TABLE messages ADD COLUMN parts INTEGER NOT NULL DEFAULT 0;"
       "ALTER TABLE messages ADD COLUMN segments INTEGER NOT NULL DEFAULT 0;"
       "ALTER TABLE messages ADD COLUMN sent_at REAL NOT NULL DEFAULT 0;"
       "ALTER TABLE messages ADD COLUMN receipt TEXT NOT NULL DEFAULT '';"
       "ALTER TABLE messages ADD COLUMN receipt_at REAL NOT NULL DEFAULT 0;"
       "UPDATE messages SET sent_at = updated WHERE state = 2;",
}

_INSERT_EVENT = "INSERT INTO events VALUES (?,?,?,?,?,?,?,?,?)"
# A receipt that came before the send was recorded (a fast vendor) decides at once: the
# state is computed from the history in the same statement, never read and written back.
# Most entries have no receipt yet, and one look-up says so first: the update then costs
# ~30,000 instructions per entry where the two look-ups below made it ~63,000.
_SENT = (
    "UPDATE messages SET state = CASE "
    "WHEN NOT EXISTS (SELECT 1 FROM events WHERE entry = ?1 AND kind = 'receipt') THEN 2 "
    "WHEN EXISTS (SELECT 1 FROM events WHERE entry = ?1 AND kind = 'receipt' "
    "AND provider = ?5 AND status = 'undelivered') THEN 5 "
    "WHEN (SELECT count(DISTINCT part) FROM events WHERE entry = ?1 AND kind = 'receipt' "
    "AND provider = ?5 AND status = 'delivered') >= max(?2, 1) THEN 4 ELSE 2 END, "
    "parts = ?2, refs = ?3, segments = ?4, provider = ?5, sent_at = ?6, updated = ?6 "
    "WHERE id = ?1 AND state IN (0, 1)"
)
_INSERT_REF = "INSERT OR IGNORE INTO refs VALUES (?,?,?)"
# Forward only, in one statement: sent (or in flight: the send not yet recorded) entries
# become undelivered at a final failure, delivered once every part has been delivered.
_RECEIPT = (
    "UPDATE messages SET state = CASE WHEN ?2 = 'undelivered' THEN 5 "
    "WHEN state = 2 AND (SELECT count(DISTINCT part) FROM events WHERE entry = ?1 "
    "AND kind = 'receipt' AND status = 'delivered') >= max(parts, 1) THEN 4 ELSE state END, "
    "receipt = ?3, receipt_at = ?4, updated = ?4, "
    "error = CASE WHEN ?2 = 'undelivered' THEN ?5 ELSE error END "
    "WHERE id = ?1 AND provider = ?6 AND state = 2 AND ?2 <> 'progress' "
    "RETURNING state, sent_at"
)

_ENTRY_COLS = (
    "id, batch, kind, recipient, region, national, text, signature, code, created, expires, attempts,"
    " error"
)

_INSERT_REPLY = "INSERT INTO replies VALUES (?,?,?,?,?)"
# how many are pending or in flight, and the oldest of them: each part over its partial
# index (tests check the plan)
UNDELIVERED = (
    "SELECT (SELECT count(*) FROM messages WHERE state = 0) + "
    "(SELECT count(*) FROM messages WHERE state = 1), "
    "(SELECT min(c) FROM (SELECT min(created) AS c FROM messages WHERE state = 0 "
    "UNION ALL SELECT min(created) FROM messages WHERE state = 1))"
)

_INSERT = (
    "INSERT INTO messages (id, batch, kind, recipient, region, national, text, signature,"
    " code, created, due, expires, updated) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
)

# Rows one housekeeping statement deletes at most: the writer thread runs other callers'
# operations between chunks (one DELETE of 100,000 expired answers held enqueues for 43 ms).
CLEANUP_CHUNK = 1000

# Bytes the WAL keeps after a checkpoint restarts it (PRAGMA journal_size_limit): between
# checkpoints it still grows to ~4 MB (SQLite's automatic checkpoint at 1000 pages).
WAL_LIMIT = 1024 * 1024

# Seconds between the writer thread's probe writes while writes fail.
PROBE_EVERY = 1.0

_Op = tuple[Callable[..., Any], tuple[Any, ...], "asyncio.Future[Any]"]


class SQLiteOutbox:
    """``Outbox`` on a local SQLite file. One process owns the file (an flock enforces it);
    ``exclusive=False`` opens an existing outbox beside its owner (the ``queue`` commands)."""

    def __init__(self, path: str, *, busy_timeout: float = 5.0, exclusive: bool = True,
                 clock: Clock = SYSTEM) -> None:
        self.path = path
        self.clock = clock
        self._busy_timeout = busy_timeout
        self._exclusive = exclusive
        # ops reach the writer thread a loop turn's worth at a time (see _call)
        self._ops: queue.SimpleQueue[list[_Op] | None] = queue.SimpleQueue()
        self._turn: list[_Op] = []
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: sqlite3.Connection | None = None
        self._lock_fh: IO[bytes] | None = None
        self._next_id = 1
        self._last_created = 0.0
        self._backlog = Backlog()
        # False from a write that failed for the storage's sake until one succeeds (or the
        # writer thread's own probe does): what /readyz reports. Set on the writer thread.
        self._writable = True
        self._fault = False  # a write fault in the batch being executed
        # bound methods made once, so ops are told apart by identity (see _statement)
        self._enqueue_op = self._op_enqueue
        self._set_op = self._op_set
        self._sent_op = self._op_sent
        self._claim_op = self._op_claim
        self._next_due_op = self._op_next_due
        # Ops whose commit needs no fsync (see _sync_for): a batch of nothing else commits
        # with synchronous = NORMAL, any other batch with FULL.
        self._unsynced = frozenset((self._claim_op, self._next_due_op))
        self._synced = True  # the writer connection's synchronous is FULL (set at open)

    @property
    def undelivered(self) -> int:
        return self._backlog.count

    @property
    def oldest_undelivered(self) -> float | None:
        return self._backlog.oldest

    @property
    def writable(self) -> bool:
        return self._writable

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        self._loop = asyncio.get_running_loop()
        path = Path(self.path)
        if self._exclusive:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StorageError(f"cannot create {path.parent}: {exc.strerror or exc}") from None
            self._lock()
        self._thread = threading.Thread(target=self._run, name="hapsms-outbox", daemon=True)
        self._thread.start()
        try:
            self._next_id, self._last_created, count, oldest = await self._call(self._op_open)
            self._backlog.counted(count, oldest)
        except BaseException:
            await self.close()
            raise

    def _lock(self) -> None:
        lock_path = self.path + ".lock"
        try:
            fh = open(lock_path, "ab")
        except OSError as exc:
            raise StorageError(f"cannot open {lock_path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            raise StorageError(
                f"{self.path} is in use by another hapsms-relay process; run one relay per outbox"
            ) from None
        self._lock_fh = fh

    async def close(self) -> None:
        if self._thread is not None:
            self._hand_off()
            self._ops.put(None)
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
            self._thread = None
        if self._lock_fh is not None:
            self._lock_fh.close()
            self._lock_fh = None

    # -- the writer thread -----------------------------------------------------------------

    def _call(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        if self._thread is None or self._loop is None:
            raise StorageError("the outbox is not open")
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._turn.append((fn, args, fut))
        if len(self._turn) == 1:
            self._loop.call_soon(self._hand_off)
        return fut

    def _hand_off(self) -> None:
        """The ops of this turn of the event loop to the writer thread, in one put: a put
        per op woke the thread (and made it take the GIL) once per op, for batches of one
        or two ops where it could have committed them all at once."""
        ops, self._turn = self._turn, []
        if ops:
            self._ops.put(ops)

    def _run(self) -> None:
        stop = False
        while not stop:
            if self._writable:
                first = self._ops.get()
            else:  # nothing may come (a load balancer took the node out): try now and then
                try:
                    first = self._ops.get(timeout=PROBE_EVERY)
                except queue.Empty:
                    self._probe()
                    continue
            if first is None:
                break
            batch = first
            while True:
                try:
                    ops = self._ops.get_nowait()
                except queue.Empty:
                    break
                if ops is None:
                    stop = True
                    break
                batch += ops
            results = self._execute(batch)
            assert self._loop is not None
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                self._loop.call_soon_threadsafe(_settle, results)
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None

    def _execute(self, batch: list[_Op]) -> list[tuple[asyncio.Future[Any], bool, Any]]:
        results: list[tuple[asyncio.Future[Any], bool, Any]] = []
        conn = self._conn
        if conn is None:  # the open op runs outside a transaction
            for fn, args, fut in batch:
                try:
                    results.append((fut, True, fn(*args)))
                except BaseException as exc:
                    results.append((fut, False, _storage_error(exc)))
            return results
        try:
            self._sync_for(conn, batch)
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            self._failed(exc)
            err = _storage_error(exc)
            return [(fut, False, err) for _, _, fut in batch]
        changes = conn.total_changes
        self._fault = False
        i = 0
        while i < len(batch):
            key = self._statement(batch[i])
            j = i + 1
            while key is not None and j < len(batch) and self._statement(batch[j]) == key:
                j += 1
            # Like writes of concurrent callers (enqueues, status updates) as one statement:
            # under load that is most of a batch, and it costs far less than a savepoint and
            # a statement each.
            if j - i == 1 or not self._run_merged(conn, batch[i:j], results):
                for fn, args, fut in batch[i:j]:
                    try:
                        conn.execute("SAVEPOINT op")
                        value = fn(*args)
                        conn.execute("RELEASE op")
                        results.append((fut, True, value))
                    except BaseException as exc:
                        self._failed(exc)
                        with contextlib.suppress(sqlite3.Error):
                            conn.execute("ROLLBACK TO op")
                            conn.execute("RELEASE op")
                        results.append((fut, False, _storage_error(exc)))
            i = j
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._failed(exc)
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            err = _storage_error(exc)
            return [(fut, False, err) for fut, _, _ in results]
        # rows rolled back to a savepoint count in total_changes too: only a batch with no
        # write fault proves that writes work
        if not self._fault and conn.total_changes != changes:
            self._writable = True
        return results

    def _sync_for(self, conn: sqlite3.Connection, batch: list[_Op]) -> None:
        """FULL (the WAL fsynced at commit) for a batch with anything but claims in it;
        NORMAL for claims alone. A claim needs no fsync: the flock makes this process the
        outbox's only owner, and open() ends every lease, so after a power cut a claim
        that reached the disk and one that did not leave the same thing, its entry due
        again (at least once; a lost claim's attempt is not counted). A synced commit
        after it (an outcome, an enqueue) syncs the claim too: the WAL is one file, synced
        up to its end.

        At a few messages a second a claim commits alone, and its fsync came between a
        message's 200 and its provider call: about 1 ms of the 2-3 ms from the 200 to the
        sink here (bench/README.md, eighth round)."""
        sync = not self._unsynced.issuperset(fn for fn, _, _ in batch)
        if sync != self._synced:
            conn.execute("PRAGMA synchronous = FULL" if sync else "PRAGMA synchronous = NORMAL")
            self._synced = sync

    def _failed(self, exc: BaseException) -> None:
        if getattr(exc, "sqlite_errorcode", 0) & 0xFF in _WRITE_FAULTS:
            self._writable = False
            self._fault = True

    def _probe(self) -> None:
        """One small write (page 1 of the file), to learn whether writes work again."""
        conn = self._conn
        if conn is None:
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._failed(exc)
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            return
        self._writable = True

    def _statement(self, op: _Op) -> str | None:
        """The SQL of an op that can share one ``executemany`` with its like, else None."""
        fn, args, _ = op
        if fn is self._enqueue_op:
            return _INSERT
        if fn is self._sent_op:
            return _SENT
        if fn is self._set_op:
            sql: str = args[0]
            return sql
        return None

    def _run_merged(self, conn: sqlite3.Connection, ops: list[_Op],
                    results: list[tuple[asyncio.Future[Any], bool, Any]]) -> bool:
        """Run like ops as one statement; False (nothing done) if it fails, so the caller
        runs them one by one and only the culprit fails."""
        sql = self._statement(ops[0])
        assert sql is not None
        try:
            conn.execute("SAVEPOINT merged")
            if sql is _INSERT:  # enqueue(rows, dedup keys): both, for every op, or none
                conn.executemany(sql, [p for _, args, _ in ops for p in args[0]])
                conn.executemany(_INSERT_REPLY, [k for _, args, _ in ops for k in args[1]])
            elif sql is _SENT:  # sent(updates, events, refs)
                conn.executemany(_INSERT_EVENT, [e for _, args, _ in ops for e in args[1]])
                conn.executemany(sql, [u for _, args, _ in ops for u in args[0]])
                conn.executemany(_INSERT_REF, [r for _, args, _ in ops for r in args[2]])
            else:
                conn.executemany(sql, [p for _, args, _ in ops for p in args[-1]])
            conn.execute("RELEASE merged")
        except BaseException:  # (not only SQLite's: a value it cannot bind, a bug's TypeError)
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK TO merged")
                conn.execute("RELEASE merged")
            return False
        results.extend((fut, True, None) for _, _, fut in ops)
        return True

    # -- operations, run on the writer thread ----------------------------------------------

    def _op_open(self) -> tuple[int, float, int, float | None]:
        if not self._exclusive and not os.path.exists(self.path):
            # A tool (queue stats...) must not create an outbox the relay would then find
            # owned by another user.
            raise StorageError(f"there is no outbox at {self.path} (queue.path) yet; the "
                               "relay creates it when it starts")
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open outbox {self.path}: {exc}") from None
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if tables and app_id != APPLICATION_ID:
                raise StorageError(
                    f"{self.path} is not a hapsms-relay outbox (another program's SQLite "
                    "file?); point queue.path at a new file or move this one away"
                )
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StorageError(
                    f"{self.path} was written by a newer hapsms-relay (schema {version}); "
                    "upgrade this one"
                )
            if tables:  # read every row before writing anything: a damaged file stays as it is
                conn.execute("SELECT count(*) FROM messages WHERE state >= 0").fetchone()
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise StorageError(f"{self.path}: cannot switch to WAL mode (got {mode})")
            conn.execute("PRAGMA synchronous = FULL")
            if tables and version < SCHEMA_VERSION:
                if not self._exclusive:
                    raise StorageError(f"{self.path} has an older schema ({version}); start "
                                       "the relay once to upgrade it")
                conn.execute("BEGIN IMMEDIATE")
                for v in range(max(version, 1), SCHEMA_VERSION):
                    # statement by statement: executescript() would commit the transaction
                    # first, and a failed upgrade would be left half done
                    for statement in filter(None, map(str.strip, _UPGRADES[v].split(";"))):
                        conn.execute(statement)
                conn.execute("COMMIT")
            # The WAL grows past SQLite's automatic checkpoint (1000 pages, ~4 MB) while a
            # reader holds an old snapshot or one commit is large, and without a limit keeps
            # its largest size for ever. With one, it is cut back to WAL_LIMIT whenever it
            # restarts after a checkpoint; cleanup() truncates it to nothing when it can.
            conn.execute(f"PRAGMA journal_size_limit = {WAL_LIMIT}")
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            # The flock says that whoever claimed entries before is dead: their leases end
            # now, and the entries are delivered again (at least once). Only the owner may: a
            # tool opening the outbox of a running relay must leave its claims alone.
            if self._exclusive:
                conn.execute("UPDATE messages SET lease = 0 WHERE state = 1")
            max_id, last = conn.execute("SELECT max(id), max(created) FROM messages").fetchone()
            undelivered, oldest = conn.execute(UNDELIVERED).fetchone()
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StorageError(self._open_failed(exc)) from None
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._synced = True  # set FULL above
        return (max_id or 0) + 1, last or 0.0, undelivered, oldest

    def _open_failed(self, exc: sqlite3.Error) -> str:
        """What an operator should read when the outbox cannot be opened: the real cause, and
        advice that never throws acknowledged messages away."""
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
        name = getattr(exc, "sqlite_errorname", "") or "SQLite error"
        if code in _DAMAGED:
            what = ("is not a SQLite database" if code == sqlite3.SQLITE_NOTADB
                    else "is damaged")
            return (f"{self.path} {what} ({exc}; {name}). If it is the outbox, it may hold "
                    "messages not yet delivered: keep the file, restore the outbox from a "
                    f"backup, or recover its rows with `sqlite3 {self.path} .recover`; "
                    "another program's file: point queue.path at a new file")
        cause = storage_cause(exc, os.path.dirname(os.path.abspath(self.path)))
        return (f"cannot use the outbox {self.path}: {cause} ({exc}; {name}). This is a "
                "fault of the storage, not of the file: fix it and start again, and every "
                "message in the outbox is still delivered. Do not move or delete the file")

    def _op_enqueue(self, rows: list[tuple[Any, ...]], keys: list[tuple[Any, ...]]) -> None:
        assert self._conn is not None
        self._conn.executemany(_INSERT, rows)
        if keys:  # dedup keys commit with the messages they answer for, or not at all
            self._conn.executemany(_INSERT_REPLY, keys)

    def _op_claim(self, owner: str, limit: int, now: float, until: float) -> list[Entry]:
        assert self._conn is not None
        # leases run out (a delivery whose outcome could not be written), then due entries;
        # each over its partial index
        rows = self._conn.execute(
            "UPDATE messages SET state = 1, attempts = attempts + 1, updated = ?, owner = ?, "
            "lease = ? WHERE id IN (SELECT id FROM messages WHERE state = 1 AND lease <= ? "
            f"LIMIT ?) RETURNING {_ENTRY_COLS}",
            (now, owner, until, now, limit),
        ).fetchall()
        if len(rows) < limit:
            rows += self._conn.execute(
                "UPDATE messages SET state = 1, attempts = attempts + 1, updated = ?, owner = ?, "
                "lease = ? WHERE id IN (SELECT id FROM messages WHERE state = 0 AND due <= ? "
                f"ORDER BY due LIMIT ?) RETURNING {_ENTRY_COLS}",
                (now, owner, until, now, limit - len(rows)),
            ).fetchall()
        entries = [Entry(*r) for r in rows]
        entries.sort(key=lambda e: e.id)
        return entries

    def _op_next_due(self) -> float | None:
        assert self._conn is not None
        due: float | None = self._conn.execute(
            "SELECT min(due) FROM messages WHERE state = 0"
        ).fetchone()[0]
        return due

    def _op_first_since(self, since: float) -> int:
        """The first id accepted at or after ``since``. Ids and acceptance times grow
        together here (one writer, ``created`` never goes back), so a binary search over the
        primary key finds it: ~40 lookups instead of an index on ``created`` that every
        enqueue would pay for."""
        assert self._conn is not None
        lo, hi = self._conn.execute("SELECT min(id), max(id) FROM messages").fetchone()
        if lo is None:
            return self._next_id
        best = hi = hi + 1
        while lo < hi:
            mid = (lo + hi) // 2
            # the first id at or after mid: there is one, as mid <= max(id)
            found, created = self._conn.execute(
                "SELECT id, created FROM messages WHERE id >= ? ORDER BY id LIMIT 1", (mid,)
            ).fetchone()
            if created >= since:
                best, hi = found, mid  # it, or an id below mid
            else:
                lo = found + 1
        return int(best)

    def _op_recent(self, since: float, after: int, limit: int) -> list[tuple[Any, ...]]:
        assert self._conn is not None
        return self._conn.execute(
            "SELECT id, kind, recipient, created FROM messages WHERE id >= ? AND id > ? "
            "AND created >= ? ORDER BY id LIMIT ?",
            (self._op_first_since(since), after, since, limit),
        ).fetchall()

    def _op_cleanup(self, low: int, below: int) -> tuple[int, int | None]:
        """Delete delivered entries among the next ``CLEANUP_CHUNK`` ids from ``low`` (below
        ``below``); return how many, and where the next chunk starts (None: done)."""
        assert self._conn is not None
        last, seen = self._conn.execute(
            "SELECT max(id), count(*) FROM (SELECT id FROM messages WHERE id >= ? AND id < ? "
            "ORDER BY id LIMIT ?)", (low, below, CLEANUP_CHUNK),
        ).fetchone()
        if not seen:
            return 0, None
        n: int = self._conn.execute(
            "DELETE FROM messages WHERE id >= ? AND id <= ? AND state IN (2, 4, 5)", (low, last),
        ).rowcount
        if n:  # the history and provider ids of what is gone, over their entry indexes
            for table in ("events", "refs"):
                self._conn.execute(
                    f"DELETE FROM {table} WHERE entry >= ?1 AND entry <= ?2 AND entry NOT IN "
                    "(SELECT id FROM messages WHERE id >= ?1 AND id <= ?2)", (low, last))
        return n, (last + 1 if seen == CLEANUP_CHUNK else None)

    def _op_sent(self, updates: list[tuple[Any, ...]], events: list[tuple[Any, ...]],
                 refs: list[tuple[Any, ...]]) -> None:
        assert self._conn is not None
        self._conn.executemany(_INSERT_EVENT, events)
        self._conn.executemany(_SENT, updates)
        self._conn.executemany(_INSERT_REF, refs)

    def _op_outcome(self, sql: str, params: tuple[Any, ...],
                    events: list[tuple[Any, ...]]) -> None:
        assert self._conn is not None
        self._conn.executemany(_INSERT_EVENT, events)
        self._conn.execute(sql, params)

    def _op_receipt(self, provider: str, r: Receipt, now: float) -> Applied:
        assert self._conn is not None
        conn = self._conn
        if r.entry is not None:
            found = conn.execute("SELECT id, provider, state FROM messages WHERE id = ?",
                                 (r.entry,)).fetchone()
        else:
            found = conn.execute(
                "SELECT m.id, m.provider, m.state FROM refs JOIN messages m ON m.id = refs.entry "
                "WHERE refs.provider = ? AND refs.ref = ?", (provider, r.ref)).fetchone()
        # an entry another provider sent is not this endpoint's to change
        if found is None or (found[2] in SENT_STATES and found[1] != provider):
            return Applied("unknown")
        id = found[0]
        conn.execute(_INSERT_EVENT, (id, now, "receipt", provider, r.code, r.text, None,
                                     r.status, r.ref))
        reason = f"{provider} {r.code}" + (f": {r.text}" if r.text else "")
        row = conn.execute(_RECEIPT, (id, r.status, r.code, now, reason[:500], provider)).fetchone()
        if row is None or row[0] == found[2]:
            return Applied("recorded", id, State(found[2]))
        return Applied("changed", id, State(row[0]), row[1])

    def _op_set(self, sql: str, params: Sequence[tuple[Any, ...]]) -> None:
        assert self._conn is not None
        self._conn.executemany(sql, params)

    def _op_query(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        assert self._conn is not None
        return self._conn.execute(sql, params).fetchall()

    def _op_change(self, sql: str, params: tuple[Any, ...]) -> int:
        assert self._conn is not None
        return self._conn.execute(sql, params).rowcount

    # -- the Outbox interface --------------------------------------------------------------

    async def enqueue(
        self, entries: Sequence[NewEntry], ttl: float, *, keys: Sequence[tuple[bytes, float]] = (),
        note: bytes = b"",
    ) -> list[int]:
        # acceptance times never go back (a clock stepped back): ids and times grow together
        now = self._last_created = max(self.clock.time(), self._last_created)
        # the only writer (the flock): a counter gives unique ids, consecutive for one body
        first = self._next_id
        ids = list(range(first, first + len(entries)))
        self._next_id = first + len(entries)
        expires = now + ttl
        # kind, recipient, region, national, text, signature, code: NewEntry's first seven
        rows = [(i, first, *e[:7], now, now, expires, now) for i, e in zip(ids, entries, strict=True)]
        key_rows = [(k, first, len(rows), note, exp) for k, exp in keys]
        await self._call(self._enqueue_op, rows, key_rows)
        self._backlog.added(len(rows), now)
        return ids

    async def claim(self, owner: str, limit: int, now: float, lease: float) -> list[Entry]:
        entries: list[Entry] = await self._call(self._claim_op, owner, limit, now, now + lease)
        return entries

    async def renew(self, owner: str, ids: Sequence[int], until: float) -> int:
        n: int = await self._call(
            self._op_change,
            "UPDATE messages SET lease = ? WHERE state = 1 AND owner = ? AND id IN "
            "(SELECT value FROM json_each(?))",
            (until, owner, orjson.dumps(list(ids)).decode()),
        )
        return n

    async def next_due(self) -> float | None:
        due: float | None = await self._call(self._next_due_op)
        return due

    async def sent(self, provider: str, entries: Sequence[Sending]) -> None:
        now = self.clock.time()
        updates = [(s.id, len(s.refs), " ".join(s.refs), s.segments, provider, now)
                   for s in entries]
        events = [(s.id, *_event(e)) for s in entries for e in s.trail]
        events += [(s.id, now, "sent", provider, "", " ".join(s.refs), s.latency, "", "")
                   for s in entries]
        refs = [(provider, ref, s.id) for s in entries for ref in s.refs if ref]
        await self._call(self._sent_op, updates, events, refs)
        self._backlog.removed(len(entries))

    async def retry(self, owner: str, id: int, due: float, provider: str, error: str,
                    trail: Sequence[Event] = ()) -> None:
        now = self.clock.time()
        await self._call(
            self._op_outcome,
            "UPDATE messages SET state = 0, due = ?, provider = ?, error = ?, updated = ? "
            "WHERE id = ? AND state = 1 AND owner = ?",
            (due, provider, error, now, id, owner),
            [(id, *_event(e)) for e in trail]
            + [(id, now, "retry", provider, "", error, None, "", "")],
        )

    async def dead(self, owner: str, id: int, provider: str, error: str,
                   trail: Sequence[Event] = ()) -> None:
        now = self.clock.time()
        await self._call(
            self._op_outcome,
            "UPDATE messages SET state = 3, provider = ?, error = ?, updated = ? "
            "WHERE id = ? AND state = 1 AND owner = ?",
            (provider, error, now, id, owner),
            [(id, *_event(e)) for e in trail]
            + [(id, now, "dead", provider, "", error, None, "", "")],
        )
        self._backlog.removed(1)

    async def receipt(self, provider: str, receipt: Receipt, now: float) -> Applied:
        applied: Applied = await self._call(self._op_receipt, provider, receipt, now)
        return applied

    async def release(self, owner: str, ids: Sequence[int]) -> None:
        now = self.clock.time()
        await self._call(
            self._set_op,
            "UPDATE messages SET state = 0, due = ?, attempts = max(attempts - 1, 0) "
            "WHERE id = ? AND state = 1 AND owner = ?",
            [(now, i, owner) for i in ids],
        )

    async def refresh(self) -> int:
        ((count, oldest),) = await self._call(self._op_query, UNDELIVERED, ())
        return self._backlog.counted(int(count), oldest)

    async def stats(self) -> Stats:
        rows = await self._call(
            self._op_query, "SELECT state, count(*), min(created) FROM messages GROUP BY state", ()
        )
        return Stats.from_rows(rows)

    async def durability(self) -> tuple[str, int]:
        """``journal_mode`` and ``synchronous`` as the writer's own connection has them in
        force for every write but a claim: ("wal", 2), FULL, is what lets a 200 promise the
        entry is on disk (the WAL is synced at every such commit, before any caller's
        future resolves)."""
        rows = await self._call(
            self._op_query, "SELECT * FROM pragma_journal_mode, pragma_synchronous", ()
        )
        return str(rows[0][0]), int(rows[0][1])

    async def list(self, state: State | None, limit: int) -> builtins.list[Row]:
        where = "WHERE state = ?" if state is not None else ""
        params: tuple[Any, ...] = (int(state), limit) if state is not None else (limit,)
        rows = await self._call(
            self._op_query, f"SELECT {_ROW_COLS} FROM messages {where} ORDER BY id DESC LIMIT ?",
            params,
        )
        return [_row(r) for r in rows]

    async def requeue(self, ids: Sequence[int] | None, ttl: float) -> int:
        now = self.clock.time()
        sql = ("UPDATE messages SET state = 0, due = ?, expires = ?, attempts = 0, updated = ? "
               "WHERE state = 3")
        if ids is None:
            n: int = await self._call(self._op_change, sql, (now, now + ttl, now))
        else:
            n = 0
            for i in ids:
                n += await self._call(self._op_change, sql + " AND id = ?", (now, now + ttl, now, i))
        if n:  # entries of any age wait again
            await self.refresh()
        return n

    async def purge_dead(self) -> int:
        n: int = await self._call(self._op_change, "DELETE FROM messages WHERE state = 3", ())
        await self._call(self._op_change, "DELETE FROM events WHERE entry NOT IN "
                         "(SELECT id FROM messages)", ())
        return n

    async def show(self, id: int) -> Detail | None:
        rows = await self._call(
            self._op_query,
            f"SELECT {_ROW_COLS}, refs, segments, sent_at, receipt, receipt_at FROM messages "
            "WHERE id = ?", (id,))
        if not rows:
            return None
        r = rows[0]
        events = await self._call(
            self._op_query, "SELECT at, kind, provider, code, text, latency, status, part "
            "FROM events WHERE entry = ? ORDER BY rowid", (id,))
        return Detail(_row(r[:10]), tuple(r[10].split()), r[11], r[12], r[13], r[14],
                      [Event(*e) for e in events])

    async def find(self, recipient: str, since: float, limit: int) -> builtins.list[Row]:
        first = await self._call(self._op_first_since, since)
        rows = await self._call(
            self._op_query, f"SELECT {_ROW_COLS} FROM messages WHERE id >= ? AND "
            "recipient = ? AND created >= ? ORDER BY id DESC LIMIT ?",
            (first, recipient, since, limit))
        return [_row(r) for r in rows]

    async def cleanup(self, delivered_before: float) -> int:
        n = 0
        below: int = await self._call(self._op_first_since, delivered_before)
        low: int | None = 0
        while low is not None:
            deleted, low = await self._call(self._op_cleanup, low, below)
            n += deleted
        now = self.clock.time()
        while await self._call(
            self._op_change, "DELETE FROM replies WHERE rowid IN (SELECT rowid FROM replies "
            "WHERE expires <= ? LIMIT ?)", (now, CLEANUP_CHUNK),
        ) == CLEANUP_CHUNK:
            pass
        await self.checkpoint()
        return n

    async def checkpoint(self) -> bool:
        """Copy the WAL into the database and truncate it to zero bytes (housekeeping, via
        cleanup); False if a reader's snapshot or a write in progress prevented it (not an
        error: the next one will do). On a connection of its own, in a worker thread, with
        no busy wait: writes pause only while it copies the WAL (as SQLite's automatic
        checkpoints make them do anyway)."""
        if self._thread is None:
            raise StorageError("the outbox is not open")
        return await asyncio.get_running_loop().run_in_executor(None, self._checkpoint)

    def _checkpoint(self) -> bool:
        try:
            with contextlib.closing(sqlite3.connect(self.path, isolation_level=None,
                                                    timeout=0)) as conn:
                busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        except sqlite3.Error as exc:
            raise _storage_error(exc) from None
        return not busy

    async def recent(self, since: float, after: int,
                     limit: int) -> builtins.list[tuple[int, int, str, float]]:
        rows: builtins.list[tuple[int, int, str, float]] = await self._call(
            self._op_recent, since, after, limit)
        return rows

    async def replies(
        self, now: float, after: int, limit: int,
    ) -> builtins.list[tuple[int, bytes, Sequence[int], bytes, float]]:
        rows = await self._call(
            self._op_query, "SELECT rowid, key, first, count, note, expires FROM replies "
            "WHERE rowid > ? AND expires > ? ORDER BY rowid LIMIT ?", (after, now, limit),
        )
        return [(pos, key, range(first, first + count), note, exp)
                for pos, key, first, count, note, exp in rows]

    async def sent_since(self, since: float) -> dict[str, tuple[int, int]]:
        rows = await self._call(
            self._op_query, "SELECT provider, count(*), sum(segments) FROM messages WHERE "
            "state IN (2, 4, 5) AND sent_at >= ? GROUP BY provider", (since,),
        )
        return {p: (int(n), int(s or 0)) for p, n, s in rows}


_ROW_COLS = "id, kind, recipient, state, created, due, attempts, provider, error, updated"


def _row(r: Sequence[Any]) -> Row:
    return Row(r[0], r[1], r[2], State(r[3]), *r[4:10])


def _event(e: Event) -> tuple[Any, ...]:
    """An event's columns after ``entry``."""
    return (e.at, e.kind, e.provider, e.code, e.text, e.latency, e.status, e.part)


def export(path: str, now: float) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """What moving to a shared outbox must carry over, read from a SQLite outbox whose relay
    is stopped: undelivered and dead entries (those in flight as pending), in the columns of
    ``_EXPORT``, and the dedup keys still live, as (key, ids, note, expires)."""
    if not os.path.exists(path):
        raise StorageError(f"there is no outbox at {path}")
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            if conn.execute("PRAGMA application_id").fetchone()[0] != APPLICATION_ID:
                raise StorageError(f"{path} is not a hapsms-relay outbox")
            entries = conn.execute(
                f"SELECT {_EXPORT}, CASE state WHEN 1 THEN 0 ELSE state END, provider, error, "
                "updated FROM messages WHERE state IN (0, 1, 3) ORDER BY id").fetchall()
            keys = [(k, list(range(first, first + count)), note, exp) for k, first, count, note, exp
                    in conn.execute("SELECT key, first, count, note, expires FROM replies "
                                    "WHERE expires > ? ORDER BY rowid", (now,))]
    except sqlite3.Error as exc:
        raise StorageError(f"cannot read {path}: {exc}") from None
    return entries, keys


_EXPORT = ("id, batch, kind, recipient, region, national, text, signature, code, created, due,"
           " expires, attempts")


def _settle(results: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for fut, ok, value in results:
        if fut.done():
            continue
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)


# SQLite's primary result codes for a file that is not (or no longer) a database, and for
# storage that fails under an intact file, with what that means for an operator.
_DAMAGED = frozenset((sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_FORMAT))
# Failures of a write that say the storage cannot take writes now (not a lock, not a bug).
_WRITE_FAULTS = frozenset((sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_READONLY,
                           sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM))
_STORAGE_CAUSES = {
    sqlite3.SQLITE_FULL: "the disk is full",
    sqlite3.SQLITE_IOERR: "an I/O error (a full disk, a file size limit or a failing device)",
    sqlite3.SQLITE_READONLY: "the file or its directory is read-only",
    sqlite3.SQLITE_CANTOPEN: "the file or its directory cannot be opened (permissions, or a "
                             "read-only or missing directory)",
    sqlite3.SQLITE_PERM: "permission denied",
    sqlite3.SQLITE_AUTH: "permission denied",
    sqlite3.SQLITE_BUSY: "another process holds a lock on it",
    sqlite3.SQLITE_LOCKED: "another process holds a lock on it",
    sqlite3.SQLITE_NOMEM: "out of memory",
}


def storage_cause(exc: BaseException, directory: str) -> str:
    """The operator's words for a storage failure: SQLite's code, sharpened by a look at
    the filesystem (an I/O error on a full or read-only filesystem says so)."""
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    try:
        fs = os.statvfs(directory)
    except OSError:
        fs = None
    if fs is not None and code in (sqlite3.SQLITE_IOERR, sqlite3.SQLITE_FULL,
                                   sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_READONLY):
        if fs.f_flag & os.ST_RDONLY:
            return f"the filesystem of {directory} is mounted read-only"
        if fs.f_bavail == 0 or (fs.f_files and fs.f_favail == 0):
            return f"the filesystem of {directory} is full"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return _STORAGE_CAUSES.get(code, "a storage error")


def _storage_error(exc: BaseException) -> BaseException:
    if isinstance(exc, StorageError) or not isinstance(exc, sqlite3.Error | OSError):
        return exc
    return StorageError(f"outbox: {exc}")
