"""Each provider's error table, row by row, as the README documents it: which of the vendor's
codes are transient (retried, failed over) and which permanent (dead at once), with the
vendor's code and text kept for the logs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from hapsms_relay import config
from hapsms_relay.errors import DeliveryError, PermanentError, TransientError
from hapsms_relay.providers import aliyun, smtp, tencent
from hapsms_relay.providers.base import Sent, classify_http_status, retry_after
from hapsms_relay.providers.twilio import TwilioProvider
from hapsms_relay.providers.vonage import STATUS, VonageProvider
from tests.helpers import base_config

T, P = TransientError, PermanentError


def provider(table: dict[str, Any]) -> Any:
    doc = base_config(Path("/nonexistent"), providers=[table], routes={"sms": [table["name"]]})
    return config.parse(doc).providers[table["name"]]


def twilio() -> TwilioProvider:
    p = provider({"name": "tw", "type": "twilio", "account_sid": "AC" + "0" * 32,
                  "auth_token": "k-123", "from": "+15017122661"})
    assert isinstance(p, TwilioProvider)
    return p


def vonage() -> VonageProvider:
    p = provider({"name": "vg", "type": "vonage", "api_key": "a1b2", "api_secret": "k-123",
                  "from": "Acme"})
    assert isinstance(p, VonageProvider)
    return p


def check(err: DeliveryError | None, kind: type[DeliveryError], provider: str, code: str,
          text: str | None = None) -> None:
    assert type(err) is kind, (err, kind)
    assert err.provider == provider and err.code == code
    if text is not None:
        assert err.text == text


# -- the HTTP rule (http provider, and any vendor answer without its own code) --------------

@pytest.mark.parametrize(("status", "kind"), [
    (400, P), (401, P), (403, P), (404, P), (407, P), (409, P), (413, P), (422, P), (499, P),
    (408, T), (429, T), (500, T), (502, T), (503, T), (504, T), (599, T), (302, T), (200, T),
])
def test_http_status_rule(status: int, kind: type[DeliveryError]) -> None:
    """4xx but 408 and 429 is permanent; 408, 429 and 5xx are transient; the code is http_<status>."""
    err = classify_http_status("api", status, "body text", {})
    check(err, kind, "api", f"http_{status}", "body text")


def test_http_transient_carries_retry_after_and_permanent_ignores_it() -> None:
    """A transient HTTP failure keeps the provider's Retry-After; delta-seconds are read exactly."""
    err = classify_http_status("api", 429, "", {"Retry-After": "17"})
    assert isinstance(err, TransientError) and err.retry_after == 17.0
    assert classify_http_status("api", 503, "", {}).retry_after is None  # type: ignore[attr-defined]
    assert not hasattr(classify_http_status("api", 400, "", {"Retry-After": "5"}), "retry_after")


@pytest.mark.parametrize(("value", "seconds"), [
    ("0", 0.0), ("7", 7.0), (" 120 ", 120.0), ("", None), ("soon", None), ("-5", None),
    ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),  # a date in the past: go now, not never
])
def test_retry_after_header(value: str, seconds: float | None) -> None:
    """Retry-After in delta-seconds or as an HTTP date; anything else is no hint."""
    assert retry_after({"Retry-After": value}) == seconds
    assert retry_after({}) is None


def test_retry_after_http_date_in_the_future() -> None:
    """An HTTP date ahead of now is the seconds until then."""
    import email.utils
    import time

    when = email.utils.formatdate(time.time() + 3600, usegmt=True)
    got = retry_after({"Retry-After": when})
    assert got is not None and 3590 < got <= 3600


# -- Tencent --------------------------------------------------------------------------------

@pytest.mark.parametrize(("code", "kind"), [
    ("InternalError", T), ("InternalError.Timeout", T), ("InternalError.OtherError", T),
    ("RequestLimitExceeded", T), ("RequestLimitExceeded.PhoneNumberDailyLimit", T),
    ("ResourceUnavailable", T), ("ResourceUnavailable.ServiceUnavailable", T),
    ("AuthFailure.SecretIdNotFound", P), ("AuthFailure.SignatureFailure", P),
    ("InvalidParameterValue.IncorrectPhoneNumber", P),
    ("FailedOperation.TemplateIncorrectOrUnapproved", P),
    ("FailedOperation.InsufficientBalanceInSmsPackage", P),
    ("FailedOperation.PhoneNumberInBlacklist", P), ("UnknownCode", P), ("", P),
    ("internalerror", P),  # codes are case-sensitive
    ("X.InternalError", P),  # the class is the code's start, not a substring
])
def test_tencent_table(code: str, kind: type[DeliveryError]) -> None:
    """Tencent: InternalError*, RequestLimitExceeded*, ResourceUnavailable* are transient;
    every other code, known or not, is permanent; code and text are kept as given."""
    check(tencent.classify("tc", code, "the text"), kind, "tc", code, "the text")


