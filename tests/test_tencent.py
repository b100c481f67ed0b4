"""The Tencent Cloud provider against a loopback fake of SendSms and SendCodeVoice."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tencentcloud.common import credential
from tencentcloud.common.common_client import CommonClient
from tencentcloud.common.http.request import RequestInternal

from hapsms_relay.errors import ConfigError, PermanentError, TransientError, UnsupportedError
from hapsms_relay.outbox import State
from hapsms_relay.providers.base import Message, Sent
from hapsms_relay.providers.tencent import TencentProvider, tc3_authorization
from tests.fake_clouds import (
    EN_CODE_MATCH,
    TC_INTL_TEMPLATE,
    TC_SECRET_ID,
    TC_SECRET_KEY,
    TencentFake,
    build_provider,
    tencent_table,
)
from tests.fakes import FakeAPI, Reply
from tests.helpers import SMS_BODY, VOICE_BODY, base_config, post_settled

CODE_TEXT = "您的验证码是123456，感谢您的使用！"


@pytest.fixture
async def tencent(fake_api: FakeAPI) -> TencentFake:
    return TencentFake(fake_api)


@pytest.fixture
async def provider(fake_api: FakeAPI, session: aiohttp.ClientSession) -> AsyncIterator[TencentProvider]:
    p = build(tencent_table(fake_api.url))
    await p.open(session)
    yield p
    await p.close()


def build(table: dict[str, Any]) -> TencentProvider:
    p = build_provider(table)
    assert isinstance(p, TencentProvider)
    return p


def sms(i: int, number: str, text: str = CODE_TEXT, signature: str = "") -> Message:
    national = number[3:] if number.startswith("+86") else number[2:]
    return Message(i, "sms", number, "CN" if number.startswith("+86") else "US", national, text,
                   signature)


# -- end to end from a HAP body --------------------------------------------------------------

async def test_sms_end_to_end(tmp_path: Path, relay_factory, session, tencent: TencentFake) -> None:
    """HAP's SMS body becomes one signed SendSms with the mapped template and its params."""
    relay = await relay_factory(base_config(
        tmp_path, providers=[tencent_table(tencent.api.url)], routes={"sms": ["tencent"]}))
    rows = await post_settled(relay, session, SMS_BODY)
    assert rows[0].state == State.SENT
    (call,) = tencent.calls
    assert call.action == "SendSms" and call.region == "ap-beijing"
    assert call.body == {
        "PhoneNumberSet": ["+8613800138000"], "SmsSdkAppId": "1400006666", "TemplateId": "1110",
        "TemplateParamSet": ["123456"], "SignName": "腾讯云", "SessionContext": str(rows[0].id),
    }
    assert tencent.rejected == []


async def test_voice_end_to_end(tmp_path: Path, relay_factory, session, tencent: TencentFake) -> None:
    """HAP's voice body becomes one signed SendCodeVoice reading the code."""
    relay = await relay_factory(base_config(
        tmp_path, providers=[tencent_table(tencent.api.url, play_times=3, voice_region="ap-guangzhou")],
        routes={"sms": ["tencent"], "voice": ["tencent"]}))
    rows = await post_settled(relay, session, VOICE_BODY)
    assert rows[0].state == State.SENT
    (call,) = tencent.calls
    assert call.action == "SendCodeVoice" and call.region == "ap-guangzhou"
    assert call.body == {"CodeMessage": "123456", "CalledNumber": "+8613800138000",
                         "VoiceSdkAppid": "1400007777", "PlayTimes": 3,
                         "SessionContext": str(rows[0].id)}


async def test_voice_without_voice_app_goes_as_templated_sms(
    tmp_path: Path, relay_factory, session, tencent: TencentFake
) -> None:
    """Without voice_sdk_app_id a code goes as an SMS: the fallback text picks the template."""
    table = tencent_table(tencent.api.url, voice_sdk_app_id=None)
    relay = await relay_factory(base_config(
        tmp_path, providers=[table], routes={"sms": ["tencent"], "voice": ["tencent"]}))
    await post_settled(relay, session, VOICE_BODY)
    (call,) = tencent.calls
    assert call.action == "SendSms"
    assert (call.body["TemplateId"], call.body["TemplateParamSet"]) == ("1111", ["123456"])


