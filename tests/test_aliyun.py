"""The Alibaba Cloud provider against a loopback fake of SendSms and SingleCallByTts."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from alibabacloud_openapi_util.client import Client as AliyunUtil
from hypothesis import given, settings
from hypothesis import strategies as st
from Tea.request import TeaRequest

from hapsms_relay.errors import ConfigError, PermanentError, TransientError, UnsupportedError
from hapsms_relay.numbers import normalise
from hapsms_relay.outbox import State
from hapsms_relay.providers.aliyun import AliyunProvider, acs3_authorization, canonical_query
from hapsms_relay.providers.base import Message, Sent
from tests.fake_clouds import (
    ALI_INTL_TEMPLATE,
    ALI_KEY_ID,
    ALI_KEY_SECRET,
    EN_CODE_MATCH,
    AliyunFake,
    aliyun_table,
    build_provider,
)
from tests.fakes import FakeAPI, Reply
from tests.helpers import SMS_BODY, VOICE_BODY, base_config, post_settled

CODE_TEXT = "您的验证码是123456，感谢您的使用！"
EN_TEXT = "Your verification code is 123456"


@pytest.fixture
async def aliyun(fake_api: FakeAPI) -> AliyunFake:
    return AliyunFake(fake_api)


@pytest.fixture
async def provider(fake_api: FakeAPI, session: aiohttp.ClientSession) -> AsyncIterator[AliyunProvider]:
    p = build(aliyun_table(fake_api.url))
    await p.open(session)
    yield p
    await p.close()


def build(table: dict[str, Any]) -> AliyunProvider:
    p = build_provider(table)
    assert isinstance(p, AliyunProvider)
    return p


def sms(number: str = "+8613800138000", text: str = CODE_TEXT, signature: str = "") -> Message:
    national = number[3:] if number.startswith("+86") else number[4:]
    return Message(1, "sms", number, "CN", national, text, signature)


# -- end to end from a HAP body --------------------------------------------------------------

async def test_sms_end_to_end(tmp_path: Path, relay_factory, session, aliyun: AliyunFake) -> None:
    """HAP's SMS body becomes one signed SendSms with TemplateCode and a JSON TemplateParam."""
    relay = await relay_factory(base_config(
        tmp_path, providers=[aliyun_table(aliyun.api.url)], routes={"sms": ["aliyun"]}))
    rows = await post_settled(relay, session, SMS_BODY)
    assert rows[0].state == State.SENT
    (call,) = aliyun.calls
    assert call.action == "SendSms"
    assert call.params == {"PhoneNumbers": "13800138000", "SignName": "阿里云短信测试",
                           "TemplateCode": "SMS_154950909", "TemplateParam": '{"code":"123456"}',
                           "OutId": str(rows[0].id)}
    assert aliyun.rejected == []


async def test_voice_end_to_end(tmp_path: Path, relay_factory, session, aliyun: AliyunFake) -> None:
    """HAP's voice body becomes one signed SingleCallByTts with the voice template."""
    table = aliyun_table(aliyun.api.url, voice_params={"num": "{code}", "app": "HAP"}, play_times=1)
    relay = await relay_factory(base_config(
        tmp_path, providers=[table], routes={"sms": ["aliyun"], "voice": ["aliyun"]}))
    rows = await post_settled(relay, session, VOICE_BODY)
    assert rows[0].state == State.SENT
    (call,) = aliyun.calls
    assert call.action == "SingleCallByTts"
    assert call.params == {"CalledNumber": "13800138000", "TtsCode": "TTS_100001",
                           "TtsParam": '{"num":"123456","app":"HAP"}', "PlayTimes": "1",
                           "CalledShowNumber": "057188773344", "OutId": str(rows[0].id)}