@pytest.mark.parametrize("code", [
    "LimitExceeded.PhoneNumberThirtySecondLimit", "LimitExceeded.PhoneNumberOneHourLimit",
    "LimitExceeded.PhoneNumberDailyLimit", "LimitExceeded.PhoneNumberSameContentDailyLimit",
])
def test_tencent_per_number_caps_are_permanent_and_say_so(code: str) -> None:
    """Tencent's own per-number caps are permanent, and the reason says it is Tencent's cap."""
    err = tencent.classify("tc", code, "exceeded")
    check(err, P, "tc", code, "Tencent's own cap for this number, not retried: exceeded")


@pytest.mark.parametrize("code", [
    "LimitExceeded.PhoneNumberCountLimit2",  # not a cap name: ends otherwise
    "LimitExceeded.AppDailyLimit", "xLimitExceeded.PhoneNumberDailyLimit",
    "LimitExceeded.PhoneNumberDailyLimit.x",
])
def test_tencent_other_limits_are_plain_permanent(code: str) -> None:
    """Only LimitExceeded.PhoneNumber*Limit names a per-number cap; other codes keep their text."""
    check(tencent.classify("tc", code, "t"), P, "tc", code, "t")


# -- Alibaba --------------------------------------------------------------------------------

@pytest.mark.parametrize(("code", "status", "kind", "kept"), [
    ("Throttling", 200, T, "Throttling"), ("Throttling.User", 200, T, "Throttling.User"),
    ("isp.SYSTEM_ERROR", 200, T, "isp.SYSTEM_ERROR"), ("isp.RAM_PERMISSION_DENY", 200, T, None),
    ("ServiceUnavailable", 503, T, "ServiceUnavailable"), ("InternalError", 500, T, None),
    ("isv.MOBILE_NUMBER_ILLEGAL", 200, P, None), ("isv.SMS_TEMPLATE_ILLEGAL", 200, P, None),
    ("isv.SMS_SIGNATURE_ILLEGAL", 200, P, None), ("InvalidAccessKeyId.NotFound", 404, P, None),
    ("SignatureDoesNotMatch", 400, P, None), ("isv.UNKNOWN", 500, P, None),
    ("", 500, T, "http_500"), ("", 503, T, "http_503"), ("", 599, T, "http_599"),
    ("", 400, P, "http_400"), ("", 499, P, "http_499"), ("", 200, P, "http_200"),
    ("isP.SYSTEM_ERROR", 200, P, None),  # case-sensitive
])
def test_aliyun_table(code: str, status: int, kind: type[DeliveryError], kept: str | None) -> None:
    """Alibaba: Throttling*, isp.*, ServiceUnavailable, InternalError transient; any other
    code permanent; without a Code the HTTP status decides (5xx transient)."""
    check(aliyun.classify("ali", code, "words", status), kind, "ali", kept or code, "words")


def test_aliyun_default_status_is_200() -> None:
    """A body's Code with no status given is read as a 200 answer's."""
    check(aliyun.classify("ali", "", "w"), P, "ali", "http_200", "w")


def test_aliyun_per_number_cap_is_permanent_and_says_so() -> None:
    """isv.BUSINESS_LIMIT_CONTROL is Alibaba's per-number cap: permanent, and the reason says so."""
    err = aliyun.classify("ali", "isv.BUSINESS_LIMIT_CONTROL", "触发小时级流控")
    assert type(err) is P and err.code == "isv.BUSINESS_LIMIT_CONTROL"
    assert "触发小时级流控" in err.text and err.text != "触发小时级流控"
    other = aliyun.classify("ali", "isv.BUSINESS_LIMIT_CONTROLX", "t")
    assert other.text == "t"


# -- Twilio ---------------------------------------------------------------------------------

def twilio_body(code: Any, message: str = "the message") -> str:
    import orjson

    return orjson.dumps({"code": code, "message": message, "status": 400}).decode()


@pytest.mark.parametrize(("status", "code", "kind"), [
    (400, 21211, P), (400, 21614, P), (400, 21610, P), (401, 20003, P), (400, 21408, P),
    (404, 20404, P), (429, 20429, T), (400, 20429, T), (400, 21611, T), (500, 20500, T),
    (503, 20503, T), (408, 20408, T), (429, 21999, T),
    (500, 21211, P), (429, 20003, P),  # a permanent code wins over the status
])
def test_twilio_table(status: int, code: int, kind: type[DeliveryError]) -> None:
    """Twilio's JSON code decides: 21211, 21614, 21610, 20003 permanent; 20429, 21611, 429 and
    5xx transient; any other 4xx permanent; the code and message are kept."""
    err = twilio().classify(status, twilio_body(code), {"Retry-After": "9"})
    check(err, kind, "tw", str(code), "the message")
    if kind is T:
        assert err.retry_after == 9.0  # type: ignore[attr-defined]


