"""Storage faults: a bounded outbox, a full disk (RLIMIT_FSIZE, and a small tmpfs as root),
a read-only state directory, and corrupt or foreign outbox files."""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from hapsms_relay.errors import StorageError
from hapsms_relay.kinds import KIND_SMS
from hapsms_relay.outbox_sqlite import APPLICATION_ID, SQLiteOutbox
from tests.fakes import FakeAPI
from tests.helpers import AUTH, SMS_BODY, base_config, eventually, write_config
from tests.process import _LAUNCH, RelayProcess


def http_provider(api: FakeAPI) -> list[dict[str, Any]]:
    return [{"name": "api", "type": "http", "url": api.url + "/send",
             "body": {"to": "{to}", "ref": "{id}"}}]


def big_body(n: int, recipients: int = 40) -> dict[str, Any]:
    mobiles = [f"1380013{n % 1000:03d}{i:01d}" if i < 10 else f"1390{n % 10000:04d}{i:03d}"
               for i in range(recipients)]
    return {"Type": 1, "Data": {"Mobiles": mobiles, "Message": "短信" * 900, "Signature": "Acme"}}


async def post(session: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any, dict[str, str]]:
    async with session.post(url + "/sms/webhook", json=body, headers=AUTH) as r:
        return r.status, await r.json(content_type=None), dict(r.headers)


async def test_commits_are_synced_before_the_200(tmp_path: Path, relay_factory, session) -> None:
    """The relay's own outbox connection runs in WAL mode with synchronous = FULL (the WAL is
    fsynced at every commit, and a 200 waits for its commit), on a new outbox and on one
    opened again: what the README's "committed to disk" rests on."""
    relay = await relay_factory(base_config(tmp_path))
    assert isinstance(relay.relay.outbox, SQLiteOutbox)
    assert await relay.relay.outbox.durability() == ("wal", 2)
    status, _ = await relay.post(session, SMS_BODY)
    assert status == 200
    await relay.stop()
    relay = await relay_factory(base_config(tmp_path))
    assert await relay.relay.outbox.durability() == ("wal", 2)


async def test_queue_full_leaves_accepted_untouched(tmp_path: Path, relay_factory, session) -> None:
    """Past max_pending: 503 queue_full with Retry-After; what was accepted is delivered intact."""
    relay = await relay_factory(base_config(tmp_path, queue={"max_pending": 3}), paused=True)
    ids = []
    for i in range(3):
        status, body = await relay.post(session, {"Type": 1, "Data": {
            "Mobiles": [f"1380013800{i}"], "Message": f"m{i}"}})
        assert status == 200
        ids += body["ids"]
    async with session.post(relay.webhook_url, json=SMS_BODY, headers=AUTH) as r:
        assert r.status == 503 and r.headers["Retry-After"] == "30"
        assert (await r.json())["error"] == "queue_full"
    rows = await relay.relay.outbox.list(None, 10)
    assert sorted(str(r.id) for r in rows) == sorted(ids) and all(r.attempts == 0 for r in rows)
    relay.relay.dispatcher.paused = False
    relay.relay.dispatcher.notify()
    sent = tmp_path / "sent.jsonl"
    await eventually(lambda: sent.exists() and len(sent.read_bytes().splitlines()) == 3,
                     what="the three accepted delivered")
    assert sorted(line.split(b'"text":"')[1][:2].decode() for line in sent.read_bytes().splitlines()) \
        == ["m0", "m1", "m2"]


async def _fill_until_refused(session: aiohttp.ClientSession, url: str) -> tuple[list[str], str]:
    """Post big bodies until the relay says storage_unavailable; return the acknowledged ids."""
    acked: list[str] = []
    for n in range(500):
        status, body, headers = await post(session, url, big_body(n))
        if status == 200:
            acked += body["ids"]
            continue
        assert status == 503, body
        assert body["error"] == "storage_unavailable" and headers["Retry-After"] == "10"
        return acked, body["detail"]
    raise AssertionError("the outbox never filled up")


async def _recovers(session: aiohttp.ClientSession, url: str, acked: list[str]) -> None:
    async def accepted() -> bool:
        status, body, _ = await post(session, url, {"Type": 1, "Data": {
            "Mobiles": ["13700137000"], "Message": f"after {len(acked)}"}})
        if status == 200:
            acked.extend(body["ids"])
        return status == 200

    await eventually(accepted, timeout=30, what="the relay to accept again")


def _integrity(db: Path) -> str:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])


