"""Prometheus metrics, on a registry of the relay's own (several relays can share a process)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)

PREFIX = "hapsms_relay"

# `*_created` series (one extra per label set) tell a scraper nothing it uses here.
disable_created_metrics()  # type: ignore[no-untyped-call]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # Prometheus' convention for what a target is: hapsms_relay_info{node, version} 1
        self.info = Info(PREFIX, "This relay: its node name (queue.node) and version",
                         registry=r)
        self.requests = Counter(
            f"{PREFIX}_requests", "Webhook requests answered, by HTTP status", ["status"],
            registry=r,
        )
        self.accepted = Counter(
            f"{PREFIX}_messages_accepted", "Messages accepted into the outbox", ["type"],
            registry=r,
        )
        self.sent = Counter(
            f"{PREFIX}_messages_sent", "Messages a provider accepted", ["provider", "type"],
            registry=r,
        )
        # the name of messages_sent before receipts; counted alike for one release
        self.delivered_deprecated = Counter(
            f"{PREFIX}_messages_delivered",
            "Deprecated: use messages_sent (this counts what a provider accepted)",
            ["provider", "type"], registry=r,
        )
        self.segments = Counter(
            f"{PREFIX}_segments", "Segments (billed SMS parts) of the messages sent",
            ["provider"], registry=r,
        )
        self.receipts = Counter(
            f"{PREFIX}_receipts", "Delivery receipts taken, by provider and status "
            "(delivered, undelivered, progress; unknown: no such entry, not stored)",
            ["provider", "status"], registry=r,
        )
        self.receipts_refused = Counter(
            f"{PREFIX}_receipts_refused", "Receipt requests refused (forged_receipt, "
            "invalid_receipt, forbidden)", ["provider", "error"], registry=r,
        )
        self.time_to_delivery = Histogram(
            f"{PREFIX}_delivery_seconds", "Time from sent to the receipt saying delivered",
            ["provider"], registry=r,
            buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600),
        )
        self.retried = Counter(
            f"{PREFIX}_messages_retried", "Delivery attempts that failed transiently",
            ["provider", "type"], registry=r,
        )
        self.dead = Counter(
            f"{PREFIX}_messages_dead", "Messages given up on (permanent failure or TTL)",
            ["provider", "type"], registry=r,
        )
        self.latency = Histogram(
            f"{PREFIX}_provider_latency_seconds", "Time a provider took to answer a send",
            ["provider"], registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.queue_depth = Gauge(
            f"{PREFIX}_queue_depth", "Messages in the outbox waiting to be sent: pending or in flight",
            registry=r,
        )
        self.queue_oldest_age = Gauge(
            f"{PREFIX}_queue_oldest_age_seconds", "Seconds since the oldest message counted in "
            "queue_depth was accepted (0: none)", registry=r,
        )
        # abuse protection and fault tolerance (limits, guard, breaker, budget, door)
        self.refused = Counter(
            f"{PREFIX}_recipients_refused", "Recipients refused by a limit, by error code",
            ["error"], registry=r,
        )
        self.duplicates = Counter(
            f"{PREFIX}_duplicates", "Bodies answered again without a second send", registry=r,
        )
        self.auth_failures = Counter(
            f"{PREFIX}_auth_failures", "Webhook requests with a missing or wrong token",
            registry=r,
        )
        self.aborted = Counter(
            f"{PREFIX}_requests_aborted", "Webhook requests whose client disconnected before "
            "the whole body arrived (nothing stored, not counted in requests_total)", registry=r,
        )
        self.connections_refused = Counter(
            f"{PREFIX}_connections_refused", "Connections closed by the front door, by reason",
            ["reason"], registry=r,
        )
        self.limits_numbers = Gauge(
            f"{PREFIX}_limits_numbers", "Numbers whose per-number windows are held exactly "
            "(at most limits.max_numbers)", registry=r,
        )
        self.limits_overflow = Counter(
            f"{PREFIX}_limits_overflow", "Messages to new numbers counted in the fixed-size "
            "sketch because limits.max_numbers numbers were held", registry=r,
        )
        self.circuit = Gauge(
            f"{PREFIX}_circuit_state", "Provider circuit breaker: 0 closed, 1 open, 2 half open",
            ["provider"], registry=r,
        )
        self.budget_remaining = Gauge(
            f"{PREFIX}_budget_remaining", "Messages left in today's budget (provider=all: overall)",
            ["provider"], registry=r,
        )
        self.budget_segments_remaining = Gauge(
            f"{PREFIX}_budget_segments_remaining",
            "Segments left in today's segment budget (provider=all: overall)",
            ["provider"], registry=r,
        )
        self._status_children: dict[int, Counter] = {}
        self._sent_children: dict[tuple[str, str], tuple[Counter, Counter, Counter]] = {}
        self._sent_pending: dict[tuple[str, str], list[int]] = {}  # not yet in the counters
        self._counts: dict[Counter, int] = {}  # not yet in the counters
        self._flush_due = False
        self._latency_children: dict[str, Histogram] = {}
        # labels() takes a lock and a dict lookup per call: the hot path keeps the children
        self.accepted_by_kind = {k: self.accepted.labels(k) for k in ("sms", "voice")}

    def request(self, status: int) -> None:
        child = self._status_children.get(status)
        if child is None:
            child = self._status_children[status] = self.requests.labels(str(status))
        self.count(child)

    def count(self, child: Counter, n: int = 1) -> None:
        """``child.inc(n)`` at the end of this turn of the event loop (or before a scrape):
        the hot path's counters, one locked increment per turn instead of per request."""
        pending = self._counts.get(child)
        self._counts[child] = n if pending is None else pending + n
        if pending is None and not self._flush_due:
            self._flush_soon()

    def _flush_soon(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._flush_due = True
        loop.call_soon(self.flush)

    def sent_to(self, provider: str, kind: str, segments: int) -> None:
        """One message sent. Counted here and added to the counters once per turn of the
        event loop (and before every scrape, see ``flush``): three counter increments, each
        under a lock, cost ~15,000 instructions per message."""
        counts = self._sent_pending.get((provider, kind))
        if counts is not None:
            counts[0] += 1
            counts[1] += segments
            return
        self._sent_pending[provider, kind] = [1, segments]
        if not self._flush_due:
            self._flush_soon()

    def flush(self) -> None:
        """Add what ``count`` and ``sent_to`` counted to the counters."""
        self._flush_due = False
        counts, self._counts = self._counts, {}
        for child, n in counts.items():
            child.inc(n)
        pending, self._sent_pending = self._sent_pending, {}
        for (provider, kind), (n, segments) in pending.items():
            children = self._sent_children.get((provider, kind))
            if children is None:
                children = self._sent_children[provider, kind] = (
                    self.sent.labels(provider, kind),
                    self.delivered_deprecated.labels(provider, kind),
                    self.segments.labels(provider))
            children[0].inc(n)
            children[1].inc(n)
            if segments:
                children[2].inc(segments)

    def provider_latency(self, provider: str) -> Histogram:
        child = self._latency_children.get(provider)
        if child is None:
            child = self._latency_children[provider] = self.latency.labels(provider)
        return child

    def track_queue(self, depth: Callable[[], float], oldest_age: Callable[[], float]) -> None:
        """The queue's gauges, read at each scrape."""
        self.queue_depth.set_function(depth)
        self.queue_oldest_age.set_function(oldest_age)
