"""Property-based fuzzing of the webhook with hypothesis: generated bodies, headers (content
encodings, Expect, control characters), methods, paths and clients hanging up mid-body never
get a 5xx or a traceback, never see a token echoed, and only a valid body is ever enqueued.

``make test`` runs 300 examples; ``make fuzz`` runs 10,000 (FUZZ_EXAMPLES overrides both).
"""

from __future__ import annotations

import asyncio
import gzip
import http.client
import io
import logging
import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest

from hapsms_relay import log
from hapsms_relay.numbers import InvalidNumber, normalise
from tests.helpers import TOKEN, base_config, leaked, start_relay

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
PATH = "/sms/webhook"
MAX_BODY = 4096

_numbers = st.one_of(
    st.sampled_from(["13800138000", "+8613800138001", "008613800138002", "8613800138003",
                     "+12025550123", "+19005550123", "+85251234567", "138 0013 8004"]),
    st.from_regex(r"\A\+?[0-9]{1,16}\Z"),
    st.text(max_size=40),
)
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
_maybe = st.one_of(st.just(None), _json)  # None: the key is left out
_sms = st.fixed_dictionaries({}, optional={
    "Mobiles": st.one_of(st.lists(_numbers, max_size=5), _json),
    "Message": st.one_of(st.text(max_size=60), st.text(min_size=1990, max_size=2010), _json),
    "Signature": st.one_of(st.text(max_size=12), st.sampled_from(["【Acme】", "[Acme]", "a\x00b"]), _json),
})
_voice = st.fixed_dictionaries({}, optional={
    "Mobile": st.one_of(_numbers, _json),
    "Code": st.one_of(st.from_regex(r"\A[0-9]{2,12}\Z"), st.text(max_size=12), _json),
})
_structured = st.builds(
    lambda t, d: {"Type": t, "Data": d},
    st.one_of(st.sampled_from([1, 2, 1, 2, 3, 0, -1, True, "1", 1.0, None]), _json),
    st.one_of(_sms, _voice, _json),
)
_body = st.one_of(
    _structured.map(orjson.dumps),
    _structured.map(orjson.dumps),
    _json.map(orjson.dumps),
    st.binary(max_size=300),
    st.binary(min_size=MAX_BODY - 10, max_size=MAX_BODY + 10),
)
_latin1 = st.text(st.characters(min_codepoint=32, max_codepoint=255), max_size=300)
# Control characters in a header value (tab is allowed; http.client itself refuses a bare
# CR or LF): aiohttp's parser refuses the request, and its answer must never echo the value.
_control = st.text(st.characters(max_codepoint=31, exclude_characters="\r\n") | st.just("\x7f"),
                   min_size=1, max_size=3)
_headers = st.fixed_dictionaries({
    "Content-Type": st.sampled_from(["application/json", "application/json; charset=utf-8",
                                     "application/json; charset=latin-1", "text/plain", ""]),
    "Authorization": st.one_of(st.just(f"Bearer {TOKEN}"), st.just(f"bearer  {TOKEN} "),
                               st.just(""), _latin1.map(lambda s: "Bearer " + s),
                               _control.map(lambda c: f"Bearer {TOKEN}{c}"),
                               _control.map(lambda c: f"Bearer {c}{TOKEN}")),
}, optional={
    "Idempotency-Key": _latin1,
    "Content-Encoding": st.sampled_from(["gzip", "deflate", "br", "zstd", "identity", "GZIP",
                                         "gzip, identity", "x-unknown", ""]),
    "Expect": st.sampled_from(["100-continue", "100-Continue", "200-ok", ""]),
    "X-Note": st.one_of(_latin1, _control),
})
_request = st.tuples(
    st.sampled_from(["POST"] * 8 + ["GET", "PUT"]),
    st.sampled_from([PATH] * 8 + ["/", "/healthz", "/sms/webhook/x"]),
    _headers,
    _body,
    st.booleans(),  # the body gzip-compressed (whatever Content-Encoding says)
    st.one_of(st.none(), st.none(), st.none(), st.floats(0, 0.99)),  # hang up this far in
)


def expected_ids(body: bytes) -> int | None:
    """An oracle written from docs/webhook.md: how many ids a valid body gets, None if invalid."""
    if len(body) > MAX_BODY:
        return None
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("Data"), dict):
        return None
    kind, data = doc.get("Type"), doc["Data"]
    if type(kind) is not int or kind not in (1, 2):
        return None
    if kind == 2:
        code = data.get("Code")
        if not (isinstance(code, str) and code.isascii() and code.isdigit() and 4 <= len(code) <= 10):
            return None
        return _count([data.get("Mobile")])
    mobiles, message, sig = data.get("Mobiles"), data.get("Message"), data.get("Signature", "")
    if not isinstance(mobiles, list) or not mobiles or len(mobiles) > 1000:
        return None
    if not isinstance(message, str) or not message.strip() or len(message) > 2000:
        return None
    if sig is not None and not isinstance(sig, str):
        return None
    if "\x00" in message or "\x00" in (sig or ""):
        return None
    return _count(mobiles)


def _count(values: list[Any]) -> int | None:
    seen = set()
    for v in values:
        if not isinstance(v, str):
            return None
        try:
            seen.add(normalise(v, "CN").e164)
        except InvalidNumber:
            return None
    return len(seen)


