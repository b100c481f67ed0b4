"""The PostgreSQL outbox keeps messages' text only in a UTF8 database: a relay and the
`queue` commands refuse any other, naming the database's encoding and how to make one."""

from __future__ import annotations

import pytest

from hapsms_relay.clock import ManualClock
from hapsms_relay.errors import StorageError
from hapsms_relay.outbox_postgres import PostgresOutbox
from hapsms_relay.secret import Secret
from tests.pg_server import PostgresServer


@pytest.mark.parametrize("encoding", ["SQL_ASCII", "LATIN1"])
async def test_a_database_not_in_utf8_is_refused(pg_server: PostgresServer,
                                                 encoding: str) -> None:
    """A relay opening a SQL_ASCII or LATIN1 database stops with its encoding named and
    creates nothing in it; a queue command (admin) is refused alike."""
    name = f"{pg_server.new_name()}_{encoding.lower()}"
    pg_server.sql(f"CREATE DATABASE {name} ENCODING '{encoding}' LOCALE 'C' TEMPLATE template0")
    try:
        for admin in (False, True):
            box = PostgresOutbox(Secret(pg_server.url(name)), clock=ManualClock(), admin=admin)
            with pytest.raises(StorageError) as refused:
                await box.open()
            assert str(refused.value) == (
                f"the database (queue.url) has encoding {encoding}; the outbox needs UTF8: "
                "CREATE DATABASE ... ENCODING 'UTF8' LOCALE 'C.UTF-8' TEMPLATE template0")
        assert pg_server.sql("SELECT to_regclass('hapsms_meta') IS NULL", name) == "t"
    finally:
        pg_server.sql(f"DROP DATABASE {name}")