@pytest.mark.parametrize(("status", "body", "kind"), [
    (429, "slow down", T), (503, "<html>down</html>", T), (400, "not json", P),
    (400, '{"code": "21211"}', P), (400, '{"code": true}', P), (500, "[1]", T),
])
def test_twilio_without_a_numeric_code_follows_the_http_rule(
        status: int, body: str, kind: type[DeliveryError]) -> None:
    """Without an integer JSON code (not JSON, a string, a bool) the HTTP status decides."""
    check(twilio().classify(status, body, {}), kind, "tw", f"http_{status}", body)


def test_twilio_message_missing_or_long() -> None:
    """A missing message is empty text; a long one is cut to 300 characters."""
    assert twilio().classify(400, '{"code": 21211}', {}).text == ""
    long = twilio().classify(400, twilio_body(21211, "x" * 400), {})
    assert long.text == "x" * 300


# -- Vonage ---------------------------------------------------------------------------------

VONAGE_TRANSIENT = {"1", "5", "10"}
VONAGE_PERMANENT = {"2", "3", "4", "6", "7", "8", "9", "11", "12", "14", "15", "22", "23", "29",
                    "32", "33"}


def vonage_body(*parts: dict[str, Any]) -> str:
    import orjson

    return orjson.dumps({"message-count": str(len(parts)), "messages": list(parts)}).decode()


def test_vonage_table_is_the_readmes() -> None:
    """The status table holds exactly the README's transient and permanent rows."""
    assert {s for s, (_, t) in STATUS.items() if t} == VONAGE_TRANSIENT
    assert {s for s, (_, t) in STATUS.items() if not t} == VONAGE_PERMANENT


@pytest.mark.parametrize("status", sorted(VONAGE_TRANSIENT | VONAGE_PERMANENT | {"13", "99"}, key=int))
def test_vonage_status_row(status: str) -> None:
    """Each status: transient or permanent as the table says (unknown: permanent), with
    Vonage's error-text as the reason, or the table's meaning when it sends none."""
    kind = T if status in VONAGE_TRANSIENT else P
    check(vonage().check(vonage_body({"status": status, "error-text": "why"})), kind, "vg", status, "why")
    meaning = STATUS.get(status, ("",))[0]
    check(vonage().check(vonage_body({"status": status})), kind, "vg", status, meaning)


def test_vonage_part_without_a_message_id() -> None:
    """A sent part without a message-id has an empty id, not a made-up one."""
    assert vonage().check(vonage_body({"status": "0"})) == Sent(("",), 1)


def test_vonage_every_part_must_be_sent() -> None:
    """A long text counts as sent only if every part has status 0; the failing part is named."""
    assert vonage().check(vonage_body({"status": "0", "message-id": "m1"})) == Sent(("m1",), 1)
    assert vonage().check(vonage_body({"status": "0", "message-id": "m1"},
                                      {"status": 0, "message-id": "m2"})) == Sent(("m1", "m2"), 2)
    err = vonage().check(vonage_body({"status": "0"}, {"status": "1", "error-text": "slow"}))
    check(err, T, "vg", "1", "part 2 of 2: slow")
    err = vonage().check(vonage_body({"status": "7"}, {"status": "0"}, {"status": "0"}))
    check(err, P, "vg", "7", "part 1 of 3: Number Barred")


@pytest.mark.parametrize("body", [
    "not json", "[]", "{}", '{"messages": []}', '{"messages": "x"}', '{"messages": [1]}',
    '{"messages": [{"status": "0"}, "x"]}',
])
def test_vonage_unreadable_answer_is_transient(body: str) -> None:
    """An answer that is not Vonage's JSON is transient (bad_response): it may have been sent."""
    check(vonage().check(body), T, "vg", "bad_response", body)


def test_vonage_part_without_status_is_permanent_bad_response() -> None:
    """A part with no status at all is not a success."""
    check(vonage().check(vonage_body({"error-text": "?"})), P, "vg", "bad_response", "?")


# -- SMTP (email-to-SMS gateways) -----------------------------------------------------------

@pytest.mark.parametrize(("code", "kind"), [
    (421, T), (450, T), (451, T), (452, T), (499, T), (500, P), (550, P), (553, P), (554, P),
    (599, P), (600, T),
])
def test_smtp_reply_classes(code: int, kind: type[DeliveryError]) -> None:
    """RFC 5321: 4yz transient, 5yz permanent; the reply is the reason."""
    exc = aiosmtplib.SMTPResponseException(code, "mailbox says no")
    check(smtp._classify("mail", exc), kind, "mail", f"smtp_{code}", f"{code} mailbox says no")
