"""Fake provider APIs on loopback: small aiohttp apps that record what they receive and
can be told to fail. The relay's real client talks to them; nothing is mocked."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import CIMultiDict


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: CIMultiDict[str]
    body: bytes
    at: float  # time.time() when the request arrived
    arrived: float = 0.0  # time.monotonic() then: the clock the relay measures windows on

    def json(self) -> Any:
        import orjson

        return orjson.loads(self.body)


@dataclass
class Reply:
    status: int = 200
    body: Any = field(default_factory=lambda: {"ok": True})
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Hang:
    """Answer only after ``seconds`` (past the client's timeout)."""

    seconds: float = 30.0


@dataclass
class Reset:
    """Drop the connection without answering."""


Action = Reply | Hang | Reset
Responder = Callable[[Recorded], Action | Awaitable[Action]]


class FakeAPI:
    """An HTTP API on 127.0.0.1:<random port>.

    ``script`` is consumed one action per request; when it is empty, ``respond`` decides
    (by default: 200 ``{"ok": true}``). ``delay`` slows every answer down. ``requests`` has
    every request received; ``accepted`` those answered with a 2xx; ``max_inflight`` is the
    most requests it was handling at once. ``hold(n)`` keeps requests waiting until ``n``
    are in flight at once: a test sees a client reach its concurrency, however slow the
    machine, instead of hoping a delay is long enough.
    """

    def __init__(self, respond: Responder | None = None) -> None:
        self.requests: list[Recorded] = []
        self.accepted: list[Recorded] = []
        self.script: deque[Action] = deque()
        self.respond = respond
        self.delay = 0.0
        self.inflight = 0
        self.max_inflight = 0
        self._gate: asyncio.Event | None = None
        self._hold = 0
        self._runner: web.AppRunner | None = None
        self.url = ""

    def hold(self, n: int) -> None:
        """Hold each request until ``n`` are in flight together; then let every one through."""
        self._hold, self._gate = n, asyncio.Event()

    async def start(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            if self._gate is not None:
                if self.inflight >= self._hold:
                    self._gate.set()
                await self._gate.wait()
            return await self._answer(request)
        finally:
            self.inflight -= 1

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        rec = Recorded(request.method, request.path, dict(request.query),
                       CIMultiDict(request.headers), await request.read(), time.time(),
                       time.monotonic())
        self.requests.append(rec)
        if self.script:
            action: Action = self.script.popleft()
        elif self.respond is not None:
            result = self.respond(rec)
            action = await result if asyncio.iscoroutine(result) else result  # type: ignore[assignment]
        else:
            action = Reply()
        if self.delay:
            await asyncio.sleep(self.delay)
        if isinstance(action, Reset):
            assert request.transport is not None
            request.transport.abort()
            raise asyncio.CancelledError  # nothing more can be written on this connection
        if isinstance(action, Hang):
            await asyncio.sleep(action.seconds)
            action = Reply()
        if 200 <= action.status < 300:
            self.accepted.append(rec)
        if isinstance(action.body, bytes | str):
            return web.Response(status=action.status, body=action.body, headers=action.headers)
        return web.json_response(action.body, status=action.status, headers=action.headers)
