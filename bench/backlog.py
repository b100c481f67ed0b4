"""Build an outbox holding N pending messages, written straight into SQLite with the relay's
own schema (a million posts would take minutes; this takes seconds).

    python bench/backlog.py var/bench/backlog.db --count 1000000
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import time
from pathlib import Path

from hapsms_relay.outbox_sqlite import SQLiteOutbox

TEXT = "您的验证码是123456，感谢您的使用！"
CHUNK = 50_000


def build(path: str, count: int, ttl: float) -> float:
    """Create ``path`` with ``count`` due SMS entries; return the seconds it took."""
    started = time.monotonic()
    for suffix in ("", "-wal", "-shm", ".lock"):
        Path(path + suffix).unlink(missing_ok=True)

    async def create() -> None:  # the relay's own code lays out the schema and pragmas
        outbox = SQLiteOutbox(path)
        await outbox.open()
        await outbox.close()

    asyncio.run(create())
    now = time.time()
    first = int(now * 1_000_000)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous = OFF")  # a benchmark fixture, not acknowledged data
    conn.execute("BEGIN")
    for start in range(0, count, CHUNK):
        rows = []
        for i in range(start, min(count, start + CHUNK)):
            number = f"139{i % 100_000_000:08d}"
            rows.append((first + i, first + i, 1, "+86" + number, "CN", number, TEXT, "明道云", "",
                         now, now, now + ttl, now))
        conn.executemany(
            "INSERT INTO messages (id, batch, kind, recipient, region, national, text, signature,"
            " code, created, due, expires, updated) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return time.monotonic() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("path")
    p.add_argument("--count", type=int, default=1_000_000)
    p.add_argument("--ttl", type=float, default=86400.0, help="seconds before entries expire")
    args = p.parse_args()
    took = build(args.path, args.count, args.ttl)
    print(f"{args.count} pending messages in {args.path} ({took:.1f}s)")


if __name__ == "__main__":
    main()
