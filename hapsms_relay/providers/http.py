"""The generic ``http`` provider: any SMS HTTP API, described in the config.

Method, URL, headers (secrets allowed), a JSON or form body built from a template, and a
success rule in the manner of Kannel's generic HTTP SMSC: the status code, and optionally a
JSON field's value or a regex on the response body. ``message_id_field`` names the JSON field
of the answer holding the API's own message id, kept with the entry.

Receipts, when the API posts them: a ``receipts`` table (a path secret: the relay cannot
check an unknown vendor's signature) and the mapping of the receipt's fields
(``receipt_id_field`` holding the relay's id or the API's, ``receipt_status_field`` and the
values that mean delivered or undelivered, ``receipt_code_field``), for a JSON object, an
array of them, a form, or a GET's query; answered ``receipt_answer``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import aiohttp
import orjson

from hapsms_relay import receipts
from hapsms_relay.errors import ConfigError, PermanentError
from hapsms_relay.providers.base import (
    BaseProvider,
    Common,
    Message,
    Sent,
    check_template,
    classify_http_status,
)
from hapsms_relay.secret import Secret
from hapsms_relay.table import Table

PLACEHOLDERS = ("to", "to_national", "message", "signature", "code", "id")
_TEXT_LIMIT = 300


@dataclass
class HttpProvider(BaseProvider):
    url: str = ""
    method: str = "POST"
    headers: Mapping[str, Secret] = field(default_factory=dict)
    body_format: str = "json"
    body: object = None
    query: Mapping[str, str] = field(default_factory=dict)
    success_status: frozenset[int] = frozenset({200, 201, 202, 204})
    success_field: tuple[str, ...] = ()
    success_value: str | None = None
    success_regex: re.Pattern[str] | None = None
    message_id_field: tuple[str, ...] = ()
    receipt_map: ReceiptMap | None = None
    voice: bool = False
    supports_voice: ClassVar[bool] = False

    _request_headers: dict[str, str] = field(default_factory=dict, init=False, repr=False)
    _timeout: aiohttp.ClientTimeout | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        # an instance attribute shadows the ClassVar: voice support is a setting here
        self.supports_voice = self.voice  # type: ignore[misc]

    async def open(self, session: aiohttp.ClientSession) -> None:
        await super().open(session)
        # built once, not per message: revealing secrets and building the timeout showed up
        # in profiles of the delivery path
        headers = {k: v.reveal() for k, v in self.headers.items()}
        if self.body_format == "json":
            headers = {"Content-Type": "application/json", **headers}
        self._request_headers = headers
        self._timeout = aiohttp.ClientTimeout(total=self.common.timeout)

    async def close(self) -> None:
        self._request_headers = {}
        await super().close()

    @classmethod
    def from_config(cls, common: Common, t: Table) -> HttpProvider:
        url = t.string("url")
        if not url.startswith(("http://", "https://")):
            raise t.error("url", "must start with http:// or https://")
        method = t.choice("method", ("POST", "PUT", "GET"), "POST")
        headers: dict[str, Secret] = {}
        if t.has("headers"):
            ht = t.table("headers")
            # Every value is kept as a Secret, inline strings too: headers are where APIs
            # take their credentials, and a Secret keeps them out of repr and logs.
            for name in list(ht.data):
                headers[name] = ht.secret(name)
            ht.done()
        body_format = t.choice("body_format", ("json", "form", "none"), "json")
        body = t.raw("body", None)
        if body_format != "none" and body is None:
            raise t.error("body", "required unless body_format = \"none\"")
        if body_format == "form" and not (
            isinstance(body, Mapping) and all(isinstance(v, str) for v in body.values())
        ):
            raise t.error("body", "a form body is a table of string templates")
        _check_body(body, t.path("body"))
        query: dict[str, str] = {}
        if t.has("query"):
            qt = t.table("query")
            for name in list(qt.data):
                query[name] = check_template(qt.string(name, nonempty=False), qt.path(name),
                                             PLACEHOLDERS)
            qt.done()
        regex = t.optional_str("success_regex")
        try:
            compiled = re.compile(regex) if regex else None
        except re.error as exc:
            raise t.error("success_regex", f"bad regex: {exc}") from None
        field_path = t.optional_str("success_field")
        value = t.optional_str("success_value")
        if (field_path is None) != (value is None):
            raise t.error("success_value" if field_path else "success_field",
                          "success_field and success_value go together")
        id_path = t.optional_str("message_id_field")
        statuses = t.int_list("success_status", [200, 201, 202, 204])
        if not statuses:
            raise t.error("success_status", "must not be empty")
        return cls(
            common, url=url, method=method, headers=headers, body_format=body_format, body=body,
            query=query, success_status=frozenset(statuses),
            success_field=tuple(field_path.split(".")) if field_path else (),
            success_value=value, success_regex=compiled, voice=t.boolean("voice", False),
            message_id_field=tuple(id_path.split(".")) if id_path else (),
            receipt_config=receipts.read_config(t, signed=False),
            receipt_map=ReceiptMap.read(t) if t.has("receipts") else None,
        )

    def _values(self, m: Message) -> dict[str, str]:
        return {
            "to": m.to, "to_national": m.national, "message": self.sms_text(m),
            "signature": m.signature, "code": m.code, "id": str(m.id),
        }

    async def send_one(self, message: Message) -> Sent:
        values = self._values(message)
        kwargs: dict[str, object] = {"headers": self._request_headers, "timeout": self._timeout}
        if self.query:
            kwargs["params"] = {k: v.format_map(values) for k, v in self.query.items()}
        if self.body_format == "json":
            kwargs["data"] = orjson.dumps(_fill(self.body, values))
        elif self.body_format == "form":
            kwargs["data"] = _fill(self.body, values)
        async with self.http().request(self.method, self.url, **kwargs) as resp:  # type: ignore[arg-type]
            text = await resp.text(errors="replace")
            if resp.status not in self.success_status:
                raise classify_http_status(self.name, resp.status, text[:_TEXT_LIMIT], resp.headers)
            self._check_success_body(text)
        if not self.message_id_field:
            return self.sent(message)
        ref = json_field(text, self.message_id_field)
        return self.sent(message, *(() if ref is None or isinstance(ref, dict | list) else (str(ref),)))

    def parse_receipts(self, request: receipts.ReceiptRequest) -> receipts.ReceiptBatch:
        m = self.receipt_map
        assert m is not None
        if request.content_type == "application/json":
            doc = request.json()
            items = doc if isinstance(doc, list) else [doc]
        else:
            items = [dict(request.form() or request.query)]
        found = []
        for item in items:
            ref, status = _field(item, m.id_field), _field(item, m.status_field)
            if not ref or not status:
                raise receipts.invalid(f"expected {'.'.join(m.id_field)} and "
                                       f"{'.'.join(m.status_field)} in each receipt")
            state: receipts.Status = ("delivered" if status in m.delivered else
                                      "undelivered" if status in m.undelivered else "progress")
            code = _field(item, m.code_field) if m.code_field else ""
            if m.id_is == "relay":
                found.append(receipts.Receipt(state, receipts.entry_id(ref), "", code or status,
                                              status))
            else:
                found.append(receipts.Receipt(state, None, ref, code or status, status))
        return receipts.ReceiptBatch(found, m.answer.encode(), m.answer_type)

    def _check_success_body(self, text: str) -> None:
        if self.success_regex is not None and not self.success_regex.search(text):
            raise PermanentError(self.name, "rejected", text[:_TEXT_LIMIT])
        if self.success_field:
            node = json_field(text, self.success_field)
            if node is None or (str(node) != self.success_value and not (
                isinstance(node, bool) and str(node).lower() == self.success_value
            )):
                raise PermanentError(self.name, "rejected", text[:_TEXT_LIMIT])


@dataclass(frozen=True)
class ReceiptMap:
    """Where an API's receipt keeps what the relay needs (``receipt_*`` settings)."""

    id_field: tuple[str, ...]
    id_is: str  # "relay": the relay's id ({id} sent); "provider": the API's (message_id_field)
    status_field: tuple[str, ...]
    delivered: frozenset[str]
    undelivered: frozenset[str]
    code_field: tuple[str, ...] = ()
    answer: str = '{"ok":true}'
    answer_type: str = "application/json"

    @classmethod
    def read(cls, t: Table) -> ReceiptMap:
        delivered = frozenset(t.str_list("receipt_delivered", nonempty=True))
        undelivered = frozenset(t.str_list("receipt_undelivered", nonempty=True))
        if delivered & undelivered:
            raise t.error("receipt_undelivered", "a value cannot mean both delivered and not")
        code = t.optional_str("receipt_code_field")
        answer = t.string("receipt_answer", '{"ok":true}', nonempty=False)
        return cls(
            id_field=tuple(t.string("receipt_id_field").split(".")),
            id_is=t.choice("receipt_id", ("relay", "provider"), "relay"),
            status_field=tuple(t.string("receipt_status_field").split(".")),
            delivered=delivered, undelivered=undelivered,
            code_field=tuple(code.split(".")) if code else (), answer=answer,
            answer_type="application/json" if answer[:1] in "{[" else "text/plain",
        )


def _field(item: object, path: Sequence[str]) -> str:
    """A receipt's field at ``path`` as text ("" if absent or not a scalar)."""
    node = item
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
    return str(node) if isinstance(node, str | int | float) and not isinstance(node, bool) else ""


def json_field(text: str, path: Sequence[str]) -> object:
    """The value at ``path`` (keys of nested objects) in the JSON ``text``, or None."""
    try:
        node: object = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _check_body(body: object, key: str) -> None:
    if isinstance(body, str):
        check_template(body, key, PLACEHOLDERS)
    elif isinstance(body, Mapping):
        for k, v in body.items():
            _check_body(v, f"{key}.{k}")
    elif isinstance(body, list):
        for i, v in enumerate(body):
            _check_body(v, f"{key}[{i}]")
    elif not isinstance(body, int | float | bool) and body is not None:
        raise ConfigError(key, "unsupported value in body template")


def _fill(body: object, values: Mapping[str, str]) -> object:
    if isinstance(body, str):
        return body.format_map(values)
    if isinstance(body, Mapping):
        return {k: _fill(v, values) for k, v in body.items()}
    if isinstance(body, list):
        return [_fill(v, values) for v in body]
    return body
