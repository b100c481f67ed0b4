"""Test helpers: a TOML writer for configs, polling with a deadline, a relay on a real socket."""

from __future__ import annotations

import asyncio
import re
import socket
import time
import tomllib
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from hapsms_relay import config, storage
from hapsms_relay.clock import SYSTEM, Clock
from hapsms_relay.config import QueueConfig
from hapsms_relay.kinds import KIND_SMS
from hapsms_relay.outbox import SENT_STATES, NewEntry, Outbox, Row, Sending, State
from hapsms_relay.relay import Relay
from hapsms_relay.webhook import Webhook

TOKEN = "test-token-5f2c"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TOKEN2 = "rotated-token-81a9"
API_KEY = "api-key-c0ffee-7e1d"
PG_PASSWORD = "pg-secret-4d2e"  # in queue.url (the test server's trust authentication ignores it)
#: Every secret the suite configures: none may appear in any log line the suite produces.
SECRETS = (TOKEN, TOKEN2, API_KEY, PG_PASSWORD, "env-secret-3a1b", "file-secret-77d0", "cred-secret-9e42",
           "k-123")
# A phone number unmasked: E.164, or a bare CN mobile (ids are 16 digits, not matched).
_NUMBER = re.compile(r"\+\d{7,}|(?<!\d)1[3-9]\d{9}(?!\d)")


def leaked(line: str) -> bool:
    """Whether a log line shows a secret of the suite or a phone number in full."""
    return any(s in line for s in SECRETS) or _NUMBER.search(line) is not None

SMS_BODY = {"Type": 1, "Data": {"Mobiles": ["13800138000"], "Message": "您的验证码是123456，感谢您的使用！",
                                "Signature": "明道云"}}
VOICE_BODY = {"Type": 2, "Data": {"Mobile": "13800138000", "Code": "123456"}}


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def _key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() and k.isascii() else _toml_value(k)


def to_toml(doc: Mapping[str, Any]) -> str:
    """Top-level tables and arrays of tables become sections; anything deeper is inline."""
    lines: list[str] = []
    for k, v in doc.items():
        if not isinstance(v, Mapping | list) or (isinstance(v, list) and not all(
                isinstance(x, Mapping) for x in v)) or v == []:
            lines.append(f"{_key(k)} = {_toml_value(v)}")
    for k, v in doc.items():
        if isinstance(v, Mapping):
            lines.append(f"\n[{k}]")
            lines += [f"{_key(a)} = {_toml_value(b)}" for a, b in v.items()]
        elif isinstance(v, list) and v and all(isinstance(x, Mapping) for x in v):
            for item in v:
                lines.append(f"\n[[{k}]]")
                lines += [f"{_key(a)} = {_toml_value(b)}" for a, b in item.items()]
    text = "\n".join(lines) + "\n"
    tomllib.loads(text)  # the writer must produce what the loader reads
    return text


def base_config(tmp_path: Path, **sections: Any) -> dict[str, Any]:
    """A valid config: loopback, TOKEN, an outbox in tmp_path, the file provider; override freely."""
    doc: dict[str, Any] = {
        "server": {"listen": "127.0.0.1:0", "tokens": [TOKEN]},
        "queue": {"path": str(tmp_path / "outbox.db"), "retry_base": "50ms", "retry_max": "200ms"},
        "providers": [{"name": "dev", "type": "file", "path": str(tmp_path / "sent.jsonl")}],
        "routes": {"sms": ["dev"]},
        # per-number windows and dedup off: most tests post the same body many times; the
        # limits tests (test_limits.py) switch them on
        "limits": {"sms": [], "voice": [], "dedup_window": "0s"},
    }
    for name, value in sections.items():
        if isinstance(value, Mapping) and isinstance(doc.get(name), Mapping):
            doc[name] = {**doc[name], **value}
        else:
            doc[name] = value
    return doc


def http_provider(name: str, url: str, **settings: Any) -> dict[str, Any]:
    """A generic ``http`` provider posting ``{"to", "text", "ref"}`` as JSON to ``url``."""
    return {"name": name, "type": "http", "url": url + "/send",
            "body": {"to": "{to}", "text": "{message}", "ref": "{id}"}, **settings}


async def outbox_rows(path: str | Path) -> list[Row]:
    """Every outbox entry, oldest first, read through the admin interface on a connection
    of its own, beside the relay (what ``queue list`` sees)."""
    admin = storage.outbox(QueueConfig(path=str(path)), admin=True)
    await admin.open()
    try:
        return (await admin.list(None, 1_000_000))[::-1]
    finally:
        await admin.close()


async def outbox_states(path: str | Path) -> list[State]:
    return [r.state for r in await outbox_rows(path)]


