"""The limits' memory is bounded: past ``limits.max_numbers`` numbers, new ones are counted
in a fixed-size sketch that never under-counts, so no number escapes its windows and
nothing crashes; the exact windows and the sketch empty as the windows expire."""

from __future__ import annotations

import random
from pathlib import Path

import aiohttp

from hapsms_relay.clock import ManualClock
from hapsms_relay.kinds import KIND_SMS, KIND_VOICE
from hapsms_relay.limits import Limiter, LimitsConfig, Window
from hapsms_relay.sketch import SLICES, Sketch
from tests.helpers import AUTH, base_config, start_relay

T0 = 1_800_000_000.0
DAY = (Window(2, 86400.0, "2/1d"),)


def number(i: int) -> str:
    return f"+86138{i:08d}"


def test_limiter_holds_at_most_max_numbers_and_still_limits_new_ones() -> None:
    """With max_numbers = 100, 5,000 numbers: 100 are held exactly, the rest are counted in
    the sketch, and every one of them is refused once over its window (a sketch may refuse a
    few early, never late)."""
    limiter = Limiter(LimitsConfig(sms=DAY, voice=(), max_numbers=100,
                                   deny_number_types=frozenset()))
    early = 0
    for i in range(5000):
        early += limiter.check(KIND_SMS, number(i), "CN", T0) is not None
        limiter.take(KIND_SMS, number(i), T0)
        limiter.take(KIND_SMS, number(i), T0 + 1)
    assert early <= 5
    assert limiter.held == 100 and limiter.overflowed == 2 * 4900  # takes, not numbers
    refused = [limiter.check(KIND_SMS, number(i), "CN", T0 + 2) for i in range(5000)]
    assert all(r is not None and r.code == "rate_limited" for r in refused)
    sketch_bytes = sum(s.nbytes for s in limiter._sketches.values())
    assert sketch_bytes <= (SLICES + 1) * 2 * 2**18  # one window's ring, whatever the count


def test_sketch_false_refusals_are_rare() -> None:
    """100,000 numbers with one message each in the sketch: a number with none of its own is
    counted at most a few messages, far below the default 20/1d."""
    rng = random.Random(11)
    sketch = Sketch(86400.0)
    for _ in range(100_000):
        sketch.add(rng.randrange(10**10, 10**11), T0 + rng.random() * 3600)
    fresh = [rng.randrange(10**11, 10**12) for _ in range(10_000)]
    counts = [sketch.count(k, T0 + 3600) for k in fresh]
    assert sum(c >= 3 for c in counts) < 100 and max(counts) < 6


def test_sketch_never_under_counts_and_forgets_after_the_window() -> None:
    """Counts in the sketch are at least what was added within the window, and nothing at
    all once the window (plus one slice) has passed."""
    sketch = Sketch(600.0)
    for i in range(50):
        for t in range(i % 4 + 1):
            sketch.add(i, T0 + t * 60)
    for i in range(50):
        assert sketch.count(i, T0 + 300) >= i % 4 + 1
    assert all(sketch.count(i, T0 + 600 + 600 / SLICES + 200) == 0 for i in range(50))


def test_sketch_is_released_when_its_windows_expire() -> None:
    """Once every sketched window has expired, prune releases the sketch: the fast path and
    the memory come back."""
    limiter = Limiter(LimitsConfig(sms=(Window(1, 600.0, "1/10m"),), voice=(Window(1, 600.0, "1/10m"),),
                                   max_numbers=10, deny_number_types=frozenset()))
    for i in range(30):
        limiter.take(KIND_SMS if i % 2 else KIND_VOICE, number(i), T0)
    assert limiter.sketched
    assert limiter.check(KIND_VOICE, number(20), "CN", T0 + 1) is not None
    limiter.prune(T0 + 3600)
    assert not limiter.sketched and limiter.held == 0 and not limiter._sketches
    assert limiter.check(KIND_VOICE, number(20), "CN", T0 + 3601) is None