async def test_voice_without_voice_template_goes_as_templated_sms(
    tmp_path: Path, relay_factory, session, aliyun: AliyunFake
) -> None:
    """Without voice_template a code goes as an SMS whose fallback text picks the template."""
    table = aliyun_table(aliyun.api.url, voice_template=None, voice_show_number=None)
    relay = await relay_factory(base_config(
        tmp_path, providers=[table], routes={"sms": ["aliyun"], "voice": ["aliyun"]}))
    await post_settled(relay, session, VOICE_BODY)
    (call,) = aliyun.calls
    assert (call.action, call.params["TemplateCode"]) == ("SendSms", "SMS_154950910")


async def test_one_call_per_recipient_and_failures_stay_apart(
    tmp_path: Path, relay_factory, session, aliyun: AliyunFake
) -> None:
    """Recipients of one body are one SendSms each, so an illegal number fails alone."""
    aliyun.number_codes["13800138001"] = "isv.MOBILE_NUMBER_ILLEGAL"
    relay = await relay_factory(base_config(
        tmp_path, providers=[aliyun_table(aliyun.api.url)], routes={"sms": ["aliyun"]}))
    rows = await post_settled(relay, session, {"Type": 1, "Data": {
        "Mobiles": ["13800138000", "13800138001", "+85291234567"], "Message": EN_TEXT}})
    assert [r.state for r in rows] == [State.SENT, State.DEAD, State.SENT]
    assert "isv.MOBILE_NUMBER_ILLEGAL" in rows[1].error
    assert sorted(c.params["PhoneNumbers"] for c in aliyun.calls) == [
        "13800138000", "13800138001", "85291234567"]


async def test_throttling_fails_over(tmp_path: Path, relay_factory, session, aliyun: AliyunFake) -> None:
    """Throttling.User hands the message to the next provider of the route at once."""
    aliyun.errors.append("Throttling.User")
    relay = await relay_factory(base_config(
        tmp_path, providers=[aliyun_table(aliyun.api.url),
                             {"name": "dev", "type": "file", "path": str(tmp_path / "sent.jsonl")}],
        routes={"sms": ["aliyun", "dev"]}))
    (row,) = await post_settled(relay, session, SMS_BODY)
    assert (row.state, row.provider) == (State.SENT, "dev")


# -- one call, every outcome ----------------------------------------------------------------

ERROR_CLASSES = [
    ("isv.MOBILE_NUMBER_ILLEGAL", PermanentError),
    ("isv.SMS_TEMPLATE_ILLEGAL", PermanentError),
    ("isv.SMS_SIGNATURE_ILLEGAL", PermanentError),
    ("InvalidAccessKeyId.NotFound", PermanentError),
    ("isv.BUSINESS_LIMIT_CONTROL", PermanentError),
    ("Throttling.User", TransientError),
    ("Throttling.Api", TransientError),
    ("isp.SYSTEM_ERROR", TransientError),
    ("ServiceUnavailable", TransientError),
]


@pytest.mark.parametrize(("code", "kind"), ERROR_CLASSES)
async def test_sms_error_codes(provider: AliyunProvider, aliyun: AliyunFake, code: str, kind: type) -> None:
    """SendSms's Code (with Alibaba's HTTP status) decides permanent or transient."""
    aliyun.errors.append(code)
    (outcome,) = await provider.send([sms()])
    assert type(outcome) is kind and outcome.code == code


@pytest.mark.parametrize(("code", "kind"), ERROR_CLASSES)
async def test_voice_error_codes(provider: AliyunProvider, aliyun: AliyunFake, code: str, kind: type) -> None:
    """SingleCallByTts's Code maps as SendSms's does."""
    aliyun.errors.append(code)
    voice = Message(1, "voice", "+8613800138000", "CN", "13800138000", "code 1234", "", "1234")
    (outcome,) = await provider.send([voice])
    assert type(outcome) is kind and outcome.code == code


async def test_business_limit_says_so(provider: AliyunProvider, aliyun: AliyunFake) -> None:
    """isv.BUSINESS_LIMIT_CONTROL is permanent and the reason says it is Alibaba's cap."""
    aliyun.errors.append("isv.BUSINESS_LIMIT_CONTROL")
    (outcome,) = await provider.send([sms()])
    assert isinstance(outcome, PermanentError)
    assert "Alibaba's own cap for this number" in outcome.reason()


