"""The endpoints beside HAP's webhook: providers' delivery receipts and the status lookup.

``POST /receipts/<provider>[/<secret>]`` (GET too: Vonage can send DLRs as GET) takes a
vendor's receipts, guarded per endpoint (its ``allow_ips``, its path secret, the vendor's
signature) and writes them through the outbox. ``GET /messages/{id}`` answers an entry's
history to a bearer of an admin token (``server.admin_tokens``), never HAP's token; it is
off unless one is configured.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable, Mapping

import orjson
from aiohttp import web

from hapsms_relay import history, log
from hapsms_relay.clock import Clock
from hapsms_relay.config import Config
from hapsms_relay.door import AddressFilter
from hapsms_relay.errors import BadRequest, StorageError
from hapsms_relay.metrics import Metrics
from hapsms_relay.outbox import Outbox, State
from hapsms_relay.providers import Provider
from hapsms_relay.receipts import PREFIX, ReceiptConfig, ReceiptRequest, ReceiptSource, forged

MESSAGES = "/messages/"
JSON = "application/json"


class Receipts:
    """``/receipts/...``: one endpoint per provider with a ``receipts`` table."""

    def __init__(self, outbox: Outbox, metrics: Metrics, clock: Clock,
                 read_body: Callable[[web.BaseRequest, str | None], Awaitable[bytes]]) -> None:
        self.outbox = outbox
        self.metrics = metrics
        self.clock = clock
        self.read_body = read_body  # the webhook's: the same size limit and deadline
        self.sources: dict[str, tuple[ReceiptSource, ReceiptConfig, AddressFilter | None]] = {}

    def set_config(self, config: Config) -> None:
        self.sources = {
            name: (p, cfg, AddressFilter(cfg.allow_ips) if cfg.allow_ips else None)
            for name, p in config.providers.items()
            if isinstance(p, ReceiptSource) and (cfg := receipt_config(p)) is not None
        }

    async def __call__(self, request: web.BaseRequest, rest: str) -> web.Response:
        name, _, secret = rest.partition("/")
        found = self.sources.get(name)
        if found is None:
            raise BadRequest(404, "not_found", f"no receipt endpoint for {name!r}: receipts "
                             "are taken for providers with a receipts table")
        source, cfg, allowed = found
        if request.method not in ("POST", "GET"):
            raise BadRequest(405, "method_not_allowed", f"use POST for {PREFIX}{name}",
                             {"Allow": "POST, GET"})
        try:
            if allowed is not None and not allowed(request.remote):
                raise BadRequest(403, "forbidden", "this address may not post receipts "
                                 f"(providers.{name}.receipts.allow_ips)")
            if cfg.secret is not None and not cfg.secret_ok(secret):
                raise forged("wrong or missing secret in the path")
            if cfg.secret is None and secret:
                raise BadRequest(404, "not_found", f"the receipt endpoint is {PREFIX}{name}")
            body = await self.read_body(request, request.headers.get("Expect"))
            batch = source.parse_receipts(ReceiptRequest(
                request.method, request.raw_path, list(request.query.items()),
                request.content_type, body, request.headers, self.clock.time()))
        except BadRequest as exc:
            if exc.status in (400, 403):
                self.metrics.receipts_refused.labels(name, exc.code).inc()
                log.warning("receipt_refused", provider=name, error=exc.code, client=request.remote)
            raise
        for r in batch.receipts:
            now = self.clock.time()
            try:
                applied = await self.outbox.receipt(name, r, now)
            except StorageError as exc:  # the vendor pushes again later
                log.error("receipt_not_stored", provider=name, error=str(exc))
                raise BadRequest(503, "storage_unavailable", "the relay cannot write its "
                                 "outbox; retry later", {"Retry-After": "10"}) from None
            status = r.status if applied.outcome != "unknown" else "unknown"
            self.metrics.receipts.labels(name, status).inc()
            if applied.state == State.DELIVERED and applied.outcome == "changed":
                self.metrics.time_to_delivery.labels(name).observe(max(0.0, now - applied.sent_at))
            log.info("receipt", id=applied.id, provider=name, status=status, code=r.code or None,
                     ref=r.ref or None, outcome=applied.outcome,
                     state=applied.state.name.lower() if applied.state is not None else None)
        return web.Response(body=batch.answer, content_type=batch.content_type)


class Messages:
    """``GET /messages/{id}``: an entry's whole history, for admin tokens only."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self.digests: tuple[bytes, ...] = ()

    def set_config(self, config: Config) -> None:
        self.digests = tuple(hashlib.sha256(t.reveal().encode()).digest()
                             for t in config.server.admin_tokens)

    async def __call__(self, request: web.BaseRequest, rest: str) -> web.Response:
        if not self.digests:
            raise BadRequest(404, "not_found", "the status lookup is off: set "
                             "server.admin_tokens to turn it on")
        if request.method not in ("GET", "HEAD"):
            raise BadRequest(405, "method_not_allowed", "use GET for /messages/{id}",
                             {"Allow": "GET, HEAD"})
        self.authenticate(request.headers)
        if not rest.isdigit() or len(rest) > 19:
            raise BadRequest(404, "not_found", "no entry with that id")
        try:
            detail = await self.outbox.show(int(rest))
        except StorageError:
            raise BadRequest(503, "storage_unavailable", "the relay cannot read its outbox; "
                             "retry later", {"Retry-After": "10"}) from None
        if detail is None:
            raise BadRequest(404, "not_found", "no entry with that id (unknown, or cleaned up "
                             "after queue.keep_delivered)")
        show = request.query.get("show_numbers", "") in ("1", "true")
        return web.Response(body=orjson.dumps(history.detail_record(detail, show_numbers=show)),
                            content_type=JSON)

    def authenticate(self, headers: Mapping[str, str]) -> None:
        scheme, _, value = headers.get("Authorization", "").partition(" ")
        digest = hashlib.sha256(value.strip().encode("utf-8", "surrogateescape")).digest()
        ok = False
        for known in self.digests:  # no early exit: every token is compared
            ok |= hmac.compare_digest(digest, known)
        if scheme.lower() != "bearer" or not value or not ok:
            raise BadRequest(401, "unauthorized", "send Authorization: Bearer <admin token> "
                             "(server.admin_tokens; HAP's webhook token does not open this)",
                             {"WWW-Authenticate": "Bearer"})


def receipt_config(p: Provider) -> ReceiptConfig | None:
    config: ReceiptConfig | None = getattr(p, "receipt_config", None)
    return config
