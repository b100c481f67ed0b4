"""Bad webhook requests: each gets its documented status and JSON error, nothing of it is
stored or sent, and the relay keeps serving."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from hapsms_relay.outbox import State
from tests.fakes import FakeAPI
from tests.helpers import (
    AUTH,
    SMS_BODY,
    TOKEN,
    TOKEN2,
    base_config,
    eventually,
    settled,
)


def _body(data: dict[str, Any], kind: Any = 1) -> bytes:
    return orjson.dumps({"Type": kind, "Data": data})


def _sms(**data: Any) -> bytes:
    return _body({"Mobiles": ["13800138000"], "Message": "hello", "Signature": "Acme", **data})


def _voice(**data: Any) -> bytes:
    return _body({"Mobile": "13800138000", "Code": "123456", **data}, 2)


@dataclass(frozen=True)
class Case:
    id: str
    status: int
    error: str
    body: bytes = _sms()
    headers: dict[str, str] = field(default_factory=lambda: {**AUTH, "Content-Type": "application/json"})
    method: str = "POST"
    path: str | None = None  # None: the webhook path
    server: dict[str, Any] = field(default_factory=dict)  # config overrides
    chunked: bool = False


JSON_AUTH = {**AUTH, "Content-Type": "application/json"}
TEN_MB = b'{"Type": 1, "Data": {"Mobiles": ["13800138000"], "Message": "' + b"x" * 10_000_000 + b'"}}'

CASES = [
    Case("not json", 400, "invalid_json", b"Type=1&Mobiles=13800138000"),
    Case("empty body", 400, "invalid_json", b""),
    Case("invalid utf-8", 400, "invalid_json",
         b'{"Type": 1, "Data": {"Mobiles": ["13800138000"], "Message": "\xff\xfe"}}'),
    Case("truncated json", 400, "invalid_json", _sms()[:-7]),
    Case("raw NUL byte", 400, "invalid_json",
         b'{"Type": 1, "Data": {"Mobiles": ["13800138000"], "Message": "a\x00b"}}'),
    Case("escaped NUL in message", 400, "invalid_body", _sms(Message="a\u0000b")),
    Case("escaped NUL in signature", 400, "invalid_body", _sms(Signature="A\u0000")),
    Case("escaped NUL in number", 400, "invalid_number", _sms(Mobiles=["13800\u0000138000"])),
    Case("deeply nested", 400, "invalid_json", b"[" * 5000 + b"]" * 5000),
    Case("top level list", 400, "invalid_body", b"[1, 2]"),
    Case("top level string", 400, "invalid_body", b'"hello"'),
    Case("no Type", 400, "invalid_body", orjson.dumps({"Data": {}})),
    Case("Type as string", 400, "invalid_body", _body({"Mobiles": ["13800138000"], "Message": "m"}, "1")),
    Case("Type as true", 400, "invalid_body", _body({"Mobiles": ["13800138000"], "Message": "m"}, True)),
    Case("Type as float", 400, "invalid_body", _body({"Mobiles": ["13800138000"], "Message": "m"}, 1.0)),
    Case("Type null", 400, "invalid_body", _body({"Mobiles": ["13800138000"], "Message": "m"}, None)),
    Case("unknown Type", 400, "unknown_type", _body({"Mobiles": ["13800138000"], "Message": "m"}, 3)),
    Case("Type 0", 400, "unknown_type", _body({"Mobiles": ["13800138000"], "Message": "m"}, 0)),
    Case("Data missing", 400, "invalid_body", orjson.dumps({"Type": 1})),
    Case("Data a list", 400, "invalid_body", orjson.dumps({"Type": 1, "Data": ["13800138000"]})),
    Case("Mobiles missing", 400, "invalid_body", _body({"Message": "m"})),
    Case("Mobiles a string", 400, "invalid_body", _sms(Mobiles="13800138000")),
    Case("Mobiles with a number", 400, "invalid_body", _sms(Mobiles=[13800138000])),
    Case("Mobiles with null", 400, "invalid_body", _sms(Mobiles=["13800138000", None])),
    Case("empty Mobiles", 400, "invalid_body", _sms(Mobiles=[])),
    Case("10000 recipients", 400, "too_many_recipients",
         _sms(Mobiles=[f"138{i:08d}" for i in range(10_000)])),
    Case("bad number", 400, "invalid_number", _sms(Mobiles=["13800138000", "12345"])),
    Case("letters for a number", 400, "invalid_number", _sms(Mobiles=["call me"])),
    Case("number with an extension", 400, "invalid_number",
         _sms(Mobiles=["+86 138 0013 8014 ext. 123"])),
    Case("tel: URI", 400, "invalid_number", _sms(Mobiles=["tel:+8613800138014"])),
    Case("emoji in a number", 400, "invalid_number", _voice(Mobile="\U0001f4f113800138014")),
    # a number is named as sent up to 40 printable characters; longer, its first 40 quoted
    Case("40-character number", 400, "invalid_number", _sms(Mobiles=["n" * 40])),
    Case("41-character number", 400, "invalid_number", _sms(Mobiles=["n" * 41])),
    Case("Message missing", 400, "invalid_body", _body({"Mobiles": ["13800138000"]})),
    Case("Message empty", 400, "invalid_body", _sms(Message="  ")),
    Case("Message a number", 400, "invalid_body", _sms(Message=42)),
    Case("Message too long", 400, "message_too_long", _sms(Message="x" * 2001)),
    Case("Signature a list", 400, "invalid_body", _sms(Signature=["Acme"])),
    Case("voice Mobile a list", 400, "invalid_body", _voice(Mobile=["13800138000"])),
    Case("voice bad number", 400, "invalid_number", _voice(Mobile="000")),
    Case("Code not digits", 400, "invalid_code", _voice(Code="12ab56")),
    Case("Code too short", 400, "invalid_code", _voice(Code="123")),
    Case("Code too long", 400, "invalid_code", _voice(Code="12345678901")),
    Case("Code a number", 400, "invalid_code", _voice(Code=123456)),
    Case("Code non-ASCII digits", 400, "invalid_code", _voice(Code="١٢٣٤٥٦")),
    Case("Code missing", 400, "invalid_code", _body({"Mobile": "13800138000"}, 2)),
    Case("10 MB body", 413, "body_too_large", TEN_MB),
    Case("10 MB chunked body", 413, "body_too_large", TEN_MB, chunked=True),
    Case("over max_body_bytes", 413, "body_too_large", _sms(Message="x" * 1000),
         server={"max_body_bytes": 512}),
    Case("no content type", 415, "unsupported_media_type", headers=AUTH),
    Case("text/plain", 415, "unsupported_media_type", headers={**AUTH, "Content-Type": "text/plain"}),
    Case("form content type", 415, "unsupported_media_type",
         headers={**AUTH, "Content-Type": "application/x-www-form-urlencoded"}),
    Case("latin-1 charset", 415, "unsupported_media_type",
         headers={**AUTH, "Content-Type": "application/json; charset=latin-1"}),
    Case("gzip on a plain body", 415, "unsupported_encoding",
         headers={**JSON_AUTH, "Content-Encoding": "gzip"}),
    Case("deflate on a plain body", 415, "unsupported_encoding",
         headers={**JSON_AUTH, "Content-Encoding": "deflate"}),
    Case("brotli", 415, "unsupported_encoding", headers={**JSON_AUTH, "Content-Encoding": "br"}),
    Case("unknown expectation", 417, "expectation_failed",
         headers={**JSON_AUTH, "Expect": "200-ok"}),
    Case("no token", 401, "unauthorized", headers={"Content-Type": "application/json"}),
    Case("wrong token", 401, "unauthorized",
         headers={"Authorization": "Bearer nope", "Content-Type": "application/json"}),
    Case("token without Bearer", 401, "unauthorized",
         headers={"Authorization": TOKEN, "Content-Type": "application/json"}),
    Case("Basic scheme", 401, "unauthorized",
         headers={"Authorization": f"Basic {TOKEN}", "Content-Type": "application/json"}),
    Case("token prefix", 401, "unauthorized",
         headers={"Authorization": f"Bearer {TOKEN[:-1]}", "Content-Type": "application/json"}),
    Case("X-Api-Key mode, Bearer sent", 401, "unauthorized", headers=JSON_AUTH,
         server={"token_header": "X-Api-Key"}),
    Case("X-Api-Key mode, wrong key", 401, "unauthorized",
         headers={"X-Api-Key": "nope", "Content-Type": "application/json"},
         server={"token_header": "X-Api-Key"}),
    Case("retired token", 401, "unauthorized", headers=JSON_AUTH, server={"tokens": [TOKEN2]}),
    Case("another scheme", 401, "unauthorized",
         headers={"Authorization": "Basic XXXX", "Content-Type": "application/json"},
         server={"tokens": [TOKEN, "XXXX"]}),
    Case("X-Api-Key mode, no header", 401, "unauthorized",
         headers={"Content-Type": "application/json"},
         server={"token_header": "X-Api-Key", "tokens": [TOKEN, "XXXX"]}),
    Case("unknown path", 404, "not_found", path="/sms/webhook/"),
    Case("root path", 404, "not_found", path="/", method="GET"),
    Case("GET on the webhook", 405, "method_not_allowed", method="GET", body=b""),
    Case("PUT on the webhook", 405, "method_not_allowed", method="PUT"),
    Case("POST on /healthz", 405, "method_not_allowed", path="/healthz"),
]


# What each case's detail starts with: the fault, in words a person fixing HAP's side reads
# (the field, the number, the limit), JSON errors followed by the parser's own words.
DETAILS = {
    "not json": "the body is not valid UTF-8 JSON: ",
    "empty body": "the body is not valid UTF-8 JSON: ",
    "invalid utf-8": "the body is not valid UTF-8 JSON: ",
    "truncated json": "the body is not valid UTF-8 JSON: ",
    "raw NUL byte": "the body is not valid UTF-8 JSON: ",
    "escaped NUL in message": "Data.Message and Data.Signature cannot contain NUL",
    "escaped NUL in signature": "Data.Message and Data.Signature cannot contain NUL",
    "escaped NUL in number": "Data.Mobiles: '13800\\x00138000' is not a valid phone number",
    "deeply nested": "the body is not valid UTF-8 JSON: ",
    "top level list": "expected a JSON object with Type and Data",
    "top level string": "expected a JSON object with Type and Data",
    "no Type": "Type must be the number 1 (SMS) or 2 (voice code)",
    "Type as string": "Type must be the number 1 (SMS) or 2 (voice code)",
    "Type as true": "Type must be the number 1 (SMS) or 2 (voice code)",
    "Type as float": "Type must be the number 1 (SMS) or 2 (voice code)",
    "Type null": "Type must be the number 1 (SMS) or 2 (voice code)",
    "unknown Type": "Type 3 is not 1 (SMS) or 2 (voice code)",
    "Type 0": "Type 0 is not 1 (SMS) or 2 (voice code)",
    "Data missing": "Data must be a JSON object",
    "Data a list": "Data must be a JSON object",
    "Mobiles missing": "Data.Mobiles must be a non-empty list of strings",
    "Mobiles a string": "Data.Mobiles must be a non-empty list of strings",
    "Mobiles with a number": "Data.Mobiles[0] must be a string",
    "Mobiles with null": "Data.Mobiles[1] must be a string",
    "empty Mobiles": "Data.Mobiles must be a non-empty list of strings",
    "10000 recipients": "Data.Mobiles has 10000 numbers; at most 1000",
    "bad number": "Data.Mobiles: 12345 is not a valid phone number",
    "letters for a number": "Data.Mobiles: call me is not a valid phone number",
    "number with an extension": "Data.Mobiles: +86 138 0013 8014 ext. 123 is not a valid phone number",
    "tel: URI": "Data.Mobiles: tel:+8613800138014 is not a valid phone number",
    "emoji in a number": "Data.Mobile: 📱13800138014 is not a valid phone number",
    "40-character number": f"Data.Mobiles: {'n' * 40} is not a valid phone number",
    "41-character number": f"Data.Mobiles: '{'n' * 40}' is not a valid phone number",
    "Message missing": "Data.Message must be a non-empty string",
    "Message empty": "Data.Message must be a non-empty string",
    "Message a number": "Data.Message must be a non-empty string",
    "Message too long": "Data.Message has 2001 characters; at most 2000",
    "Signature a list": "Data.Signature must be a string",
    "voice Mobile a list": "Data.Mobile must be a string",
    "voice bad number": "Data.Mobile: 000 is not a valid phone number",
    "Code not digits": "Data.Code must be a string of 4 to 10 digits",
    "Code too short": "Data.Code must be a string of 4 to 10 digits",
    "Code too long": "Data.Code must be a string of 4 to 10 digits",
    "Code a number": "Data.Code must be a string of 4 to 10 digits",
    "Code non-ASCII digits": "Data.Code must be a string of 4 to 10 digits",
    "Code missing": "Data.Code must be a string of 4 to 10 digits",
    "10 MB body": "the body exceeds 1048576 bytes",
    "10 MB chunked body": "the body exceeds 1048576 bytes",
    "over max_body_bytes": "the body exceeds 512 bytes",
    "no content type": "send Content-Type: application/json (UTF-8)",
    "text/plain": "send Content-Type: application/json (UTF-8)",
    "form content type": "send Content-Type: application/json (UTF-8)",
    "latin-1 charset": "send Content-Type: application/json (UTF-8)",
    "gzip on a plain body": "send the body uncompressed (no Content-Encoding)",
    "deflate on a plain body": "send the body uncompressed (no Content-Encoding)",
    "brotli": "send the body uncompressed (no Content-Encoding)",
    "unknown expectation": "the only expectation the relay meets is Expect: 100-continue",
    "no token": "missing or wrong token; send Authorization: Bearer <token>",
    "wrong token": "missing or wrong token; send Authorization: Bearer <token>",
    "token without Bearer": "missing or wrong token; send Authorization: Bearer <token>",
    "Basic scheme": "missing or wrong token; send Authorization: Bearer <token>",
    "token prefix": "missing or wrong token; send Authorization: Bearer <token>",
    "X-Api-Key mode, Bearer sent": "missing or wrong token; send X-Api-Key: <token>",
    "X-Api-Key mode, wrong key": "missing or wrong token; send X-Api-Key: <token>",
    "retired token": "missing or wrong token; send Authorization: Bearer <token>",
    "another scheme": "missing or wrong token; send Authorization: Bearer <token>",
    "X-Api-Key mode, no header": "missing or wrong token; send X-Api-Key: <token>",
    "unknown path": "no endpoint at /sms/webhook/; HAP's webhook is POST /sms/webhook",
    "root path": "no endpoint at /; HAP's webhook is POST /sms/webhook",
    "GET on the webhook": "use POST for /sms/webhook",
    "PUT on the webhook": "use POST for /sms/webhook",
    "POST on /healthz": "use GET for /healthz",
}


async def _request(session: aiohttp.ClientSession, url: str, case: Case) -> tuple[int, Any, str]:
    data: Any = case.body if len(case.body) < 1_000_000 else io.BytesIO(case.body)
    if case.chunked:
        async def chunks() -> Any:
            for i in range(0, len(case.body), 65536):
                yield case.body[i : i + 65536]
        data = chunks()
    headers = dict(case.headers)
    if "Content-Type" not in headers and data:
        # aiohttp would add application/octet-stream on its own; say so explicitly
        headers["Content-Type"] = "application/octet-stream"
    async with session.request(case.method, url, data=data, headers=headers) as r:
        return r.status, await r.json(content_type=None), r.content_type


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
async def test_bad_request_is_refused_cleanly(
    case: Case, tmp_path: Path, relay_factory: Any, session: aiohttp.ClientSession, fake_api: FakeAPI
) -> None:
    """A bad request gets its documented status and JSON error, stores nothing, sends nothing,
    and the relay serves the next good request."""
    provider = {"name": "api", "type": "http", "url": fake_api.url + "/send",
                "body": {"to": "{to}", "text": "{message}"}, "voice": True}
    server = {"max_body_bytes": 1_048_576, **case.server}
    relay = await relay_factory(base_config(
        tmp_path, server=server, providers=[provider], routes={"sms": ["api"]},
    ))
    url = relay.url + (case.path if case.path is not None else relay.relay.config.server.path)
    status, body, content_type = await _request(session, url, case)
    assert (status, body.get("error")) == (case.status, case.error), body
    assert body["ok"] is False and body["detail"].startswith(DETAILS[case.id]), body
    assert set(body) == {"ok", "error", "detail"}
    assert content_type == "application/json"
    stats = await relay.relay.outbox.stats()
    assert (stats.pending, stats.inflight, stats.sent, stats.dead) == (0, 0, 0, 0)
    assert relay.relay.outbox.undelivered == 0

    good_headers = ({"X-Api-Key": TOKEN} if "token_header" in case.server
                    else {"Authorization": f"Bearer {case.server.get('tokens', [TOKEN])[0]}"})
    status, answer = await relay.post(session, SMS_BODY, good_headers)
    assert status == 200 and len(answer["ids"]) == 1
    await eventually(lambda: len(fake_api.requests) == 1, what="the good message delivered")
    assert fake_api.requests[0].json()["to"] == "+8613800138000"


def test_every_documented_error_code_is_in_the_table() -> None:
    """The table covers every 4xx error code docs/webhook.md documents for bad input."""
    covered = {c.error for c in CASES}
    expected = {"invalid_json", "invalid_body", "unknown_type", "invalid_number", "invalid_code",
                "too_many_recipients", "message_too_long", "unauthorized", "not_found",
                "method_not_allowed", "body_too_large", "unsupported_media_type",
                "unsupported_encoding", "expectation_failed"}
    assert expected <= covered


async def test_method_not_allowed_names_the_allowed_methods(
    tmp_path: Path, relay_factory: Any, session: aiohttp.ClientSession
) -> None:
    """405 says in ``Allow`` which methods work: POST on the webhook, GET/HEAD on probes."""
    relay = await relay_factory(base_config(tmp_path))
    async with session.get(relay.webhook_url) as r:
        assert r.status == 405 and r.headers["Allow"] == "POST"
    async with session.delete(relay.url + "/metrics") as r:
        assert r.status == 405 and r.headers["Allow"] == "GET, HEAD"


async def test_rotation_accepts_every_configured_token(
    tmp_path: Path, relay_factory: Any, session: aiohttp.ClientSession
) -> None:
    """With two tokens configured (rotation) both are accepted, and nothing else is."""
    relay = await relay_factory(base_config(tmp_path, server={"tokens": [TOKEN, TOKEN2]}))
    for token in (TOKEN, TOKEN2):
        status, _ = await relay.post(session, SMS_BODY, {"Authorization": f"Bearer {token}"})
        assert status == 200
    status, body = await relay.post(session, SMS_BODY, {"Authorization": "Bearer other"})
    assert (status, body["error"]) == (401, "unauthorized")
    stats = await relay.relay.outbox.stats()
    assert stats.pending + stats.inflight + stats.sent == 2


async def test_unauthorized_says_how_to_authenticate(
    tmp_path: Path, relay_factory: Any, session: aiohttp.ClientSession
) -> None:
    """A 401 of the Bearer mode carries ``WWW-Authenticate: Bearer``; one of a header of
    its own (X-Api-Key), no challenge (there is no scheme to name)."""
    relay = await relay_factory(base_config(tmp_path))
    async with session.post(relay.webhook_url, json=SMS_BODY) as r:
        assert r.status == 401 and r.headers.getall("WWW-Authenticate") == ["Bearer"]
    await relay.stop()
    relay = await relay_factory(base_config(tmp_path, server={"token_header": "X-Api-Key"}))
    async with session.post(relay.webhook_url, json=SMS_BODY) as r:
        assert r.status == 401 and "WWW-Authenticate" not in r.headers


async def test_bearer_token_is_all_after_the_scheme(
    tmp_path: Path, relay_factory: Any, session: aiohttp.ClientSession
) -> None:
    """What follows ``Bearer `` is the token, spaces and all; its last word alone is not."""
    relay = await relay_factory(base_config(tmp_path, server={"tokens": ["two words"]}))
    status, _ = await relay.post(session, SMS_BODY, {"Authorization": "Bearer two words"})
    assert status == 200
    status, body = await relay.post(session, SMS_BODY, {"Authorization": "Bearer words"})
    assert (status, body["error"]) == (401, "unauthorized")


async def test_token_header_mode_accepts_the_raw_token(
    tmp_path: Path, relay_factory: Any, session: aiohttp.ClientSession
) -> None:
    """With ``token_header = "X-Api-Key"`` the raw token in that header is accepted: the
    message is stored and delivered; the same token as a Bearer header is not."""
    relay = await relay_factory(base_config(tmp_path, server={"token_header": "X-Api-Key"}))
    status, body = await relay.post(session, SMS_BODY, {"X-Api-Key": TOKEN})
    assert status == 200 and body["ok"] is True
    rows = await settled(relay, body["ids"])
    assert rows[body["ids"][0]].state == State.SENT
    status, body = await relay.post(session, SMS_BODY, {"Authorization": f"Bearer {TOKEN}"})
    assert (status, body["error"]) == (401, "unauthorized")


async def test_unauthenticated_when_allowed(
    tmp_path: Path, relay_factory: Any, session: aiohttp.ClientSession
) -> None:
    """``allow_unauthenticated = true`` with no tokens accepts posts without a token."""
    doc = base_config(tmp_path)
    doc["server"] = {"listen": "127.0.0.1:0", "allow_unauthenticated": True}
    relay = await relay_factory(doc)
    status, body = await relay.post(session, SMS_BODY, {})
    assert status == 200
    rows = await settled(relay, body["ids"])
    assert rows[body["ids"][0]].state == State.SENT


async def test_queue_full_answers_503(
    tmp_path: Path, relay_factory: Any, session: aiohttp.ClientSession
) -> None:
    """Past ``queue.max_pending`` undelivered entries a post gets 503 ``queue_full``, whole."""
    relay = await relay_factory(base_config(tmp_path, queue={"max_pending": 2}), paused=True)
    two = {"Type": 1, "Data": {"Mobiles": ["13800138000", "13800138001"], "Message": "m"}}
    assert (await relay.post(session, two))[0] == 200
    async with session.post(relay.webhook_url, json=SMS_BODY, headers=AUTH) as r:
        body = await r.json()
        assert (r.status, body["error"]) == (503, "queue_full")
        assert r.headers["Retry-After"].isdigit()
    assert (await relay.relay.outbox.stats()).pending == 2
