"""What the webhook says of a body it refuses, fast: ``Webhook.parse`` on the bytes alone (the
relay built, not started), each refusal's status, error code and detail word for word.

The relay tests of test_webhook_errors.py hold the same promises end to end (and that nothing
of a refused body is stored); these are the ones ``make mutation`` runs for every mutant of
the parse."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from hapsms_relay.errors import BadRequest
from hapsms_relay.webhook import Webhook
from tests.helpers import base_config, webhook_of

GOOD = "13800138000"


@pytest.fixture
def hook(tmp_path: Path) -> Webhook:
    return webhook_of(base_config(tmp_path, server={"max_recipients": 3,
                                                    "max_message_chars": 10}))


def sms(**data: Any) -> bytes:
    return orjson.dumps({"Type": 1, "Data": {"Mobiles": [GOOD], "Message": "hello",
                                             "Signature": "Acme", **data}})


def voice(**data: Any) -> bytes:
    return orjson.dumps({"Type": 2, "Data": {"Mobile": GOOD, "Code": "1234", **data}})


def refusal(hook: Webhook, body: bytes) -> tuple[int, str, str]:
    with pytest.raises(BadRequest) as caught:
        hook.parse(body)
    return caught.value.status, caught.value.code, caught.value.detail


BODY = "expected a JSON object with Type and Data"
TYPE = "Type must be the number 1 (SMS) or 2 (voice code)"
MOBILES = "Data.Mobiles must be a non-empty list of strings"
MESSAGE = "Data.Message must be a non-empty string"
NUL = "Data.Message and Data.Signature cannot contain NUL"
CODE = "Data.Code must be a string of 4 to 10 digits"
LONG = "1" * 41  # printable, over 40 characters: shown as the repr of its first 40


@pytest.mark.parametrize(("body", "error", "detail"), [
    (b"[1, 2]", "invalid_body", BODY),
    (b'"text"', "invalid_body", BODY),
    (b'{"Data": {}}', "invalid_body", TYPE),
    (b'{"Type": "1", "Data": {}}', "invalid_body", TYPE),
    (b'{"Type": true, "Data": {}}', "invalid_body", TYPE),
    (b'{"Type": 1.0, "Data": {}}', "invalid_body", TYPE),
    (b'{"Type": 1}', "invalid_body", "Data must be a JSON object"),
    (b'{"Type": 1, "Data": [1]}', "invalid_body", "Data must be a JSON object"),
    (b'{"Type": 3, "Data": {}}', "unknown_type", "Type 3 is not 1 (SMS) or 2 (voice code)"),
    (sms(Mobiles=GOOD), "invalid_body", MOBILES),
    (sms(Mobiles=[]), "invalid_body", MOBILES),
    (sms(Mobiles=None), "invalid_body", MOBILES),
    (sms(Mobiles=[GOOD] * 4), "too_many_recipients", "Data.Mobiles has 4 numbers; at most 3"),
    (sms(Message=""), "invalid_body", MESSAGE),
    (sms(Message=" \n"), "invalid_body", MESSAGE),
    (sms(Message=7), "invalid_body", MESSAGE),
    (sms(Message="x" * 11), "message_too_long", "Data.Message has 11 characters; at most 10"),
    (sms(Signature=7), "invalid_body", "Data.Signature must be a string"),
    (sms(Message="he\x00llo"), "invalid_body", NUL),
    (sms(Signature="Ac\x00me"), "invalid_body", NUL),
    (sms(Mobiles=[GOOD, 13800138001]), "invalid_body", "Data.Mobiles[1] must be a string"),
    (sms(Mobiles=[GOOD, "12"]), "invalid_number", "Data.Mobiles: 12 is not a valid phone number"),
    (sms(Mobiles=["1" * 40]), "invalid_number",
     f"Data.Mobiles: {'1' * 40} is not a valid phone number"),
    (sms(Mobiles=[LONG]), "invalid_number",
     f"Data.Mobiles: {LONG[:40]!r} is not a valid phone number"),
    (sms(Mobiles=["1\n2"]), "invalid_number", "Data.Mobiles: '1\\n2' is not a valid phone number"),
    (voice(Mobile=None), "invalid_body", "Data.Mobile must be a string"),
    (voice(Mobile=13800138000), "invalid_body", "Data.Mobile must be a string"),
    (voice(Mobile="12"), "invalid_number", "Data.Mobile: 12 is not a valid phone number"),
    (voice(Code=1234), "invalid_code", CODE),
    (voice(Code="123"), "invalid_code", CODE),
    (voice(Code="12345678901"), "invalid_code", CODE),
    (voice(Code="12a4"), "invalid_code", CODE),
    (voice(Code="１２３４"), "invalid_code", CODE),  # digits, but not ASCII ones
])
def test_each_refusal_is_400_naming_the_fault(hook: Webhook, body: bytes, error: str,
                                              detail: str) -> None:
    """Each malformed body is 400 with its error code and a detail naming the field."""
    assert refusal(hook, body) == (400, error, detail)


@pytest.mark.parametrize("body", [b"{", b"\xff{}", b""])
def test_a_body_that_is_not_json_is_400_invalid_json(hook: Webhook, body: bytes) -> None:
    """Bytes that are not UTF-8 JSON: 400 invalid_json, with the decoder's reason."""
    status, error, detail = refusal(hook, body)
    assert (status, error) == (400, "invalid_json")
    assert detail.startswith("the body is not valid UTF-8 JSON: ") and len(detail) > 34


@pytest.mark.parametrize(("body", "count"), [
    (sms(), 1), (sms(Mobiles=[GOOD] * 3), 1), (sms(Mobiles=[GOOD, "13800138001"]), 2),
    (sms(Signature=None), 1),
])
def test_what_passes_is_one_entry_per_distinct_number(hook: Webhook, body: bytes,
                                                      count: int) -> None:
    """At the bounds (max_recipients numbers, a null Signature), the body passes: one entry
    per distinct number."""
    assert len(hook.parse(body)) == count


@pytest.mark.parametrize("code", ["1234", "1234567890"])
def test_voice_codes_of_4_to_10_digits(hook: Webhook, code: str) -> None:
    """A voice code of 4 or of 10 digits passes, stored as sent (3 and 11 are refused above)."""
    (entry,) = hook.parse(voice(Code=code))
    assert entry.code == code
