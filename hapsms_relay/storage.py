"""The outbox backends by ``queue.backend``: an explicit registry, each backend imported
only when it is used (the PostgreSQL driver is not loaded by a SQLite relay).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING

from hapsms_relay.clock import SYSTEM, Clock
from hapsms_relay.outbox import Outbox

if TYPE_CHECKING:
    from hapsms_relay.config import QueueConfig

#: ``admin``: opened beside running relays by the ``queue`` commands, not to serve.
Factory = Callable[["QueueConfig", Clock, bool], Outbox]


def _sqlite(q: QueueConfig, clock: Clock, admin: bool) -> Outbox:
    from hapsms_relay.outbox_sqlite import SQLiteOutbox

    return SQLiteOutbox(q.path, exclusive=not admin, clock=clock)


def _postgres(q: QueueConfig, clock: Clock, admin: bool) -> Outbox:
    from hapsms_relay.outbox_postgres import PostgresOutbox

    assert q.url is not None  # config requires it with this backend
    return PostgresOutbox(q.url, clock=clock, node=q.node, admin=admin)


BACKENDS: dict[str, Factory] = {"sqlite": _sqlite, "postgres": _postgres}


def outbox(q: QueueConfig, clock: Clock = SYSTEM, *, admin: bool = False) -> Outbox:
    """The configured backend, not yet opened."""
    return BACKENDS[q.backend](q, clock, admin)


def owner(node: str) -> str:
    """This process's name on its claims: the node's name and a part that no other process
    (a restart of this one included) has, so a new process never takes an old one's claims
    for its own."""
    return f"{node}/{os.getpid()}-{secrets.token_hex(3)}"
