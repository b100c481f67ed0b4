"""The per-number limiter with explicit times: sliding windows (each of several, the longer
one with the larger count included), countries and number types, forgetting a failed
enqueue, rebuilding from the outbox's rows, and pruning what no window needs."""

from __future__ import annotations

import re

import pytest

from hapsms_relay.errors import ConfigError
from hapsms_relay.kinds import KIND_SMS, KIND_VOICE
from hapsms_relay.limits import Limiter, LimitsConfig, Window, _span, parse
from hapsms_relay.table import Table

N = "+8613800138000"
OTHER = "+8613800138001"
T0 = 1_800_000_000.0
MIN, HOUR, DAY = 60.0, 3600.0, 86400.0


def limiter(sms: tuple[str, ...] = ("5/10m", "20/1d"), voice: tuple[str, ...] = ("3/10m",),
            **cfg: object) -> Limiter:
    return Limiter(LimitsConfig(sms=tuple(Window.parse(w) for w in sms),
                                voice=tuple(Window.parse(w) for w in voice), **cfg))  # type: ignore[arg-type]


def send(lim: Limiter, at: float, number: str = N, kind: int = KIND_SMS) -> str | None:
    """Check and, if allowed, take: what the guard does per recipient. The refusal's detail."""
    refusal = lim.check(kind, number, "CN", at)
    if refusal is not None:
        assert refusal.code == "rate_limited" and refusal.status == 429
        return refusal.detail
    lim.take(kind, number, at)
    return None


def test_short_window_refuses_the_sixth_and_reopens_as_it_slides() -> None:
    """5/10m: five pass, the sixth is refused; once the first is 10 minutes old one more passes."""
    lim = limiter()
    for i in range(5):
        assert send(lim, T0 + i) is None
    detail = send(lim, T0 + 5)
    assert detail == f"{N}: at most 5 sms messages per 10 minutes to one number (limits.sms 5/10m)"
    assert send(lim, T0 + 10 * MIN - 0.01) is not None  # the first is still inside
    assert send(lim, T0 + 10 * MIN + 0.01) is None  # it slid out: one more
    assert send(lim, T0 + 10 * MIN + 0.02) is not None


def test_longer_window_with_the_larger_count_fires() -> None:
    """5/10m and 20/1d: twenty spread out so the short window never fills, then the daily
    limit refuses the 21st, naming itself, until the first is a day old."""
    lim = limiter()
    for i in range(20):
        assert send(lim, T0 + i * 11 * MIN) is None, i
    at = T0 + 20 * 11 * MIN
    assert send(lim, at) == (f"{N}: at most 20 sms messages per 1 day to one number "
                             "(limits.sms 20/1d)")
    assert send(lim, T0 + DAY + 1) is None


def test_window_order_does_not_matter() -> None:
    """The day window listed first fires the same way."""
    lim = limiter(sms=("20/1d", "5/10m"))
    for i in range(20):
        assert send(lim, T0 + i * 11 * MIN) is None
    assert "20/1d" in (send(lim, T0 + 20 * 11 * MIN) or "")
    lim = limiter(sms=("20/1d", "5/10m"))
    for i in range(5):
        assert send(lim, T0 + i) is None
    assert "5/10m" in (send(lim, T0 + 5) or "")


def test_a_take_exactly_a_window_ago_is_outside_it() -> None:
    """A message sent exactly ``seconds`` ago no longer counts (the window is half open)."""
    lim = limiter(sms=("2/1m",))
    assert send(lim, T0) is None and send(lim, T0 + 1) is None
    assert send(lim, T0 + 59.999) is not None
    assert send(lim, T0 + 60) is None


def test_untake_from_the_middle_keeps_the_others() -> None:
    """Forgetting the middle one of three takes keeps the first and the last."""
    lim = limiter(sms=("3/1m",))
    for at in (T0, T0 + 1, T0 + 2):
        lim.take(KIND_SMS, N, at)
    lim.untake(KIND_SMS, N, T0 + 1)
    assert send(lim, T0 + 3) is None  # room for one
    assert send(lim, T0 + 4) is not None
    assert send(lim, T0 + 60.5) is None  # T0 slid out; T0 + 2 and T0 + 3 remain
    assert send(lim, T0 + 60.6) is not None


def test_prune_looks_at_a_numbers_newest_take() -> None:
    """A number is kept while its newest take is inside the longest window, whatever its
    older ones."""
    lim = limiter(sms=("3/1m",), voice=())
    for at in (T0, T0 + 30, T0 + 50):
        lim.take(KIND_SMS, N, at)
    assert lim.prune(T0 + 100) == 0  # newest 50 s old
    assert lim.prune(T0 + 110) == 1


