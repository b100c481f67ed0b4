"""Relays on PostgreSQL (queue.backend = "postgres"), on a throwaway server: the webhook and
delivery end to end, several relays on one database, the URL as a secret, multi-host URLs
with target_session_attrs, the database down or read-only (503, /readyz, reconnect), and
the queue commands against the database."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from hapsms_relay import config
from hapsms_relay.errors import ConfigError, StorageError
from hapsms_relay.outbox import Sending, State
from tests.fakes import FakeAPI
from tests.helpers import AUTH, PG_PASSWORD, SMS_BODY, base_config, eventually, http_provider, write_config
from tests.pg_server import PostgresServer
from tests.process import run_cli


def pg_config(tmp_path: Path, url: str, api: FakeAPI | None = None, **sections: Any) -> dict[str, Any]:
    """A relay config on the PostgreSQL database ``url``, delivering to ``api`` if given."""
    queue = {"backend": "postgres", "url": url, "retry_base": "50ms", "retry_max": "200ms",
             **sections.pop("queue", {})}
    extra: dict[str, Any] = {}
    if api is not None:
        extra = {"providers": [http_provider("api", api.url)], "routes": {"sms": ["api"]}}
    return base_config(tmp_path, queue=queue, **extra, **sections)


def with_password(url: str) -> str:
    """The URL with a password (trust authentication ignores it): what must never leak."""
    return url.replace("postgresql://hapsms@", f"postgresql://hapsms:{PG_PASSWORD}@")


def _doc(doc: dict[str, Any]) -> dict[str, Any]:
    doc["queue"].pop("path", None)
    return doc


async def test_relay_on_postgres_end_to_end(tmp_path: Path, pg_url: str, relay_factory: Any,
                                            session: aiohttp.ClientSession,
                                            fake_api: FakeAPI) -> None:
    """A post is stored in PostgreSQL, answered 200 and sent; the queue commands see it."""
    doc = _doc(pg_config(tmp_path, with_password(pg_url), fake_api, queue={"node": "pg-1"}))
    relay = await relay_factory(doc)
    status, answer = await relay.post(session, SMS_BODY)
    assert status == 200
    await eventually(lambda: len(fake_api.accepted) == 1, what="the delivery")
    assert fake_api.accepted[0].json()["ref"] == answer["ids"][0]
    await relay.settled(sent=1)
    async with session.get(relay.url + "/readyz") as r:
        assert r.status == 200 and (await r.json())["node"] == "pg-1"
    path = write_config(tmp_path, doc)
    code, out, _ = await run_cli("queue", "stats", "--config", str(path))
    assert code == 0 and "sent 1" in out and "pending 0" in out


async def test_url_is_a_secret(tmp_path: Path, pg_url: str) -> None:
    """queue.url never shows its password: not in the config's repr, not in check-config."""
    doc = _doc(pg_config(tmp_path, with_password(pg_url)))
    path = write_config(tmp_path, doc)
    cfg = config.load(str(path))
    assert cfg.queue.url is not None and PG_PASSWORD not in repr(cfg)
    code, out, err = await run_cli("check-config", "--config", str(path))
    assert code == 0 and PG_PASSWORD not in out + err


async def test_queue_commands_without_the_database(tmp_path: Path, pg_url: str) -> None:
    """A queue command (and cluster status) while the database is unreachable exits 1 with
    libpq's reason, never the URL's password."""
    name = PostgresServer.name(pg_url)
    url = f"postgresql://hapsms:{PG_PASSWORD}@/{name}?host={tmp_path}/nothing-here&connect_timeout=2"
    path = str(write_config(tmp_path, _doc(pg_config(tmp_path, url))))
    for args in (["queue", "stats"], ["queue", "list"], ["queue", "retry", "--all-dead"],
                 ["cluster", "status"]):
        code, out, err = await run_cli(*args, "--config", path)
        assert code == 1 and err.startswith("hapsms-relay: database: "), (args, err)
        assert PG_PASSWORD not in out + err


