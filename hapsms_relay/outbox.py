"""The outbox interfaces: what the webhook and the dispatcher need of durable storage
(``Queue``), and what the ``queue`` commands need (``Admin``).

Backends implement both (``outbox_sqlite``, ``outbox_postgres``) and are picked by
``queue.backend`` in ``storage``; one contract suite (tests/test_outbox_contract.py) holds
every backend to them. Several relays may share one storage: ids are unique across writers,
and an entry is claimed by one owner for a lease that the owner renews while it delivers.

An entry moves forward only: pending (in flight while claimed) -> sent (a provider accepted
it) -> delivered or undelivered (the provider's receipt); or pending -> dead (the relay gave
up before any provider accepted it). The outcome methods append to the entry's history.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

from hapsms_relay.receipts import Receipt


class State(IntEnum):
    PENDING = 0
    INFLIGHT = 1
    SENT = 2  # a provider accepted it (before receipts, this state was called "delivered")
    DEAD = 3  # the relay gave up before a provider accepted it
    DELIVERED = 4  # the handset got it, per the provider's receipt
    UNDELIVERED = 5  # the provider's receipt reports a final failure


#: the states of entries a provider accepted (what budgets count)
SENT_STATES = (State.SENT, State.DELIVERED, State.UNDELIVERED)




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


class Entry(NamedTuple):
    """A claimed entry, as the dispatcher delivers it. A named tuple, as ``NewEntry``: one
    is built per message claimed, and a frozen dataclass's ``__init__`` cost ~6,000
    instructions more."""

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
    error: str = ""  # why the last attempt failed, if one did


class Event(NamedTuple):
    """One step of an entry's history.

    ``kind``: ``attempt`` (a provider failed it, another was tried), ``sent``, ``retry``,
    ``dead``, ``receipt``. ``status``: a receipt's (delivered, undelivered, progress).
    ``part``: the provider's id the step is about (a Vonage part's message id).
    """

    at: float
    kind: str
    provider: str
    code: str = ""
    text: str = ""
    latency: float | None = None  # seconds the provider took to answer
    status: str = ""
    part: str = ""


class Sending(NamedTuple):
    """An entry a provider accepted, as ``Queue.sent`` records it."""

    id: int
    refs: tuple[str, ...]  # the provider's message ids (one per part for Vonage)
    segments: int
    latency: float
    trail: tuple[Event, ...] = ()  # providers that failed it earlier in the same round


@dataclass(frozen=True, slots=True)
class Applied:
    """What ``Queue.receipt`` did: ``changed`` the entry's state, only ``recorded`` the
    receipt in its history (on the way, a repeat, a late one, a part of several), or found
    no ``unknown`` entry for it (nothing stored)."""

    outcome: Literal["changed", "recorded", "unknown"]
    id: int | None = None
    state: State | None = None
    sent_at: float = 0.0


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
    updated: float  # the last change of state


@dataclass(frozen=True, slots=True)
class Detail:
    """One entry's whole story, as ``queue show`` and ``GET /messages/{id}`` tell it."""

    row: Row
    refs: tuple[str, ...]  # the provider's message ids
    segments: int
    sent_at: float  # 0: not sent
    receipt: str  # the last receipt's code
    receipt_at: float
    events: builtins.list[Event]


@dataclass(frozen=True, slots=True)
class Stats:
    pending: int
    inflight: int
    sent: int  # accepted by a provider, no final receipt (yet)
    dead: int
    oldest_pending: float | None  # creation time of the oldest undelivered entry
    delivered: int = 0
    undelivered: int = 0

    @classmethod
    def from_rows(cls, rows: Iterable[Sequence[Any]]) -> Stats:
        """From ``SELECT state, count(*), min(created) ... GROUP BY state``, any backend."""
        counts = {State(s): (n, c) for s, n, c in rows}
        oldest = [c for s, (n, c) in counts.items() if s in (State.PENDING, State.INFLIGHT)]
        return cls(
            pending=counts.get(State.PENDING, (0, None))[0],
            inflight=counts.get(State.INFLIGHT, (0, None))[0],
            sent=counts.get(State.SENT, (0, None))[0],
            dead=counts.get(State.DEAD, (0, None))[0],
            oldest_pending=min(oldest) if oldest else None,
            delivered=counts.get(State.DELIVERED, (0, None))[0],
            undelivered=counts.get(State.UNDELIVERED, (0, None))[0],
        )


