"""Abuse limits on recipients: per-number sliding windows, countries and number types (the
types themselves are classified in ``numbers``).

Checks run in memory on the webhook's hot path. The windows are rebuilt at start from the
outbox itself (every accepted message is a row with its recipient and time), so a restart
resets nothing and the hot path writes nothing more than the enqueue already does.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import phonenumbers

from hapsms_relay.kinds import KIND_SMS, KIND_VOICE, kind_name
from hapsms_relay.numbers import NUMBER_TYPES, denied_type
from hapsms_relay.sketch import Sketch
from hapsms_relay.table import Table, parse_duration

RATE_LIMITED = "rate_limited"


@dataclass(frozen=True)
class Window:
    """At most ``count`` messages to one number in any ``seconds`` (sliding)."""

    count: int
    seconds: float
    text: str  # as configured, "5/10m", for the refusal's detail

    @classmethod
    def parse(cls, text: str) -> Window:
        count, sep, span = text.partition("/")
        if not sep or not count.strip().isdigit() or int(count) < 1:
            raise ValueError(f"expected COUNT/DURATION such as \"5/10m\"; got {text!r}")
        return cls(int(count), parse_duration(span), text.replace(" ", ""))


@dataclass(frozen=True)
class LimitsConfig:
    sms: tuple[Window, ...] = (Window(5, 600.0, "5/10m"), Window(20, 86400.0, "20/1d"))
    voice: tuple[Window, ...] = (Window(3, 600.0, "3/10m"),)
    allow_countries: frozenset[str] = frozenset()
    deny_countries: frozenset[str] = frozenset()
    deny_number_types: frozenset[str] = frozenset({"premium_rate", "shared_cost"})
    daily_budget: int = 0  # messages a day across providers; 0: no budget
    provider_budgets: Mapping[str, int] = field(default_factory=dict)
    daily_segment_budget: int = 0  # segments (billed SMS parts) a day; 0: no budget
    provider_segment_budgets: Mapping[str, int] = field(default_factory=dict)
    over_budget: str = "hold"  # "hold": keep in the outbox; "refuse": answer 429 / dead
    budget_warning: float = 0.9  # log budget_low once this share of a budget is used
    dedup_window: float = 10.0  # 0: off
    idempotency_ttl: float = 86400.0
    max_numbers: int = 500_000  # numbers the windows hold exactly; more go to a sketch

    @property
    def retention(self) -> float:
        """How long the outbox must keep accepted messages for these limits to hold."""
        spans = [w.seconds for w in (*self.sms, *self.voice)]
        if (self.daily_budget or self.provider_budgets or self.daily_segment_budget
                or self.provider_segment_budgets):
            spans.append(86400.0)
        return max(spans, default=0.0)


def _budgets(t: Table, key: str, known: set[str]) -> dict[str, int]:
    """A table of provider name -> budget (``provider_budgets``, ``provider_segment_budgets``)."""
    budgets: dict[str, int] = {}
    if t.has(key):
        bt = t.table(key)
        for name in list(bt.data):
            if name not in known:
                raise bt.error(name, f"unknown provider {name!r}")
            budgets[name] = bt.integer(name, min=1)
    return budgets


def parse(t: Table, providers: Iterable[str]) -> LimitsConfig:
    """The ``[limits]`` table; ``providers`` are the names a budget may refer to."""
    d = LimitsConfig()
    windows = {}
    for kind, default in (("sms", d.sms), ("voice", d.voice)):
        try:
            windows[kind] = tuple(
                Window.parse(s) for s in t.str_list(kind, [w.text for w in default])
            )
        except ValueError as exc:
            raise t.error(kind, str(exc)) from None
    allow = _regions(t, "allow_countries")
    deny = _regions(t, "deny_countries")
    if allow and deny:
        raise t.error("deny_countries", "set allow_countries or deny_countries, not both")
    types = frozenset(t.str_list("deny_number_types", sorted(d.deny_number_types)))
    for name in types - NUMBER_TYPES.keys():
        raise t.error("deny_number_types", f"unknown number type {name!r}; known: "
                      f"{', '.join(sorted(NUMBER_TYPES))}")
    known = set(providers)
    budgets, segment_budgets = (_budgets(t, key, known)
                                for key in ("provider_budgets", "provider_segment_budgets"))
    warning = t.raw("budget_warning", d.budget_warning)
    if not isinstance(warning, int | float) or isinstance(warning, bool) or not 0 < warning <= 1:
        raise t.error("budget_warning", "expected a share between 0 and 1, such as 0.9")
    cfg = LimitsConfig(
        sms=windows["sms"], voice=windows["voice"], allow_countries=allow, deny_countries=deny,
        deny_number_types=types,
        daily_budget=t.integer("daily_budget", 0, min=0),
        provider_budgets=budgets,
        daily_segment_budget=t.integer("daily_segment_budget", 0, min=0),
        provider_segment_budgets=segment_budgets,
        over_budget=t.choice("over_budget", ("hold", "refuse"), d.over_budget),
        budget_warning=float(warning),
        dedup_window=t.duration("dedup_window", "10s", positive=False),
        idempotency_ttl=t.duration("idempotency_ttl", "24h"),
        max_numbers=t.integer("max_numbers", d.max_numbers, min=1),
    )
    t.done()
    return cfg


def _regions(t: Table, key: str) -> frozenset[str]:
    regions = frozenset(r.upper() for r in t.str_list(key, []))
    for r in sorted(regions - phonenumbers.SUPPORTED_REGIONS):
        raise t.error(key, f"unknown region {r!r}; use ISO 3166 codes such as \"CN\"")
    return regions


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why one recipient gets no message: an error code, a status and which limit."""

    code: str
    status: int
    detail: str


