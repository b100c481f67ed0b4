"""The ``queue`` commands as the README runs them on a deployed relay: as root, from a shell
where the service's credentials do not exist, on an outbox owned by the service's user."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hapsms_relay.kinds import KIND_SMS
from hapsms_relay.outbox import NewEntry
from hapsms_relay.outbox_sqlite import SQLiteOutbox
from tests.helpers import base_config, write_config

SERVICE_UID = 65534  # stands in for the service's DynamicUser


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hapsms_relay", *args], capture_output=True,
                          text=True, env=env, check=False)


def _deployed_config(directory: Path) -> Path:
    """Secrets as on an install: the token a systemd credential, a provider key from the
    environment; neither exists in the shell that runs the command."""
    doc = base_config(directory, server={"tokens": [{"credential": "webhook-token"}]})
    doc["providers"] = [{"name": "api", "type": "http", "url": "http://127.0.0.1:9/send",
                         "headers": {"Authorization": {"env": "HAPSMS_UNSET_API_KEY"}}}]
    doc["routes"] = {"sms": ["api"]}
    return write_config(directory, doc)


def _shell_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if k not in ("CREDENTIALS_DIRECTORY", "HAPSMS_UNSET_API_KEY", "STATE_DIRECTORY")}


async def _make_outbox(path: Path) -> None:
    outbox = SQLiteOutbox(str(path))
    await outbox.open()
    entry = NewEntry(KIND_SMS, "+8613800138000", "CN", "13800138000", "hi")
    await outbox.enqueue([entry], 900.0)
    await outbox.close()


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """A state directory any user may reach (pytest's own temp dirs are root-only)."""
    d = Path(tempfile.mkdtemp(prefix="hapsms-state-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_queue_commands_need_no_secret(state_dir: Path) -> None:
    """queue stats, list and retry work with the token a missing credential and a provider
    key a missing environment variable; check-config, which needs them, still says so."""
    config = str(_deployed_config(state_dir))
    asyncio.run(_make_outbox(state_dir / "outbox.db"))
    env = _shell_env()
    stats = _cli("queue", "stats", "--config", config, env=env)
    assert (stats.returncode, stats.stdout.splitlines()[0]) == (0, "pending 1"), stats.stderr
    listed = _cli("queue", "list", "--config", config, env=env)
    assert listed.returncode == 0 and "state=pending" in listed.stdout
    assert _cli("queue", "retry", "--all-dead", "--config", config, env=env).stdout == "requeued 0\n"
    checked = _cli("check-config", "--config", config, env=env)
    assert checked.returncode == 78 and "server.tokens[0]: credential" in checked.stderr


def _as_service_user_write(db: Path) -> int:
    """In a child running as SERVICE_UID: open the outbox and write to it; 0 if that worked."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            os.setgid(SERVICE_UID)
            os.setuid(SERVICE_UID)
            conn = sqlite3.connect(db, isolation_level=None)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("UPDATE messages SET updated = updated + 1")
            conn.close()
            code = 0
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: the README runs these as root")
def test_queue_commands_as_root_leave_the_outbox_to_its_owner(state_dir: Path) -> None:
    """Run as root on an outbox owned by the service's user, the commands leave no file in
    the state directory that this user does not own (SQLite gives a -wal or -shm it creates
    the database's owner), and the user can write the outbox afterwards."""
    config = str(_deployed_config(state_dir))
    db = state_dir / "outbox.db"
    asyncio.run(_make_outbox(db))
    for f in [state_dir, *state_dir.iterdir()]:
        os.chown(f, SERVICE_UID, SERVICE_UID)
    env = _shell_env()
    for args in (["queue", "stats"], ["queue", "list"], ["queue", "retry", "--all-dead"]):
        done = _cli(*args, "--config", config, env=env)
        assert done.returncode == 0, done.stderr
    owners = {f.name: f.stat().st_uid for f in state_dir.iterdir()}
    assert set(owners.values()) == {SERVICE_UID}, owners
    assert _as_service_user_write(db) == 0
