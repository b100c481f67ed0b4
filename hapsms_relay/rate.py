"""A provider's send rate (``rate = "50/s"``): at most that many API calls in any window.

The guarantee is about what the vendor sees, whatever the network does: a call holds its
place in the window from the moment it may start until ``per`` seconds after it ended, so
``count + 1`` calls can never all reach the vendor within ``per`` seconds (a call reaches it
between its start and its end). Waiters are served in arrival order. Time comes from the
``Clock`` (tests move a ``ManualClock``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
from collections import deque
from dataclasses import dataclass

from hapsms_relay.clock import SYSTEM, Clock

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}
_RATE = re.compile(r"^\s*([1-9][0-9]{0,6})\s*/\s*([smh])\s*$")


@dataclass(frozen=True, slots=True)
class Rate:
    """``count`` calls per ``per`` seconds."""

    count: int
    per: float
    text: str  # as configured: "50/s"

    def __str__(self) -> str:
        return self.text


def parse_rate(text: str) -> Rate | None:
    """``"10/s"``, ``"600/m"`` or ``"1000/h"`` as a ``Rate``; None when it is not one."""
    m = _RATE.match(text)
    if m is None:
        return None
    return Rate(int(m[1]), _UNITS[m[2]], f"{m[1]}/{m[2]}")


class RateLimiter:
    """Admits at most ``rate.count`` calls per ``rate.per`` seconds, counted as the module
    docstring says. ``acquire`` before a call, ``release`` once it ended (however it ended)."""

    def __init__(self, rate: Rate, clock: Clock = SYSTEM) -> None:
        self.rate = rate
        self.clock = clock
        self._running = 0
        self._ended: deque[float] = deque()  # when calls ended, oldest first (monotonic)
        self._queue: deque[int] = deque()  # tickets of the waiters, first come first served
        self._tickets = itertools.count()
        self._changed = asyncio.Event()

    @property
    def waiting(self) -> int:
        """Callers in ``acquire`` now."""
        return len(self._queue)

    def expected_wait(self, extra: int) -> float:
        """Roughly how long ``extra`` more callers would wait behind those waiting now."""
        return (len(self._queue) + extra) / self.rate.count * self.rate.per

    async def acquire(self) -> None:
        ticket = next(self._tickets)
        self._queue.append(ticket)
        try:
            while True:
                timeout = self.rate.per
                if self._queue[0] == ticket:
                    now = self.clock.monotonic()
                    ended = self._ended
                    while ended and ended[0] + self.rate.per <= now:
                        ended.popleft()
                    if self._running + len(ended) < self.rate.count:
                        self._running += 1
                        self._queue.popleft()
                        self._changed.set()  # the next in line looks now
                        return
                    if ended:  # else every place is a running call: its release wakes us
                        timeout = ended[0] + self.rate.per - now
                self._changed.clear()
                await self.clock.wait(self._changed, timeout)
        except BaseException:
            with contextlib.suppress(ValueError):
                self._queue.remove(ticket)
            self._changed.set()
            raise

    def release(self) -> None:
        self._running -= 1
        self._ended.append(self.clock.monotonic())
        self._changed.set()
