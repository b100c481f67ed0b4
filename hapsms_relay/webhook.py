"""The hot path: HAP's webhook in, validation, durable enqueue, JSON response out.

Served by aiohttp's low-level server: one handler dispatches through one table of path ->
handler (and of path prefixes: receipts, the status lookup, in ``endpoints``), so every
answer, 404 and 405 included, is the relay's JSON and nothing is routed twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson
from aiohttp import HttpVersion10, HttpVersion11, web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from hapsms_relay import log
from hapsms_relay.clock import SYSTEM, Clock
from hapsms_relay.config import Config
from hapsms_relay.endpoints import MESSAGES, Messages, Receipts
from hapsms_relay.errors import BadRequest, ClientGone, StorageError
from hapsms_relay.guard import Admitter
from hapsms_relay.kinds import KIND_SMS, KIND_VOICE, kind_name
from hapsms_relay.metrics import Metrics
from hapsms_relay.numbers import InvalidNumber, Number, normalise
from hapsms_relay.outbox import NewEntry, Outbox
from hapsms_relay.receipts import PREFIX as RECEIPTS

JSON = "application/json"
IDEMPOTENCY_KEY = "Idempotency-Key"
_SIGNATURE_BRACKETS = (("【", "】"), ("[", "]"))
_PROBES = frozenset(("/healthz", "/readyz", "/metrics"))
_HTTP_VERSIONS = frozenset((HttpVersion10, HttpVersion11))
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

#: a handler of the endpoint table: the request, and the path after a prefix ("" for a path)
Handler = Callable[[web.BaseRequest, str], Awaitable[web.StreamResponse]]


def error_response(exc: BadRequest) -> web.Response:
    return web.Response(status=exc.status, body=exc.body(), content_type=JSON,
                        headers=exc.headers)


class Webhook:
    """The request handler of the relay's HTTP server."""

    def __init__(
        self, config: Config, outbox: Outbox, metrics: Metrics, notify: Callable[[], None],
        ready: Callable[[], tuple[bool, dict[str, Any]]], guard: Admitter, clock: Clock = SYSTEM,
    ) -> None:
        self.outbox = outbox
        self.metrics = metrics
        self.notify = notify
        self.ready = ready
        self.accepting = True  # false once stopping: /readyz says so, posts are still served
        self.handling = 0  # requests being handled now
        self.storing = 0  # entries of enqueues not yet committed (for queue.max_pending)
        self.guard = guard
        self.receipts = Receipts(outbox, metrics, clock, self.read_body)
        self.messages = Messages(outbox)
        self.set_config(config)

    def set_config(self, config: Config) -> None:
        """Swap tokens, limits and paths in one assignment each (used by reload)."""
        s = config.server
        self.config = config
        self.path = s.path
        self.token_header = s.token_header
        self.bearer = s.token_header.lower() == "authorization"
        # Compare digests: constant time whatever the length of what the client sent.
        self.token_digests = tuple(hashlib.sha256(t.reveal().encode()).digest() for t in s.tokens)
        self.guard.set_config(config.limits)
        self.receipts.set_config(config)
        self.messages.set_config(config)
        # the endpoint table: exact paths first (HAP's webhook, the probes), then prefixes
        self.routes: dict[str, Handler] = {
            s.path: self.webhook, "/healthz": self.probe, "/readyz": self.probe,
            "/metrics": self.probe,
        }
        # each receipt endpoint also has its own allow_ips (its vendor's addresses)
        self.prefixes: tuple[tuple[str, Handler], ...] = (
            (RECEIPTS, self.receipts), (MESSAGES, self.messages))

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        self.handling += 1
        try:
            return await self._handle(request)
        finally:
            self.handling -= 1

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        try:
            path = request.path
            handler = self.routes.get(path)
            rest = ""
            if handler is None:
                for prefix, h in self.prefixes:
                    if path.startswith(prefix):
                        handler, rest = h, path[len(prefix):]
                        break
            if request.version not in _HTTP_VERSIONS:  # aiohttp's parser lets 0.9 and 2.0 by
                raise BadRequest(505, "http_version_not_supported",
                                 "the relay speaks HTTP/1.1 (and 1.0)", {"Connection": "close"})
            if handler is None:
                raise BadRequest(404, "not_found", f"no endpoint at {request.path}; "
                                 f"HAP's webhook is POST {self.path}")
            response: web.StreamResponse = await handler(request, rest)
        except BadRequest as exc:
            response = error_response(exc)
            if exc.status in (408, 505) or self.unread_expected(request):
                # 408: the rest of a slow body is not worth waiting for. A client waiting for
                # 100 Continue sends no body: there is nothing to read before the next request.
                response.force_close()
        except ClientGone:
            # not an error of the relay: nothing was stored, there is nobody to answer
            self.metrics.aborted.inc()
            log.debug("client_gone", client=request.remote, path=request.path)
            response = error_response(BadRequest(400, "incomplete_body", "the connection "
                                                 "closed before the whole body arrived"))
            response.force_close()
            return response  # counted as aborted, not as an answer
        except Exception:  # a bug: answer in JSON, keep serving, log the traceback
            # a receipt path may end in its secret: logged without it
            shown = request.path if not request.path.startswith(RECEIPTS) else \
                RECEIPTS + request.path[len(RECEIPTS):].split("/")[0]
            log.LOGGER.exception("internal_error path=%s", shown)
            response = error_response(BadRequest(500, "internal_error",
                                                 "the relay failed; see its log"))
        if request.path not in _PROBES:  # a scrape every 15 s would drown HAP's requests
            self.metrics.request(response.status)
        return response

    # -- POST {path} -----------------------------------------------------------------------

    async def webhook(self, request: web.BaseRequest, _: str = "") -> web.Response:
        key = self.check_request(request)
        body = await self.read_body(request, request.headers.get("Expect"))
        parsed = self.parse(body)
        # limits and duplicates (guard.py): only admitted recipients are stored
        adm = self.guard.admit(parsed, key)
        while adm.duplicate is not None:
            reply = adm.duplicate if not isinstance(adm.duplicate, asyncio.Future) \
                else await adm.duplicate
            if reply is not None:
                self.metrics.duplicates.inc()
                return self.answer(reply.ids, reply.note, duplicate=True)
            adm = self.guard.admit(parsed, key)  # the first request failed: this one is first
        if not adm.entries:
            first = adm.refused[0][1]
            raise BadRequest(first.status, first.code, first.detail, refused=adm.note())
        entries = adm.entries
        n = len(entries)
        # entries being stored count too: concurrent requests see each other's (a deferred
        # admission is checked in the enqueue's transaction, against every relay's entries)
        if self.outbox.undelivered + self.storing + n > self.config.queue.max_pending \
                and not adm.deferred:
            self.guard.abort(adm)
            raise _queue_full()
        note = adm.note()
        self.storing += n
        try:
            if adm.deferred:  # duplicates and windows decided in the enqueue's transaction
                done = await self.guard.store(adm, self.config.queue.ttl,
                                              self.config.queue.max_pending)
                ids, note = done.ids, done.note
            else:
                ids = await self.outbox.enqueue(entries, self.config.queue.ttl, keys=adm.keys,
                                                note=note)
        except BaseException as exc:
            self.storing -= n
            self.guard.abort(adm)
            if not isinstance(exc, StorageError):
                raise
            log.error("enqueue_failed", error=str(exc), count=len(entries))
            raise BadRequest(503, "storage_unavailable",
                             "the relay cannot write its outbox; retry later",
                             {"Retry-After": "10"}) from None
        self.storing -= n
        if adm.deferred and (done.duplicate or not ids):
            if done.duplicate:
                self.metrics.duplicates.inc()
                return self.answer(ids, note, duplicate=True)
            if done.full:
                raise _queue_full()
            first = adm.refused[0][1]
            raise BadRequest(first.status, first.code, first.detail, refused=note)
        self.guard.commit(adm, ids)
        self.notify()
        kind = kind_name(entries[0].kind)
        self.metrics.count(self.metrics.accepted_by_kind[kind], len(ids))
        # debug, not info: each message gets its `delivered` or `dead` line (with this id) at
        # info, and the line cost a sixth of the request's CPU; the count is in /metrics.
        if log.LOGGER.isEnabledFor(logging.DEBUG):
            log.debug("accepted", ids=",".join(map(str, ids)), type=kind, count=len(ids),
                      client=request.remote)
        return self.answer(ids, note)

    def check_request(self, request: web.BaseRequest) -> str | None:
        """What HAP's webhook checks before it reads the body: the method, the token, the
        content type and encoding, the Idempotency-Key (returned, None if not sent); a
        failed check raises its ``BadRequest``."""
        if request.method != "POST":
            raise BadRequest(405, "method_not_allowed", f"use POST for {self.path}",
                             {"Allow": "POST"})
        if self.token_digests:
            self.authenticate(request)
        if request.content_type != JSON or (request.charset or "utf-8").lower() not in (
            "utf-8", "utf8"
        ):
            raise BadRequest(415, "unsupported_media_type",
                             "send Content-Type: application/json (UTF-8)")
        headers = request.headers
        encoding = headers.get("Content-Encoding")
        if encoding is not None and encoding.strip().lower() not in ("", "identity"):
            # HAP posts plain JSON; a decoder would be one more thing to bound (gzip bombs)
            raise BadRequest(415, "unsupported_encoding", "send the body uncompressed (no "
                             "Content-Encoding)", {"Accept-Encoding": "identity"})
        key = headers.get(IDEMPOTENCY_KEY)
        if key is not None and not (0 < len(key) <= 255 and key.isascii() and key.isprintable()):
            raise BadRequest(400, "invalid_idempotency_key",
                             "Idempotency-Key must be 1 to 255 printable ASCII characters")
        return key

    def answer(self, ids: Sequence[int], refused: bytes, duplicate: bool = False) -> web.Response:
        """200 ``{"ok": true, "ids": [...]}``, with ``"duplicate": true`` for an answer given
        again and ``"refused": [...]`` when some recipients were refused."""
        body = orjson.dumps({"ok": True, "ids": [str(i) for i in ids]})
        if duplicate:
            body = body[:-1] + b',"duplicate":true}'
        if refused:
            body = body[:-1] + b',"refused":' + refused + b"}"
        return web.Response(body=body, content_type=JSON)

    def authenticate(self, request: web.BaseRequest) -> None:
        value = request.headers.get(self.token_header, "")
        if self.bearer:
            scheme, _, value = value.partition(" ")
            if scheme.lower() != "bearer":
                value = ""
        # aiohttp hands over non-UTF-8 header bytes as surrogates: hash them, do not crash
        digest = hashlib.sha256(value.strip().encode("utf-8", "surrogateescape")).digest()
        ok = False
        for known in self.token_digests:  # no early exit: every token is compared
            ok |= hmac.compare_digest(digest, known)
        if not ok or not value:
            self.metrics.auth_failures.inc()
            log.warning("auth_failed", client=request.remote, header=self.token_header)
            how = "Authorization: Bearer <token>" if self.bearer else f"{self.token_header}: <token>"
            raise BadRequest(401, "unauthorized", f"missing or wrong token; send {how}",
                             {"WWW-Authenticate": "Bearer"} if self.bearer else None)

    async def read_body(self, request: web.BaseRequest, expect: str | None) -> bytes:
        limit = self.config.server.max_body_bytes
        length = request.content_length
        if length is not None and length > limit:
            raise _too_large(limit)
        if expect is not None:
            await self.expect(request, expect)
        content = request.content
        if content.is_eof():  # the usual case: the whole (small) body is already buffered
            body = content.read_nowait()
            if len(body) > limit:
                raise _too_large(limit)
            return body
        chunks = bytearray()
        try:
            # a client trickling its body must not hold a request slot for long
            async with asyncio.timeout(self.config.server.body_timeout):
                while True:
                    chunk = await content.readany()
                    if not chunk:
                        break
                    chunks += chunk
                    if len(chunks) > limit:
                        raise _too_large(limit)
        except TimeoutError:
            raise BadRequest(408, "request_timeout", "the body did not arrive within "
                             f"{self.config.server.body_timeout:g}s") from None
        except ConnectionError:  # the client went away mid-body (aiohttp's "Connection lost")
            raise ClientGone() from None
        return bytes(chunks)

    async def expect(self, request: web.BaseRequest, expect: str) -> None:
        """``Expect: 100-continue``: every check that needs no body has passed, so ask for
        it (curl waits a second for this before sending a body over 1 KiB)."""
        if expect.strip().lower() != "100-continue":
            raise BadRequest(417, "expectation_failed",
                             "the only expectation the relay meets is Expect: 100-continue")
        # RFC 9110 15.2.1: not to HTTP/1.0 clients, nor once the body is here anyway
        if request.version == HttpVersion11 and request.content.total_bytes == 0 \
                and not request.content.is_eof():
            try:
                await request.writer.write(CONTINUE)
            except ConnectionError:
                raise ClientGone() from None
            request.writer.output_size = 0  # as aiohttp's own expect handler: no answer yet

    @staticmethod
    def unread_expected(request: web.BaseRequest) -> bool:
        """Whether the client waits for 100 Continue that it will not get: its body never
        comes, so the connection cannot carry another request."""
        return (request.content.total_bytes == 0 and not request.content.is_eof()
                and "Expect" in request.headers)

    def parse(self, body: bytes) -> list[NewEntry]:
        """HAP's body to outbox entries, or ``BadRequest``; nothing half-accepted."""
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(400, "invalid_json", f"the body is not valid UTF-8 JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise BadRequest(400, "invalid_body", "expected a JSON object with Type and Data")
        kind = doc.get("Type")
        data = doc.get("Data")
        if type(kind) is not int:
            raise BadRequest(400, "invalid_body", "Type must be the number 1 (SMS) or 2 (voice code)")
        if not isinstance(data, dict):
            raise BadRequest(400, "invalid_body", "Data must be a JSON object")
        if kind == 1:
            return self.parse_sms(data)
        if kind == 2:
            return self.parse_voice(data)
        raise BadRequest(400, "unknown_type", f"Type {kind} is not 1 (SMS) or 2 (voice code)")

    def parse_sms(self, data: dict[str, Any]) -> list[NewEntry]:
        s = self.config.server
        mobiles = data.get("Mobiles")
        message = data.get("Message")
        signature = data.get("Signature", "")
        if not isinstance(mobiles, list) or not mobiles:
            raise BadRequest(400, "invalid_body", "Data.Mobiles must be a non-empty list of strings")
        if len(mobiles) > s.max_recipients:
            raise BadRequest(400, "too_many_recipients",
                             f"Data.Mobiles has {len(mobiles)} numbers; at most {s.max_recipients}")
        if not isinstance(message, str) or not message.strip():
            raise BadRequest(400, "invalid_body", "Data.Message must be a non-empty string")
        if len(message) > s.max_message_chars:
            raise BadRequest(400, "message_too_long",
                             f"Data.Message has {len(message)} characters; at most {s.max_message_chars}")
        if signature is None:
            signature = ""
        if not isinstance(signature, str):
            raise BadRequest(400, "invalid_body", "Data.Signature must be a string")
        if "\x00" in message or "\x00" in signature:
            raise BadRequest(400, "invalid_body", "Data.Message and Data.Signature cannot contain NUL")
        signature = strip_signature(signature)
        numbers = self.numbers(mobiles, "Data.Mobiles")
        return [NewEntry(KIND_SMS, n.e164, n.region, n.national, message, signature, "", n.type)
                for n in numbers]

    def parse_voice(self, data: dict[str, Any]) -> list[NewEntry]:
        mobile = data.get("Mobile")
        code = data.get("Code")
        if not isinstance(mobile, str):
            raise BadRequest(400, "invalid_body", "Data.Mobile must be a string")
        if not isinstance(code, str) or not (4 <= len(code) <= 10) or not code.isascii() \
                or not code.isdigit():
            raise BadRequest(400, "invalid_code", "Data.Code must be a string of 4 to 10 digits")
        (n,) = self.numbers([mobile], "Data.Mobile")
        return [NewEntry(KIND_VOICE, n.e164, n.region, n.national, "", "", code, n.type)]

    def numbers(self, raw: Sequence[object], key: str) -> list[Number]:
        region = self.config.default_region
        seen: dict[str, Number] = {}
        for i, value in enumerate(raw):
            if not isinstance(value, str):
                raise BadRequest(400, "invalid_body", f"{key}[{i}] must be a string")
            try:
                n = normalise(value, region)
            except InvalidNumber:
                shown = value if value.isprintable() and len(value) <= 40 else repr(value[:40])
                raise BadRequest(400, "invalid_number",
                                 f"{key}: {shown} is not a valid phone number") from None
            seen.setdefault(n.e164, n)
        return list(seen.values())

    # -- probes ----------------------------------------------------------------------------

    async def probe(self, request: web.BaseRequest, _: str = "") -> web.Response:
        if request.method not in ("GET", "HEAD"):
            raise BadRequest(405, "method_not_allowed", f"use GET for {request.path}",
                             {"Allow": "GET, HEAD"})
        if request.path == "/healthz":
            return web.Response(body=b'{"ok":true}', content_type=JSON)
        if request.path == "/readyz":
            ok, detail = self.ready()
            return web.Response(status=200 if ok else 503,
                                body=orjson.dumps({"ok": ok, **detail}), content_type=JSON)
        self.metrics.flush()  # what was counted this turn of the loop, too
        return web.Response(body=generate_latest(self.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})


def _queue_full() -> BadRequest:
    return BadRequest(503, "queue_full", "the outbox is full; retry later", {"Retry-After": "30"})


def _too_large(limit: int) -> BadRequest:
    # built when needed: one per request cost ~1% of ingest
    return BadRequest(413, "body_too_large", f"the body exceeds {limit} bytes")


def strip_signature(sig: str) -> str:
    """HAP may send ``【Acme】`` or ``[Acme]``; the relay keeps ``Acme``."""
    sig = sig.strip()
    for left, right in _SIGNATURE_BRACKETS:
        if sig.startswith(left) and sig.endswith(right):
            return sig[len(left) : -len(right)].strip()
    return sig