async def test_queue_commands_do_not_create_an_outbox(
    tmp_path: Path, pg_server: PostgresServer, pg_url: str,
) -> None:
    """A queue command on a database no relay has used yet exits 1 and says so, and leaves
    the database empty (as with SQLite, where it creates no file)."""
    path = str(write_config(tmp_path, _doc(pg_config(tmp_path, pg_url))))
    for args in (["queue", "stats"], ["queue", "list", "--dead"], ["queue", "purge", "--dead"]):
        code, _, err = await run_cli(*args, "--config", path)
        assert code == 1 and "there is no outbox in this database" in err, (args, err)
    tables = pg_server.sql("SELECT count(*) FROM pg_tables WHERE tablename LIKE 'hapsms%'",
                           PostgresServer.name(pg_url))
    assert tables == "0"


@pytest.mark.parametrize(("queue", "says"), [
    ({"backend": "postgres"}, r"queue\.url: required"),
    ({"backend": "sqlite", "url": "postgresql:///x"}, r"queue\.url: only used with"),
    ({"backend": "mysql"}, r"queue\.backend: must be one of"),
])
def test_backend_settings_are_checked(tmp_path: Path, queue: dict[str, Any], says: str) -> None:
    """A wrong backend, or a url without postgres (or postgres without url), names the key."""
    doc = base_config(tmp_path, queue=queue)
    if queue.get("backend") == "postgres":
        doc["queue"].pop("path")
    with pytest.raises(ConfigError, match=says):
        config.parse(doc)


async def test_multi_host_url_skips_hosts_that_are_down_or_read_only(
    tmp_path: Path, pg_server: PostgresServer, pg_url: str, relay_factory: Any,
    session: aiohttp.ClientSession,
) -> None:
    """host=DOWN,READ-ONLY,PRIMARY with target_session_attrs=read-write: libpq skips a host
    that does not answer and one whose sessions are read-only, and the relay writes to the
    primary, as it would after a failover."""
    standby = PostgresServer()  # read-only, as a hot standby is
    standby.init("default_transaction_read_only = on\n")
    standby.start()
    try:
        name = PostgresServer.name(pg_url)
        standby.sql(f"CREATE DATABASE {name}")
        url = (f"postgresql://hapsms@/{name}?host={tmp_path}/nothing-here,{standby.socket_dir},"
               f"{pg_server.socket_dir}&target_session_attrs=read-write&connect_timeout=2")
        relay = await relay_factory(_doc(pg_config(tmp_path, url)), paused=True)
        status, answer = await relay.post(session, SMS_BODY)
        assert status == 200
        assert pg_server.sql(f"SELECT count(*) FROM hapsms_messages WHERE id = {answer['ids'][0]}",
                             name) == "1"
    finally:
        standby.cleanup()


async def test_two_relays_share_one_database(tmp_path: Path, pg_url: str, relay_factory: Any,
                                             session: aiohttp.ClientSession,
                                             fake_api: FakeAPI) -> None:
    """Posts spread over two relays on one database: ids are distinct, and every entry is
    delivered exactly once between them (no crash, so no resend)."""
    fake_api.delay = 0.01
    relays = [await relay_factory(_doc(pg_config(tmp_path, pg_url, fake_api,
                                                 queue={"node": f"relay-{n}"})))
              for n in range(2)]

    async def post(i: int) -> list[str]:
        body = {"Type": 1, "Data": {"Mobiles": [f"1390000{i:04d}"], "Message": f"m{i}"}}
        status, answer = await relays[i % 2].post(session, body)
        assert status == 200
        ids: list[str] = answer["ids"]
        return ids

    acked = [i for ids in await asyncio.gather(*(post(i) for i in range(200))) for i in ids]
    assert len(set(acked)) == 200
    await eventually(lambda: len(fake_api.accepted) >= 200, what="every message delivered")
    await asyncio.sleep(0)  # nothing more may arrive: each was claimed by one relay only
    refs = [r.json()["ref"] for r in fake_api.accepted]
    assert sorted(refs) == sorted(acked)


