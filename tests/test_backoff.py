"""Retry backoff, sampled over many draws: it grows with each attempt up to ``retry_max``,
is spread with full jitter (not one fixed delay), never undercuts the provider's
Retry-After, and survives attempt counts that would overflow a float."""

from __future__ import annotations

import itertools
import random
import statistics

import pytest

from hapsms_relay.dispatcher import backoff

DRAWS = 2000


def draws(attempt: int, base: float = 1.0, cap: float = 60.0, retry_after: float | None = None,
          n: int = DRAWS) -> list[float]:
    random.seed(attempt * 7919 + n)  # deterministic: the suite never flakes on a draw
    return [backoff(attempt, base, cap, retry_after) for _ in range(n)]


@pytest.mark.parametrize(("attempt", "ceiling"), [
    (1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 16.0), (6, 32.0), (7, 60.0), (8, 60.0), (50, 60.0),
])
def test_delay_stays_between_base_and_the_attempts_ceiling(attempt: int, ceiling: float) -> None:
    """Attempt n waits between retry_base and base * 2**(n-1), capped at retry_max."""
    got = draws(attempt)
    assert min(got) >= 1.0 and max(got) <= ceiling
    if ceiling > 1.0:
        # full jitter: the draws reach close to both ends of the range
        span = ceiling - 1.0
        assert min(got) < 1.0 + 0.05 * span and max(got) > ceiling - 0.05 * span


def test_backoff_grows_with_each_attempt() -> None:
    """The mean delay roughly doubles per attempt until the cap, then stays there."""
    means = [statistics.fmean(draws(a)) for a in range(1, 10)]
    # uniform(1, 2**(a-1)): mean (1 + 2**(a-1)) / 2, within 10 % over 2000 draws
    for a, mean in enumerate(means[:6], 1):
        expected = (1 + 2 ** (a - 1)) / 2
        assert abs(mean - expected) <= 0.1 * expected, (a, mean, expected)
    assert all(later > earlier for earlier, later in itertools.pairwise(means[:7]))
    assert abs(means[7] - 30.5) < 3 and abs(means[8] - 30.5) < 3  # capped: uniform(1, 60)


def test_backoff_is_spread_not_fixed() -> None:
    """Draws for one attempt differ (jitter), spread over the range like a uniform draw."""
    got = draws(6)  # uniform(1, 32)
    assert len(set(got)) > DRAWS * 0.99
    stdev = statistics.pstdev(got)
    assert abs(stdev - 31 / 12 ** 0.5) < 1.0  # a uniform draw's spread, not a narrow one
    quarters = [sum(1 + 31 * q / 4 <= x < 1 + 31 * (q + 1) / 4 for x in got) for q in range(4)]
    assert all(abs(n - DRAWS / 4) < DRAWS * 0.05 for n in quarters), quarters


def test_first_attempt_waits_the_base() -> None:
    """After the first failure the wait is retry_base itself (nothing to spread yet)."""
    assert set(draws(1, base=0.5, cap=60.0, n=50)) == {0.5}
    assert set(draws(0, base=0.5, cap=60.0, n=50)) == {0.5}  # defensive: never below base


def test_cap_below_base_waits_the_base() -> None:
    """A retry_max below retry_base still waits retry_base."""
    assert set(draws(5, base=2.0, cap=1.0, n=50)) == {2.0}


@pytest.mark.parametrize("attempt", [64, 65, 1000, 10**6])
def test_huge_attempt_counts_do_not_overflow(attempt: int) -> None:
    """Thousands of attempts (a long TTL) stay capped instead of overflowing a float."""
    got = draws(attempt, n=200)
    assert 1.0 <= min(got) and max(got) <= 60.0 and max(got) > 50.0


def test_exponent_is_bounded_at_64() -> None:
    """Past 64 doublings the ceiling stops growing (a cap above 2**64 shows it)."""
    got = draws(200, base=1.0, cap=float("inf"), n=200)
    assert max(got) <= 2.0 ** 64 and max(got) > 2.0 ** 63


@pytest.mark.parametrize(("retry_after", "floor"), [(0.0, 1.0), (5.0, 5.0), (3600.0, 3600.0)])
def test_retry_after_is_a_floor_even_past_the_cap(retry_after: float, floor: float) -> None:
    """The provider's Retry-After is never undercut, and wins over retry_max."""
    got = draws(3, retry_after=retry_after, n=500)
    assert min(got) >= floor
    if retry_after < 1.0:
        assert max(got) > 3.0  # a small hint leaves the jitter alone
    if retry_after > 60.0:
        assert set(got) == {retry_after}