class Limiter:
    """Countries, number types and sliding windows per (type, number)."""

    def __init__(self, cfg: LimitsConfig) -> None:
        self.cfg = cfg
        # kind -> number -> acceptance times, newest last, as many as the largest window
        # needs. A day of numbers is held (a million after a busy day, or a backlog), and
        # most got one message, so each costs as little as it can: the key is the number as
        # an int (32 bytes; its E.164 text is 63), a single time is a bare float and only
        # more make a tuple. Neither is work for the garbage collector (100,000 lists made
        # each full collection a 20-50 ms pause). Each map is ordered by the numbers' newest
        # time (take() moves a number to the end), so prune() stops at the first live one.
        self._log: dict[int, dict[int, float | tuple[float, ...]]] = {KIND_SMS: {}, KIND_VOICE: {}}
        self._tick = 0.0  # the latest time taken, shared by all takes in its millisecond
        # Past cfg.max_numbers numbers held, a new number's takes are counted in a sketch
        # per (kind, window span) instead (sketch.py: fixed memory, never under-counts), and
        # checks add its counts while one is live. Memory: the numbers held, at most
        # max_numbers, plus at most ~4.5 MiB per window.
        self._sketches: dict[tuple[int, float], Sketch] = {}
        self.sketched = False  # a sketch holds counts now (checks must look at it)
        self.overflowed = 0  # takes counted in a sketch since start

    @property
    def held(self) -> int:
        """Numbers whose windows are held exactly."""
        return len(self._log[KIND_SMS]) + len(self._log[KIND_VOICE])

    def check(self, kind: int, e164: str, region: str, now: float,
              number_type: str = "") -> Refusal | None:
        """Why ``e164`` may not get a message now, or None; ``number_type`` is its type if
        normalising already found it (numbers.py's fast path), else it is looked up."""
        cfg = self.cfg
        if (cfg.allow_countries and region not in cfg.allow_countries) or region in cfg.deny_countries:
            return Refusal("country_not_allowed", 403,
                           f"{e164}: numbers in {region or 'an unknown region'} are not allowed")
        if cfg.deny_number_types:
            if number_type:
                ntype = number_type if number_type in cfg.deny_number_types else None
            else:
                ntype = denied_type(cfg.deny_number_types, e164, region)
            if ntype is not None:
                return Refusal("number_type_not_allowed", 403,
                               f"{e164}: {ntype.replace('_', '-')} numbers are not allowed")
        key = _key(e164)
        held = self._log[kind].get(key)
        if self.sketched:
            return self._check_sketched(kind, e164, key, held, now)
        if held is not None:
            times = (held,) if isinstance(held, float) else held
            for w in self._windows(kind):
                if len(times) >= w.count and times[-w.count] > now - w.seconds:
                    return _rate_limited(kind, e164, w)
        return None

    def _check_sketched(self, kind: int, e164: str, key: int,
                        held: float | tuple[float, ...] | None, now: float) -> Refusal | None:
        """``check``'s windows while a sketch is live: what is held exactly plus the
        sketch's count (a number may be in both, if it was sketched and then held)."""
        times = () if held is None else (held,) if isinstance(held, float) else held
        for w in self._windows(kind):
            sketch = self._sketches.get((kind, w.seconds))
            extra = sketch.count(key, now) if sketch is not None else 0
            if sum(1 for t in times if t > now - w.seconds) + extra >= w.count:
                return _rate_limited(kind, e164, w)
        return None

    def _sketch(self, kind: int, seconds: float) -> Sketch:
        sketch = self._sketches.get((kind, seconds))
        if sketch is None:
            sketch = self._sketches[kind, seconds] = Sketch(seconds)
        return sketch

    def take(self, kind: int, e164: str, at: float) -> bool:
        """Count one message to ``e164`` at ``at`` (call in time order); False if it was
        counted in a sketch (``max_numbers`` reached)."""
        return self._take(kind, _key(e164), at)

    def _take(self, kind: int, key: int, at: float) -> bool:
        windows = self._windows(kind)
        if not windows:
            return True
        at = self._share(at)
        log = self._log[kind]
        # popped and added again: the map stays ordered by each number's newest time
        held = log.pop(key, None)
        if held is None:
            if len(log) + len(self._log[KIND_VOICE if kind == KIND_SMS else KIND_SMS]) \
                    >= self.cfg.max_numbers:
                for w in windows:
                    self._sketch(kind, w.seconds).add(key, at)
                self.sketched = True
                self.overflowed += 1
                return False
            log[key] = at
            return True
        size = max(w.count for w in windows)
        times = ((held,) if isinstance(held, float) else held) + (at,)
        log[key] = times[-size:] if size > 1 else at
        return True

    def untake(self, kind: int, e164: str, at: float) -> None:
        """Forget a ``take`` whose enqueue failed."""
        log = self._log[kind]
        key = _key(e164)
        at = _ceil_ms(at)
        held = log.get(key)
        times = (held,) if isinstance(held, float) else held
        if times is None and self.sketched:  # it may have gone to a sketch
            for w in self._windows(kind):
                sketch = self._sketches.get((kind, w.seconds))
                if sketch is not None:
                    sketch.add(key, at, -1)
            return
        if times is not None and at in times:
            i = times.index(at)
            left = times[:i] + times[i + 1:]
            if not left:
                del log[key]
            else:
                log[key] = left[0] if len(left) == 1 else left

    def load(self, rows: Iterable[tuple[int, int, str, float]]) -> int:
        """Rebuild the windows from (id, kind, recipient, accepted at) rows in time order."""
        n = 0
        for _, kind, recipient, at in rows:
            self._take(kind, _key(recipient), at)
            n += 1
        return n

    def prune(self, now: float, limit: int = 1 << 62) -> int:
        """Drop up to ``limit`` numbers whose newest message is older than every window
        (memory); return how many. The maps are ordered by newest time, so the scan ends at
        the first live number: the work is the expired numbers, not all those held."""
        cutoff = now - self.cfg.retention
        removed = 0
        for log in self._log.values():
            dead: list[int] = []
            for key, held in log.items():
                newest = held if isinstance(held, float) else held[-1]
                if newest > cutoff or removed + len(dead) >= limit:
                    break
                dead.append(key)
            for key in dead:
                del log[key]
            removed += len(dead)
        if self.sketched and not any(now < s.live_until for s in self._sketches.values()):
            self.sketched = False
            self._sketches.clear()  # their memory too, until the next overflow
        return removed

    def _share(self, at: float) -> float:
        """``at`` rounded up to the millisecond, as one float object per millisecond: a
        float per number held was 32 of its ~95 bytes, and at 15,000 posts/s fifteen share
        one. Rounding up keeps a window closed a little longer, never shorter."""
        t = _ceil_ms(at)
        if t != self._tick:
            self._tick = t
        return self._tick

    def _windows(self, kind: int) -> tuple[Window, ...]:
        return self.cfg.voice if kind == KIND_VOICE else self.cfg.sms if kind == KIND_SMS else ()




def _rate_limited(kind: int, e164: str, w: Window) -> Refusal:
    name = kind_name(kind)
    return Refusal(RATE_LIMITED, 429, f"{e164}: at most {w.count} {name} messages per "
                   f"{_span(w.seconds)} to one number (limits.{name} {w.text})")


def _ceil_ms(at: float) -> float:
    return math.ceil(at * 1000) / 1000


def _key(e164: str) -> int:
    """The number as an int: E.164 is "+" and digits, never a leading zero (unique)."""
    return int(e164)


def _span(seconds: float) -> str:
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            n = int(seconds // size)
            return f"{n} {unit}{'s' if n != 1 else ''}"
    return f"{seconds:g} seconds"