async def test_recipients_of_one_body_share_one_call(
    tmp_path: Path, relay_factory, session, tencent: TencentFake
) -> None:
    """Three recipients of one HAP body are one SendSms call with three numbers."""
    relay = await relay_factory(base_config(
        tmp_path, providers=[tencent_table(tencent.api.url)], routes={"sms": ["tencent"]}))
    numbers = ["13800138000", "13800138001", "13800138002"]
    rows = await post_settled(relay, session, {"Type": 1, "Data": {
        "Mobiles": numbers, "Message": CODE_TEXT, "Signature": "明道云"}})
    assert {r.state for r in rows} == {State.SENT}
    (call,) = tencent.calls
    assert call.body["PhoneNumberSet"] == ["+86" + n for n in numbers]


@pytest.mark.parametrize("workers", [1, 64])
async def test_a_body_goes_in_as_few_calls_as_the_api_allows(
    tmp_path: Path, relay_factory, session, tencent: TencentFake, workers: int
) -> None:
    """205 recipients of one body are two SendSms calls (200 + 5), whatever queue.workers."""
    doc = base_config(tmp_path, providers=[tencent_table(tencent.api.url)],
                      routes={"sms": ["tencent"]})
    doc["queue"]["workers"] = workers
    relay = await relay_factory(doc)
    numbers = [f"+861380013{i:04d}" for i in range(205)]
    status, _ = await relay.post(session, {"Type": 1, "Data": {"Mobiles": numbers,
                                                               "Message": CODE_TEXT}})
    assert status == 200
    await relay.settled(sent=205)
    assert sorted(len(c.body["PhoneNumberSet"]) for c in tencent.calls) == [5, 200]
    assert sorted(n for c in tencent.calls for n in c.body["PhoneNumberSet"]) == numbers


async def test_partial_failure_in_a_batch(
    tmp_path: Path, relay_factory, session, tencent: TencentFake
) -> None:
    """One number refused in SendStatusSet is dead; the others of the same call are delivered."""
    tencent.number_codes["+8613800138001"] = "InvalidParameterValue.IncorrectPhoneNumber"
    relay = await relay_factory(base_config(
        tmp_path, providers=[tencent_table(tencent.api.url)], routes={"sms": ["tencent"]}))
    rows = await post_settled(relay, session, {"Type": 1, "Data": {
        "Mobiles": ["13800138000", "13800138001", "13800138002"], "Message": CODE_TEXT}})
    states = [r.state for r in rows]
    assert states == [State.SENT, State.DEAD, State.SENT]
    assert "InvalidParameterValue.IncorrectPhoneNumber" in rows[1].error
    assert len(tencent.calls) == 1


async def test_transient_error_fails_over(
    tmp_path: Path, relay_factory, session, tencent: TencentFake
) -> None:
    """RequestLimitExceeded hands the message to the next provider of the route at once."""
    tencent.errors.append("RequestLimitExceeded")
    relay = await relay_factory(base_config(
        tmp_path, providers=[tencent_table(tencent.api.url),
                             {"name": "dev", "type": "file", "path": str(tmp_path / "sent.jsonl")}],
        routes={"sms": ["tencent", "dev"]}))
    (row,) = await post_settled(relay, session, SMS_BODY)
    assert (row.state, row.provider) == (State.SENT, "dev")


# -- one call, every outcome ----------------------------------------------------------------

async def test_mainland_and_other_numbers_go_in_separate_calls(
    provider: TencentProvider, tencent: TencentFake
) -> None:
    """SendSms takes only mainland or only other numbers in one call: the batch is split."""
    text = "Your verification code is 123456"
    outcomes = await provider.send([sms(1, "+8613800138000", text), sms(2, "+12025550123", text),
                                    sms(3, "+8613800138001", text)])
    assert all(isinstance(o, Sent) for o in outcomes) and len(outcomes) == 3
    assert [(c.body["PhoneNumberSet"], c.body["TemplateId"], c.body.get("SignName"))
            for c in tencent.calls] == [
        (["+8613800138000", "+8613800138001"], "1111", "腾讯云"),
        (["+12025550123"], TC_INTL_TEMPLATE, None)]


