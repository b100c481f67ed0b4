"""The outbox backends the contract suite runs against, each a fixture that makes fresh,
empty storage for one test: SQLite in a temp dir (and, in test_postgres, PostgreSQL on a
throwaway server)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from hapsms_relay.clock import Clock
from hapsms_relay.outbox import Outbox
from hapsms_relay.outbox_sqlite import SQLiteOutbox

#: fixture names, one per backend (conftest.py defines them)
BACKEND_PARAMS = ["sqlite_backend"]


@dataclass
class Backend:
    name: str
    #: a new outbox object on this test's storage (each opened and closed by the caller)
    make: Callable[[Clock], Outbox]


@pytest.fixture
def sqlite_backend(tmp_path: Path) -> Backend:
    path = str(tmp_path / "outbox.db")
    return Backend("sqlite", lambda clock: SQLiteOutbox(path, clock=clock))
