"""A circuit breaker per provider: after ``failures`` consecutive calls that failed
transiently the provider is skipped for ``cool_off``; then one call goes through as a probe,
and its outcome closes the circuit or opens it again.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from hapsms_relay import log
from hapsms_relay.clock import SYSTEM, Clock
from hapsms_relay.errors import PermanentError, TransientError
from hapsms_relay.metrics import Metrics
from hapsms_relay.providers.base import Outcome, Sent
from hapsms_relay.table import Table

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
_GAUGE = {CLOSED: 0, OPEN: 1, HALF_OPEN: 2}


@dataclass(frozen=True)
class BreakerConfig:
    failures: int = 5  # 0: no breaker
    cool_off: float = 30.0


def parse(t: Table) -> BreakerConfig:
    cfg = BreakerConfig(t.integer("failures", 5, min=0), t.duration("cool_off", "30s"))
    t.done()
    return cfg


@dataclass
class _Circuit:
    failures: int = 0
    opened_at: float = 0.0  # monotonic; 0: closed
    probe_at: float = 0.0  # when the probe in flight started; 0: none
    last_error: str = ""  # the provider's last transient failure, "code: text"


_ANSWERED = (Sent, PermanentError)  # outcomes that show the provider is up


class Breakers:
    def __init__(self, cfg: BreakerConfig, metrics: Metrics, clock: Clock = SYSTEM) -> None:
        self.cfg = cfg
        self.clock = clock
        self.metrics = metrics
        # The one record of each circuit: its state is derived from it and the clock when
        # asked (allow, /readyz, a metrics scrape), so no copy of it can lag behind the
        # cool-off and disagree.
        self._circuits: dict[str, _Circuit] = {}

    def allow(self, name: str) -> float:
        """0 when a call to ``name`` may go now (a probe, if half open); else the seconds
        until it may be probed."""
        c = self._circuits.get(name)
        if c is None or not c.opened_at:
            return 0.0
        now = self.clock.monotonic()
        wait = c.opened_at + self.cfg.cool_off - now
        if wait > 0:
            return wait
        # half open: one probe at a time (a probe lost to a crash frees the slot after cool_off)
        if c.probe_at and now - c.probe_at < self.cfg.cool_off:
            return self.cfg.cool_off - (now - c.probe_at)
        c.probe_at = now
        return 0.0

    def record(self, name: str, outcomes: Sequence[Outcome]) -> None:
        """One call's outcomes: any answer (sent or refused) closes; all transient fails."""
        if self.cfg.failures <= 0:
            return
        c = self._circuits.get(name)
        if c is None:
            c = self._circuits[name] = _Circuit()
        elif not (c.failures or c.opened_at or c.probe_at) and outcomes \
                and type(outcomes[0]) is Sent:
            return  # the usual case: a closed circuit stays closed, nothing to change
        if any(isinstance(o, _ANSWERED) for o in outcomes):
            if c.opened_at:
                log.info("circuit_closed", provider=name)
            c.failures, c.opened_at, c.probe_at = 0, 0.0, 0.0
        elif outcomes and all(isinstance(o, TransientError) for o in outcomes):
            c.failures += 1
            last = outcomes[-1]
            assert isinstance(last, TransientError)
            c.last_error = f"{last.code}" + (f": {last.text}" if last.text else "")
            if c.opened_at or c.failures >= self.cfg.failures:
                if not c.opened_at or c.probe_at:
                    log.warning("circuit_open", provider=name, failures=c.failures,
                                cool_off_s=self.cfg.cool_off)
                c.opened_at, c.probe_at = self.clock.monotonic(), 0.0
        else:  # the provider could not carry these messages: says nothing of its health
            c.probe_at = 0.0

    def last_error(self, name: str) -> str:
        """The failure that kept the circuit open, for the reasons of messages it holds back."""
        c = self._circuits.get(name)
        return c.last_error if c is not None else ""

    def state(self, name: str) -> str:
        """closed, open, or half_open once the cool-off has passed (a probe may go)."""
        c = self._circuits.get(name)
        if c is None or not c.opened_at:
            return CLOSED
        if self.clock.monotonic() - c.opened_at >= self.cfg.cool_off:
            return HALF_OPEN
        return OPEN

    def states(self, names: Sequence[str]) -> dict[str, str]:
        return {n: self.state(n) for n in names}

    def track(self, names: Sequence[str]) -> None:
        """Show these providers' circuits in the metrics: each scrape reads ``state``."""
        for name in names:
            self.metrics.circuit.labels(name).set_function(functools.partial(self._gauge, name))

    def _gauge(self, name: str) -> float:
        return _GAUGE[self.state(name)]