async def test_voice_codes_outside_mainland_go_as_sms(
    provider: TencentProvider, tencent: TencentFake
) -> None:
    """VMS calls mainland numbers only: of one voice batch the +86 number is called and the
    others get the fallback SMS, with no SendCodeVoice to them."""
    text = "Your verification code is 123456"
    batch = [Message(1, "voice", "+8613800138000", "CN", "13800138000", text, "", "123456"),
             Message(2, "voice", "+85291234567", "HK", "91234567", text, "", "123456")]
    outcomes = await provider.send(batch)
    assert [type(o) for o in outcomes] == [Sent, Sent]
    assert [(c.action, c.body.get("CalledNumber") or c.body.get("PhoneNumberSet"))
            for c in tencent.calls] == [
        ("SendCodeVoice", "+8613800138000"), ("SendSms", ["+85291234567"])]


async def test_hap_signature_used_without_sign_name(
    fake_api: FakeAPI, session: aiohttp.ClientSession, tencent: TencentFake
) -> None:
    """With no sign_name, HAP's Signature is the SignName."""
    p = build(tencent_table(fake_api.url, sign_name=None))
    await p.open(session)
    (outcome,) = await p.send([sms(1, "+8613800138000", signature="明道云")])
    assert isinstance(outcome, Sent) and outcome.ids[0].startswith("5000:")
    assert outcome.segments == 1  # SendStatus's Fee
    assert tencent.calls[0].body["SignName"] == "明道云"


ERROR_CLASSES = [
    ("AuthFailure.SecretIdNotFound", PermanentError),
    ("AuthFailure.UnauthorizedOperation", PermanentError),
    ("InvalidParameterValue.IncorrectPhoneNumber", PermanentError),
    ("FailedOperation.TemplateIncorrectOrUnapproved", PermanentError),
    ("FailedOperation.SignatureIncorrectOrUnapproved", PermanentError),
    ("LimitExceeded.PhoneNumberDailyLimit", PermanentError),
    ("LimitExceeded.PhoneNumberOneHourLimit", PermanentError),
    ("LimitExceeded.PhoneNumberThirtySecondLimit", PermanentError),
    ("LimitExceeded.PhoneNumberSameContentDailyLimit", PermanentError),
    ("RequestLimitExceeded", TransientError),
    ("RequestLimitExceeded.UinLimitExceeded", TransientError),
    ("InternalError", TransientError),
    ("InternalError.Timeout", TransientError),
    ("InternalError.OtherError", TransientError),
]


@pytest.mark.parametrize(("code", "kind"), ERROR_CLASSES)
async def test_call_error_codes(
    provider: TencentProvider, tencent: TencentFake, code: str, kind: type
) -> None:
    """Response.Error.Code decides permanent or transient for every message of the call."""
    tencent.errors.append(code)
    outcomes = await provider.send([sms(1, "+8613800138000"), sms(2, "+8613800138001")])
    assert [type(o) for o in outcomes] == [kind, kind]
    assert all(o is not None and o.code == code for o in outcomes)


@pytest.mark.parametrize(("code", "kind"), ERROR_CLASSES)
async def test_per_number_codes(
    provider: TencentProvider, tencent: TencentFake, code: str, kind: type
) -> None:
    """A number's own Code in SendStatusSet decides for that number only."""
    tencent.number_codes["+8613800138001"] = code
    first, second = await provider.send([sms(1, "+8613800138000"), sms(2, "+8613800138001")])
    assert isinstance(first, Sent) and type(second) is kind and second.code == code


async def test_per_number_cap_says_so(provider: TencentProvider, tencent: TencentFake) -> None:
    """LimitExceeded.PhoneNumber*Limit is permanent and the reason says it is Tencent's cap."""
    tencent.number_codes["+8613800138000"] = "LimitExceeded.PhoneNumberDailyLimit"
    (outcome,) = await provider.send([sms(1, "+8613800138000")])
    assert isinstance(outcome, PermanentError)
    assert "Tencent's own cap for this number" in outcome.reason()


async def test_voice_error_codes(provider: TencentProvider, tencent: TencentFake) -> None:
    """SendCodeVoice's errors map as SendSms's do."""
    tencent.errors.extend(["InvalidParameterValue.IncorrectPhoneNumber", "InternalError"])
    voice = Message(1, "voice", "+8613800138000", "CN", "13800138000", "code 1234", "", "1234")
    assert isinstance((await provider.send([voice]))[0], PermanentError)
    assert isinstance((await provider.send([voice]))[0], TransientError)


