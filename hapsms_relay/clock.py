"""Time, from one place: the guard, budgets, breakers, dispatcher and outbox leases ask a
``Clock``, so tests move a ``ManualClock`` (midnight, a cool-off, a lease's expiry) instead
of sleeping, and nothing patches ``time``.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from typing import Protocol


class Clock(Protocol):
    """Wall time for what is stored and compared across processes, monotonic time for
    intervals, and waits measured on the same clock."""

    def time(self) -> float:
        """Seconds since the epoch (accepted at, due, lease expiry, the budget's day)."""

    def monotonic(self) -> float:
        """Seconds from an arbitrary start, never going back (cool-offs, latencies)."""

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of this clock's time."""

    async def wait(self, event: asyncio.Event, timeout: float) -> bool:
        """Wait until ``event`` is set or ``timeout`` seconds passed; True if it was set."""


class SystemClock:
    """The real clock: ``time.time``, ``time.monotonic`` and the event loop's timers."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def wait(self, event: asyncio.Event, timeout: float) -> bool:
        if event.is_set():
            return True
        if timeout <= 0:
            return False
        with contextlib.suppress(TimeoutError):
            # asyncio.timeout, not wait_for: no task of its own (this runs per claim round)
            async with asyncio.timeout(timeout):
                await event.wait()
        return event.is_set()


SYSTEM = SystemClock()


class ManualClock:
    """A clock that moves only when told to (tests): ``advance`` wakes the waits it ends."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._now = start
        self._start = start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def time(self) -> float:
        return self._now

    def monotonic(self) -> float:
        # from an arbitrary start, as the real one (which is never 0 either)
        return self._now - self._start + 1000.0

    def advance(self, seconds: float) -> None:
        """Move time forward; every wait whose end has come is woken."""
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self._now += seconds
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, fut = heapq.heappop(self._sleepers)
            if not fut.done():
                fut.set_result(None)

    def set(self, when: float) -> None:
        """Move time forward to ``when`` (seconds since the epoch)."""
        self.advance(when - self._now)

    @property
    def waiting(self) -> int:
        """How many waits are pending (a test advances once the code under test waits)."""
        return len(self.deadlines)

    @property
    def deadlines(self) -> list[float]:
        """When the pending waits end, soonest first (a test knows which loop waits)."""
        return sorted(when for when, _, f in self._sleepers if not f.done())

    def _timer(self, seconds: float) -> asyncio.Future[None]:
        """A future woken once the clock reaches now + ``seconds``, "now" being this call's:
        a deadline taken later (when a task first runs) could miss an advance in between
        and wait for one that never comes."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._order), fut))
        return fut

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut = self._timer(seconds)
        try:
            await fut
        finally:
            fut.cancel()

    async def wait(self, event: asyncio.Event, timeout: float) -> bool:
        if event.is_set() or timeout <= 0:
            return event.is_set()
        timer = self._timer(timeout)
        setter = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait((setter, timer), return_when=asyncio.FIRST_COMPLETED)
        finally:
            setter.cancel()
            timer.cancel()
        return event.is_set()
