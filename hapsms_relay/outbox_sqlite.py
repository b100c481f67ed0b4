"""The SQLite outbox: WAL, ``synchronous=FULL``, group commit on one writer thread.

Every operation is queued to a single thread that owns the connection. The thread drains
whatever has queued up and runs it in one transaction, so concurrent webhook requests share
one fsync; each caller's future resolves only after that commit. The event loop never
blocks on SQLite.
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
from hapsms_relay.outbox import Entry, NewEntry, Row, State, Stats

APPLICATION_ID = 0x48415053  # "HAPS": tells our outbox from any other SQLite file
SCHEMA_VERSION = 1

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
    updated   REAL    NOT NULL
);
CREATE INDEX IF NOT EXISTS pending_due ON messages(due) WHERE state = 0;
CREATE INDEX IF NOT EXISTS dead_id ON messages(id) WHERE state = 3;
-- entries in flight (a few): counting undelivered ones and releasing stranded ones read
-- this and pending_due, not the whole table (a 15 ms scan per 200,000 rows on the writer)
CREATE INDEX IF NOT EXISTS inflight_id ON messages(id) WHERE state = 1;
-- dedup keys (dedup.py): appended in rowid order, read whole at start; a random-key index
-- would touch a random page per request, so the only index is on the (nearly ordered) expiry
CREATE TABLE IF NOT EXISTS replies (
    key     BLOB    NOT NULL,
    first   INTEGER NOT NULL,
    count   INTEGER NOT NULL,
    note    BLOB    NOT NULL,
    expires REAL    NOT NULL
);
CREATE INDEX IF NOT EXISTS replies_expires ON replies(expires);
"""

_ENTRY_COLS = (
    "id, batch, kind, recipient, region, national, text, signature, code, created, expires, attempts"
)

_INSERT_REPLY = "INSERT INTO replies VALUES (?,?,?,?,?)"
_INSERT = (
    "INSERT INTO messages (id, batch, kind, recipient, region, national, text, signature,"
    " code, created, due, expires, updated) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"
)

