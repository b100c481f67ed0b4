"""The webhook's checks before the body is read (``Webhook.check_request``), fast: a real
request on a real loopback socket, through a tiny aiohttp app whose handler is the check
alone and answers what it returned or the error the relay would answer (the relay's own
``error_response``). The method, the token (only when tokens are set; each of several, in the
``Authorization: Bearer`` mode or a header of its own, and what a 401 says), the content type
and its charset, the content encoding and the Idempotency-Key's bounds, each on both sides."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from hapsms_relay.errors import BadRequest
from hapsms_relay.webhook import error_response
from tests.helpers import AUTH, TOKEN, TOKEN2, base_config, webhook_of

JSON_AUTH = {**AUTH, "Content-Type": "application/json"}

Check = Callable[..., Awaitable[tuple[int, Any, Any]]]


@pytest.fixture
async def check(tmp_path: Path, session: aiohttp.ClientSession) -> AsyncIterator[Check]:
    """Sends a request to the check of a relay's webhook (built, not started); its status,
    JSON body and headers. ``tokens``: False for a relay without tokens, a list for these
    tokens; ``settings``: more of its [server] settings."""
    runners: list[web.AppRunner] = []

    async def send(headers: Any = JSON_AUTH, method: str = "POST", *,
                   tokens: bool | list[str] = True, **settings: Any) -> tuple[int, Any, Any]:
        server: dict[str, Any] = {"path": "/hap"} if tokens else {
            "path": "/hap", "tokens": [], "allow_unauthenticated": True}
        if isinstance(tokens, list):
            server["tokens"] = tokens
        doc = base_config(tmp_path, server={**server, **settings})
        webhook = webhook_of(doc)

        async def handle(request: web.Request) -> web.Response:
            try:
                return web.json_response({"key": webhook.check_request(request)})
            except BadRequest as exc:
                return error_response(exc)

        app = web.Application()
        app.router.add_route("*", "/hap", handle)
        # as the relay's server: a Content-Encoding is refused, not decoded
        runner = web.AppRunner(app, handle_signals=False, auto_decompress=False)
        await runner.setup()
        runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/hap"
        async with session.request(method, url, data=b"{}", headers=headers) as r:
            return r.status, orjson.loads(await r.read()), r.headers

    yield send
    for runner in runners:
        await runner.cleanup()


@pytest.mark.parametrize("content_type", [
    "application/json", "application/json; charset=utf-8", "application/json; charset=UTF-8",
    "application/json; charset=utf8", "Application/JSON",
])
async def test_json_in_utf8_passes(check: Check, content_type: str) -> None:
    """application/json without a charset or with UTF-8 (any spelling) passes; no key: None."""
    status, body, _ = await check({**AUTH, "Content-Type": content_type})
    assert (status, body) == (200, {"key": None})


@pytest.mark.parametrize("content_type", [
    "text/plain", "application/x-www-form-urlencoded", "application/json; charset=latin-1",
    "application/json; charset=utf-16", "",
])
async def test_other_content_types_are_415(check: Check, content_type: str) -> None:
    """Another type, or JSON in another charset, is 415 unsupported_media_type."""
    status, body, _ = await check({**AUTH, "Content-Type": content_type})
    assert (status, body) == (415, {"ok": False, "error": "unsupported_media_type",
                                    "detail": "send Content-Type: application/json (UTF-8)"})


@pytest.mark.parametrize("encoding", ["identity", " Identity ", "IDENTITY", ""])
async def test_identity_encoding_passes(check: Check, encoding: str) -> None:
    """Content-Encoding identity (any case, spaces around) or empty is a plain body."""
    status, body, _ = await check({**JSON_AUTH, "Content-Encoding": encoding})
    assert (status, body) == (200, {"key": None})


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "identity, gzip"])
async def test_compressed_bodies_are_415(check: Check, encoding: str) -> None:
    """A compressed body is 415 unsupported_encoding, saying Accept-Encoding: identity."""
    status, body, headers = await check({**JSON_AUTH, "Content-Encoding": encoding})
    assert (status, body) == (415, {"ok": False, "error": "unsupported_encoding", "detail":
                                    "send the body uncompressed (no Content-Encoding)"})
    assert headers["Accept-Encoding"] == "identity"


@pytest.mark.parametrize("key", ["k", "order-7781", "x" * 255, "~ !\"#$%&'()*+,-./:;<=>?@[]^_`{|}"])
async def test_idempotency_keys_of_1_to_255_printable_ascii_pass(check: Check, key: str) -> None:
    """An Idempotency-Key of 1 to 255 printable ASCII characters is returned as sent."""
    status, body, _ = await check({**JSON_AUTH, "Idempotency-Key": key})
    assert (status, body) == (200, {"key": key})


@pytest.mark.parametrize("key", ["", "x" * 256, "é-key", "tab\there"])
async def test_other_idempotency_keys_are_400(check: Check, key: str) -> None:
    """An empty, overlong, non-ASCII or unprintable Idempotency-Key is 400."""
    status, body, _ = await check([*JSON_AUTH.items(), ("Idempotency-Key", key)])
    assert (status, body) == (400, {"ok": False, "error": "invalid_idempotency_key", "detail":
                                    "Idempotency-Key must be 1 to 255 printable ASCII characters"})


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
async def test_only_post(check: Check, method: str) -> None:
    """Any method but POST is 405, naming the path and allowing POST."""
    status, body, headers = await check(method=method)
    assert (status, body) == (405, {"ok": False, "error": "method_not_allowed",
                                    "detail": "use POST for /hap"})
    assert headers["Allow"] == "POST"


async def test_token_checked_only_when_tokens_are_set(check: Check) -> None:
    """With tokens, a request without one is 401 (before its content type is looked at);
    without tokens, none is asked for."""
    status, body, _ = await check({"Content-Type": "text/plain"})
    assert (status, body["error"]) == (401, "unauthorized")
    status, body, _ = await check({"Content-Type": "application/json"}, tokens=False)
    assert (status, body) == (200, {"key": None})


async def test_method_checked_first(check: Check) -> None:
    """A GET without token or content type is 405, not 401 or 415."""
    status, body, _ = await check({}, method="GET")
    assert (status, body["error"]) == (405, "method_not_allowed")


UNAUTHORIZED = {"ok": False, "error": "unauthorized"}


async def test_a_401_says_how_to_send_the_token(check: Check) -> None:
    """A 401 names what to send: in the Bearer mode ``Authorization: Bearer <token>`` with a
    ``WWW-Authenticate: Bearer`` challenge; with a header of its own (X-Api-Key) that header,
    and no challenge (there is no scheme to name)."""
    status, body, headers = await check({"Content-Type": "application/json"})
    assert (status, body) == (401, {**UNAUTHORIZED, "detail": "missing or wrong token; send "
                                    "Authorization: Bearer <token>"})
    assert headers.getall("WWW-Authenticate") == ["Bearer"]
    status, body, headers = await check({"Content-Type": "application/json"},
                                        token_header="X-Api-Key")
    assert (status, body) == (401, {**UNAUTHORIZED, "detail": "missing or wrong token; send "
                                    "X-Api-Key: <token>"})
    assert "WWW-Authenticate" not in headers


@pytest.mark.parametrize("token", [TOKEN, TOKEN2])
async def test_each_of_several_tokens_passes(check: Check, token: str) -> None:
    """With two tokens (a rotation), the first passes as the second does."""
    status, body, _ = await check({"Authorization": f"Bearer {token}",
                                   "Content-Type": "application/json"}, tokens=[TOKEN, TOKEN2])
    assert (status, body) == (200, {"key": None})


@pytest.mark.parametrize("authorization", [
    "Bearer two words", "bearer two words", "Bearer  two words", "BEARER two words ",
])
async def test_the_bearer_token_is_all_after_the_scheme(check: Check, authorization: str) -> None:
    """After ``Bearer`` (any case) and one or more spaces (RFC 9110's ``1*SP``), the rest is
    the token, spaces and all."""
    status, body, _ = await check({"Authorization": authorization,
                                   "Content-Type": "application/json"}, tokens=["two words"])
    assert (status, body) == (200, {"key": None})


@pytest.mark.parametrize(("headers", "server"), [
    ({"Authorization": "Bearer words"}, {"tokens": ["two words"]}),  # the last word alone
    ({"Authorization": "Basic XXXX"}, {"tokens": [TOKEN, "XXXX"]}),  # a token, another scheme
    ({"Authorization": "XXXX"}, {"tokens": [TOKEN, "XXXX"]}),  # a token, no scheme
    ({"Authorization": "Bearer "}, {}),
    ({}, {"token_header": "X-Api-Key", "tokens": [TOKEN, "XXXX"]}),  # no header at all
    ({"X-Api-Key": ""}, {"token_header": "X-Api-Key"}),
    ({"X-Api-Key": f"Bearer {TOKEN}"}, {"token_header": "X-Api-Key"}),
    (AUTH, {"token_header": "X-Api-Key"}),  # the Bearer header in the X-Api-Key mode
])
async def test_anything_but_a_token_is_401(check: Check, headers: dict[str, str],
                                           server: dict[str, Any]) -> None:
    """A token's last word, a token under another scheme or none, an empty token, no header:
    each is 401."""
    status, body, _ = await check({**headers, "Content-Type": "application/json"}, **server)
    assert (status, body["error"]) == (401, "unauthorized")


async def test_a_header_of_its_own_takes_the_raw_token(check: Check) -> None:
    """With ``token_header = "X-Api-Key"``, the token as sent in that header passes."""
    status, body, _ = await check({"X-Api-Key": TOKEN, "Content-Type": "application/json"},
                                  token_header="X-Api-Key")
    assert (status, body) == (200, {"key": None})
