"""What an accepted webhook body is stored as: one outbox entry per recipient, with the
number normalised (E.164, region, national form), the text, the signature without HAP's
brackets, and a voice code as its code alone. Read back through the Outbox protocol from a
relay whose delivery is paused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from hapsms_relay.kinds import KIND_SMS, KIND_VOICE
from hapsms_relay.outbox import Entry
from hapsms_relay.webhook import strip_signature
from tests.helpers import base_config


async def _stored(relay: Any, ids: list[str]) -> list[Entry]:
    now = relay.relay.clock.time()
    entries: list[Entry] = await relay.relay.outbox.claim("test", 100, now, 30)
    assert sorted(str(e.id) for e in entries) == sorted(ids)
    return entries


async def test_sms_is_stored_per_recipient(tmp_path: Path, relay_factory: Any,
                                           session: aiohttp.ClientSession) -> None:
    """Each distinct recipient is one entry of the body's batch: E.164, region, national
    number, the text as sent and the signature out of its 【】; a number given twice (in two
    spellings) is one entry."""
    relay = await relay_factory(base_config(tmp_path), paused=True)
    body = {"Type": 1, "Data": {"Mobiles": ["13800138000", "+86 138 0013 8000", "+12025550123"],
                                "Message": " hello ", "Signature": " 【Acme】 "}}
    status, answer = await relay.post(session, body)
    assert status == 200 and len(answer["ids"]) == 2
    entries = await _stored(relay, answer["ids"])
    assert [(e.kind, e.recipient, e.region, e.national, e.text, e.signature, e.code)
            for e in sorted(entries, key=lambda e: e.id)] == [
        (KIND_SMS, "+8613800138000", "CN", "13800138000", " hello ", "Acme", ""),
        (KIND_SMS, "+12025550123", "US", "2025550123", " hello ", "Acme", ""),
    ]
    assert {e.batch for e in entries} == {min(e.id for e in entries)}


async def test_voice_code_is_stored_as_its_code(tmp_path: Path, relay_factory: Any,
                                                session: aiohttp.ClientSession) -> None:
    """A voice code is one entry: the normalised number and the code, no text or signature."""
    relay = await relay_factory(base_config(tmp_path, routes={"sms": ["dev"], "voice": ["dev"]}),
                                paused=True)
    body = {"Type": 2, "Data": {"Mobile": "+1 202 555 0123", "Code": "0123456789"}}
    status, answer = await relay.post(session, body)
    assert status == 200 and len(answer["ids"]) == 1
    (e,) = await _stored(relay, answer["ids"])
    assert (e.kind, e.recipient, e.region, e.national, e.text, e.signature, e.code) == (
        KIND_VOICE, "+12025550123", "US", "2025550123", "", "", "0123456789")


@pytest.mark.parametrize(("sent", "kept"), [
    ("【Acme】", "Acme"), ("[Acme]", "Acme"), (" 【 Acme 】 ", "Acme"), ("Acme", "Acme"),
    ("【Acme", "【Acme"), ("Acme】", "Acme】"), ("【Acme]", "【Acme]"), ("[Acme】", "[Acme】"),
])
def test_signature_loses_only_a_pair_of_brackets(sent: str, kept: str) -> None:
    """HAP's 【Acme】 or [Acme] is kept as Acme; a bracket without its pair stays."""
    assert strip_signature(sent) == kept


async def test_the_largest_body_the_limits_allow_is_stored(
    tmp_path: Path, relay_factory: Any, session: aiohttp.ClientSession
) -> None:
    """max_recipients numbers and a message of max_message_chars characters are accepted,
    one more of either is not; a null or missing Signature is no signature."""
    relay = await relay_factory(base_config(tmp_path, server={"max_recipients": 2,
                                                              "max_message_chars": 5}),
                                paused=True)

    def body(mobiles: list[str], message: str) -> dict[str, Any]:
        return {"Type": 1, "Data": {"Mobiles": mobiles, "Message": message, "Signature": None}}

    two = ["13800138000", "13800138001"]
    status, answer = await relay.post(session, body(two, "12345"))
    assert status == 200 and len(answer["ids"]) == 2
    assert {(e.text, e.signature) for e in await _stored(relay, answer["ids"])} == {("12345", "")}
    unsigned = {"Type": 1, "Data": {"Mobiles": ["13800138003"], "Message": "hi"}}
    status, answer = await relay.post(session, unsigned)
    assert status == 200
    assert [e.signature for e in await _stored(relay, answer["ids"])] == [""]
    status, answer = await relay.post(session, body([*two, "13800138002"], "12345"))
    assert (status, answer["error"]) == (400, "too_many_recipients")
    status, answer = await relay.post(session, body(two, "123456"))
    assert (status, answer["error"]) == (400, "message_too_long")