@pytest.mark.parametrize(("change", "code"), [
    ({"access_key_secret": "not-the-secret"}, "SignatureDoesNotMatch"),
    ({"access_key_id": "LTAIunknown"}, "InvalidAccessKeyId.NotFound"),
])
async def test_bad_credentials_are_rejected_by_signature_check(
    fake_api: FakeAPI, session: aiohttp.ClientSession, aliyun: AliyunFake, change: dict[str, str],
    code: str,
) -> None:
    """A wrong secret or key id is refused by the fake as Alibaba does: permanent."""
    p = build(aliyun_table(fake_api.url, **change))
    await p.open(session)
    (outcome,) = await p.send([sms()])
    assert isinstance(outcome, PermanentError) and outcome.code == code
    assert aliyun.rejected == [code] and aliyun.calls == []


@pytest.mark.parametrize(("reply", "code", "kind"), [
    (Reply(502, "<html>Bad Gateway</html>"), "http_502", TransientError),
    (Reply(403, "<html>Forbidden</html>"), "http_403", PermanentError),
    (Reply(200, "not json"), "bad_response", TransientError),
])
async def test_answers_without_a_code(
    provider: AliyunProvider, fake_api: FakeAPI, reply: Reply, code: str, kind: type
) -> None:
    """An answer without Alibaba's Code falls back to the HTTP status rule."""
    fake_api.script.append(reply)
    (outcome,) = await provider.send([sms()])
    assert type(outcome) is kind and outcome.code == code


async def test_hap_signature_used_without_sign_name(
    fake_api: FakeAPI, session: aiohttp.ClientSession, aliyun: AliyunFake
) -> None:
    """With no sign_name HAP's Signature is the SignName; with neither nothing is sent."""
    p = build(aliyun_table(fake_api.url, sign_name=None))
    await p.open(session)
    (outcome,) = await p.send([sms(signature="明道云")])
    assert isinstance(outcome, Sent) and outcome.ids[0].endswith("^0")  # SendSms's BizId
    assert aliyun.calls[0].params["SignName"] == "明道云"
    (outcome,) = await p.send([sms()])
    assert isinstance(outcome, UnsupportedError) and outcome.code == "no_sign_name"


async def test_no_template_is_unsupported(provider: AliyunProvider, aliyun: AliyunFake) -> None:
    """A text no mapping matches is not sent: no_template."""
    (outcome,) = await provider.send([sms(text="Hello from HAP")])
    assert isinstance(outcome, UnsupportedError) and outcome.code == "no_template"
    assert aliyun.calls == []


# -- numbers outside mainland China ----------------------------------------------------------

def message(raw: str, kind: str = "sms", text: str = CODE_TEXT) -> Message:
    """The message the dispatcher builds for ``raw`` as HAP sent it (parsed as the webhook does)."""
    n = normalise(raw, "CN")
    return Message(1, kind, n.e164, n.region, n.national, text, "", "123456" if kind == "voice" else "")  # type: ignore[arg-type]


# HAP's number -> SendSms's PhoneNumbers, or None: never sent to SendSms (Alibaba would read
# the international form, 1 + ten digits, as a bare mainland mobile).
TRICKY_NUMBERS = [
    ("+13125551234", None),  # USA: 1312... is the shape of a mainland 131 mobile
    ("+12125551234", None),  # USA
    ("+14165551234", None),  # Canada
    ("+8613125551234", "13125551234"),  # mainland, the same digits as the first
    ("13800138000", "13800138000"),  # mainland written without a prefix,
    ("8613800138000", "13800138000"),  # with 86,
    ("008613800138000", "13800138000"),  # with 0086,
    ("+8613800138000", "13800138000"),  # and with +86
    ("+85291234567", "85291234567"),  # Hong Kong
    ("+85366123456", "85366123456"),  # Macao
    ("+886912345678", "886912345678"),  # Taiwan
    ("+6581234567", "6581234567"),  # Singapore
]