def test_untake_gives_back_a_sketched_take() -> None:
    """A take counted in the sketch whose enqueue failed is taken back."""
    limiter = Limiter(LimitsConfig(sms=(Window(1, 600.0, "1/10m"),), voice=(), max_numbers=1,
                                   deny_number_types=frozenset()))
    limiter.take(KIND_SMS, number(1), T0)
    limiter.take(KIND_SMS, number(2), T0)
    assert limiter.check(KIND_SMS, number(2), "CN", T0) is not None
    limiter.untake(KIND_SMS, number(2), T0)
    assert limiter.check(KIND_SMS, number(2), "CN", T0) is None


async def test_relay_at_max_numbers_limits_new_numbers(tmp_path: Path, caplog) -> None:
    """Through the webhook with max_numbers = 50: 200 distinct numbers are all accepted once
    and each refused a second time (429 rate_limited); /metrics shows at most 50 held and
    the overflow; a limits_full warning is logged."""
    doc = base_config(tmp_path, limits={"sms": ["1/1d"], "max_numbers": 50})
    clock = ManualClock(T0)
    relay = await start_relay(doc, paused=True, clock=clock)
    try:
        async with aiohttp.ClientSession() as session:
            mobiles = [f"1380013{i:04d}" for i in range(200)]
            for i in range(0, 200, 20):
                status, body = await relay.post(session, {"Type": 1, "Data": {
                    "Mobiles": mobiles[i:i + 20], "Message": "first"}})
                assert status == 200 and len(body["ids"]) == 20, body
            for m in mobiles[::7]:
                status, body = await relay.post(session, {"Type": 1, "Data": {
                    "Mobiles": [m], "Message": "again"}}, AUTH)
                assert (status, body["error"]) == (429, "rate_limited"), (m, body)
            async with session.get(relay.url + "/metrics") as r:
                text = await r.text()
        assert "hapsms_relay_limits_numbers 50.0" in text
        assert "hapsms_relay_limits_overflow_total 150.0" in text
        assert caplog.text.count("limits_full") == 1
    finally:
        await relay.stop()


def sketched(sms: tuple[Window, ...], voice: tuple[Window, ...] = ()) -> Limiter:
    """A limiter holding one number (number(0)) exactly, the next ones in a sketch."""
    limiter = Limiter(LimitsConfig(sms=sms, voice=voice, max_numbers=1,
                                   deny_number_types=frozenset()))
    assert limiter.take(KIND_SMS, number(0), T0) is True  # held exactly
    assert limiter.take(KIND_SMS, number(1), T0) is False  # counted in the sketch
    assert limiter.sketched
    return limiter


def test_take_says_whether_the_number_is_held_exactly() -> None:
    """take() is True for a number held exactly (new or again) and for a kind with no window,
    False only for a take the sketch counted."""
    limiter = sketched((Window(3, 60.0, "3/1m"),))
    assert limiter.take(KIND_SMS, number(0), T0 + 1) is True
    assert limiter.take(KIND_VOICE, number(2), T0 + 1) is True  # voice has no window here
    assert limiter.take(KIND_SMS, number(3), T0 + 1) is False


def test_while_sketched_held_takes_count_once_and_only_inside_the_window() -> None:
    """While a sketch is live, a number held exactly is counted by its own takes, each once,
    and a take exactly one window old no longer counts."""
    limiter = sketched((Window(2, 60.0, "2/1m"),))
    assert limiter.check(KIND_SMS, number(0), "CN", T0 + 1) is None  # one take of two
    limiter.take(KIND_SMS, number(0), T0 + 1)
    assert limiter.check(KIND_SMS, number(0), "CN", T0 + 59) is not None  # both in
    assert limiter.check(KIND_SMS, number(0), "CN", T0 + 60) is None  # T0 is a window old


def test_while_sketched_a_kind_without_a_sketch_counts_nothing_extra() -> None:
    """An SMS sketch adds nothing to a voice window: a new number's first call goes."""
    limiter = sketched((Window(5, 60.0, "5/1m"),), voice=(Window(1, 60.0, "1/1m"),))
    assert limiter.check(KIND_VOICE, number(5), "CN", T0 + 1) is None