# Rows one housekeeping statement deletes at most: the writer thread runs other callers'
# operations between chunks (one DELETE of 100,000 expired answers held enqueues for 43 ms).
CLEANUP_CHUNK = 1000

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
        self._ops: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: sqlite3.Connection | None = None
        self._lock_fh: IO[bytes] | None = None
        self._next_id = 0
        self._undelivered = 0
        # bound methods made once, so ops are told apart by identity (see _statement)
        self._enqueue_op = self._op_enqueue
        self._set_op = self._op_set

    @property
    def undelivered(self) -> int:
        return self._undelivered

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
            self._next_id, self._undelivered = await self._call(self._op_open)
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
        self._ops.put((fn, args, fut))
        return fut

    def _run(self) -> None:
        stop = False
        while not stop:
            first = self._ops.get()
            if first is None:
                break
            batch = [first]
            while True:
                try:
                    op = self._ops.get_nowait()
                except queue.Empty:
                    break
                if op is None:
                    stop = True
                    break
                batch.append(op)
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
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            err = _storage_error(exc)
            return [(fut, False, err) for _, _, fut in batch]
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
                        with contextlib.suppress(sqlite3.Error):
                            conn.execute("ROLLBACK TO op")
                            conn.execute("RELEASE op")
                        results.append((fut, False, _storage_error(exc)))
            i = j
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            err = _storage_error(exc)
            return [(fut, False, err) for fut, _, _ in results]
        return results

    def _statement(self, op: _Op) -> str | None:
        """The SQL of an op that can share one ``executemany`` with its like, else None."""
        fn, args, _ = op
        if fn is self._enqueue_op:
            return _INSERT
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
            else:
                conn.executemany(sql, [p for _, args, _ in ops for p in args[-1]])
            conn.execute("RELEASE merged")
        except sqlite3.Error:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK TO merged")
                conn.execute("RELEASE merged")
            return False
        results.extend((fut, True, None) for _, _, fut in ops)
        return True

    # -- operations, run on the writer thread ----------------------------------------------

    def _op_open(self) -> tuple[int, int]:
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
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            # Entries a dead process had claimed: deliver them again (at least once). Only
            # the owner may: a tool opening the outbox of a running relay would otherwise
            # make its deliveries in flight due again, and send them twice.
            if self._exclusive:
                conn.execute("UPDATE messages SET state = 0 WHERE state = 1")
            max_id = conn.execute("SELECT max(id) FROM messages").fetchone()[0] or 0
            undelivered = conn.execute(
                "SELECT count(*) FROM messages WHERE state = 0"
            ).fetchone()[0]
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StorageError(
                f"{self.path} is not a usable SQLite database ({exc}); move it away and "
                "restart, or restore it from a backup"
            ) from None
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return max_id + 1, undelivered

    def _op_enqueue(self, rows: list[tuple[Any, ...]], keys: list[tuple[Any, ...]]) -> None:
        assert self._conn is not None
        self._conn.executemany(_INSERT, rows)
        if keys:  # dedup keys commit with the messages they answer for, or not at all
            self._conn.executemany(_INSERT_REPLY, keys)

    def _op_claim(self, limit: int, now: float) -> list[Entry]:
        assert self._conn is not None
        cur = self._conn.execute(
            "UPDATE messages SET state = 1, attempts = attempts + 1, updated = ? WHERE id IN "
            "(SELECT id FROM messages WHERE state = 0 AND due <= ? ORDER BY due LIMIT ?) "
            f"RETURNING {_ENTRY_COLS}",
            (now, now, limit),
        )
        entries = [Entry(*r) for r in cur.fetchall()]
        entries.sort(key=lambda e: e.id)
        return entries

    def _op_next_due(self) -> float | None:
        assert self._conn is not None
        due: float | None = self._conn.execute(
            "SELECT min(due) FROM messages WHERE state = 0"
        ).fetchone()[0]
        return due

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
            "DELETE FROM messages WHERE id >= ? AND id <= ? AND state = 2", (low, last),
        ).rowcount
        return n, (last + 1 if seen == CLEANUP_CHUNK else None)

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
        now = self.clock.time()
        # ids grow with time (never below now in µs) so ordering and cleanup by id are safe
        first = max(self._next_id, int(now * 1_000_000))
        ids = list(range(first, first + len(entries)))
        self._next_id = first + len(entries)
        expires = now + ttl
        # kind, recipient, region, national, text, signature, code: NewEntry's first seven
        rows = [(i, first, *e[:7], now, now, expires, now) for i, e in zip(ids, entries, strict=True)]
        key_rows = [(k, first, len(rows), note, exp) for k, exp in keys]
        # Counted before the commit, so that concurrent requests checking max_pending see
        # each other's rows (no await between the check and here); uncounted on failure.
        self._undelivered += len(rows)
        try:
            await self._call(self._enqueue_op, rows, key_rows)
        except BaseException:
            self._undelivered -= len(rows)
            raise
        return ids

    async def claim(self, limit: int, now: float) -> list[Entry]:
        entries: list[Entry] = await self._call(self._op_claim, limit, now)
        return entries

    async def next_due(self) -> float | None:
        due: float | None = await self._call(self._op_next_due)
        return due

    async def delivered(self, ids: Sequence[int], provider: str) -> None:
        now = self.clock.time()
        await self._call(
            self._set_op,
            "UPDATE messages SET state = 2, provider = ?, updated = ? WHERE id = ?",
            [(provider, now, i) for i in ids],
        )
        self._undelivered -= len(ids)

    async def retry(self, id: int, due: float, provider: str, error: str) -> None:
        await self._call(
            self._set_op,
            "UPDATE messages SET state = 0, due = ?, provider = ?, error = ?, updated = ? "
            "WHERE id = ?",
            [(due, provider, error, self.clock.time(), id)],
        )

    async def dead(self, id: int, provider: str, error: str) -> None:
        await self._call(
            self._set_op,
            "UPDATE messages SET state = 3, provider = ?, error = ?, updated = ? WHERE id = ?",
            [(provider, error, self.clock.time(), id)],
        )
        self._undelivered -= 1

    async def release(self, ids: Sequence[int]) -> None:
        now = self.clock.time()
        await self._call(
            self._set_op,
            "UPDATE messages SET state = 0, due = ?, attempts = max(attempts - 1, 0) "
            "WHERE id = ? AND state = 1",
            [(now, i) for i in ids],
        )

    async def release_stranded(self, keep: Sequence[int], claimed_before: float) -> int:
        n: int = await self._call(
            self._op_change,
            "UPDATE messages SET state = 0, due = ? WHERE state = 1 AND updated < ? "
            "AND id NOT IN (SELECT value FROM json_each(?))",
            (self.clock.time(), claimed_before, orjson.dumps(list(keep)).decode()),
        )
        return n

    async def stats(self) -> Stats:
        rows = await self._call(
            self._op_query, "SELECT state, count(*), min(created) FROM messages GROUP BY state", ()
        )
        counts = {State(s): (n, c) for s, n, c in rows}
        oldest = [c for s, (n, c) in counts.items() if s in (State.PENDING, State.INFLIGHT)]
        stats = Stats(
            pending=counts.get(State.PENDING, (0, None))[0],
            inflight=counts.get(State.INFLIGHT, (0, None))[0],
            delivered=counts.get(State.DELIVERED, (0, None))[0],
            dead=counts.get(State.DEAD, (0, None))[0],
            oldest_pending=min(oldest) if oldest else None,
        )
        return stats

    async def refresh_count(self) -> int:
        """Recount undelivered entries (``queue retry`` from the CLI changes them behind us)."""
        rows = await self._call(  # two counts, each over its partial index
            self._op_query, "SELECT (SELECT count(*) FROM messages WHERE state = 0) + "
            "(SELECT count(*) FROM messages WHERE state = 1)", ()
        )
        self._undelivered = int(rows[0][0])
        return self._undelivered

    async def list(self, state: State | None, limit: int) -> list[Row]:
        where = "WHERE state = ?" if state is not None else ""
        params: tuple[Any, ...] = (int(state), limit) if state is not None else (limit,)
        rows = await self._call(
            self._op_query,
            "SELECT id, kind, recipient, state, created, due, attempts, provider, error "
            f"FROM messages {where} ORDER BY id DESC LIMIT ?",
            params,
        )
        return [Row(r[0], r[1], r[2], State(r[3]), *r[4:]) for r in rows]

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
        self._undelivered += n
        return n

    async def purge_dead(self) -> int:
        n: int = await self._call(self._op_change, "DELETE FROM messages WHERE state = 3", ())
        return n

    async def cleanup(self, delivered_before: float) -> int:
        # ids are never below their creation time in µs: an id range stands for an age range
        n = 0
        low: int | None = 0
        while low is not None:
            deleted, low = await self._call(
                self._op_cleanup, low, int(delivered_before * 1_000_000))
            n += deleted
        now = self.clock.time()
        while await self._call(
            self._op_change, "DELETE FROM replies WHERE rowid IN (SELECT rowid FROM replies "
            "WHERE expires <= ? LIMIT ?)", (now, CLEANUP_CHUNK),
        ) == CLEANUP_CHUNK:
            pass
        return n

    async def recent(self, since: float, after: int,
                     limit: int) -> builtins.list[tuple[int, int, str, float]]:
        # ids are at least their creation time in µs: the primary key finds the range
        rows: builtins.list[tuple[int, int, str, float]] = await self._call(
            self._op_query, "SELECT id, kind, recipient, created FROM messages WHERE id >= ? "
            "AND id > ? AND created >= ? ORDER BY id LIMIT ?",
            (int(since * 1_000_000), after, since, limit),
        )
        return rows

    async def replies(self, now: float, after: int,
                      limit: int) -> builtins.list[tuple[int, bytes, int, int, bytes, float]]:
        rows: builtins.list[tuple[int, bytes, int, int, bytes, float]] = await self._call(
            self._op_query, "SELECT rowid, key, first, count, note, expires FROM replies "
            "WHERE rowid > ? AND expires > ? ORDER BY rowid LIMIT ?", (after, now, limit),
        )
        return rows

    async def delivered_since(self, since: float) -> dict[str, int]:
        rows = await self._call(
            self._op_query, "SELECT provider, count(*) FROM messages WHERE state = 2 AND "
            "updated >= ? GROUP BY provider", (since,),
        )
        return {p: int(n) for p, n in rows}


def _settle(results: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for fut, ok, value in results:
        if fut.done():
            continue
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)


def _storage_error(exc: BaseException) -> BaseException:
    if isinstance(exc, StorageError) or not isinstance(exc, sqlite3.Error | OSError):
        return exc
    return StorageError(f"outbox: {exc}")