class _Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class _LeakCheck(io.StringIO):
    """A log stream that checks every line as the suite's fixture does, keeping only leaks."""

    def __init__(self) -> None:
        super().__init__()
        self.lines = 0
        self.leaks: list[str] = []

    def write(self, text: str) -> int:
        for line in text.splitlines():
            self.lines += 1
            if leaked(line):
                self.leaks.append(line[:300])
        return len(text)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A relay (delivery paused) on its own loop in a thread, for a synchronous client."""
    tmp = tmp_path_factory.mktemp("fuzz")
    doc = base_config(tmp, server={"max_body_bytes": MAX_BODY},
                      limits={"deny_number_types": []})  # numbers are the oracle's business
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    relay = asyncio.run_coroutine_threadsafe(start_relay(doc, paused=True), loop).result(30)
    yield relay
    asyncio.run_coroutine_threadsafe(relay.stop(), loop).result(30)
    # what asyncio.run does on its way out: a connection lost while aiohttp read the rest of
    # a refused body (lingering, up to 1 s) leaves its task behind
    asyncio.run_coroutine_threadsafe(_cancel_the_rest(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


async def _cancel_the_rest() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def test_webhook_fuzz(served: Any) -> None:
    """Generated requests never get a 5xx or a traceback; a 200 only for a valid body, with
    exactly its recipients enqueued; a body docs/webhook.md calls valid is accepted."""
    # the relay's whole log, at debug level, goes through the suite's leak check line by
    # line (the autouse fixture cannot see a stream of its own; 10,000 runs' lines are not kept)
    checked = _LeakCheck()
    log.setup("debug", stream=checked)
    errors = _Errors()
    log.LOGGER.addHandler(errors)
    host, port = served.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    outbox = served.relay.outbox
    seen = {"n": 0}

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(_request)
    def check(req: tuple[str, str, dict[str, str], bytes, bool, float | None]) -> None:
        method, path, headers, body, compressed, hang_up = req
        seen["n"] += 1
        if compressed:
            body = gzip.compress(body)
        if hang_up is not None:  # a client leaving mid-body: nothing stored, nothing logged
            before = outbox.undelivered
            _hang_up(host, int(port), method, path, headers, body, hang_up)
            assert outbox.undelivered == before
            return
        before = outbox.undelivered
        try:
            conn.request(method, path, body=body, headers=headers)
            r = conn.getresponse()
            raw = r.read()
        except (http.client.HTTPException, OSError):
            conn.close()  # the relay closed the connection (a 4xx it will not keep alive for)
            conn.request(method, path, body=body, headers=headers)
            r = conn.getresponse()
            raw = r.read()
        if r.getheader("Connection", "").lower() == "close":
            conn.close()
        assert r.status < 500, raw
        assert TOKEN.encode() not in raw  # nothing a client sends as a token is echoed
        answer = orjson.loads(raw)
        assert isinstance(answer, dict) and isinstance(answer.get("ok"), bool)
        enqueued = outbox.undelivered - before
        scheme, _, token = headers["Authorization"].partition(" ")
        ok_request = (method == "POST" and path == PATH
                      and scheme.lower() == "bearer" and token.strip() == TOKEN
                      and headers["Content-Type"].startswith("application/json")
                      and "latin" not in headers["Content-Type"]
                      and _key_ok(headers.get("Idempotency-Key"))
                      and headers.get("Content-Encoding", "").strip().lower() in ("", "identity")
                      and headers.get("Expect", "100-continue").lower() == "100-continue"
                      and all(_clean(v) for v in headers.values()))
        expected = expected_ids(body) if ok_request else None
        if r.status == 200 and path == PATH:
            assert expected is not None and answer["ok"] is True, (body, answer)
            if answer.get("duplicate"):  # a repeated Idempotency-Key: the first answer again
                assert enqueued == 0
            else:
                assert len(answer["ids"]) == expected == enqueued
        else:
            assert enqueued == 0
            assert expected is None, (r.status, body, answer)

    try:
        check()
    finally:
        conn.close()
        log.LOGGER.removeHandler(errors)
    assert not errors.records, [e.getMessage() for e in errors.records]
    assert seen["n"] >= EXAMPLES
    metrics = generate_latest(served.relay.metrics.registry).decode()
    assert 'status="5' not in metrics  # no 5xx counted, client disconnects included
    assert checked.lines > 0  # the relay did log through it (accepted lines, at least)
    assert not checked.leaks, f"secret or unmasked number in the relay's log: {checked.leaks[:3]}"


def _hang_up(host: str, port: int, method: str, path: str, headers: dict[str, str],
             body: bytes, share: float) -> None:
    """Send the request with only ``share`` of its body, then close the connection."""
    head = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    data = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body[:int(len(body) * share)]
    with socket.create_connection((host, port), timeout=30) as sock:
        sock.sendall(data)


def _clean(value: str) -> bool:
    """Whether aiohttp's parser accepts this header value (no control character but tab)."""
    return all(c == "\t" or (ord(c) >= 32 and c != "\x7f") for c in value)


def _key_ok(key: str | None) -> bool:
    return key is None or (0 < len(key) <= 255 and key.isascii() and key.isprintable())


def test_oracle_agrees_with_readme_samples() -> None:
    """The oracle accepts HAP's samples and refuses obvious garbage."""
    assert expected_ids(orjson.dumps({"Type": 1, "Data": {"Mobiles": ["13800138000"],
                                                         "Message": "hi"}})) == 1
    assert expected_ids(orjson.dumps({"Type": 2, "Data": {"Mobile": "13800138000",
                                                         "Code": "1234"}})) == 1
    assert expected_ids(b"{") is None
    assert expected_ids(orjson.dumps({"Type": 1, "Data": {
        "Mobiles": ["13800138000", "+8613800138000", "13800138001"], "Message": "hi"}})) == 2
    assert expected_ids(orjson.dumps({"Type": 3, "Data": {"Mobile": "13800138000"}})) is None
    assert expected_ids(orjson.dumps({"Type": 2, "Data": {"Mobile": "13800138000",
                                                         "Code": "12"}})) is None