async def test_database_down_then_back(tmp_path: Path, pg_server: PostgresServer, pg_url: str,
                                       relay_factory: Any, session: aiohttp.ClientSession,
                                       fake_api: FakeAPI) -> None:
    """With PostgreSQL stopped a post gets 503 storage_unavailable and /readyz is not ready;
    once it is back the relay reconnects by itself, accepts and delivers, with no restart."""
    relay = await relay_factory(_doc(pg_config(tmp_path, pg_url, fake_api)))
    assert (await relay.post(session, SMS_BODY))[0] == 200
    await eventually(lambda: len(fake_api.accepted) == 1, what="the first delivery")
    await asyncio.to_thread(pg_server.stop, "immediate")
    try:
        status, body = await relay.post(session, SMS_BODY)
        assert status == 503 and body["error"] == "storage_unavailable"

        async def not_ready() -> bool:
            async with session.get(relay.url + "/readyz") as r:
                detail = await r.json()
                return r.status == 503 and detail["storage"] == "failing"

        await eventually(not_ready, what="/readyz not ready")
    finally:
        await asyncio.to_thread(pg_server.start)

    async def accepted() -> bool:
        return (await relay.post(session, SMS_BODY))[0] == 200

    await eventually(accepted, timeout=30, what="accepting again")
    await eventually(lambda: len(fake_api.accepted) == 2, what="the later post delivered")

    async def ready() -> bool:
        async with session.get(relay.url + "/readyz") as r:
            return r.status == 200

    await eventually(ready, what="/readyz ready again")


async def test_read_only_database_answers_503(tmp_path: Path, pg_server: PostgresServer,
                                              pg_url: str, relay_factory: Any,
                                              session: aiohttp.ClientSession) -> None:
    """A database that turned read-only (a demoted primary) refuses writes: 503, not ready,
    no 200 without a commit; writable again, the relay accepts again by itself."""
    name = PostgresServer.name(pg_url)
    relay = await relay_factory(_doc(pg_config(tmp_path, pg_url)), paused=True)
    assert (await relay.post(session, SMS_BODY))[0] == 200
    pg_server.sql(f"ALTER DATABASE {name} SET default_transaction_read_only = on")
    pg_server.sql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")
    try:
        async def refused() -> bool:
            status, body = await relay.post(session, SMS_BODY)
            assert status in (503, 200)
            return status == 503 and body["error"] == "storage_unavailable"

        await eventually(refused, what="503 while read-only")
    finally:
        pg_server.sql(f"ALTER DATABASE {name} SET default_transaction_read_only = off")

    async def accepted() -> bool:
        return (await relay.post(session, SMS_BODY))[0] == 200

    await eventually(accepted, timeout=30, what="accepting again")
    rows = await relay.relay.outbox.list(None, 100)
    assert all(r.state == State.PENDING for r in rows)


async def test_outcome_write_lost_with_the_database_is_sent_again(
    tmp_path: Path, pg_server: PostgresServer, pg_url: str, relay_factory: Any,
    session: aiohttp.ClientSession, fake_api: FakeAPI, caplog: pytest.LogCaptureFixture,
) -> None:
    """The database goes away while a delivery is in flight: its outcome cannot be written,
    so the entry is sent again once the database is back and its lease ran out, never
    forgotten (at least once)."""
    fake_api.delay = 1.0
    doc = _doc(pg_config(tmp_path, pg_url, fake_api, queue={"lease": "2s"}))
    relay = await relay_factory(doc)
    status, answer = await relay.post(session, SMS_BODY)
    assert status == 200
    await eventually(lambda: len(fake_api.requests) == 1, what="the send under way")
    await asyncio.to_thread(pg_server.stop, "immediate")
    try:
        await eventually(lambda: len(fake_api.accepted) == 1, what="the send done")
        await eventually(lambda: "outbox_update_failed" in caplog.text, what="the lost outcome")
    finally:
        await asyncio.to_thread(pg_server.start)

    async def sent() -> bool:
        try:
            rows = await relay.relay.outbox.list(None, 10)
        except StorageError:  # not reconnected yet
            return False
        return [r.state for r in rows] == [State.SENT]

    await eventually(sent, timeout=30, what="sent again and recorded as sent")
    assert [r.json()["ref"] for r in fake_api.accepted] == answer["ids"] * 2


