"""A small pool of open SMTP connections, shared by the messages of one ``smtp`` provider.

Up to ``size`` connections, each carrying one transaction at a time; opened lazily (a server
that is down at start-up only delays delivery), reused while they work, checked with NOOP
after sitting idle, and dropped on any failure that may have left them out of step.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiosmtplib

QUIT_TIMEOUT = 2.0  # seconds a polite QUIT may take on close before the socket is just closed


class SMTPPool:
    def __init__(
        self, connect: Callable[[], Awaitable[aiosmtplib.SMTP]], *, size: int, idle_check: float
    ) -> None:
        self._connect = connect
        self._slots = asyncio.Semaphore(size)
        self._idle: list[tuple[aiosmtplib.SMTP, float]] = []  # (connection, idle since)
        self.idle_check = idle_check
        self.opened = 0  # connections opened over the pool's life

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[aiosmtplib.SMTP]:
        """A connection for one transaction, returned to the pool afterwards if still sound.

        Each caller opens, checks and uses its own connection without holding any lock, so a
        slow or broken connection holds up only the message on it.
        """
        async with self._slots:
            conn = await self._take()
            try:
                yield conn
            except aiosmtplib.SMTPResponseException:
                # The server answered (4xx/5xx): the connection is in step (aiosmtplib sent
                # RSET) unless the server closed it, which _put notices.
                self._put(conn)
                raise
            except BaseException:
                # A timeout, a reset, a cancellation: a reply may still be on its way.
                conn.close()
                raise
            self._put(conn)

    async def _take(self) -> aiosmtplib.SMTP:
        while self._idle:
            # Most recently used first: the hot connections stay hot, the others age out.
            conn, since = self._idle.pop()
            if not conn.is_connected:
                continue
            if time.monotonic() - since < self.idle_check:
                return conn
            try:
                await conn.noop()
            except (aiosmtplib.SMTPException, OSError, TimeoutError):
                conn.close()
                continue
            return conn
        conn = await self._connect()
        self.opened += 1
        return conn

    def _put(self, conn: aiosmtplib.SMTP) -> None:
        if conn.is_connected:
            self._idle.append((conn, time.monotonic()))

    async def close(self) -> None:
        """QUIT the idle connections (briefly); connections in use are their users' to close."""
        idle, self._idle = self._idle, []
        await asyncio.gather(*(_quit(conn) for conn, _ in idle))


async def _quit(conn: aiosmtplib.SMTP) -> None:
    try:
        await conn.quit(timeout=QUIT_TIMEOUT)
    except (aiosmtplib.SMTPException, OSError, TimeoutError):
        pass
    finally:
        conn.close()