async def test_wrong_key_is_rejected_by_signature_check(
    fake_api: FakeAPI, session: aiohttp.ClientSession, tencent: TencentFake
) -> None:
    """A request signed with the wrong key gets AuthFailure.SignatureFailure: permanent."""
    p = build(tencent_table(fake_api.url, secret_key="not-the-key"))
    await p.open(session)
    (outcome,) = await p.send([sms(1, "+8613800138000")])
    assert isinstance(outcome, PermanentError) and outcome.code == "AuthFailure.SignatureFailure"
    assert tencent.rejected == ["AuthFailure.SignatureFailure"] and tencent.calls == []


@pytest.mark.parametrize(("reply", "code"), [
    (Reply(502, "<html>Bad Gateway</html>"), "http_502"),
    (Reply(200, "not json"), "bad_response"),
    (Reply(200, {"unexpected": True}), "bad_response"),
])
async def test_broken_answers_are_transient(
    provider: TencentProvider, fake_api: FakeAPI, reply: Reply, code: str
) -> None:
    """A gateway error or an answer that is not Tencent's shape is retried, never lost."""
    fake_api.script.append(reply)
    (outcome,) = await provider.send([sms(1, "+8613800138000")])
    assert isinstance(outcome, TransientError) and outcome.code == code


async def test_missing_status_is_transient(provider: TencentProvider, fake_api: FakeAPI) -> None:
    """A number absent from SendStatusSet is retried rather than taken as delivered."""
    fake_api.script.append(Reply(200, {"Response": {"SendStatusSet": [], "RequestId": "r"}}))
    (outcome,) = await provider.send([sms(1, "+8613800138000")])
    assert isinstance(outcome, TransientError) and outcome.code == "missing_status"


async def test_no_template_is_unsupported(provider: TencentProvider, tencent: TencentFake) -> None:
    """A text no mapping matches is not sent: every message of the batch is no_template."""
    outcomes = await provider.send([sms(1, "+8613800138000", "hello"), sms(2, "+8613800138001", "hello")])
    assert all(isinstance(o, UnsupportedError) and o.code == "no_template" for o in outcomes)
    assert tencent.calls == []


async def test_connection_refused_is_transient(session: aiohttp.ClientSession) -> None:
    """An endpoint that refuses connections is a transient failure for the whole batch."""
    p = build(tencent_table("http://127.0.0.1:9"))
    await p.open(session)
    outcomes = await p.send([sms(1, "+8613800138000"), sms(2, "+8613800138001")])
    assert all(isinstance(o, TransientError) and o.code == "connection_error" for o in outcomes)


# -- signing and config ---------------------------------------------------------------------

@settings(max_examples=50, deadline=None)
@given(
    params=st.dictionaries(st.sampled_from(["PhoneNumberSet", "TemplateId", "SignName"]),
                           st.text(max_size=30), max_size=3),
    timestamp=st.integers(min_value=1_500_000_000, max_value=2_000_000_000),
    host=st.sampled_from(["sms.tencentcloudapi.com", "vms.tencentcloudapi.com", "127.0.0.1:8443"]),
    secret_key=st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1,
                       max_size=40),
)
def test_signature_matches_tencent_sdk(
    params: dict[str, str], timestamp: int, host: str, secret_key: str
) -> None:
    """Our TC3-HMAC-SHA256 Authorization equals the one Tencent's SDK computes."""
    payload = json.dumps(params)
    service = host.split(".")[0] if "tencent" in host else "sms"
    ours = tc3_authorization("AKIDexample", secret_key, service=service, host=host, path="/",
                             payload=payload.encode(), timestamp=timestamp)
    client = CommonClient(service, "2021-01-11", credential.Credential("AKIDexample", secret_key),
                          "ap-guangzhou")
    req = RequestInternal(host, "POST", "/", {
        "Content-Type": "application/json", "Host": host, "X-TC-Timestamp": str(timestamp)},
        payload)
    date = dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%Y-%m-%d")
    signature = client._get_tc3_signature(params, req, date, service, secret_key)
    assert ours == (f"TC3-HMAC-SHA256 Credential=AKIDexample/{date}/{service}/tc3_request, "
                    f"SignedHeaders=content-type;host, Signature={signature}")