async def _relays(n: int, tmp_path: Path, url: str, relay_factory: Any, **sections: Any) -> list[Any]:
    return [await relay_factory(_doc(pg_config(tmp_path, url, queue={"node": f"relay-{i}"},
                                               **sections)), paused=True)
            for i in range(n)]


async def test_duplicates_hold_across_relays(tmp_path: Path, pg_url: str, relay_factory: Any,
                                             session: aiohttp.ClientSession) -> None:
    """The same body posted to two relays at the same moment, twenty bodies at once: each is
    stored once and both answers carry the same ids (one of them marked duplicate)."""
    relays = await _relays(2, tmp_path, pg_url, relay_factory,
                           limits={"sms": [], "voice": [], "dedup_window": "10s"})

    async def both(i: int) -> list[Any]:
        body = {"Type": 1, "Data": {"Mobiles": [f"1390000{i:04d}", f"1370000{i:04d}"],
                                    "Message": f"m{i}"}}
        return list(await asyncio.gather(relays[0].post(session, body), relays[1].post(session, body)))

    for (s1, a1), (s2, a2) in await asyncio.gather(*(both(i) for i in range(20))):
        assert s1 == s2 == 200
        assert a1["ids"] == a2["ids"] and len(a1["ids"]) == 2
        assert [bool(a1.get("duplicate")), bool(a2.get("duplicate"))].count(True) == 1
    assert (await relays[0].relay.outbox.stats()).pending == 40


async def test_idempotency_key_holds_across_relays(tmp_path: Path, pg_url: str, relay_factory: Any,
                                                   session: aiohttp.ClientSession) -> None:
    """One Idempotency-Key posted to three relays at once (different bodies even): stored
    once, every answer has the same ids."""
    relays = await _relays(3, tmp_path, pg_url, relay_factory)
    headers = {**AUTH, "Idempotency-Key": "order-7781"}
    answers = await asyncio.gather(*(
        r.post(session, {"Type": 1, "Data": {"Mobiles": ["13800138000"], "Message": f"m{i}"}},
               headers) for i, r in enumerate(relays * 3)))
    assert {s for s, _ in answers} == {200}
    assert len({tuple(a["ids"]) for _, a in answers}) == 1
    assert sum(1 for _, a in answers if not a.get("duplicate")) == 1
    assert (await relays[0].relay.outbox.stats()).pending == 1


async def test_windows_hold_across_relays(tmp_path: Path, pg_url: str, relay_factory: Any,
                                          session: aiohttp.ClientSession) -> None:
    """Posts for one number spread over three relays at once are admitted no more often in
    total than its window allows (3 in 10 minutes); the rest get 429 rate_limited."""
    relays = await _relays(3, tmp_path, pg_url, relay_factory,
                           limits={"sms": ["3/10m"], "voice": [], "dedup_window": "0s"})
    answers = await asyncio.gather(*(
        r.post(session, {"Type": 1, "Data": {"Mobiles": ["13800138000", f"1390000{i:04d}"],
                                             "Message": f"m{i}"}})
        for i, r in enumerate(relays * 6)))
    assert {s for s, _ in answers} == {200}  # the other number of each body always fits
    got = sum(len(a["ids"]) for _, a in answers)
    assert got == 18 + 3
    refused = [r for _, a in answers for r in a.get("refused", [])]
    assert len(refused) == 15 and {r["error"] for r in refused} == {"rate_limited"}
    alone = await relays[0].post(session, {"Type": 1, "Data": {"Mobiles": ["13800138000"],
                                                               "Message": "again"}})
    assert alone[0] == 429 and alone[1]["error"] == "rate_limited"


