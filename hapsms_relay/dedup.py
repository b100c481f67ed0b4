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
    """What a body was answered with: its ids, and the refused list (JSON) if any."""

    ids: Sequence[int]
    note: bytes
    expires: float


def body_key(entries: Sequence[NewEntry]) -> bytes:
    """Same type, recipients, text, signature and code: the same key."""
    e = entries[0]
    parts = (str(e.kind), e.text, e.signature, e.code, *sorted(x.recipient for x in entries))
    text = "\x00".join(parts).encode("utf-8", "surrogatepass")
    return hashlib.blake2b(text, digest_size=16, person=b"body").digest()


def header_key(value: str) -> bytes:
    return hashlib.blake2b(value.encode(), digest_size=16, person=b"idempotency").digest()


# An answer with consecutive ids and no refused recipients (nearly all: one body's ids are
# consecutive unless writers interleave) as one int: expiry in ms, count, first id, 48
# bytes in all where a tuple of them and its int and float took ~140; any other as the
# tuple of Reply's fields, the ids as a tuple.
_Packed = int | tuple[tuple[int, ...], bytes, float]
_COUNT_BITS = 20
_ID_BITS = 64


def _pack(ids: Sequence[int], note: bytes, expires: float) -> _Packed:
    first, count = ids[0], len(ids)
    if (note or not 0 <= first < 1 << _ID_BITS or not 0 < count < 1 << _COUNT_BITS
            or (count > 1 and not isinstance(ids, range)
                and any(ids[i] != first + i for i in range(1, count)))):
        return (tuple(ids), note, expires)
    return (int(expires * 1000) << (_ID_BITS + _COUNT_BITS)) | (count << _ID_BITS) | first


def _expires(p: _Packed) -> float:
    return p[2] if isinstance(p, tuple) else (p >> (_ID_BITS + _COUNT_BITS)) / 1000


def _unpack(p: _Packed) -> Reply:
    if isinstance(p, tuple):
        return Reply(*p)
    count = (p >> _ID_BITS) & ((1 << _COUNT_BITS) - 1)
    first = p & ((1 << _ID_BITS) - 1)
    return Reply(range(first, first + count), b"", _expires(p))


class Replies:
    """Answers by key, and the keys whose first request is still being stored."""

    def __init__(self) -> None:
        # Answers in lanes, each a map ordered by expiry, so prune() stops at the first live
        # answer: body keys (seconds) and Idempotency-Keys (a day) expire out of order, and a
        # key goes to the lane whose last expiry is the latest not after its own (two lanes
        # in practice). Answers are packed (see _pack): a window of them is held, 150,000
        # at 15,000 posts/s, and neither an int nor a plain tuple is work for the garbage
        # collector (a subclass such as Reply stays tracked; 200,000 tracked objects made
        # each full collection ~20 ms longer: the p99).
        # keyed by the key as an int (48 bytes; the 16 bytes as bytes take 64)
        self._lanes: list[dict[int, _Packed]] = []
        self._last: list[float] = []  # each lane's latest expiry
        self._storing: dict[bytes, list[asyncio.Future[Reply | None]]] = {}

    def __len__(self) -> int:
        return sum(len(lane) for lane in self._lanes)

    def find(self, keys: Iterable[bytes], now: float) -> Reply | asyncio.Future[Reply | None] | None:
        """The stored answer for any of ``keys``, a future for one being stored, or None."""
        for key in keys:
            k = int.from_bytes(key)
            for lane in self._lanes:
                done = lane.get(k)
                if done is not None and _expires(done) > now:
                    return _unpack(done)
            waiters = self._storing.get(key)
            if waiters is not None:
                fut: asyncio.Future[Reply | None] = asyncio.get_running_loop().create_future()
                waiters.append(fut)
                return fut
        return None

    def storing(self, keys: Iterable[bytes]) -> None:
        for key in keys:
            self._storing.setdefault(key, [])

    def stored(self, keys: Iterable[tuple[bytes, float]], ids: Sequence[int], note: bytes) -> None:
        """The body is on disk: remember its answer and wake its duplicates."""
        for key, expires in keys:
            self._keep(key, _pack(ids, note, expires))
            for fut in self._storing.pop(key, ()):
                if not fut.done():
                    fut.set_result(Reply(ids, note, expires))

    def failed(self, keys: Iterable[bytes]) -> None:
        """Storing failed: duplicates that waited are handled as first requests."""
        for key in keys:
            for fut in self._storing.pop(key, ()):
                if not fut.done():
                    fut.set_result(None)

    def load(self, rows: Iterable[tuple[bytes, Sequence[int], bytes, float]]) -> None:
        for key, ids, note, expires in rows:
            self._keep(key, _pack(ids, note, expires))

    def prune(self, now: float, limit: int = 1 << 62) -> int:
        """Forget up to ``limit`` expired answers; return how many. The work is the expired
        answers, not all those held."""
        removed = 0
        for lane in self._lanes:
            dead: list[int] = []
            for key, reply in lane.items():
                if _expires(reply) > now or removed + len(dead) >= limit:
                    break
                dead.append(key)
            for key in dead:
                del lane[key]
            removed += len(dead)
        for i in reversed(range(len(self._lanes))):
            if not self._lanes[i]:
                del self._lanes[i], self._last[i]
        return removed

    def _keep(self, key_bytes: bytes, reply: _Packed) -> None:
        key = int.from_bytes(key_bytes)
        expires = _expires(reply)
        best = -1
        for i, last in enumerate(self._last):
            if last <= expires and (best < 0 or last > self._last[best]):
                best = i
        if best < 0:
            best = len(self._lanes)
            self._lanes.append({})
            self._last.append(expires)
        lane = self._lanes[best]
        # a key answered again once its answer expired: moved to the end, keeping the order
        # (an expired copy left in another lane is skipped by find() and pruned in its turn)
        lane.pop(key, None)
        lane[key] = reply
        self._last[best] = expires