@pytest.mark.parametrize(("change", "key"), [
    ({"secret_id": None}, "providers[0].secret_id: required"),
    ({"sdk_app_id": None}, "providers[0].sdk_app_id: required"),
    ({"sdk_app_id": "app-1"}, "providers[0].sdk_app_id: expected a numeric id"),
    ({"endpoint": "sms.tencentcloudapi.com"}, "providers[0].endpoint: must start with"),
    ({"play_times": 4}, "providers[0].play_times: must be at most 3"),
    ({"templates": [{"match": "(", "template": "1"}]}, "providers[0].templates[0].match: bad regex"),
    ({"templates": [{"match": "(?P<code>[0-9]+)", "template": "1", "params": {"code": "{code}"}}]},
     "providers[0].templates[0].params: expected a list"),
    ({"signature": "x"}, "providers[0].signature: unknown setting"),
])
def test_config_errors_name_the_key(change: dict[str, Any], key: str) -> None:
    """Each bad tencent setting is refused with its key named."""
    with pytest.raises(ConfigError) as info:
        build(tencent_table("https://sms.tencentcloudapi.com", **change))
    assert str(info.value).startswith(key)


def test_secrets_stay_out_of_repr() -> None:
    """The provider's repr shows neither SecretId nor SecretKey."""
    text = repr(build(tencent_table("https://sms.tencentcloudapi.com")))
    assert TC_SECRET_KEY not in text and TC_SECRET_ID not in text


# -- outside mainland China: templates and SignName -------------------------------------------

EN_TEXT = "Your verification code is 123456"


async def test_mixed_body_gets_the_international_template(
    tmp_path: Path, relay_factory, session, tencent: TencentFake
) -> None:
    """A body to +86 and other numbers: the mainland ones with the mainland template and the
    SignName, the others in their own call with the international template and no SignName."""
    relay = await relay_factory(base_config(
        tmp_path, providers=[tencent_table(tencent.api.url, sender_id="HAPSMS")],
        routes={"sms": ["tencent"]}))
    rows = await post_settled(relay, session, {"Type": 1, "Data": {
        "Mobiles": ["+8613800138000", "+85291234567", "+6581234567"], "Message": EN_TEXT}})
    assert [r.state for r in rows] == [State.SENT] * 3
    assert sorted((c.body["PhoneNumberSet"], c.body["TemplateId"], c.body.get("SignName"),
                   c.body.get("SenderId")) for c in tencent.calls) == [
        (["+85291234567", "+6581234567"], TC_INTL_TEMPLATE, None, "HAPSMS"),
        (["+8613800138000"], "1111", "腾讯云", None)]


async def test_no_international_mapping_is_cannot_carry(
    tmp_path: Path, relay_factory, session, tencent: TencentFake
) -> None:
    """With mainland mappings only, a +852 number costs no call and goes to the next
    provider; the mainland recipient of the same body is sent as before."""
    table = tencent_table(tencent.api.url, templates=[
        {"match": EN_CODE_MATCH, "template": "1111", "params": ["{code}"]}])
    relay = await relay_factory(base_config(
        tmp_path, providers=[table, {"name": "dev", "type": "file",
                                     "path": str(tmp_path / "sent.jsonl")}],
        routes={"sms": ["tencent", "dev"]}))
    rows = await post_settled(relay, session, {"Type": 1, "Data": {
        "Mobiles": ["+8613800138000", "+85291234567"], "Message": EN_TEXT}})
    assert [(r.state, r.provider) for r in rows] == [
        (State.SENT, "tencent"), (State.SENT, "dev")]
    assert [c.body["PhoneNumberSet"] for c in tencent.calls] == [["+8613800138000"]]


