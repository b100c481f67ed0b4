"""The front door: allowed addresses, connection limits, a header deadline, TLS, and the
drain that closes every connection on stop without losing a request.

Admission happens when a connection is made, before it takes a slot: an address outside
``allow_ips`` is closed at once. A slow or hostile client must not starve the others: past
``max_connections_per_client`` from one address a new connection is closed; when all
``max_connections`` are taken, the longest idle connection of the address holding the most
is closed to make room (only when every connection has a request in progress is the new
one refused); and a connection that has not sent a complete request header within
``header_timeout`` is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestHandler

from hapsms_relay import log
from hapsms_relay.config import ServerConfig
from hapsms_relay.errors import BadRequest
from hapsms_relay.metrics import Metrics

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# While stopping, a kept-alive connection is closed once it has been quiet this long (no
# request in progress, no byte received): a client still posting on it sends its next
# request sooner, and that request is served (with Connection: close) rather than raced.
DRAIN_QUIET = 1.0


# What was wrong with a request the parser refused, by aiohttp's exception class (most
# specific first). Never the parser's own message: it quotes the offending line, and that
# line may be an Authorization header holding a valid token.
_MALFORMED: tuple[tuple[type[BaseException], str], ...] = (
    (http_exceptions.LineTooLong, "a line of the request is too long"),
    (http_exceptions.BadHttpMethod, "bad method"),
    (http_exceptions.BadStatusLine, "bad request line"),
    (http_exceptions.InvalidHeader, "bad header"),
    (http_exceptions.InvalidURLError, "bad URL"),
    (http_exceptions.TransferEncodingError, "bad Transfer-Encoding"),
    (http_exceptions.ContentLengthError, "bad Content-Length"),
    (http_exceptions.BadHttpMessage, "bad header or framing"),
)


def malformed(exc: BaseException | None) -> str:
    """A fixed description of what the parser refused, which quotes nothing the client sent."""
    for cls, text in _MALFORMED:
        if isinstance(exc, cls):
            return "malformed HTTP request: " + text
    return "malformed HTTP request"


class _Handler(RequestHandler):
    """aiohttp's handler of one connection: admitted by the door when the connection is
    made, and answering malformed HTTP in the relay's JSON."""

    def __init__(self, door: Door, **kwargs: Any) -> None:
        super().__init__(door, loop=door.loop, **kwargs)
        self.door = door
        self.admitted = False
        self.quiet_since = door.loop.time()  # the last byte in or answer out (for the drain)

    def data_received(self, data: bytes) -> None:
        self.quiet_since = self.door.loop.time()  # part of a request counts as busy
        super().data_received(data)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio's protocol callback, before aiohttp sets the connection up: a refused one
        # is closed here and never takes a slot, a task or a header timer
        if self.door.admit(self, transport):
            self.admitted = True
            super().connection_made(transport)
        else:
            transport.close()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.admitted:
            self.admitted = False
            self.door.release(self)
            super().connection_lost(exc)

    def handle_error(self, request: web.BaseRequest, status: int = 500,
                     exc: BaseException | None = None, message: str | None = None,
                     ) -> web.StreamResponse:
        # Only HTTP the parser rejects gets here (the relay's handler catches its own errors);
        # debug level: anyone can send garbage, and it must not flood the journal. Neither
        # the line nor the answer carries ``message`` (see _MALFORMED).
        log.debug("bad_http_request", client=request.remote, status=status,
                  error=type(exc).__name__ if exc is not None else None)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started")
        if status < 500:
            error = BadRequest(status, "bad_request", malformed(exc))
        else:
            error = BadRequest(status, "internal_error", "the relay failed; see its log")
        resp = web.Response(status=status, content_type="application/json", body=error.body())
        resp.force_close()
        return resp