@pytest.mark.parametrize(("raw", "sent"), TRICKY_NUMBERS)
async def test_phone_numbers_are_never_read_as_another_number(
    provider: AliyunProvider, aliyun: AliyunFake, raw: str, sent: str | None
) -> None:
    """Each number goes to SendSms in the form Alibaba reads as that number: mainland ones
    as their 11 digits, others with their country code, +1 ones not at all (cannot carry)."""
    m = message(raw, text=EN_TEXT)
    (outcome,) = await provider.send([m])
    if sent is None:
        assert isinstance(outcome, UnsupportedError) and outcome.code == "ambiguous_number"
        assert aliyun.calls == []
        return
    assert isinstance(outcome, Sent)
    (call,) = aliyun.calls
    assert call.params["PhoneNumbers"] == sent
    assert call.mainland == (m.country_code == "86")
    assert call.params["TemplateCode"] == (
        "SMS_154950910" if call.mainland else ALI_INTL_TEMPLATE)


@pytest.mark.parametrize("raw", ["+13125551234", "+85291234567", "+6581234567"])
async def test_voice_codes_outside_mainland_are_not_called(
    provider: AliyunProvider, aliyun: AliyunFake, raw: str
) -> None:
    """SingleCallByTts calls mainland numbers only: others get the fallback SMS (or, when
    SendSms cannot carry them either, nothing is sent)."""
    await provider.send([message(raw, "voice", "Your verification code is 123456")])
    assert [c.action for c in aliyun.calls] in ([], ["SendSms"])
    assert all(c.params.get("PhoneNumbers") == raw[1:] for c in aliyun.calls)


async def test_mainland_voice_code_calls_the_mainland_number(
    provider: AliyunProvider, aliyun: AliyunFake
) -> None:
    """A mainland voice code is called at its 11 digits, which Alibaba reads as domestic."""
    (outcome,) = await provider.send([message("+8613125551234", "voice")])
    assert isinstance(outcome, Sent) and "^" in outcome.ids[0] and outcome.segments == 0
    (call,) = aliyun.calls
    assert (call.action, call.params["CalledNumber"], call.mainland) == (
        "SingleCallByTts", "13125551234", True)


async def test_us_voice_code_goes_to_the_next_provider(
    tmp_path: Path, relay_factory, session, aliyun: AliyunFake
) -> None:
    """A voice code to a +1 number makes no Alibaba call and is delivered by the next provider."""
    relay = await relay_factory(base_config(
        tmp_path, providers=[aliyun_table(aliyun.api.url),
                             {"name": "dev", "type": "file", "path": str(tmp_path / "sent.jsonl")}],
        routes={"sms": ["aliyun", "dev"], "voice": ["aliyun", "dev"]}))
    (row,) = await post_settled(relay, session, {"Type": 2, "Data": {
        "Mobile": "+13125551234", "Code": "123456"}})
    assert (row.state, row.provider) == (State.SENT, "dev")
    assert aliyun.calls == []


# -- signing and config ---------------------------------------------------------------------