class Backlog:
    """What a backend knows of its undelivered entries (pending or in flight) without asking
    the storage: how many, and when the oldest was accepted (``Queue.undelivered`` and
    ``Queue.oldest_undelivered``). Its own writes change it at once; ``counted`` sets what
    the storage says (at open and ``refresh``)."""

    __slots__ = ("count", "oldest")

    def __init__(self) -> None:
        self.count = 0
        self.oldest: float | None = None

    def counted(self, count: int, oldest: float | None) -> int:
        """What the storage holds: ``count`` entries, the oldest accepted at ``oldest``."""
        self.count, self.oldest = count, oldest
        return count

    def added(self, n: int, accepted: float) -> None:
        """``n`` entries accepted at ``accepted``: none older than those already waiting."""
        if n:
            self.count += n
            if self.oldest is None:
                self.oldest = accepted

    def removed(self, n: int) -> None:
        """``n`` entries sent or dead. Which entry is the oldest now is known only once none
        is left; until then it stays as it was, older than it is, until ``counted``. Never
        below zero: a relay of a cluster sends what other relays accepted after it last
        counted (what it knows of those is the count as of then)."""
        self.count = max(self.count - n, 0)
        if not self.count:
            self.oldest = None


class Queue(Protocol):
    """The hot path and delivery. Every method may raise ``StorageError``.

    An entry is pending, in flight (claimed by one owner until its lease runs out), delivered
    or dead. A claim whose lease ran out (its owner died, or lost the record of an outcome)
    is claimable again: delivery is at least once.
    """

    @property
    def undelivered(self) -> int:
        """Entries pending or in flight, as last known (cheap; for limits and metrics):
        this writer's changes at once, other writers' after ``refresh``."""

    @property
    def oldest_undelivered(self) -> float | None:
        """When the oldest entry pending or in flight was accepted, None if there is none, as
        last known (cheap; for metrics): this writer's first enqueue into an empty outbox
        and its last entry sent or dead at once, anything else (the oldest sent while
        others wait, other writers' changes) after ``refresh``."""

    @property
    def writable(self) -> bool:
        """False while writes fail for the storage's sake (disk full, read-only, I/O
        errors), True again as soon as one succeeds; the backend retries on its own, so
        this recovers without traffic. ``/readyz`` reports it."""

    async def open(self) -> None:
        """Open (and create or upgrade) the storage."""

    async def close(self) -> None: ...

    async def enqueue(
        self, entries: Sequence[NewEntry], ttl: float, *, keys: Sequence[tuple[bytes, float]] = (),
        note: bytes = b"",
    ) -> list[int]:
        """Store the entries durably in one transaction; return their ids (unique across
        every writer of the storage) only once it has committed.

        ``keys`` (dedup and Idempotency-Key, with their expiry) are stored in the same
        transaction, each answering for these ids and ``note`` (see ``replies``).
        """

    async def claim(self, owner: str, limit: int, now: float, lease: float) -> list[Entry]:
        """Up to ``limit`` entries due at ``now`` (pending, or in flight with their lease run
        out), now in flight for ``owner`` until ``now + lease``."""

    async def renew(self, owner: str, ids: Sequence[int], until: float) -> int:
        """Extend ``owner``'s leases on these in-flight entries; return how many it holds."""

    async def next_due(self) -> float | None:
        """When the earliest pending entry becomes due, or None if nothing is pending."""

    async def sent(self, provider: str, entries: Sequence[Sending]) -> None:
        """Entries ``provider`` accepted: sent (whoever holds them now), with its ids and
        segments, and each step in the history. A receipt that came first decides at once."""

    async def retry(self, owner: str, id: int, due: float, provider: str, error: str,
                    trail: Sequence[Event] = ()) -> None:
        """Put ``owner``'s in-flight entry back to pending until ``due``, recording why."""

    async def dead(self, owner: str, id: int, provider: str, error: str,
                   trail: Sequence[Event] = ()) -> None:
        """Give up on ``owner``'s in-flight entry for good, keeping the reason."""

    async def receipt(self, provider: str, receipt: Receipt, now: float) -> Applied:
        """Record ``provider``'s receipt for one of its entries (found by the relay's id or
        the provider's) and move the entry forward in one statement: sent to delivered
        once every part is delivered, to undelivered at the first final failure. A
        repeated or late receipt changes nothing but the history."""

    async def release(self, owner: str, ids: Sequence[int]) -> None:
        """Put ``owner``'s in-flight entries back to pending, due now (shutdown)."""

    async def refresh(self) -> int:
        """Recount the undelivered entries and find the oldest, over indexes (other writers
        and the ``queue`` commands change them); return the count."""

    async def cleanup(self, delivered_before: float) -> int:
        """Forget delivered entries accepted before the given time, and expired keys."""

    # What the limits rebuild at start (see ``guard.Guard.load``), read a chunk at a time: a
    # day can be millions of entries.

    async def recent(self, since: float, after: int,
                     limit: int) -> builtins.list[tuple[int, int, str, float]]:
        """Up to ``limit`` entries accepted since ``since`` with ids above ``after``, by id:
        (id, kind, recipient, accepted at)."""

    async def replies(
        self, now: float, after: int, limit: int,
    ) -> builtins.list[tuple[int, bytes, Sequence[int], bytes, float]]:
        """Up to ``limit`` keys stored with ``enqueue``, not yet expired, in the order they
        were stored, after position ``after``: (position, key, ids, note, expires)."""

    async def sent_since(self, since: float) -> dict[str, tuple[int, int]]:
        """Entries sent since ``since``, by provider: (messages, segments)."""


