"""systemd integration without libsystemd: the socket systemd passes us, and sd_notify.

sd_notify is one datagram of ``KEY=value`` lines to ``$NOTIFY_SOCKET`` (a path, or an
abstract name written ``@name``); see sd_notify(3) and sd_listen_fds(3).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable

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

    def reloading(self) -> None:
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify(RELOADING="1", MONOTONIC_USEC=str(usec), STATUS="reloading the config")

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