def write_config(tmp_path: Path, doc: Mapping[str, Any], name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(to_toml(doc), encoding="utf-8")
    return path


class Book:
    """A ``History`` (what ``enqueue_checked``'s admission loads) that keeps the rows."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, int, str, float]] = []

    def load(self, rows: Iterable[tuple[int, int, str, float]]) -> None:
        self.rows.extend(rows)


def sms_entry(n: int, text: str = "hi") -> NewEntry:
    """Entry ``n`` of an SMS body, as the webhook makes it: a number of its own (139 and n)."""
    national = f"139{n:08d}"
    return NewEntry(KIND_SMS, "+86" + national, "CN", national, text, "Acme")


def sending(ids: Sequence[int]) -> list[Sending]:
    """What ``Queue.sent`` takes for entries sent without ids or segments."""
    return [Sending(i, (), 0, 0.0) for i in ids]


async def eventually(
    predicate: Callable[[], bool | Awaitable[bool]],
    timeout: float = 15.0,
    what: str = "condition",
    settled: Callable[[], bool] | None = None,
) -> None:
    """Poll ``predicate`` until true; fail with ``what`` after ``timeout`` seconds, or at
    once when ``settled`` said, just before ``predicate`` was read, that nothing can move
    until the test acts (everything under test waits on the test's ManualClock or a gate):
    what was read then is final. ``settled`` may raise to fail the wait itself."""
    deadline = time.monotonic() + timeout
    while True:
        still = settled is not None and settled()
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if still:
            raise AssertionError(f"settled without {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


class RunningRelay:
    """A Relay started in this process on a real loopback socket."""

    def __init__(self, relay: Relay, url: str) -> None:
        self.relay = relay
        self.url = url
        self.webhook_url = url + relay.config.server.path

    async def post(
        self, session: aiohttp.ClientSession, body: Any, headers: Mapping[str, str] | None = None
    ) -> tuple[int, Any]:
        async with session.post(self.webhook_url, json=body, headers=dict(headers or AUTH)) as r:
            return r.status, await r.json(content_type=None)

    async def settled(self, *, sent: int = 0, dead: int = 0) -> None:
        """Wait until the outbox holds this many sent and this many dead entries."""

        async def reached() -> bool:
            s = await self.relay.outbox.stats()
            return (s.sent, s.dead) == (sent, dead)

        await eventually(reached, what=f"{sent} sent and {dead} dead entries")

    async def caught_up(self) -> None:
        """Wait until the relay has done all that is due by its clock's time: nothing in
        flight and every pending entry due later (how a test moving a ManualClock knows the
        relay has reacted before it moves the clock again)."""
        from hapsms_relay.outbox import State

        async def idle() -> bool:
            if self.relay.dispatcher.inflight or (await self.relay.outbox.stats()).inflight:
                return False
            now = self.relay.clock.time()
            return all(r.due > now for r in await self.relay.outbox.list(State.PENDING, 10_000))

        await eventually(idle, what="the relay to catch up with its clock")

    async def stop(self) -> None:
        await self.relay.stop()


def webhook_of(doc: Mapping[str, Any]) -> Webhook:
    """The webhook of a relay built from ``doc`` and not started (nothing opened), for
    tests of its checks behind a server of their own."""
    return Relay(config.parse(tomllib.loads(to_toml(doc)))).webhook


async def start_relay(doc: Mapping[str, Any], *, paused: bool = False,
                      outbox: Outbox | None = None, clock: Clock = SYSTEM) -> RunningRelay:
    cfg = config.parse(tomllib.loads(to_toml(doc)))
    relay = Relay(cfg, paused=paused, outbox=outbox, clock=clock)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    await relay.start(sock)
    host, port = sock.getsockname()[:2]
    return RunningRelay(relay, f"http://{host}:{port}")


async def settled(relay: RunningRelay, ids: list[str], timeout: float = 15.0) -> dict[str, Any]:
    """Wait until every entry of ``ids`` is sent (or further) or dead; its outbox row by id."""
    wanted = {int(i) for i in ids}
    found: dict[str, Any] = {}

    async def done() -> bool:
        rows = await relay.relay.outbox.list(None, 10_000)
        found.clear()
        found.update({str(r.id): r for r in rows if r.id in wanted
                      and r.state in (*SENT_STATES, State.DEAD)})
        return len(found) == len(wanted)

    await eventually(done, timeout, what=f"entries {sorted(wanted)} sent or dead")
    return found


async def post_settled(relay: RunningRelay, session: aiohttp.ClientSession, body: Any) -> list[Any]:
    """POST a HAP body (it must be accepted) and wait for its entries to be sent or dead;
    their outbox rows, in the order of the answer's ids."""
    status, answer = await relay.post(session, body)
    assert status == 200, answer
    rows = await settled(relay, answer["ids"])
    return [rows[i] for i in answer["ids"]]
