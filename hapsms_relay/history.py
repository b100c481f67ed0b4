"""An entry's story as operators read it: one JSON-ready record for ``queue show``,
``queue find`` and ``GET /messages/{id}``, numbers masked as in the logs unless asked."""

from __future__ import annotations

import time
from typing import Any

from hapsms_relay import log
from hapsms_relay.kinds import kind_name
from hapsms_relay.outbox import Detail, Event, Row


def when(t: float) -> str | None:
    """A time as ISO 8601 in UTC with milliseconds, or None for "not yet"."""
    if not t:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def row_record(r: Row, *, show_numbers: bool = False) -> dict[str, Any]:
    """What ``queue list`` and ``queue find`` print for an entry."""
    return {
        "id": str(r.id), "type": kind_name(r.kind),
        "to": r.recipient if show_numbers else log.mask(r.recipient),
        "state": r.state.name.lower(), "accepted_at": when(r.created),
        "attempts": r.attempts, "provider": r.provider, "error": r.error,
    }


def event_record(e: Event) -> dict[str, Any]:
    record: dict[str, Any] = {"at": when(e.at), "event": e.kind, "provider": e.provider}
    if e.status:
        record["status"] = e.status
    if e.code:
        record["code"] = e.code
    if e.text:
        record["text" if e.kind != "sent" else "provider_ids"] = e.text
    if e.part and e.part != e.text:
        record["part"] = e.part
    if e.latency is not None:
        record["latency_ms"] = round(e.latency * 1000, 1)
    return record


def detail_record(d: Detail, *, show_numbers: bool = False) -> dict[str, Any]:
    """The whole history: accepted at, each attempt (provider, outcome, latency), sent at,
    the provider's message ids, the receipt's status and time, the error."""
    record = row_record(d.row, show_numbers=show_numbers)
    record.update({
        "sent_at": when(d.sent_at), "provider_ids": list(d.refs), "segments": d.segments,
        "receipt": d.receipt or None, "receipt_at": when(d.receipt_at),
        "history": [event_record(e) for e in d.events],
    })
    return record