class Door(web.Server):
    """aiohttp's low-level server with the relay's admission (see the module docstring).

    aiohttp has no public hook for either job, so this reaches into it in two places, and
    setup.cfg pins aiohttp's major version for them: ``__call__`` (the protocol factory
    loop.create_server calls) makes ``_Handler``, a ``RequestHandler`` subclass overriding
    ``handle_error`` (the answer to what the parser refuses) and asyncio's
    ``connection_made``/``connection_lost``. Everything else is public: the handler's
    keyword arguments, ``request.protocol``, and the request handler, wrapped to know which
    connections are idle.
    """

    def __init__(self, handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]],
                 cfg: ServerConfig, metrics: Metrics) -> None:
        self.loop = asyncio.get_running_loop()
        super().__init__(self._serve, loop=self.loop)
        self._handler = handler
        self.metrics = metrics
        self.draining = False
        self._drained: asyncio.Event | None = None
        self._clients: dict[RequestHandler, str] = {}
        self._per_client: dict[str, int] = {}
        # Connections waiting for a request (a first one, or the next on a kept-alive
        # connection), per address, the longest idle first: what a full door closes.
        self._idle: dict[str, dict[RequestHandler, None]] = {}
        self._header_timers: dict[RequestHandler, asyncio.TimerHandle] = {}
        self.set_config(cfg)

    def set_config(self, cfg: ServerConfig) -> None:
        """Limits and allowed addresses (reload): connections from addresses no longer
        allowed are closed, a request in progress first."""
        self.cfg = cfg
        self.allowed = AddressFilter(cfg.allow_ips) if cfg.allow_ips else None
        # keepalive_timeout: an idle connection, or one dribbling its next request's header,
        # is closed after header_timeout as well. lingering_time: after an answer to a body
        # that was not read whole (413, 408), wait 1s (not aiohttp's 10s) for the rest.
        # auto_decompress off: the webhook refuses a Content-Encoding rather than decoding.
        self._handler_args: dict[str, Any] = {
            "keepalive_timeout": cfg.header_timeout, "lingering_time": 1.0,
            "auto_decompress": False,
        }
        if self.allowed is not None:
            for handler, client in list(self._clients.items()):
                if not self.allowed(client):
                    self.metrics.connections_refused.labels("allow_ips").inc()
                    self._close(handler, client)

    def __call__(self) -> _Handler:
        return _Handler(self, **self._handler_args)

    def admit(self, handler: RequestHandler, transport: asyncio.BaseTransport) -> bool:
        """Whether a new connection may stay: its address is allowed, and there is a slot
        for it (an idle connection is closed to make one when the door is full)."""
        peer = transport.get_extra_info("peername")
        client = peer[0] if isinstance(peer, tuple) else ""
        refused = self.metrics.connections_refused
        if self.allowed is not None and not self.allowed(client):
            refused.labels("allow_ips").inc()
            return False
        n = self._per_client.get(client, 0)
        if n >= self.cfg.max_connections_per_client:
            refused.labels("max_connections_per_client").inc()
            return False
        if len(self._clients) >= self.cfg.max_connections and not self._evict():
            refused.labels("max_connections").inc()
            return False
        self._clients[handler] = client
        self._per_client[client] = n + 1
        self._idle.setdefault(client, {})[handler] = None
        self._header_timers[handler] = self.loop.call_later(
            self.cfg.header_timeout, self._header_timeout, handler)
        return True

    def _evict(self) -> bool:
        """Close an idle connection to make room: of the address holding the most
        connections, the longest idle; False if every connection has a request going."""
        victim, most = "", 0
        for client, idle in self._idle.items():
            if idle and self._per_client[client] > most:
                victim, most = client, self._per_client[client]
        if not most:
            return False
        self.metrics.connections_refused.labels("idle_evicted").inc()
        self._close(next(iter(self._idle[victim])), victim)
        return True

    def _close(self, handler: RequestHandler, client: str) -> None:
        idle = handler in self._idle.get(client, ())
        self.release(handler)
        if idle:
            handler.force_close()  # as aiohttp's keep-alive timeout closes an idle one
        else:
            handler.close()  # after the request in progress

    def release(self, handler: RequestHandler) -> None:
        """Forget a connection (closed, or being closed by the door): its slot is free."""
        timer = self._header_timers.pop(handler, None)
        if timer is not None:
            timer.cancel()
        client = self._clients.pop(handler, None)
        if client is None:
            return
        idle = self._idle[client]
        idle.pop(handler, None)
        n = self._per_client[client] - 1
        if n:
            self._per_client[client] = n
        else:
            del self._per_client[client]
            del self._idle[client]
        if self._drained is not None and not self._clients:
            self._drained.set()

    def _header_timeout(self, handler: RequestHandler) -> None:
        if self._header_timers.pop(handler, None) is not None:
            self.metrics.connections_refused.labels("header_timeout").inc()
            handler.force_close()

    async def _serve(self, request: web.BaseRequest) -> web.StreamResponse:
        # A complete header arrived: the first request's deadline is met (later ones on the
        # connection are bounded by aiohttp's keepalive_timeout), and the connection is busy
        # until the handler is done, then idle again.
        protocol = request.protocol
        timer = self._header_timers.pop(protocol, None)
        if timer is not None:
            timer.cancel()
        client = self._clients.get(protocol)
        idle = self._idle.get(client) if client is not None else None
        if idle is not None:
            idle.pop(protocol, None)
        try:
            response = await self._handler(request)
        finally:
            if idle is not None and protocol in self._clients:
                idle[protocol] = None
            if isinstance(protocol, _Handler):
                protocol.quiet_since = self.loop.time()
        if self.draining:
            response.force_close()  # Connection: close; aiohttp closes once it is sent
        return response

    # -- stopping ---------------------------------------------------------------------------

    async def drain(self, timeout: float) -> None:
        """Close every connection without dropping a request, within ``timeout`` seconds.

        Call it once the listener is closed (under socket activation new connections then
        wait in the kernel's backlog for the next process). Until a connection closes, its
        requests are served as usual, each answered with ``Connection: close`` and the
        connection closed after it. A connection with nothing in progress is closed once it
        has been quiet for ``DRAIN_QUIET``: one that was just used is likely to carry a
        request any moment, which is then served instead of crossing our close on the wire;
        one quiet for longer is closed at once (its client's next request is as likely now
        as later). Whatever remains after ``timeout`` is left to the caller.
        """
        self.draining = True
        if not self._clients:
            return
        self._drained = asyncio.Event()
        for handler in list(self._clients):
            if isinstance(handler, _Handler):
                self._close_when_quiet(handler)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained.wait(), timeout)

    def _close_when_quiet(self, handler: _Handler) -> None:
        client = self._clients.get(handler)
        if client is None or handler not in self._idle.get(client, ()):
            return  # closed already, or a request is in progress: its answer closes it
        wait = handler.quiet_since + DRAIN_QUIET - self.loop.time()
        if wait > 0:
            self.loop.call_later(wait, self._close_when_quiet, handler)
        else:
            self._close(handler, client)


