"""systemd integration without libsystemd: the socket systemd passes us, sd_notify, and
the outcome of a reload for ``ExecReload=``.

sd_notify is one datagram of ``KEY=value`` lines to ``$NOTIFY_SOCKET`` (a path, or an
abstract name written ``@name``); see sd_notify(3) and sd_listen_fds(3).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import orjson

from hapsms_relay import log

SD_LISTEN_FDS_START = 3
STATUS_EVERY = 1.0  # seconds between looks at the status line; sent only when it changed


def listen_socket() -> socket.socket | None:
    """The listening socket systemd passed us (fd 3), or None to bind as configured.

    The ``LISTEN_*`` variables are removed either way (sd_listen_fds with unset_environment),
    so that nothing started later mistakes the socket for its own.
    """
    pid = os.environ.pop("LISTEN_PID", "")
    fds = os.environ.pop("LISTEN_FDS", "")
    os.environ.pop("LISTEN_FDNAMES", None)
    if not (pid.isdigit() and int(pid) == os.getpid() and fds.isdigit() and int(fds) >= 1):
        return None
    if int(fds) > 1:
        log.warning("socket_activation_extra_fds", count=fds, using=SD_LISTEN_FDS_START)
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    if sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise OSError(f"the socket systemd passed is not a stream socket ({sock.type!r}): "
                      "use ListenStream= in hapsms-relay.socket")
    sock.set_inheritable(False)
    sock.setblocking(False)
    return sock


class Notifier:
    """Sends sd_notify messages; does nothing when not run by systemd (no ``$NOTIFY_SOCKET``)."""

    def __init__(self, address: str | None, watchdog_usec: int = 0) -> None:
        if address and address.startswith("@"):
            address = "\0" + address[1:]  # the abstract namespace
        self.address = address or None
        self.watchdog_interval = watchdog_usec / 2e6 if watchdog_usec > 0 else 0.0
        self._sock: socket.socket | None = None
        self._failed = False
        self._status = ""

    @classmethod
    def from_environment(cls) -> Notifier:
        """``$NOTIFY_SOCKET``; the watchdog from ``$WATCHDOG_USEC`` when meant for this pid."""
        usec = os.environ.get("WATCHDOG_USEC", "")
        wd_pid = os.environ.get("WATCHDOG_PID", "")
        mine = not wd_pid or (wd_pid.isdigit() and int(wd_pid) == os.getpid())
        return cls(os.environ.get("NOTIFY_SOCKET"), int(usec) if usec.isdigit() and mine else 0)

    def notify(self, **fields: str) -> None:
        """Send one message, for example ``notify(READY="1", STATUS="accepting")``."""
        if self.address is None:
            return
        # systemd reads one status line: a newline inside a value would start a new key.
        data = "\n".join(f"{k}={' '.join(v.splitlines())}" for k, v in fields.items())
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(data.encode(), self.address)
        except OSError as exc:
            # Losing a status line is harmless; losing the watchdog will show in systemd's log.
            if not self._failed:
                log.warning("notify_failed", socket=self.address.replace("\0", "@"), error=str(exc))
            self._failed = True
        else:
            self._failed = False
        if "STATUS" in fields:
            self._status = fields["STATUS"]

    def ready(self, status: str) -> None:
        self.notify(READY="1", STATUS=status)

    def reloading(self) -> int:
        """RELOADING=1; the CLOCK_MONOTONIC microseconds it names, which stamp the reload."""
        usec = monotonic_usec()
        self.notify(RELOADING="1", MONOTONIC_USEC=str(usec), STATUS="reloading the config")
        return usec

    def stopping(self, status: str) -> None:
        self.notify(STOPPING="1", STATUS=status)

    async def keep_alive(self, status: Callable[[], str]) -> None:
        """Until cancelled: ``WATCHDOG=1`` every half watchdog period, ``STATUS=`` when it
        changes. Both run on the event loop, so a blocked loop stops the pings."""
        if self.address is None:
            return
        loop = asyncio.get_running_loop()
        next_ping = loop.time()
        while True:
            now = loop.time()
            if self.watchdog_interval and now >= next_ping:
                self.notify(WATCHDOG="1")
                next_ping = now + self.watchdog_interval
            line = status()
            if line != self._status:
                self.notify(STATUS=line)
            wait = STATUS_EVERY
            if self.watchdog_interval:
                wait = min(wait, max(next_ping - loop.time(), 0.0))
            await asyncio.sleep(wait)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


# -- the outcome of a reload --------------------------------------------------------------------
# systemd 252 (Debian 12) has no Type=notify-reload, and even that cannot fail a reload: so
# ExecReload= runs `hapsms-relay reload $MAINPID`, which sends SIGHUP and waits for the relay
# to write how the reload it started ended into $RUNTIME_DIRECTORY (RuntimeDirectory=).

RELOAD_FILE = "reload"


class ReloadOutcome(NamedTuple):
    pid: int
    started: int  # CLOCK_MONOTONIC microseconds when the reload began (after the SIGHUP)
    error: str  # empty: the new config is in force


def runtime_directory() -> Path | None:
    directory = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    return Path(directory) if directory else None


def write_reload_outcome(outcome: ReloadOutcome) -> None:
    """Publish a reload's outcome (whole, by rename) for ``read_reload_outcome``; without
    ``$RUNTIME_DIRECTORY`` (not run by the unit) there is nobody to tell."""
    directory = runtime_directory()
    if directory is None:
        return
    path = directory / RELOAD_FILE
    tmp = path.with_name(f".{RELOAD_FILE}.{os.getpid()}")
    try:
        tmp.write_bytes(orjson.dumps(outcome._asdict()))
        tmp.replace(path)
    except OSError as exc:
        log.warning("reload_outcome_unwritten", path=str(path), error=exc.strerror or str(exc))
        with contextlib.suppress(OSError):
            tmp.unlink()


def read_reload_outcome(directory: Path) -> ReloadOutcome | None:
    try:
        doc = orjson.loads((directory / RELOAD_FILE).read_bytes())
        return ReloadOutcome(int(doc["pid"]), int(doc["started"]), str(doc["error"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not written yet, or by another version
