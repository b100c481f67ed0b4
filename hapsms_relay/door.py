"""The front door: connection limits, a header deadline, allowed addresses and TLS.

A slow or hostile client must not starve the others: connections past ``max_connections``
(or ``max_connections_per_client`` from one address) are closed at once, and a connection
that has not sent a complete request header within ``header_timeout`` is closed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
from typing import Any

from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestHandler

from hapsms_relay import log
from hapsms_relay.config import ServerConfig
from hapsms_relay.errors import BadRequest
from hapsms_relay.metrics import Metrics

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


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
    """aiohttp's connection handler, answering malformed HTTP in the relay's JSON."""

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
    """aiohttp's low-level server with per-connection limits (see the module docstring)."""

    def __init__(self, handler: Any, cfg: ServerConfig, metrics: Metrics, **kwargs: Any) -> None:
        # keepalive_timeout: an idle connection, or one dribbling its next request's header,
        # is closed after header_timeout as well. lingering_time: after an answer to a body
        # that was not read whole (413, 408), wait 1s (not aiohttp's 10s) for the rest.
        # auto_decompress off: the webhook refuses a Content-Encoding rather than decoding.
        super().__init__(handler, request_factory=self._request,
                         keepalive_timeout=cfg.header_timeout, lingering_time=1.0,
                         auto_decompress=False, **kwargs)
        self.cfg = cfg
        self.metrics = metrics
        self._clients: dict[RequestHandler, str] = {}
        self._per_client: dict[str, int] = {}
        self._waiting: dict[RequestHandler, asyncio.TimerHandle] = {}

    def __call__(self) -> RequestHandler:
        return _Handler(self, loop=self._loop, **self._kwargs)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        peer = transport.get_extra_info("peername")
        client = peer[0] if isinstance(peer, tuple) else ""
        self._clients[handler] = client
        n = self._per_client[client] = self._per_client.get(client, 0) + 1
        if len(self._clients) > self.cfg.max_connections:
            self.metrics.connections_refused.labels("max_connections").inc()
            self._loop.call_soon(handler.force_close)  # once aiohttp has set the connection up
        elif n > self.cfg.max_connections_per_client:
            self.metrics.connections_refused.labels("max_connections_per_client").inc()
            self._loop.call_soon(handler.force_close)
        else:
            self._waiting[handler] = self._loop.call_later(
                self.cfg.header_timeout, self._header_timeout, handler
            )

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        timer = self._waiting.pop(handler, None)
        if timer is not None:
            timer.cancel()
        client = self._clients.pop(handler, None)
        if client is not None:
            n = self._per_client[client] - 1
            if n:
                self._per_client[client] = n
            else:
                del self._per_client[client]

    def _header_timeout(self, handler: RequestHandler) -> None:
        if self._waiting.pop(handler, None) is not None:
            self.metrics.connections_refused.labels("header_timeout").inc()
            handler.force_close()

    def _request(self, message: Any, payload: Any, protocol: RequestHandler, writer: Any,
                 task: asyncio.Task[None]) -> web.BaseRequest:
        # a complete header arrived: the first request's deadline is met (later requests on
        # the connection are bounded by aiohttp's keepalive_timeout)
        timer = self._waiting.pop(protocol, None)
        if timer is not None:
            timer.cancel()
        return web.BaseRequest(message, payload, protocol, writer, task, self._loop)


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