def test_window_of_one() -> None:
    """1/30s: one message, then none until 30 s later."""
    lim = limiter(sms=("1/30s",))
    assert send(lim, T0) is None
    assert send(lim, T0 + 29.9) == (f"{N}: at most 1 sms messages per 30 seconds to one number "
                                    "(limits.sms 1/30s)")
    assert send(lim, T0 + 30.01) is None


def test_numbers_and_kinds_are_counted_apart() -> None:
    """Another number, or a voice code to the same one, has windows of its own."""
    lim = limiter()
    for i in range(5):
        assert send(lim, T0 + i) is None
    assert send(lim, T0 + 6) is not None
    assert send(lim, T0 + 6, OTHER) is None
    for i in range(3):
        assert send(lim, T0 + 7 + i, kind=KIND_VOICE) is None
    detail = send(lim, T0 + 11, kind=KIND_VOICE)
    assert detail == f"{N}: at most 3 voice messages per 10 minutes to one number (limits.voice 3/10m)"


def test_no_windows_no_limit() -> None:
    """An empty window list counts nothing and refuses nothing."""
    lim = limiter(sms=(), voice=())
    for i in range(100):
        assert send(lim, T0 + i * 0.001) is None
        assert send(lim, T0 + i * 0.001, kind=KIND_VOICE) is None


def test_untake_forgets_exactly_one_take() -> None:
    """A take whose enqueue failed is forgotten: the window has room for one more again."""
    lim = limiter(sms=("2/1m",))
    assert send(lim, T0) is None
    assert send(lim, T0 + 1) is None
    assert send(lim, T0 + 2) is not None
    lim.untake(KIND_SMS, N, T0 + 1)
    assert send(lim, T0 + 2) is None
    assert send(lim, T0 + 3) is not None
    lim.untake(KIND_SMS, N, T0 + 99)  # never taken: nothing changes
    assert send(lim, T0 + 3) is not None
    lim.untake(KIND_SMS, N, T0)
    lim.untake(KIND_SMS, N, T0 + 2)
    assert send(lim, T0 + 4) is None and send(lim, T0 + 5) is None  # both gone
    lim.untake(KIND_SMS, OTHER, T0)  # a number never seen
    lim.untake(KIND_SMS, N, T0 + 4)
    lim.untake(KIND_SMS, N, T0 + 5)
    assert lim.prune(T0 + 10) == 0  # nothing left held for N to prune


def test_untake_of_a_single_take_empties_the_number() -> None:
    """The only take of a number forgotten: it has a full window again."""
    lim = limiter(sms=("1/1m",))
    assert send(lim, T0 + 0.0004) is None
    lim.untake(KIND_SMS, N, T0 + 0.0004)
    assert send(lim, T0 + 1) is None


def test_load_rebuilds_windows_from_rows() -> None:
    """Rows read back at start count as the takes they were."""
    lim = limiter()
    rows = [(i, KIND_SMS, N, T0 + i) for i in range(5)] + [(9, KIND_VOICE, OTHER, T0)]
    assert lim.load(rows) == 6
    assert send(lim, T0 + 10) is not None
    assert send(lim, T0 + 10, OTHER) is None
    for i in range(2):
        assert send(lim, T0 + 11 + i, OTHER, KIND_VOICE) is None
    assert send(lim, T0 + 20, OTHER, KIND_VOICE) is not None


def test_prune_drops_only_numbers_no_window_needs() -> None:
    """Numbers whose newest take is older than the longest window are forgotten, in order,
    at most ``limit`` at a time; live numbers are kept and still limited."""
    lim = limiter(sms=("2/10m", "3/1h"), voice=())
    lim.take(KIND_SMS, "+8613800000001", T0)
    lim.take(KIND_SMS, "+8613800000002", T0 + 10)
    lim.take(KIND_SMS, N, T0 + 20)
    lim.take(KIND_SMS, N, T0 + 30)
    assert lim.prune(T0 + HOUR - 0.001) == 0  # the first is still inside the hour
    assert lim.prune(T0 + HOUR) == 1  # exactly an hour old: outside the window, as check() has it
    assert lim.prune(T0 + HOUR + 15, limit=5) == 1
    assert send(lim, T0 + HOUR + 15) is None  # N kept: one more in the hour
    assert send(lim, T0 + HOUR + 16) is not None
    assert lim.prune(T0 + 3 * HOUR, limit=0) == 0
    assert lim.prune(T0 + 3 * HOUR, limit=1) == 1
    assert lim.prune(T0 + 3 * HOUR) == 0


