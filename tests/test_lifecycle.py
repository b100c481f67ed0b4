"""One lifecycle: what ``Relay.start`` opened, ``stop`` (or a start failing half-way) closes
in reverse order, and nothing it opened is left behind."""

from __future__ import annotations

import socket
import tomllib
from pathlib import Path
from typing import Any

import pytest

from hapsms_relay import config
from hapsms_relay.errors import StorageError
from hapsms_relay.outbox_sqlite import SQLiteOutbox
from hapsms_relay.providers.file import FileProvider
from hapsms_relay.relay import Relay
from tests.helpers import base_config, to_toml


def _relay(doc: dict[str, Any]) -> Relay:
    return Relay(config.parse(tomllib.loads(to_toml(doc))))


async def _outbox_is_free(path: Path) -> bool:
    """Whether another process-wide owner could open the outbox now (its lock released)."""
    other = SQLiteOutbox(str(path))
    try:
        await other.open()
    except StorageError:
        return False
    await other.close()
    return True


def _files(relay: Relay) -> list[FileProvider]:
    return [p for p in relay.config.providers.values() if isinstance(p, FileProvider)]


async def test_start_failing_at_the_listener_closes_everything_it_opened(tmp_path: Path) -> None:
    """A listen address in use fails the start; the providers, the HTTP session and the
    outbox opened before it are closed again, so a second start on the same outbox works."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        relay = _relay(base_config(tmp_path, server={"listen": f"127.0.0.1:{port}"}))
        with pytest.raises(OSError):
            await relay.start()
    assert relay.session is not None and relay.session.closed
    assert all(p._fh is None for p in _files(relay))
    assert await _outbox_is_free(tmp_path / "outbox.db")
    await relay.stop()  # nothing left to close: a no-op


async def test_provider_failing_to_open_closes_those_opened_before(tmp_path: Path) -> None:
    """The second provider cannot open (its file is a directory): the first one, the session
    and the outbox are closed, in reverse order of opening."""
    (tmp_path / "dir").mkdir()
    doc = base_config(tmp_path, providers=[
        {"name": "a", "type": "file", "path": str(tmp_path / "a.jsonl")},
        {"name": "b", "type": "file", "path": str(tmp_path / "dir")},
    ], routes={"sms": ["a", "b"]})
    relay = _relay(doc)
    with pytest.raises(OSError):
        await relay.start()
    assert (tmp_path / "a.jsonl").exists()  # "a" had opened
    assert all(p._fh is None for p in _files(relay))
    assert relay.session is not None and relay.session.closed
    assert await _outbox_is_free(tmp_path / "outbox.db")


async def test_stop_closes_in_reverse_and_twice_is_harmless(tmp_path: Path) -> None:
    """After a full start, stop closes the listener, providers, session and outbox; a
    second stop does nothing."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    relay = _relay(base_config(tmp_path))
    await relay.start(sock)
    assert not await _outbox_is_free(tmp_path / "outbox.db")
    await relay.stop()
    assert sock.fileno() == -1  # the listener is closed
    assert relay.session is not None and relay.session.closed
    assert all(p._fh is None for p in _files(relay))
    assert await _outbox_is_free(tmp_path / "outbox.db")
    await relay.stop()