class History(Protocol):
    """What admission decided inside the enqueue's transaction knows: the entries stored
    for the recipients of a batch, loaded as (id, kind, recipient, accepted at)."""

    def load(self, rows: Iterable[tuple[int, int, str, float]]) -> object: ...


#: One body's decision against a batch's history: the entries to store, the refused note.
Decide = Callable[[History], tuple[list[NewEntry], bytes]]


class Checked(NamedTuple):
    """What ``enqueue_checked`` stored: the ids (none if everything was refused) and the
    refused note, or, with ``duplicate``, the answer a key already had; ``full``: nothing
    stored, the outbox holds ``max_pending`` undelivered entries."""

    ids: Sequence[int]
    note: bytes
    duplicate: bool
    full: bool = False


#: a daily budget's counter: (unit, scope), unit "messages" or "segments", scope a
#: provider's name or "all" (budget.py)
BudgetKey = tuple[str, str]
#: a counter's value, or a change to it: (sent, reserved by sends under way)
Spent = tuple[int, int]


@runtime_checkable
class CheckingQueue(Queue, Protocol):
    """A queue that several relays share decides duplicates, windows and ``max_pending`` in
    the enqueue's own transaction, and keeps the daily budgets' counts, so that they hold
    across the relays."""

    async def enqueue_checked(
        self, entries: Sequence[NewEntry], ttl: float, *, keys: Sequence[tuple[bytes, float]],
        since: float, history: Callable[[], History], decide: Decide, max_pending: int,
    ) -> Checked:
        """In one transaction, with the recipients locked across writers: if a live key
        already answers, that answer (nothing stored); else the history of the recipients
        since ``since`` is loaded into ``history()`` (one per transaction, shared by the
        bodies of a batch in order), ``decide`` picks what is stored, and the keys answer
        for it (not stored if nothing was). Nothing is stored (``full``) if it would take
        the undelivered entries of every writer together past ``max_pending``."""

    async def spend(
        self, day: float, keys: Sequence[BudgetKey],
        change: Callable[[dict[BudgetKey, Spent]], dict[BudgetKey, Spent]],
    ) -> dict[BudgetKey, Spent]:
        """The budget counters ``keys`` of the day starting at ``day``, locked across
        writers: ``change`` gets their values and says what to add to each (negative amounts
        give back; a count never goes below 0); their values after. A counter first used
        starts with what was sent since ``day`` (as ``sent_since`` counts it)."""


class Node(NamedTuple):
    """A relay on a shared outbox, as its last heartbeat said."""

    owner: str  # the node's name and its process (storage.owner)
    node: str
    version: str
    digest: str  # of the settings that must agree across relays (config.digest)
    started: float
    heartbeat: float
    inflight: int


@runtime_checkable
class Cluster(Protocol):
    """A storage several relays share keeps a heartbeat of each (``cluster status``)."""

    async def heartbeat(self, node: Node) -> None:
        """Record (or refresh) this relay's row."""

    async def leave(self, owner: str) -> None:
        """This relay stops: forget its row."""

    async def nodes(self) -> builtins.list[Node]:
        """Every relay's last heartbeat, newest first."""


class Admin(Protocol):
    """What the ``queue`` commands do, beside running relays. Methods may raise
    ``StorageError``."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def stats(self) -> Stats: ...

    async def list(self, state: State | None, limit: int) -> builtins.list[Row]:
        """The newest ``limit`` entries (in ``state`` if given), newest first."""

    async def requeue(self, ids: Sequence[int] | None, ttl: float) -> int:
        """Dead entries (given ones, or all with None) pending again with a fresh TTL."""

    async def purge_dead(self) -> int: ...

    async def show(self, id: int) -> Detail | None:
        """The entry and its history, or None."""

    async def find(self, recipient: str, since: float,
                   limit: int) -> builtins.list[Row]:
        """Entries for one number (E.164) accepted since ``since``, newest first."""


class Outbox(Queue, Admin, Protocol):
    """A backend: both interfaces on one storage."""
