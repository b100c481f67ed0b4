"""The relay as systemd runs it: started by the real ``systemd-socket-activate`` on an
inherited socket, reporting over a real ``$NOTIFY_SOCKET``, reloaded by SIGHUP, under the
kernel's memory-deny-write-execute."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from hapsms_relay import systemd
from tests.fakes import FakeAPI
from tests.helpers import SMS_BODY, TOKEN, VOICE_BODY, base_config, eventually, write_config

ACTIVATE = shutil.which("systemd-socket-activate")
pytestmark = pytest.mark.skipif(ACTIVATE is None, reason="systemd-socket-activate is not installed")

# Exec the rest of argv with PR_SET_MDWE (Linux 6.3+), which exec keeps: the kernel's
# counterpart of the unit's MemoryDenyWriteExecute=yes, so these tests run the relay under it.
MDWE_EXEC = """
import ctypes, os, sys
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0):
    sys.exit("prctl(PR_SET_MDWE): " + os.strerror(ctypes.get_errno()))
os.execvp(sys.argv[1], sys.argv[1:])
"""


def _mdwe_supported() -> bool:
    import ctypes

    return ctypes.CDLL(None).prctl(66, 0, 0, 0, 0) >= 0  # PR_GET_MDWE


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class NotifyListener:
    """A unix datagram socket standing in for systemd's notify socket."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address.replace("@", "\0", 1) if address.startswith("@") else address)
        self.sock.setblocking(False)
        self.messages: list[dict[str, str]] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._receive())

    async def _receive(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(self.sock, 65536)
            self.messages.append(dict(line.split("=", 1) for line in data.decode().split("\n")))

    def index(self, key: str, start: int = 0) -> int:
        """The position of the first message from ``start`` on that carries ``key``, or -1."""
        return next((i for i, m in enumerate(self.messages) if i >= start and key in m), -1)

    async def wait_for(self, key: str, start: int = 0) -> int:
        await eventually(lambda: self.index(key, start) >= 0, what=f"{key} after message {start}")
        return self.index(key, start)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.sock.close()


class ActivatedRelay:
    """``systemd-socket-activate -l 127.0.0.1:PORT`` running ``hapsms-relay serve``."""

    def __init__(self, config_path: Path, log_path: Path, notify: NotifyListener,
                 watchdog_usec: int = 0, runtime_dir: Path | None = None) -> None:
        self.runtime_dir = runtime_dir
        self.config_path = config_path
        self.log_path = log_path
        self.notify = notify
        self.watchdog_usec = watchdog_usec
        with socket.socket() as s:  # a free port for systemd-socket-activate to bind
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/sms/webhook"
        self.proc: asyncio.subprocess.Process | None = None
        self.terminated = False

    async def start(self) -> None:
        assert ACTIVATE is not None
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("LISTEN_", "NOTIFY_", "WATCHDOG_"))}
        args = [ACTIVATE, "-l", f"127.0.0.1:{self.port}", "-E", f"NOTIFY_SOCKET={self.notify.address}"]
        if self.watchdog_usec:
            args += ["-E", f"WATCHDOG_USEC={self.watchdog_usec}"]
        if self.runtime_dir is not None:  # RuntimeDirectory=
            args += ["-E", f"RUNTIME_DIRECTORY={self.runtime_dir}"]
        args += [sys.executable, "-m", "hapsms_relay", "serve", "--config", str(self.config_path)]
        if _mdwe_supported():
            args = [sys.executable, "-c", MDWE_EXEC, *args]
        with self.log_path.open("wb") as out:
            self.proc = await asyncio.create_subprocess_exec(*args, stdout=out, stderr=out, env=env)
        # systemd-socket-activate says so on stderr once it listens.
        await eventually(lambda: "Listening on" in self.log(), what="systemd-socket-activate listening")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.terminated |= sig == signal.SIGTERM

    async def post(self, session: aiohttp.ClientSession, body: Any, token: str = TOKEN) -> int:
        async with session.post(self.url, json=body, headers=auth(token)) as r:
            await r.read()
            return r.status

    async def stop(self) -> int:
        """The exit status after SIGTERM (sent once, as systemd does)."""
        assert self.proc is not None
        if not self.terminated:
            self.signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), 30)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: unix socket paths are limited to 107 bytes."""
    d = Path(tempfile.mkdtemp(prefix="hsr", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
async def notify_listener(short_dir: Path) -> AsyncIterator[NotifyListener]:
    listener = NotifyListener(str(short_dir / "notify"))
    listener.start()
    yield listener
    await listener.close()


@pytest.fixture
async def activated(tmp_path: Path, notify_listener: NotifyListener) -> AsyncIterator[
        list[ActivatedRelay]]:
    started: list[ActivatedRelay] = []
    yield started
    for r in started:
        if r.proc is not None and r.proc.returncode is None:
            r.proc.kill()
            await r.proc.wait()


# -- in-process: the module on its own ----------------------------------------------------------

@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
async def test_notifier_sends_to_path_and_abstract_sockets(short_dir: Path, abstract: bool) -> None:
    """sd_notify reaches a path socket and an '@' abstract one, one KEY=value per line."""
    address = f"@hapsms-relay-test-{os.getpid()}-{id(short_dir)}" if abstract else str(short_dir / "n")
    listener = NotifyListener(address)
    listener.start()
    notifier = systemd.Notifier(address)
    try:
        notifier.ready("accepting;\nqueue 0")
        await listener.wait_for("READY")
        assert listener.messages[0] == {"READY": "1", "STATUS": "accepting; queue 0"}
    finally:
        notifier.close()
        await listener.close()


def test_notifier_without_notify_socket_is_silent(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside systemd (no $NOTIFY_SOCKET) notifying does nothing and raises nothing."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    notifier = systemd.Notifier.from_environment()
    notifier.ready("accepting")
    assert notifier.address is None


def test_watchdog_interval_is_half_and_only_for_our_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    """WATCHDOG_USEC gives a ping every half period; a WATCHDOG_PID of another process, none."""
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/nowhere")
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert systemd.Notifier.from_environment().watchdog_interval == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.Notifier.from_environment().watchdog_interval == 15.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert systemd.Notifier.from_environment().watchdog_interval == 0.0


def test_listen_fds_for_another_pid_are_ignored_and_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """LISTEN_PID naming another process means bind as configured; the variables are removed."""
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_FDNAMES", "hapsms-relay.socket")
    assert systemd.listen_socket() is None
    assert not {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} & set(os.environ)


# -- the real thing: systemd-socket-activate, SIGHUP, SIGTERM ------------------------------------

async def test_socket_activation_accepts_hap_sample_on_inherited_socket(
    tmp_path: Path, notify_listener: NotifyListener, activated: list[ActivatedRelay],
    session: aiohttp.ClientSession,
) -> None:
    """A post that arrives before the relay runs is answered 200 by it on the inherited fd 3."""
    # The configured listen address is not where the test posts: only fd 3 can answer it.
    doc = base_config(tmp_path, routes={"sms": ["dev"], "voice": ["dev"]})
    relay = ActivatedRelay(write_config(tmp_path, doc), tmp_path / "relay.log", notify_listener)
    activated.append(relay)
    await relay.start()
    assert await relay.post(session, SMS_BODY) == 200  # this connection starts the relay
    assert await relay.post(session, VOICE_BODY) == 200
    sent = tmp_path / "sent.jsonl"
    await eventually(lambda: sent.exists() and len(sent.read_bytes().splitlines()) == 2,
                     what="both sample bodies delivered")
    kinds = sorted(orjson.loads(line)["kind"] for line in sent.read_bytes().splitlines())
    assert kinds == ["sms", "voice"]
    assert f"address=127.0.0.1:{relay.port}" in relay.log()
    assert "inherited_socket=yes" in relay.log()
    assert await relay.stop() == 0


async def test_notify_sequence_ready_status_watchdog_reload_stopping(
    tmp_path: Path, notify_listener: NotifyListener, activated: list[ActivatedRelay],
    session: aiohttp.ClientSession,
) -> None:
    """READY, STATUS, WATCHDOG, then RELOADING+MONOTONIC_USEC and READY on SIGHUP, then
    STOPPING on SIGTERM reach $NOTIFY_SOCKET in that order."""
    relay = ActivatedRelay(write_config(tmp_path, base_config(tmp_path)), tmp_path / "relay.log",
                           notify_listener, watchdog_usec=200_000)
    activated.append(relay)
    await relay.start()
    assert await relay.post(session, SMS_BODY) == 200
    n = notify_listener
    ready = await n.wait_for("READY")
    assert n.messages[ready]["STATUS"].startswith("accepting; queue ")
    # The status line is kept current: the delivery shows up in a later STATUS= on its own.
    await eventually(lambda: any("sent 1" in m.get("STATUS", "") for m in n.messages[ready:]),
                     what="STATUS with the delivery")
    watchdog = await n.wait_for("WATCHDOG", ready + 1)
    assert n.messages[watchdog] == {"WATCHDOG": "1"}

    relay.signal(signal.SIGHUP)
    reloading = await n.wait_for("RELOADING", watchdog + 1)
    assert int(n.messages[reloading]["MONOTONIC_USEC"]) > 0
    ready_again = await n.wait_for("READY", reloading + 1)
    assert "reload failed" not in n.messages[ready_again]["STATUS"]
    # Still pinging after the reload.
    await n.wait_for("WATCHDOG", ready_again + 1)

    relay.signal(signal.SIGTERM)
    stopping = await n.wait_for("STOPPING", ready_again + 1)
    assert n.messages[stopping]["STATUS"].startswith("stopping")
    assert await relay.stop() == 0
    assert n.index("READY", stopping) == -1  # nothing claims readiness after STOPPING=1


async def test_sighup_reload_rotates_tokens_adds_provider_and_survives_broken_config(
    tmp_path: Path, notify_listener: NotifyListener, activated: list[ActivatedRelay],
    session: aiohttp.ClientSession, fake_api: FakeAPI,
) -> None:
    """Under a steady stream of posts (all answered 200): SIGHUP rotates the token (new
    accepted, old refused) and adds a provider; a broken config then keeps the old one in
    force and reports the error in STATUS= and the log."""
    old_token, steady, new_token = "old-token-1", "steady-token-2", "new-token-3"
    doc = base_config(tmp_path, server={"tokens": [old_token, steady]})
    path = write_config(tmp_path, doc)
    relay = ActivatedRelay(path, tmp_path / "relay.log", notify_listener)
    activated.append(relay)
    await relay.start()
    n = notify_listener

    statuses: list[int] = []
    flowing = True

    async def flow() -> None:
        while flowing:
            statuses.append(await relay.post(session, SMS_BODY, steady))

    flow_task = asyncio.create_task(flow())

    async def reload() -> dict[str, str]:
        """SIGHUP; the READY=1 that ends it; and posts flowing after it."""
        start = len(n.messages)
        relay.signal(signal.SIGHUP)
        ready = await n.wait_for("READY", await n.wait_for("RELOADING", start) + 1)
        count = len(statuses)
        await eventually(lambda: len(statuses) > count + 5, what="posts flowing after the reload")
        return n.messages[ready]

    try:
        await n.wait_for("READY")
        assert await relay.post(session, SMS_BODY, old_token) == 200
        assert await relay.post(session, SMS_BODY, new_token) == 401

        api = {"name": "api", "type": "http", "url": fake_api.url + "/send",
               "body": {"to": "{to}", "text": "{message}"}}
        doc["server"]["tokens"] = [steady, new_token]
        doc["providers"] = [*doc["providers"], api]
        doc["routes"] = {"sms": ["api", "dev"]}
        write_config(tmp_path, doc)
        status = await reload()
        assert "reload failed" not in status["STATUS"]
        assert await relay.post(session, SMS_BODY, new_token) == 200
        assert await relay.post(session, SMS_BODY, old_token) == 401
        await eventually(lambda: len(fake_api.accepted) > 0, what="a delivery through the new provider")

        path.write_text(path.read_text() + '\n[bogus]\nkey = 1\n')
        status = await reload()
        assert "reload failed, old config in force: bogus: " in status["STATUS"]
        assert "reload_failed" in relay.log() and "error=\"bogus: " in relay.log()
        assert await relay.post(session, SMS_BODY, new_token) == 200
        assert await relay.post(session, SMS_BODY, old_token) == 401
        delivered = len(fake_api.accepted)
        await eventually(lambda: len(fake_api.accepted) > delivered, what="deliveries continuing")
    finally:
        flowing = False
        await flow_task
    assert statuses and set(statuses) == {200}, f"posts failed during reloads: {set(statuses)}"
    assert await relay.stop() == 0
    assert "Traceback" not in relay.log()


async def test_reload_command_reports_the_outcome(
    tmp_path: Path, short_dir: Path, notify_listener: NotifyListener,
    activated: list[ActivatedRelay], session: aiohttp.ClientSession,
) -> None:
    """`hapsms-relay reload PID` (the unit's ExecReload=) exits 0 once a good config is in
    force, and 1 with the error on stderr for a broken one, which the relay does not take;
    without $RUNTIME_DIRECTORY it says what it needs."""
    from tests.process import run_cli

    runtime = short_dir / "run"
    runtime.mkdir()
    doc = base_config(tmp_path, server={"tokens": ["old-token-1"]})
    path = write_config(tmp_path, doc)
    relay = ActivatedRelay(path, tmp_path / "relay.log", notify_listener, runtime_dir=runtime)
    activated.append(relay)
    await relay.start()
    assert await relay.post(session, SMS_BODY, "old-token-1") == 200  # starts the relay
    assert relay.proc is not None
    pid = str(relay.proc.pid)
    env = {"RUNTIME_DIRECTORY": str(runtime)}

    doc["server"]["tokens"] = ["new-token-2"]
    write_config(tmp_path, doc)
    assert await run_cli("reload", pid, env=env) == (0, "", "")
    assert await relay.post(session, SMS_BODY, "new-token-2") == 200

    path.write_text(path.read_text() + "\n[bogus]\nkey = 1\n")
    code, out, err = await run_cli("reload", pid, env=env)
    assert (code, out) == (1, "")
    assert err.startswith("hapsms-relay: reload failed, the running config stays: bogus: ")
    assert await relay.post(session, SMS_BODY, "new-token-2") == 200  # still in force

    code, _, err = await run_cli("reload", pid, env={"RUNTIME_DIRECTORY": ""})
    assert code == 2 and "RUNTIME_DIRECTORY" in err
    assert await relay.stop() == 0


@pytest.mark.skipif(not _mdwe_supported(), reason="the kernel has no PR_SET_MDWE (Linux < 6.3)")
def test_mdwe_wrapper_denies_writable_executable_memory() -> None:
    """The wrapper the tests above start the relay through really refuses W+X mappings."""
    import subprocess

    probe = "import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)"
    done = subprocess.run([sys.executable, "-c", MDWE_EXEC, sys.executable, "-c", probe],
                          capture_output=True, text=True, check=False)
    assert done.returncode != 0 and "PermissionError" in done.stderr