@settings(max_examples=50, deadline=None)
@given(
    params=st.dictionaries(
        st.sampled_from(["PhoneNumbers", "SignName", "TemplateCode", "TemplateParam", "OutId"]),
        st.text(max_size=40), max_size=5),
    nonce=st.uuids(),
    secret=st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1,
                   max_size=40),
    host=st.sampled_from(["dysmsapi.aliyuncs.com", "dyvmsapi.aliyuncs.com", "127.0.0.1:8443"]),
)
def test_signature_matches_alibaba_sdk(params: dict[str, str], nonce: Any, secret: str, host: str) -> None:
    """Our ACS3-HMAC-SHA256 Authorization equals the one Alibaba's OpenAPI util computes."""
    headers = {
        "host": host, "x-acs-action": "SendSms", "x-acs-version": "2017-05-25",
        "x-acs-date": "2024-05-01T08:00:00Z", "x-acs-signature-nonce": nonce.hex,
        "x-acs-content-sha256": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    }
    ours = acs3_authorization(ALI_KEY_ID, secret, method="POST", path="/",
                              query=canonical_query(params), headers=headers)
    req = TeaRequest()
    req.method, req.pathname, req.query, req.headers = "POST", "/", dict(params), dict(headers)
    theirs = AliyunUtil.get_authorization(
        req, "ACS3-HMAC-SHA256", headers["x-acs-content-sha256"], ALI_KEY_ID, secret)
    assert ours == theirs


@pytest.mark.parametrize(("change", "key"), [
    ({"access_key_id": None}, "providers[0].access_key_id: required"),
    ({"access_key_secret": {"env": "HAPSMS_TEST_UNSET_VAR"}}, "providers[0].access_key_secret: environment"),
    ({"endpoint": "ftp://dysmsapi.aliyuncs.com"}, "providers[0].endpoint: must start with"),
    ({"play_times": 0}, "providers[0].play_times: must be at least 1"),
    ({"voice_params": {"code": "{digits}"}}, "providers[0].voice_params.code: unknown placeholder"),
    ({"templates": [{"match": "x", "template": "SMS_1", "params": ["{code}"]}]},
     "providers[0].templates[0].params: expected a table"),
])
def test_config_errors_name_the_key(change: dict[str, Any], key: str) -> None:
    """Each bad aliyun setting is refused with its key named."""
    with pytest.raises(ConfigError) as info:
        build(aliyun_table("https://dysmsapi.aliyuncs.com", **change))
    assert str(info.value).startswith(key)


def test_secrets_stay_out_of_repr() -> None:
    """The provider's repr shows neither the AccessKey id nor its secret."""
    text = repr(build(aliyun_table("https://dysmsapi.aliyuncs.com")))
    assert ALI_KEY_SECRET not in text and ALI_KEY_ID not in text


# -- outside mainland China: templates, SendMessageToGlobe ------------------------------------

def globe_table(url: str, **over: Any) -> dict[str, Any]:
    return aliyun_table(url, international_api="SendMessageToGlobe", globe_endpoint=url,
                        globe_from="HAPSMS", **over)


async def test_mixed_body_gets_the_international_template(
    tmp_path: Path, relay_factory, session, aliyun: AliyunFake
) -> None:
    """A body to +86 and other numbers: each number with the template for its side."""
    relay = await relay_factory(base_config(
        tmp_path, providers=[aliyun_table(aliyun.api.url)], routes={"sms": ["aliyun"]}))
    rows = await post_settled(relay, session, {"Type": 1, "Data": {
        "Mobiles": ["+8613800138000", "+85291234567"], "Message": EN_TEXT}})
    assert [r.state for r in rows] == [State.SENT] * 2
    assert sorted((c.params["PhoneNumbers"], c.params["TemplateCode"]) for c in aliyun.calls) == [
        ("13800138000", "SMS_154950910"), ("85291234567", ALI_INTL_TEMPLATE)]


async def test_no_international_mapping_is_cannot_carry(
    fake_api: FakeAPI, session: aiohttp.ClientSession, aliyun: AliyunFake
) -> None:
    """With mainland mappings only, a +852 number is no_template without a call."""
    p = build(aliyun_table(fake_api.url, templates=[
        {"match": EN_CODE_MATCH, "template": "SMS_154950910", "params": {"code": "{code}"}}]))
    await p.open(session)
    (outcome,) = await p.send([message("+85291234567", text=EN_TEXT)])
    assert isinstance(outcome, UnsupportedError) and outcome.code == "no_template"
    assert 'regions = ["international"]' in outcome.reason()
    assert aliyun.calls == []