async def test_disk_full_by_file_size_limit(tmp_path: Path, session, fake_api: FakeAPI) -> None:
    """Under RLIMIT_FSIZE writes fail as on a full disk: 503 storage_unavailable and a log line,
    never a 200 for what is not on disk; raising the limit (space returning) recovers without a
    restart; every acknowledged message reaches the provider and the file is intact."""
    doc = base_config(tmp_path, providers=http_provider(fake_api), routes={"sms": ["api"]})
    relay = RelayProcess(write_config(tmp_path, doc), fsize=2 * 1024 * 1024)
    await relay.start()
    try:
        acked, detail = await _fill_until_refused(session, relay.url)
        assert acked and "cannot write its outbox" in detail
        await eventually(lambda: "enqueue_failed" in relay.text(), what="the error log line")
        # Whether the next write fits depends on where SQLite's WAL stands after a checkpoint
        # (the WAL restarts from its head, inside the limit): refused, or accepted and then
        # held to the same promise as every 200, delivered (checked below).
        status, body, _ = await post(session, relay.url, big_body(9999))
        assert status in (200, 503), body
        if status == 200:
            acked += body["ids"]
        # Space returns: raise the soft limit from outside (the hard limit was left as it was).
        hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
        resource.prlimit(relay.pid, resource.RLIMIT_FSIZE, (hard, hard))
        await _recovers(session, relay.url, acked)
        await eventually(lambda: {r.json()["ref"] for r in fake_api.accepted} >= set(acked),
                         timeout=60, what="every acknowledged message delivered")
        assert {r.json()["ref"] for r in fake_api.accepted} == set(acked)
    finally:
        assert await relay.stop() == 0
    assert _integrity(tmp_path / "outbox.db") == "ok"


async def _readyz(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.get(url + "/readyz") as r:
        return r.status, await r.json()


async def _ready_again(session: aiohttp.ClientSession, url: str) -> bool:
    return (await _readyz(session, url))[0] == 200


async def test_readyz_reports_a_failing_outbox(tmp_path: Path, session, fake_api: FakeAPI) -> None:
    """While the outbox cannot be written /readyz answers 503 (storage failing), so a load
    balancer takes the node out; it is ready again once writes work, with no post needed."""
    doc = base_config(tmp_path, providers=http_provider(fake_api), routes={"sms": ["api"]})
    relay = RelayProcess(write_config(tmp_path, doc), fsize=2 * 1024 * 1024)
    await relay.start()
    try:
        assert (await _readyz(session, relay.url))[0] == 200
        await _fill_until_refused(session, relay.url)
        status, body = await _readyz(session, relay.url)
        assert (status, body["ok"], body["storage"]) == (503, False, "failing")
        hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
        resource.prlimit(relay.pid, resource.RLIMIT_FSIZE, (hard, hard))  # space returns

        async def ready() -> bool:
            status, body = await _readyz(session, relay.url)
            return status == 200 and body["storage"] == "ok"

        await eventually(ready, timeout=30, what="/readyz ready again without a post")
    finally:
        assert await relay.stop() == 0


@contextlib.contextmanager
def tmpfs(path: Path, size: str, *options: str) -> Iterator[Path]:
    path.mkdir()
    opts = ",".join([f"size={size}", *options])
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                              capture_output=True, check=False)
    except FileNotFoundError:
        pytest.skip("no mount command")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
async def test_disk_full_on_small_tmpfs(tmp_path: Path, session, fake_api: FakeAPI) -> None:
    """On a real full filesystem (ENOSPC): 503 (posts and /readyz) until a file is deleted,
    then 200 again."""
    with tmpfs(tmp_path / "state", "3m") as state:
        filler = state / "filler"
        filler.write_bytes(b"\0" * (2 * 1024 * 1024))
        doc = base_config(tmp_path, providers=http_provider(fake_api), routes={"sms": ["api"]},
                          queue={"path": str(state / "outbox.db")})
        relay = RelayProcess(write_config(tmp_path, doc))
        await relay.start()
        try:
            acked, _ = await _fill_until_refused(session, relay.url)
            assert "enqueue_failed" in relay.text() or await _logged(relay, "enqueue_failed")
            assert (await _readyz(session, relay.url))[0] == 503
            filler.unlink()  # space returns
            await eventually(lambda: _ready_again(session, relay.url), timeout=30,
                             what="/readyz ready again once space returns")
            await _recovers(session, relay.url, acked)
            await eventually(lambda: {r.json()["ref"] for r in fake_api.accepted} == set(acked),
                             timeout=60, what="every acknowledged message delivered")
        finally:
            assert await relay.stop() == 0
        assert _integrity(state / "outbox.db") == "ok"


