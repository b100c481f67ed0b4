"""The outbox backends the contract suite runs against, each a fixture that makes fresh,
empty storage for one test: SQLite in a temp dir, an empty database on the session's
throwaway PostgreSQL server."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hapsms_relay.clock import Clock
from hapsms_relay.outbox import Outbox
from hapsms_relay.outbox_postgres import PostgresOutbox
from hapsms_relay.outbox_sqlite import SQLiteOutbox
from hapsms_relay.secret import Secret
from tests.pg_server import PostgresServer

#: fixture names, one per backend (conftest.py defines them)
BACKEND_PARAMS = ["sqlite_backend", "postgres_backend"]


@dataclass
class Backend:
    name: str
    #: a new outbox object on this test's storage (each opened and closed by the caller)
    make: Callable[[Clock], Outbox]


@pytest.fixture
def sqlite_backend(tmp_path: Path) -> Backend:
    path = str(tmp_path / "outbox.db")
    return Backend("sqlite", lambda clock: SQLiteOutbox(path, clock=clock))


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the whole session; each test takes an empty database.
    With ``HAPSMS_TEST_PG_DIR`` set (mutation/run.py: one server for every mutant's run), the
    server already running in that directory, left running."""
    if shared := os.environ.get("HAPSMS_TEST_PG_DIR"):
        yield PostgresServer(Path(shared))
        return
    server = PostgresServer()
    server.init()
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
def pg_url(pg_server: PostgresServer) -> str:
    """An empty database on the session's server, this test's alone (this process's own,
    emptied: ``PostgresServer.empty_database``)."""
    return pg_server.empty_database()


@pytest.fixture
def postgres_backend(pg_url: str) -> Backend:
    url = Secret(pg_url)
    return Backend("postgres", lambda clock: PostgresOutbox(url, clock=clock, node="test"))