async def test_no_international_mapping_dead_reason_says_what_to_configure(
    provider: TencentProvider, tencent: TencentFake
) -> None:
    """The no_template reason names the region and the regions setting to add."""
    p = build(tencent_table(provider.endpoint.human_repr(), templates=[
        {"match": EN_CODE_MATCH, "template": "1111", "params": ["{code}"]}]))
    await p.open(provider.http())
    (outcome,) = await p.send([Message(1, "sms", "+85291234567", "HK", "91234567", EN_TEXT)])
    assert isinstance(outcome, UnsupportedError) and outcome.code == "no_template"
    assert 'regions = ["international"]' in outcome.reason() and "HK" in outcome.reason()
    assert tencent.calls == []


async def test_mainland_without_any_signature_is_not_sent(
    fake_api: FakeAPI, session: aiohttp.ClientSession, tencent: TencentFake
) -> None:
    """No sign_name and no HAP Signature: a +86 number is no_sign_name with no call, while
    a non-mainland number of the same batch, which needs none, is sent."""
    p = build(tencent_table(fake_api.url, sign_name=None))
    await p.open(session)
    outcomes = await p.send([sms(1, "+8613800138000", EN_TEXT), sms(2, "+12025550123", EN_TEXT)])
    assert isinstance(outcomes[0], UnsupportedError) and outcomes[0].code == "no_sign_name"
    assert isinstance(outcomes[1], Sent)
    assert [c.body["PhoneNumberSet"] for c in tencent.calls] == [["+12025550123"]]


async def test_voice_fallback_sms_without_sign_name_moves_on(
    tmp_path: Path, relay_factory, session, tencent: TencentFake
) -> None:
    """A voice code sent as SMS never has HAP's Signature: without sign_name it goes to the
    next provider of the route, with no SendSms to Tencent."""
    table = tencent_table(tencent.api.url, sign_name=None, voice_sdk_app_id=None)
    relay = await relay_factory(base_config(
        tmp_path, providers=[table, {"name": "dev", "type": "file",
                                     "path": str(tmp_path / "sent.jsonl")}],
        routes={"sms": ["tencent", "dev"], "voice": ["tencent", "dev"]}))
    (row,) = await post_settled(relay, session, VOICE_BODY)
    assert (row.state, row.provider) == (State.SENT, "dev")
    assert tencent.calls == []


@pytest.mark.parametrize(("templates", "number", "code"), [
    # a mainland template mapped for international numbers: Tencent refuses it
    ([{"match": EN_CODE_MATCH, "template": "1111", "params": ["{code}"],
       "regions": ["international"]}], "+85291234567", "FailedOperation.TemplateIncorrectOrUnapproved"),
    # an international template mapped for mainland numbers: refused as well
    ([{"match": EN_CODE_MATCH, "template": TC_INTL_TEMPLATE, "params": ["{code}"]}],
     "+8613800138000", "FailedOperation.TemplateIncorrectOrUnapproved"),
])
async def test_fake_refuses_a_template_for_the_wrong_side(
    fake_api: FakeAPI, session: aiohttp.ClientSession, tencent: TencentFake,
    templates: list[dict[str, Any]], number: str, code: str,
) -> None:
    """The fake applies Tencent's rule: a template is approved for mainland or for other
    numbers, and a mapping that says otherwise fails permanently."""
    p = build(tencent_table(fake_api.url, templates=templates))
    await p.open(session)
    (outcome,) = await p.send([sms(1, number, EN_TEXT)])
    assert isinstance(outcome, PermanentError) and outcome.code == code


def test_check_config_warns_about_a_missing_sign_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """check-config warns when a provider that routes send +86 numbers has no sign_name,
    and not when a rule sends +86 numbers elsewhere."""
    from hapsms_relay import cli
    from tests.helpers import write_config

    dev = {"name": "dev", "type": "file", "path": str(tmp_path / "sent.jsonl")}
    table = tencent_table("https://sms.tencentcloudapi.com", sign_name=None)
    for routes, warned in [
        ({"sms": ["tencent"]}, True),
        ({"sms": ["tencent"], "rules": [{"prefix": "+86", "sms": ["dev"], "voice": ["dev"]}]},
         False),
    ]:
        path = write_config(tmp_path, base_config(tmp_path, providers=[table, dev], routes=routes))
        assert cli.main(["check-config", "--config", str(path)]) == cli.EX_OK
        out = capsys.readouterr().out
        assert ("warning: provider tencent: no sign_name" in out) is warned
        assert "international without SignName" in out and "templates: 2 mainland, 1 international" in out