async def _logged(relay: RelayProcess, event: str) -> bool:
    await eventually(lambda: event in relay.text(), what=event)
    return True


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_read_only_state_directory_refuses_to_start(tmp_path: Path) -> None:
    """A read-only state directory: the relay exits 1 and says it cannot open the outbox."""
    with tmpfs(tmp_path / "state", "1m", "ro") as state:
        doc = base_config(tmp_path, queue={"path": str(state / "outbox.db")})
        done = subprocess.run(
            [sys.executable, "-m", "hapsms_relay", "serve", "--config", str(write_config(tmp_path, doc))],
            capture_output=True, text=True, timeout=60, check=False,
        )
    assert done.returncode == 1
    assert "start_failed" in done.stdout and "outbox.db" in done.stdout
    assert "Read-only file system" in done.stdout


def _garbage(path: Path) -> None:
    path.write_bytes(os.urandom(64 * 1024))


def _truncated(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY, state INTEGER, pad BLOB)")
        conn.executemany("INSERT INTO messages VALUES (?, 0, randomblob(3000))",
                         [(i,) for i in range(300)])
        conn.commit()
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.seek(size // 2)
        fh.write(os.urandom(size // 4))  # overwrite b-tree pages in the middle


def _foreign(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE users (name TEXT)")
        conn.commit()


@pytest.mark.parametrize(("make", "says", "remedy", "last"), [
    (_garbage, "is not a SQLite database", "restore the outbox from a backup",
     "point queue.path at a new file"),
    (_truncated, "is damaged", "keep the file", "point queue.path at a new file"),
    (_foreign, "is not a hapsms-relay outbox", "point queue.path at a new file",
     "or move this one away"),
])
async def test_corrupt_or_foreign_outbox_refused(tmp_path: Path, make: Any, says: str,
                                                 remedy: str, last: str) -> None:
    """A corrupt or foreign outbox file is refused with what to do, and left as it was."""
    path = tmp_path / "outbox.db"
    make(path)
    before = path.read_bytes()
    outbox = SQLiteOutbox(str(path))
    with pytest.raises(StorageError, match=says) as info:
        await outbox.open()
    assert remedy in str(info.value) and str(info.value).endswith(last)  # says what to do
    assert "delete" not in str(info.value) and "move it away" not in str(info.value)
    assert path.read_bytes() == before


async def test_a_tool_never_creates_an_outbox(tmp_path: Path) -> None:
    """A queue command opening an outbox that is not there yet says so, and creates no file
    the relay would then find owned by another user."""
    path = tmp_path / "outbox.db"
    with pytest.raises(StorageError) as info:
        await SQLiteOutbox(str(path), exclusive=False).open()
    assert str(info.value) == (f"there is no outbox at {path} (queue.path) yet; the relay "
                               "creates it when it starts")
    assert not path.exists()


async def test_an_outbox_path_sqlite_cannot_open_is_named(tmp_path: Path) -> None:
    """A queue.path SQLite cannot open at all (a directory) is refused naming the path."""
    (tmp_path / "outbox.db").mkdir()
    with pytest.raises(StorageError, match=r"^cannot open outbox .*outbox\.db: "):
        await SQLiteOutbox(str(tmp_path / "outbox.db")).open()


def test_corrupt_outbox_stops_serve(tmp_path: Path) -> None:
    """`hapsms-relay serve` on a corrupt outbox exits 1 with start_failed and the remedy."""
    _garbage(tmp_path / "outbox.db")
    cfg = write_config(tmp_path, base_config(tmp_path))
    done = subprocess.run([sys.executable, "-m", "hapsms_relay", "serve", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1
    assert "start_failed" in done.stdout and "restore the outbox from a backup" in done.stdout


async def _serve_once(cfg: Path, fsize: int) -> tuple[int, str]:
    """``hapsms-relay serve`` under a file-size limit until it exits; status and output."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _LAUNCH, str(fsize), "serve", "--config", str(cfg),
        cwd=cfg.parent, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_full_disk_at_start_keeps_the_outbox(tmp_path: Path, session,
                                                   fake_api: FakeAPI) -> None:
    """A relay stopped with pending messages that cannot write at its next start (a full
    disk) exits 1 naming a storage fault and advising to keep the file, never to move it;
    once writes work again every pending message is delivered."""
    doc = base_config(tmp_path, providers=http_provider(fake_api), routes={"sms": ["api"]})
    cfg = write_config(tmp_path, doc)
    relay = RelayProcess(cfg, paused=True)
    await relay.start()
    acked = []
    for i in range(5):
        status, body, _ = await post(session, relay.url, {"Type": 1, "Data": {
            "Mobiles": [f"1380013800{i}"], "Message": f"pending {i}"}})
        assert status == 200
        acked += body["ids"]
    assert await relay.stop() == 0

    # any write past one byte fails, as on a full disk: the WAL's shared memory cannot grow
    code, out = await _serve_once(cfg, fsize=1)
    assert code == 1, out
    line = next(x for x in out.splitlines() if "start_failed" in x)
    assert "fault of the storage" in line and "Do not move or delete the file" in line
    assert "move it away" not in line and "not a usable" not in line
    assert _integrity(tmp_path / "outbox.db") == "ok"

    relay = RelayProcess(cfg)
    await relay.start()
    try:
        await eventually(lambda: {r.json()["ref"] for r in fake_api.accepted} == set(acked),
                         timeout=60, what="every pending message delivered after the fault")
    finally:
        assert await relay.stop() == 0


def _fill(directory: Path) -> Path:
    """Fill the filesystem of ``directory`` to the last byte; the filler file."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 1 << 12, 1):
            while True:
                try:
                    os.write(fd, b"\0" * size)
                except OSError:
                    break
    finally:
        os.close(fd)
    return filler


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
async def test_really_full_disk_at_start_names_it(tmp_path: Path, session,
                                                  fake_api: FakeAPI) -> None:
    """On a really full filesystem (ENOSPC) at start-up the relay says the filesystem is
    full and to keep the file; once space is freed every pending message is delivered."""
    with tmpfs(tmp_path / "state", "2m") as state:
        doc = base_config(tmp_path, providers=http_provider(fake_api), routes={"sms": ["api"]},
                          queue={"path": str(state / "outbox.db")})
        cfg = write_config(tmp_path, doc)
        relay = RelayProcess(cfg, paused=True)
        await relay.start()
        acked = []
        for i in range(5):
            status, body, _ = await post(session, relay.url, {"Type": 1, "Data": {
                "Mobiles": [f"1380013800{i}"], "Message": f"pending {i}"}})
            assert status == 200
            acked += body["ids"]
        assert await relay.stop() == 0
        filler = _fill(state)
        code, out = await _serve_once(cfg, fsize=0)
        assert code == 1, out
        line = next(x for x in out.splitlines() if "start_failed" in x)
        assert f"the filesystem of {state} is full" in line, line
        assert "Do not move or delete the file" in line
        filler.unlink()  # space returns
        relay = RelayProcess(cfg)
        await relay.start()
        try:
            await eventually(lambda: {r.json()["ref"] for r in fake_api.accepted} == set(acked),
                             timeout=60, what="every pending message delivered")
        finally:
            assert await relay.stop() == 0
        assert _integrity(state / "outbox.db") == "ok"


async def test_max_pending_holds_under_concurrent_posts(tmp_path: Path, relay_factory, session) -> None:
    """Fifty posts at once against max_pending = 10: exactly ten are accepted, not more."""
    relay = await relay_factory(base_config(tmp_path, queue={"max_pending": 10}), paused=True)

    async def post(i: int) -> int:
        body = {"Type": 1, "Data": {"Mobiles": [f"1390000{i:04d}"], "Message": f"m{i}"}}
        return (await relay.post(session, body))[0]

    statuses = await asyncio.gather(*(post(i) for i in range(50)))
    assert statuses.count(200) == 10 and statuses.count(503) == 40
    stats = await relay.relay.outbox.stats()
    assert stats.pending == 10 == relay.relay.outbox.undelivered


def _wal(path: Path) -> int:
    wal = Path(str(path) + "-wal")
    return wal.stat().st_size if wal.exists() else 0


async def test_wal_is_bounded_after_a_burst(tmp_path: Path) -> None:
    """A burst that grows the WAL far past SQLite's checkpoint (a reader held an old
    snapshot meanwhile) leaves it at most WAL_LIMIT once writes go on, and housekeeping
    (cleanup) truncates it to nothing."""
    from hapsms_relay.outbox import NewEntry
    from hapsms_relay.outbox_sqlite import WAL_LIMIT

    path = tmp_path / "outbox.db"
    outbox = SQLiteOutbox(str(path))
    await outbox.open()
    try:
        reader = sqlite3.connect(path)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM messages").fetchone()  # a snapshot, held
        text = "x" * 2000
        for b in range(400):
            await outbox.enqueue([NewEntry(KIND_SMS, f"+861380013{b:04d}", "CN", "", text)
                                  for _ in range(10)], 900)
        burst = _wal(path)
        assert burst > 4 * WAL_LIMIT
        reader.rollback()
        reader.close()
        for _ in range(3):  # a checkpoint completes, then the WAL restarts from its head
            await outbox.enqueue([NewEntry(KIND_SMS, "+8613800138000", "CN", "", "m")], 900)
        assert _wal(path) <= WAL_LIMIT
        await outbox.cleanup(0)
        assert _wal(path) == 0
        assert (await outbox.stats()).pending == 4003
    finally:
        await outbox.close()
