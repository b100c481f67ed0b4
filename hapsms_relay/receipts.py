"""Delivery receipts: what a provider's receipt says, the optional provider interface that
verifies and parses one, and the per-endpoint protection every receipt endpoint has.

A provider with receipts implements ``ReceiptSource``; the server routes
``POST /receipts/<provider name>[/<secret>]`` to it and writes what it parsed through the
outbox (``Queue.receipt``), which moves an entry forward only.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable
from urllib.parse import parse_qsl

import orjson

from hapsms_relay.errors import BadRequest, ConfigError
from hapsms_relay.secret import Secret
from hapsms_relay.table import Table

#: ``delivered``: the handset got it; ``undelivered``: a final failure; ``progress``: on its
#: way (Twilio's ``sent``, Vonage's ``accepted``/``buffered``): history only, no change.
Status = Literal["delivered", "undelivered", "progress"]
PREFIX = "/receipts/"


@dataclass(frozen=True, slots=True)
class Receipt:
    """One message's (or one part's) status, as a provider reported it."""

    status: Status
    entry: int | None = None  # the relay's id, where the vendor echoes it
    ref: str = ""  # the provider's message id (a part's, for Vonage)
    code: str = ""  # the vendor's status or error code (DELIVRD, 30003, ...)
    text: str = ""  # the vendor's words for it
    segments: int = 0  # the parts the vendor billed, if the receipt says


@dataclass(frozen=True, slots=True)
class ReceiptRequest:
    """A receipt request as it arrived, for a provider to verify and parse."""

    method: str
    path_qs: str  # path and query as received (what a vendor behind a proxy did not sign)
    query: Sequence[tuple[str, str]]
    content_type: str
    body: bytes
    headers: Mapping[str, str]
    now: float  # the relay's clock: signature timestamps are checked against it

    def form(self) -> list[tuple[str, str]]:
        """A form-encoded body's fields, in order (repeated names kept)."""
        if self.content_type != "application/x-www-form-urlencoded":
            return []
        try:
            return parse_qsl(self.body.decode(), keep_blank_values=True)
        except UnicodeDecodeError:
            raise invalid("the form is not UTF-8") from None

    def json(self) -> Any:
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError:
            raise invalid("the body is not JSON") from None


@dataclass(frozen=True, slots=True)
class ReceiptBatch:
    """What a receipt request carried, and the answer its vendor expects."""

    receipts: list[Receipt]
    answer: bytes = b""
    content_type: str = "application/json"


@runtime_checkable
class ReceiptSource(Protocol):
    """The optional provider interface for delivery receipts."""

    def parse_receipts(self, request: ReceiptRequest) -> ReceiptBatch:
        """Verify the request is the vendor's (``BadRequest`` 403 if not) and parse it
        (``BadRequest`` 400 if it is not a receipt). No I/O."""


@dataclass(frozen=True, slots=True)
class ReceiptConfig:
    """A provider's ``receipts`` table: its endpoint is on only when the table is there."""

    secret: Secret | None = None  # the last path segment the endpoint wants
    allow_ips: tuple[str, ...] = ()

    def path(self, name: str) -> str:
        """The endpoint's path (with its secret: do not log it)."""
        secret = self.secret.reveal() if self.secret is not None else ""
        return PREFIX + name + (f"/{secret}" if secret else "")

    def secret_ok(self, given: str) -> bool:
        expected = self.secret.reveal() if self.secret is not None else ""
        return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode())


def read_config(t: Table, *, signed: bool) -> ReceiptConfig | None:
    """``receipts = { secret = ..., allow_ips = [...] }`` of a provider table. A vendor
    that does not sign its receipts (``signed`` False) needs the secret."""
    if not t.has("receipts"):
        return None
    rt = t.table("receipts")
    secret = rt.optional_secret("secret")
    if secret is not None and not _url_safe(secret.reveal()):
        raise rt.error("secret", "use letters, digits, '-', '_' and '.' (it goes in a URL path)")
    if secret is None and not signed:
        raise rt.error("secret", "required: this vendor does not sign its receipts, so its "
                       "endpoint is /receipts/<name>/<secret>")
    allow = rt.str_list("allow_ips", [])
    for i, cidr in enumerate(allow):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise ConfigError(f"{rt.path('allow_ips')}[{i}]",
                              f"expected an address or CIDR; got {cidr!r}") from None
    rt.done()
    return ReceiptConfig(secret, tuple(allow))


def _url_safe(text: str) -> bool:
    return bool(text) and all(c.isascii() and (c.isalnum() or c in "-_.") for c in text)


def forged(detail: str) -> BadRequest:
    """A receipt that is not the vendor's: refused, and nothing changes."""
    return BadRequest(403, "forged_receipt", detail)


def invalid(detail: str) -> BadRequest:
    return BadRequest(400, "invalid_receipt", detail)


def objects(doc: object, what: str) -> list[dict[str, Any]]:
    """A JSON array of objects (what Tencent and Alibaba push), or ``invalid``."""
    if not isinstance(doc, list) or not all(isinstance(o, dict) for o in doc):
        raise invalid(f"expected {what}: a JSON array of objects")
    return doc


def entry_id(value: object) -> int | None:
    """The relay's id as a vendor echoes it (a string of digits), else None."""
    text = str(value) if isinstance(value, str | int) and not isinstance(value, bool) else ""
    return int(text) if text.isdigit() and len(text) < 20 else None
