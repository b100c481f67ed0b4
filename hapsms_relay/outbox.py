"""The outbox interface: what the server and the dispatcher need of durable storage.

The SQLite implementation is in ``outbox_sqlite``; a networked backend would implement the
same Protocol without touching the server or the dispatcher.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple, Protocol


class State(IntEnum):
    PENDING = 0
    INFLIGHT = 1
    DELIVERED = 2
    DEAD = 3


KIND_SMS = 1
KIND_VOICE = 2


class NewEntry(NamedTuple):
    """One recipient of an accepted webhook body, before it has an id.

    A named tuple, not a frozen dataclass: one is built per recipient on the webhook's hot
    path, and a frozen dataclass's ``__init__`` costs ~1.5 µs more.
    """

    kind: int  # KIND_SMS or KIND_VOICE
    recipient: str  # E.164
    region: str
    national: str
    text: str
    signature: str = ""
    code: str = ""
    number_type: str = ""  # phonenumbers' type ("mobile") if normalising found it; not stored


@dataclass(frozen=True, slots=True)
class Entry:
    """A claimed entry, as the dispatcher delivers it."""

    id: int
    batch: int  # the id of the first entry of the same webhook body
    kind: int
    recipient: str
    region: str
    national: str
    text: str
    signature: str
    code: str
    created: float
    expires: float
    attempts: int


@dataclass(frozen=True, slots=True)
class Row:
    """An entry as ``queue list`` shows it."""

    id: int
    kind: int
    recipient: str
    state: State
    created: float
    due: float
    attempts: int
    provider: str
    error: str


@dataclass(frozen=True, slots=True)
class Stats:
    pending: int
    inflight: int
    delivered: int
    dead: int
    oldest_pending: float | None  # creation time of the oldest undelivered entry


class Outbox(Protocol):
    """Durable storage of accepted messages. Every method may raise ``StorageError``."""

    @property
    def undelivered(self) -> int:
        """Entries pending or in flight, as last known (cheap; for limits and metrics)."""

    async def open(self) -> None:
        """Open the storage; entries left in flight by a dead process become pending again."""

    async def close(self) -> None: ...

    async def enqueue(
        self, entries: Sequence[NewEntry], ttl: float, *, keys: Sequence[tuple[bytes, float]] = (),
        note: bytes = b"",
    ) -> list[int]:
        """Store the entries durably; return their ids only once they are on disk.

        ``keys`` (dedup and Idempotency-Key, with their expiry) are stored in the same
        transaction, each answering for these ids and ``note`` (see ``replies``).
        """

    async def claim(self, limit: int, now: float) -> list[Entry]:
        """Mark up to ``limit`` due pending entries in flight and return them."""

    async def next_due(self) -> float | None:
        """When the earliest pending entry becomes due, or None if nothing is pending."""

    async def delivered(self, ids: Sequence[int], provider: str) -> None: ...

    async def retry(self, id: int, due: float, provider: str, error: str) -> None:
        """Put an in-flight entry back to pending until ``due``, recording why."""

    async def dead(self, id: int, provider: str, error: str) -> None:
        """Give up on an entry for good, keeping the reason."""

    async def release(self, ids: Sequence[int]) -> None:
        """Put in-flight entries back to pending, due now (shutdown)."""

    async def release_stranded(self, keep: Sequence[int], claimed_before: float) -> int:
        """Entries in flight that nobody delivers any more (their outcome could not be
        written) back to pending: all claimed before ``claimed_before`` but ``keep``."""

    async def stats(self) -> Stats: ...

    async def list(self, state: State | None, limit: int) -> list[Row]: ...

    async def requeue(self, ids: Sequence[int] | None, ttl: float) -> int:
        """Dead entries (given ones, or all with None) pending again with a fresh TTL."""

    async def purge_dead(self) -> int: ...

    async def cleanup(self, delivered_before: float) -> int:
        """Forget delivered entries accepted before the given time, and expired keys."""

    # What the limits rebuild at start (see ``guard.Guard.load``), read a chunk at a time: a
    # day can be millions of entries.

    async def recent(self, since: float, after: int,
                     limit: int) -> builtins.list[tuple[int, int, str, float]]:
        """Up to ``limit`` entries accepted since ``since`` with ids above ``after``, oldest
        first: (id, kind, recipient, accepted at)."""

    async def replies(self, now: float, after: int,
                      limit: int) -> builtins.list[tuple[int, bytes, int, int, bytes, float]]:
        """Up to ``limit`` keys stored with ``enqueue``, not yet expired, in the order they
        were stored, after position ``after``: (position, key, first id, count, note, expires)."""

    async def delivered_since(self, since: float) -> dict[str, int]:
        """Entries delivered since ``since``, by provider."""