def test_untake_while_sketched_forgets_the_exact_take() -> None:
    """A number held exactly gets its own take back while a sketch is live."""
    limiter = sketched((Window(1, 60.0, "1/1m"),))
    assert limiter.check(KIND_SMS, number(0), "CN", T0 + 1) is not None
    limiter.untake(KIND_SMS, number(0), T0)
    assert limiter.check(KIND_SMS, number(0), "CN", T0 + 1) is None


def test_untake_gives_back_one_sketched_take_only() -> None:
    """Of two sketched takes, an untake gives back one: a third take is refused again."""
    limiter = sketched((Window(2, 60.0, "2/1m"),))
    limiter.take(KIND_SMS, number(1), T0 + 1)
    assert limiter.check(KIND_SMS, number(1), "CN", T0 + 2) is not None
    limiter.untake(KIND_SMS, number(1), T0 + 1)
    assert limiter.check(KIND_SMS, number(1), "CN", T0 + 2) is None
    limiter.take(KIND_SMS, number(1), T0 + 2)
    assert limiter.check(KIND_SMS, number(1), "CN", T0 + 3) is not None


def test_sketch_is_released_as_soon_as_it_counts_nothing() -> None:
    """prune releases the sketch at the first moment it would count nothing, not later."""
    limiter = sketched((Window(1, 60.0, "1/1m"),))
    probe = Sketch(60.0)
    probe.add(1, T0)  # the same window and time: the same lifetime
    limiter.prune(probe.live_until - 0.001)
    assert limiter.sketched and probe.count(1, probe.live_until - 0.001) == 1
    limiter.prune(probe.live_until)
    assert not limiter.sketched and probe.count(1, probe.live_until) == 0


def test_sketch_keeps_every_slice_a_window_touches() -> None:
    """One message per slice over a whole window (SLICES + 1 slices): all are counted at its
    end, none lost to a recycled slice."""
    span = 600.0 / SLICES
    sketch = Sketch(600.0)
    for i in range(SLICES + 1):
        sketch.add(7, T0 + i * span)
    assert sketch.count(7, T0 + SLICES * span) == SLICES + 1


def test_sketch_counts_until_its_window_has_passed() -> None:
    """A message is still counted a full window after it (the slice it fell in is in the
    window), and nothing is once the window and that slice are over."""
    span = 600.0 / SLICES
    sketch = Sketch(600.0)
    start = (T0 // span) * span  # the start of a slice
    sketch.add(7, start)
    assert sketch.count(7, start + 600.0) == 1
    assert sketch.count(7, start + 600.0 + span) == 0


def test_sketch_counters_saturate() -> None:
    """A count past a counter's 65,535 stays at 65,535 rather than wrapping or failing."""
    sketch = Sketch(600.0)
    sketch.add(7, T0, 70_000)
    sketch.add(7, T0, 1)
    assert sketch.count(7, T0) == 65_535


def test_sketch_memory_is_one_ring_of_slices_allocated_on_use() -> None:
    """Nothing is allocated until a message is counted; each slice used holds 2**18 two-byte
    counters (512 KiB), whatever the number of keys."""
    sketch = Sketch(600.0)
    assert sketch.nbytes == 0
    for key in range(1000):
        sketch.add(key, T0)
    assert sketch.nbytes == 512 * 1024


def test_sketch_memory_stays_one_ring_however_long_it_counts() -> None:
    """Messages over many windows reuse the ring: at most SLICES + 1 slices are ever held
    (4.5 MiB for the default width)."""
    sketch = Sketch(80.0)
    for t in range(0, 800, 10):
        sketch.add(7, T0 + t)
    assert sketch.nbytes == (SLICES + 1) * 512 * 1024


def test_sketch_counts_a_message_at_a_float_slice_edge() -> None:
    """A message at a time whose quotient by the slice rounds up (1.0 / 0.1 is 10.0, its
    floor division 9.0) lands in the slice the count looks at: it is counted at once."""
    sketch = Sketch(0.1 * SLICES)  # slices of 0.1 s
    sketch.add(7, 1.0)
    assert sketch.count(7, 1.0) == 1