async def test_cluster_status_lists_relays_and_config_agreement(
    tmp_path: Path, pg_url: str, relay_factory: Any,
) -> None:
    """cluster status lists each relay alive with its version, heartbeat and work in flight,
    and exits 1 once one relay's limits differ from the others'."""
    doc = _doc(pg_config(tmp_path, pg_url))
    await _relays(2, tmp_path, pg_url, relay_factory)
    path = write_config(tmp_path, doc)
    code, out, err = await run_cli("cluster", "status", "--config", str(path))
    assert code == 0, err
    assert out.startswith("2 relays alive") and "relay-0" in out and "relay-1" in out
    assert out.count("(same config)") == 2 and "in flight 0" in out
    await relay_factory(_doc(pg_config(tmp_path, pg_url, queue={"node": "odd"},
                                       limits={"sms": ["1/1m"]})), paused=True)
    code, out, err = await run_cli("cluster", "status", "--config", str(path))
    assert code == 1 and "3 relays alive" in out and "CONFIG DIFFERS" in out
    assert "configs differ" in err


async def test_cluster_status_needs_a_shared_outbox(tmp_path: Path) -> None:
    """cluster status on a SQLite config says why it has nothing to show, exit 1."""
    code, _, err = await run_cli("cluster", "status", "--config",
                                 str(write_config(tmp_path, base_config(tmp_path))))
    assert code == 1 and "shared" in err


async def test_import_sqlite_moves_a_single_relay_to_the_cluster(
    tmp_path: Path, pg_url: str, relay_factory: Any, session: aiohttp.ClientSession,
) -> None:
    """queue import-sqlite copies the undelivered and dead entries (ids kept) and the live
    dedup keys; a second run adds nothing; a duplicate posted to the cluster afterwards gets
    the answer the single relay gave."""
    single = base_config(tmp_path, limits={"sms": [], "voice": [], "dedup_window": "1h"})
    relay = await relay_factory(single, paused=True)
    body = {"Type": 1, "Data": {"Mobiles": ["13800138000", "13900139000", "13700137000"],
                                "Message": "moving"}}
    status, first = await relay.post(session, body)
    assert status == 200
    box = relay.relay.outbox
    a, b, c = (int(i) for i in first["ids"])
    claimed = await box.claim("old", 10, relay.relay.clock.time(), 30)
    assert len(claimed) == 3
    await box.sent("dev", [Sending(a, (), 1, 0.1)])
    await box.dead("old", b, "dev", "dev http_400: no such number")
    await relay.stop()  # c stays in flight, as after a crash

    cluster = write_config(tmp_path, _doc(pg_config(tmp_path, pg_url, limits={
        "sms": [], "voice": [], "dedup_window": "1h"})), "cluster.toml")
    sqlite_path = str(tmp_path / "outbox.db")
    code, out, err = await run_cli("queue", "import-sqlite", sqlite_path, "--config", str(cluster))
    assert code == 0, err
    assert out.startswith("imported 2 entries (0 there already) and 1 dedup keys")
    code, out, _ = await run_cli("queue", "import-sqlite", sqlite_path, "--config", str(cluster))
    assert code == 0 and out.startswith("imported 0 entries (2 there already)")

    doc = _doc(pg_config(tmp_path, pg_url, limits={"sms": [], "voice": [], "dedup_window": "1h"}))
    pg = await relay_factory(doc, paused=True)
    rows = {r.id: r for r in await pg.relay.outbox.list(None, 10)}
    assert set(rows) == {b, c}
    assert rows[b].state == State.DEAD and "no such number" in rows[b].error
    assert rows[c].state == State.PENDING
    status, again = await pg.post(session, body)
    assert status == 200 and again["ids"] == first["ids"] and again.get("duplicate") is True
    status, new = await pg.post(session, {"Type": 1, "Data": {"Mobiles": ["13800138000"],
                                                              "Message": "new"}})
    assert status == 200 and int(new["ids"][0]) > c  # the sequence moved past the imported ids


