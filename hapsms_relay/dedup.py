"""Duplicates: an identical body within ``limits.dedup_window``, or a repeated
``Idempotency-Key`` within ``limits.idempotency_ttl``, gets the first answer again and no
second send. Keys live in memory for the hot path and are stored in the outbox in the same
transaction as the messages they answer for, so they survive a restart.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from hapsms_relay.outbox import NewEntry


class Reply(NamedTuple):
    """What a body was answered with: consecutive ids, and the refused list (JSON) if any."""

    first: int
    size: int  # how many ids
    note: bytes
    expires: float

    @property
    def ids(self) -> list[int]:
        return list(range(self.first, self.first + self.size))


def body_key(entries: Sequence[NewEntry]) -> bytes:
    """Same type, recipients, text, signature and code: the same key."""
    e = entries[0]
    parts = (str(e.kind), e.text, e.signature, e.code, *sorted(x.recipient for x in entries))
    text = "\x00".join(parts).encode("utf-8", "surrogatepass")
    return hashlib.blake2b(text, digest_size=16, person=b"body").digest()


def header_key(value: str) -> bytes:
    return hashlib.blake2b(value.encode(), digest_size=16, person=b"idempotency").digest()


class Replies:
    """Answers by key, and the keys whose first request is still being stored."""

    def __init__(self) -> None:
        # plain tuples (Reply's fields): a tuple of ints, bytes and a float is no work for the
        # garbage collector (a subclass such as Reply stays tracked), and a window of answers
        # is held: 200,000 tracked objects made each full collection ~20 ms longer (the p99)
        self._done: dict[bytes, tuple[int, int, bytes, float]] = {}
        self._storing: dict[bytes, list[asyncio.Future[Reply | None]]] = {}

    def __len__(self) -> int:
        return len(self._done)

    def find(self, keys: Iterable[bytes], now: float) -> Reply | asyncio.Future[Reply | None] | None:
        """The stored answer for any of ``keys``, a future for one being stored, or None."""
        for key in keys:
            done = self._done.get(key)
            if done is not None and done[3] > now:
                return Reply(*done)
            waiters = self._storing.get(key)
            if waiters is not None:
                fut: asyncio.Future[Reply | None] = asyncio.get_running_loop().create_future()
                waiters.append(fut)
                return fut
        return None

    def storing(self, keys: Iterable[bytes]) -> None:
        for key in keys:
            self._storing.setdefault(key, [])

    def stored(self, keys: Iterable[tuple[bytes, float]], first: int, count: int, note: bytes) -> None:
        """The body is on disk: remember its answer and wake its duplicates."""
        for key, expires in keys:
            self._done[key] = (first, count, note, expires)
            for fut in self._storing.pop(key, ()):
                if not fut.done():
                    fut.set_result(Reply(first, count, note, expires))

    def failed(self, keys: Iterable[bytes]) -> None:
        """Storing failed: duplicates that waited are handled as first requests."""
        for key in keys:
            for fut in self._storing.pop(key, ()):
                if not fut.done():
                    fut.set_result(None)

    def load(self, rows: Iterable[tuple[bytes, int, int, bytes, float]]) -> None:
        for key, first, count, note, expires in rows:
            self._done[key] = (first, count, note, expires)

    def prune(self, now: float) -> None:
        for key in [k for k, r in self._done.items() if r[3] <= now]:
            del self._done[key]