class AddressFilter:
    """``server.allow_ips``: whether a client address may use the relay (cached per address)."""

    def __init__(self, cidrs: tuple[str, ...]) -> None:
        self.networks: tuple[_Network, ...] = tuple(
            ipaddress.ip_network(c, strict=False) for c in cidrs
        )
        self._cache: dict[str | None, bool] = {}

    def __call__(self, remote: str | None) -> bool:
        ok = self._cache.get(remote)
        if ok is None:
            if len(self._cache) > 4096:
                self._cache.clear()
            ok = self._cache[remote] = self._check(remote)
        return ok

    def _check(self, remote: str | None) -> bool:
        try:
            addr = ipaddress.ip_address((remote or "").split("%")[0])
        except ValueError:
            return False  # a unix socket or no address: only an empty allow list admits it
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in n for n in self.networks)


def tls_context(cfg: ServerConfig) -> ssl.SSLContext | None:
    """A server TLS context for ``tls_cert``/``tls_key``, or None when TLS is off."""
    if not cfg.tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    load_certificate(ctx, cfg)
    return ctx


def load_certificate(ctx: ssl.SSLContext, cfg: ServerConfig) -> None:
    """(Re)load the certificate: new handshakes use it, open connections keep theirs."""
    try:
        ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise OSError(f"cannot load server.tls_cert {cfg.tls_cert} / server.tls_key "
                      f"{cfg.tls_key}: {exc}") from None