async def test_schema_is_created_once_by_relays_starting_together(
    pg_server: PostgresServer, pg_url: str,
) -> None:
    """Eight relays opening a new database at once all start, on one versioned schema; a
    schema newer than this relay knows is refused with what to do."""
    from hapsms_relay.outbox_postgres import SCHEMA_VERSION, PostgresOutbox
    from hapsms_relay.secret import Secret

    boxes = [PostgresOutbox(Secret(pg_url), node=f"n{i}") for i in range(8)]
    await asyncio.gather(*(b.open() for b in boxes))
    await asyncio.gather(*(b.close() for b in boxes))
    name = PostgresServer.name(pg_url)
    assert pg_server.sql("SELECT value FROM hapsms_meta WHERE key = 'schema'", name) \
        == str(SCHEMA_VERSION)
    pg_server.sql("UPDATE hapsms_meta SET value = '999' WHERE key = 'schema'", name)
    newer = PostgresOutbox(Secret(pg_url))
    with pytest.raises(StorageError, match=r"newer hapsms-relay .*upgrade this relay"):
        await newer.open()


async def test_max_pending_counts_every_change(
    tmp_path: Path, pg_server: PostgresServer, pg_url: str, relay_factory: Any,
    session: aiohttp.ClientSession,
) -> None:
    """queue.max_pending on PostgreSQL counts what is undelivered however it changes: sent and
    dead entries make room, `queue retry` takes it again; a change made by hand is mended
    by the next refresh (housekeeping)."""
    # housekeeping's refresh only when the test calls it
    doc = _doc(pg_config(tmp_path, pg_url, queue={"max_pending": 2, "housekeeping": "1h"}))
    relay = await relay_factory(doc, paused=True)
    box = relay.relay.outbox

    async def post() -> int:
        status, answer = await relay.post(session, SMS_BODY)
        assert status == 200 or answer["error"] == "queue_full"
        return status

    assert [await post() for _ in range(3)] == [200, 200, 503]
    first, second = await box.claim("me", 10, relay.relay.clock.time(), 30)
    await box.dead("me", first.id, "dev", "dev http_400: no")
    assert [await post(), await post()] == [200, 503]
    await box.sent("dev", [Sending(second.id, (), 1, 0.1)])
    assert [await post(), await post()] == [200, 503]
    code, out, _ = await run_cli("queue", "retry", "--all-dead",
                                 "--config", str(write_config(tmp_path, doc)))
    assert (code, out) == (0, "requeued 1\n")
    assert await post() == 503  # three undelivered now
    pg_server.sql("DELETE FROM hapsms_messages WHERE state = 0", PostgresServer.name(pg_url))
    assert await post() == 503  # the count does not know yet
    assert await box.refresh() == 0
    assert [await post(), await post(), await post()] == [200, 200, 503]


async def test_keys_of_one_batch_answer_with_their_own_ids(pg_url: str) -> None:
    """Bodies admitted together, each with its own key and a different number of entries:
    each key answers again with its own body's ids and note."""
    from hapsms_relay.kinds import KIND_SMS
    from hapsms_relay.outbox import Checked, History, NewEntry
    from hapsms_relay.outbox_postgres import PostgresOutbox
    from hapsms_relay.secret import Secret

    class Book:
        def load(self, rows: Any) -> None:
            pass

    def body(n: int, size: int) -> list[NewEntry]:
        return [NewEntry(KIND_SMS, f"+86139{n:04d}{i:04d}", "CN", f"139{n:04d}{i:04d}", "hi", "A")
                for i in range(size)]

    box = PostgresOutbox(Secret(pg_url), node="n")
    await box.open()
    try:
        async def admit(n: int, size: int) -> Checked:
            entries = body(n, size)

            def decide(book: History) -> tuple[list[NewEntry], bytes]:
                return entries, f"note {n}".encode()

            return await box.enqueue_checked(
                entries, 60, keys=[(f"key {n}".encode(), 1e12)], since=0, history=Book,
                decide=decide, max_pending=1000)

        sizes = [1, 3, 2, 1, 4]
        first = await asyncio.gather(*(admit(n, size) for n, size in enumerate(sizes)))
        assert [len(c.ids) for c in first] == sizes
        assert len({i for c in first for i in c.ids}) == sum(sizes)
        again = await asyncio.gather(*(admit(n, size) for n, size in enumerate(sizes)))
        assert [(list(c.ids), c.note, c.duplicate) for c in again] == [
            (list(c.ids), f"note {n}".encode(), True) for n, c in enumerate(first)]
    finally:
        await box.close()