@pytest.mark.parametrize(("raw", "to"), [
    ("+13125551234", "13125551234"), ("+85291234567", "85291234567"), ("+6581234567", "6581234567")])
async def test_globe_carries_numbers_outside_mainland(
    fake_api: FakeAPI, session: aiohttp.ClientSession, aliyun: AliyunFake, raw: str, to: str
) -> None:
    """With international_api = SendMessageToGlobe, other numbers (+1 included: that API
    never reaches the mainland) get the free text, signed as version 2018-05-01."""
    p = build(globe_table(fake_api.url))
    await p.open(session)
    m = message(raw, text="Hello from HAP")
    (outcome,) = await p.send([m])
    assert isinstance(outcome, Sent) and outcome.segments == 1 and outcome.ids[0].isdigit()
    (call,) = aliyun.calls
    assert call.action == "SendMessageToGlobe" and not call.mainland
    assert call.params == {"To": to, "Message": "Hello from HAP", "Type": "NOTIFY", "From": "HAPSMS",
                           "TaskId": str(m.id)}
    assert aliyun.rejected == []


async def test_globe_voice_code_is_an_otp_and_mainland_stays_on_sendsms(
    tmp_path: Path, relay_factory, session, aliyun: AliyunFake
) -> None:
    """A voice code to a US number goes as the fallback text with Type OTP; a mainland
    number of the same provider still goes to SendSms with its template."""
    relay = await relay_factory(base_config(
        tmp_path, providers=[globe_table(aliyun.api.url)],
        routes={"sms": ["aliyun"], "voice": ["aliyun"]}))
    (row,) = await post_settled(relay, session, {"Type": 2, "Data": {
        "Mobile": "+13125551234", "Code": "123456"}})
    (mainland,) = await post_settled(relay, session, SMS_BODY)
    assert row.state == mainland.state == State.SENT
    assert [(c.action, c.params.get("Type")) for c in aliyun.calls] == [
        ("SendMessageToGlobe", "OTP"), ("SendSms", None)]


async def test_globe_error_codes(
    fake_api: FakeAPI, session: aiohttp.ClientSession, aliyun: AliyunFake
) -> None:
    """A ResponseCode other than OK is the message's error; Throttling stays transient."""
    p = build(globe_table(fake_api.url))
    await p.open(session)
    aliyun.errors.append("Throttling.User")
    (outcome,) = await p.send([message("+85291234567", text="Hello")])
    assert isinstance(outcome, TransientError) and outcome.code == "Throttling.User"


@pytest.mark.parametrize(("templates", "raw"), [
    ([{"match": EN_CODE_MATCH, "template": "SMS_154950910", "params": {"code": "{code}"},
       "regions": ["HK"]}], "+85291234567"),
    ([{"match": EN_CODE_MATCH, "template": ALI_INTL_TEMPLATE, "params": {"code": "{code}"}}],
     "+8613800138000"),
])
async def test_fake_refuses_a_template_for_the_wrong_side(
    fake_api: FakeAPI, session: aiohttp.ClientSession, aliyun: AliyunFake,
    templates: list[dict[str, Any]], raw: str,
) -> None:
    """The fake applies Alibaba's rule: a mainland template for a non-mainland number (or
    the other way round) is isv.SMS_TEMPLATE_ILLEGAL, permanent."""
    p = build(aliyun_table(fake_api.url, templates=templates))
    await p.open(session)
    (outcome,) = await p.send([message(raw, text=EN_TEXT)])
    assert isinstance(outcome, PermanentError) and outcome.code == "isv.SMS_TEMPLATE_ILLEGAL"


def test_bad_regions_name_the_key() -> None:
    """An unknown region in a mapping is refused with its key named."""
    with pytest.raises(ConfigError) as info:
        build(aliyun_table("https://dysmsapi.aliyuncs.com", templates=[
            {"match": "x", "template": "SMS_1", "regions": ["abroad"]}]))
    assert str(info.value).startswith("providers[0].templates[0].regions[0]: unknown region")