def test_prune_limit_counts_across_kinds() -> None:
    """The chunk limit of a prune covers SMS and voice numbers together."""
    lim = limiter(sms=("2/1m",), voice=("2/1m",))
    for i in range(3):
        lim.take(KIND_SMS, f"+861380000000{i}", T0)
        lim.take(KIND_VOICE, f"+861380000000{i}", T0)
    assert lim.prune(T0 + HOUR, limit=4) == 4
    assert lim.prune(T0 + HOUR) == 2


def test_retention_is_the_longest_window_or_a_day_with_a_budget() -> None:
    """The outbox keeps rows as long as the longest window, or a day when a budget counts."""
    assert limiter(sms=("5/10m",), voice=("3/2h",)).cfg.retention == 2 * HOUR
    assert limiter(sms=(), voice=()).cfg.retention == 0.0
    assert limiter(sms=("5/10m",), voice=(), daily_budget=10).cfg.retention == DAY
    assert limiter(sms=("1/2d",), voice=(), daily_budget=10).cfg.retention == 2 * DAY
    assert limiter(sms=(), voice=(), provider_budgets={"a": 1}).cfg.retention == DAY


@pytest.mark.parametrize(("text", "count", "seconds", "shown"), [
    ("5/10m", 5, 600.0, "5/10m"), ("20/1d", 20, 86400.0, "20/1d"), (" 3 / 30s", 3, 30.0, "3/30s"),
    ("1/500ms", 1, 0.5, "1/500ms"), ("100/1h", 100, 3600.0, "100/1h"),
])
def test_window_parse(text: str, count: int, seconds: float, shown: str) -> None:
    """COUNT/DURATION, spaces allowed; the text is kept (without spaces) for refusals."""
    assert Window.parse(text) == Window(count, seconds, shown)


@pytest.mark.parametrize("text", ["5", "0/10m", "-1/10m", "x/10m", "5:10m", "/10m"])
def test_window_parse_refuses(text: str) -> None:
    """Anything but a positive count, a slash and a duration is refused, quoting it."""
    with pytest.raises(ValueError, match=re.escape(f'COUNT/DURATION such as "5/10m"; got {text!r}')):
        Window.parse(text)


@pytest.mark.parametrize(("seconds", "text"), [
    (86400.0, "1 day"), (172800.0, "2 days"), (3600.0, "1 hour"), (7200.0, "2 hours"),
    (600.0, "10 minutes"), (60.0, "1 minute"), (90.0, "90 seconds"), (30.0, "30 seconds"),
    (0.5, "0.5 seconds"), (5400.0, "90 minutes"), (90000.0, "25 hours"),
])
def test_span_in_words(seconds: float, text: str) -> None:
    """A window's span as the refusal says it: the largest whole unit."""
    assert _span(seconds) == text


def test_country_rules() -> None:
    """allow_countries admits only its regions; deny_countries refuses its own; unknown regions
    are named as such."""
    lim = limiter(allow_countries=frozenset({"CN", "HK"}))
    assert lim.check(KIND_SMS, N, "CN", T0) is None
    assert lim.check(KIND_SMS, "+85291234567", "HK", T0) is None
    r = lim.check(KIND_SMS, "+12025550123", "US", T0)
    assert r is not None and (r.code, r.status) == ("country_not_allowed", 403)
    assert r.detail == "+12025550123: numbers in US are not allowed"
    r = lim.check(KIND_SMS, "+8823", "", T0)
    assert r is not None and r.detail == "+8823: numbers in an unknown region are not allowed"
    lim = limiter(deny_countries=frozenset({"US"}))
    assert lim.check(KIND_SMS, N, "CN", T0) is None
    r = lim.check(KIND_SMS, "+12025550123", "US", T0)
    assert r is not None and r.code == "country_not_allowed"


@pytest.mark.parametrize(("number", "region", "given", "refused"), [
    ("+19005550123", "US", "", "premium-rate"),
    ("+611300123456", "AU", "", "shared-cost"),
    ("+12025550123", "US", "", None),
    (N, "CN", "mobile", None),
    (N, "CN", "premium_rate", "premium-rate"),  # the type normalising found is trusted
])
def test_number_types(number: str, region: str, given: str, refused: str | None) -> None:
    """Denied number types are refused (403 number_type_not_allowed) naming the type."""
    r = limiter().check(KIND_SMS, number, region, T0, given)
    if refused is None:
        assert r is None
    else:
        assert r is not None and (r.code, r.status) == ("number_type_not_allowed", 403)
        assert r.detail == f"{number}: {refused} numbers are not allowed"


def test_number_types_beyond_the_special_ones() -> None:
    """A denied type that needs phonenumbers' full classification (mobile, fixed_line) works."""
    lim = limiter(deny_number_types=frozenset({"mobile"}))
    r = lim.check(KIND_SMS, N, "CN", T0)
    assert r is not None and r.detail == f"{N}: mobile numbers are not allowed"
    assert lim.check(KIND_SMS, "+861062345678", "CN", T0) is None  # a Beijing fixed line
    assert limiter(deny_number_types=frozenset()).check(KIND_SMS, "+19005550123", "US", T0) is None


def parse_limits(**table: object) -> LimitsConfig:
    return parse(Table(dict(table), "limits"), ["dev"])


@pytest.mark.parametrize(("table", "field", "value"), [
    ({"voice": ["1/1m"]}, "voice", (Window(1, 60.0, "1/1m"),)),
    ({"provider_budgets": {"dev": 1}}, "provider_budgets", {"dev": 1}),
    ({"daily_budget": 0}, "daily_budget", 0),
    ({"daily_segment_budget": 3}, "daily_segment_budget", 3),
    ({"provider_segment_budgets": {"dev": 2}}, "provider_segment_budgets", {"dev": 2}),
    ({"budget_warning": 1}, "budget_warning", 1.0),
    ({"idempotency_ttl": "1h"}, "idempotency_ttl", 3600.0),
    ({"max_numbers": 1}, "max_numbers", 1),
    ({"dedup_window": "0s"}, "dedup_window", 0.0),
    ({"sms": ["1/1m", "2/1h"]}, "sms", (Window(1, 60.0, "1/1m"), Window(2, 3600.0, "2/1h"))),
    ({"allow_countries": ["cn", "HK"]}, "allow_countries", frozenset({"CN", "HK"})),
    ({"deny_countries": ["us"]}, "deny_countries", frozenset({"US"})),
    ({"deny_number_types": ["mobile"]}, "deny_number_types", frozenset({"mobile"})),
    ({"deny_number_types": []}, "deny_number_types", frozenset()),
    ({"over_budget": "refuse"}, "over_budget", "refuse"),
    ({"over_budget": "hold"}, "over_budget", "hold"),
])
def test_limits_settings_are_read(table: dict[str, object], field: str, value: object) -> None:
    """Each [limits] setting is read under its own name, at the edge of what it allows."""
    assert getattr(parse_limits(**table), field) == value


@pytest.mark.parametrize(("table", "key", "says"), [
    ({"provider_budgets": {"dev": 0}}, "limits.provider_budgets.dev", "at least 1"),
    ({"provider_budgets": {"other": 5}}, "limits.provider_budgets.other", "unknown provider"),
    ({"daily_budget": -1}, "limits.daily_budget", ""),
    ({"daily_segment_budget": -1}, "limits.daily_segment_budget", "at least 0"),
    ({"provider_segment_budgets": {"dev": 0}}, "limits.provider_segment_budgets.dev", "at least 1"),
    ({"budget_warning": 0}, "limits.budget_warning", "between 0 and 1"),
    ({"budget_warning": 1.5}, "limits.budget_warning", "between 0 and 1"),
    ({"budget_warning": True}, "limits.budget_warning", "between 0 and 1"),
    ({"max_numbers": 0}, "limits.max_numbers", ""),
    ({"deny_number_types": ["premium"]}, "limits.deny_number_types",
     "unknown number type 'premium'; known: fixed_line, fixed_line_or_mobile, mobile,"),
    ({"allow_countries": ["CN"], "deny_countries": ["US"]}, "limits.deny_countries", "not both"),
    ({"allow_countries": ["XX"]}, "limits.allow_countries", "unknown region 'XX'"),
])
def test_limits_settings_refused(table: dict[str, object], key: str, says: str) -> None:
    """A [limits] setting out of range is refused, naming its key and what is wrong."""
    with pytest.raises(ConfigError) as err:
        parse_limits(**table)
    assert err.value.key == key and says in err.value.problem


def test_limits_defaults() -> None:
    """An empty [limits] table is the documented defaults, every one of them."""
    assert parse_limits() == LimitsConfig()


@pytest.mark.parametrize(("table", "key", "problem"), [
    ({"sms": ["5"]}, "limits.sms", "expected COUNT/DURATION such as \"5/10m\"; got '5'"),
    ({"allow_countries": ["CN"], "deny_countries": ["US"]}, "limits.deny_countries",
     "set allow_countries or deny_countries, not both"),
    ({"budget_warning": 2}, "limits.budget_warning",
     "expected a share between 0 and 1, such as 0.9"),
    ({"over_budget": "drop"}, "limits.over_budget", "must be one of 'hold', 'refuse'; got 'drop'"),
])
def test_limits_refusals_say_exactly_what_is_wrong(table: dict[str, object], key: str,
                                                   problem: str) -> None:
    """The whole message of a refused [limits] setting, as the operator reads it."""
    with pytest.raises(ConfigError) as err:
        parse_limits(**table)
    assert (err.value.key, err.value.problem) == (key, problem)
