"""Loopback fakes of Tencent Cloud's and Alibaba Cloud's SMS and voice APIs.

Each verifies the signature of every request with the vendor's own SDK code and rejects a bad
one as the vendor does. It then applies the vendor's documented rules the relay's behaviour
depends on (a mainland template only for mainland numbers and an international one for the
others, a SignName for mainland numbers, voice calls to mainland numbers only, and Alibaba's
reading of a number as mainland or not) and answers in the vendor's real response shapes,
with the errors a test asks for (for the whole call, or per number).
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from alibabacloud_openapi_util.client import Client as AliyunUtil
from Tea.request import TeaRequest
from tencentcloud.common.sign import Sign

from tests.fakes import FakeAPI, Recorded, Reply

# -- Tencent Cloud API 3.0 ------------------------------------------------------------------

TC_SECRET_ID = "AKIDfakeSecretId0001"
TC_SECRET_KEY = "fakeSecretKey/tc3+0001"
_TC_AUTH = re.compile(
    r"^TC3-HMAC-SHA256 Credential=(?P<id>[^/]+)/(?P<date>\d{4}-\d\d-\d\d)/(?P<service>\w+)/tc3_request, "
    r"SignedHeaders=(?P<signed>[a-z0-9;-]+), Signature=(?P<sig>[0-9a-f]{64})$"
)
_TC_SERVICE = {"SendSms": "sms", "SendCodeVoice": "vms"}
TC_INTL_TEMPLATE = "2220"  # the fake's approved international template


def tencent_error(code: str, message: str = "") -> dict[str, Any]:
    """Tencent's error shape, answered with HTTP 200 as Tencent does."""
    return {"Response": {"Error": {"Code": code, "Message": message or code},
                         "RequestId": str(uuid.uuid4())}}


@dataclass
class TencentCall:
    action: str
    region: str
    body: dict[str, Any]


@dataclass
class TencentFake:
    """Tencent's sms.tencentcloudapi.com and vms.tencentcloudapi.com on one loopback port.

    ``errors``: top-level error codes for the next calls, one per call. ``number_codes``:
    a per-number ``Code`` in ``SendStatusSet`` (default ``Ok``). ``calls``: the verified
    requests; ``rejected``: the codes of refused ones. ``sent``: (number, SerialNo) of each
    message accepted, which ``report`` posts the status callback for.
    """

    api: FakeAPI
    errors: deque[str] = field(default_factory=deque)
    number_codes: dict[str, str] = field(default_factory=dict)
    calls: list[TencentCall] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    intl_templates: set[str] = field(default_factory=lambda: {TC_INTL_TEMPLATE})
    sent: list[tuple[str, str]] = field(default_factory=list)

    async def report(self, session: Any, url: str, serials: list[str] | None = None,
                     status: str = "SUCCESS", errmsg: str = "DELIVRD",
                     description: str = "用户短信送达成功") -> tuple[int, Any]:
        """The console's status callback, as Tencent posts it: one report per message."""
        numbers = dict((s, n) for n, s in self.sent)
        reports = [{"user_receive_time": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "nationcode": numbers[s][1:3], "mobile": numbers[s][3:],
                    "report_status": status, "errmsg": errmsg, "description": description,
                    "sid": s} for s in (serials if serials is not None else list(numbers))]
        async with session.post(url, json=reports) as r:
            return r.status, await r.json(content_type=None)

    def __post_init__(self) -> None:
        self.api.respond = self.respond

    def respond(self, rec: Recorded) -> Reply:
        action = rec.headers.get("X-TC-Action", "")
        problem = self._check_signature(rec, _TC_SERVICE.get(action, "?"))
        if problem:
            self.rejected.append(problem)
            return Reply(200, tencent_error(problem, "The provided credentials could not be validated."))
        body = rec.json()
        self.calls.append(TencentCall(action, rec.headers.get("X-TC-Region", ""), body))
        if self.errors:
            return Reply(200, tencent_error(self.errors.popleft()))
        request_id = str(uuid.uuid4())
        refused = self._vendor_rules(action, body)
        if refused:
            return Reply(200, tencent_error(refused))
        if action == "SendCodeVoice":
            return Reply(200, {"Response": {"SendStatus": {
                "CallId": str(uuid.uuid4()), "SessionContext": body.get("SessionContext", "")},
                                            "RequestId": request_id}})
        if action != "SendSms":
            return Reply(200, tencent_error("InvalidAction", f"action {action!r} not found"))
        statuses = []
        fee = self.fee(body)
        for number in body["PhoneNumberSet"]:
            code = self.number_codes.get(number, "Ok")
            statuses.append({
                "SerialNo": self._serial(number) if code == "Ok" else "",
                "PhoneNumber": number, "Fee": fee if code == "Ok" else 0,
                "SessionContext": body.get("SessionContext", ""),
                "Code": code, "Message": "send success" if code == "Ok" else code.split(".")[-1],
                "IsoCode": "CN" if number.startswith("+86") else "",
            })
        return Reply(200, {"Response": {"SendStatusSet": statuses, "RequestId": request_id}})

    def _serial(self, number: str) -> str:
        serial = f"5000:{uuid.uuid4().int % 10**28}"
        self.sent.append((number, serial))
        return serial

    @staticmethod
    def fee(body: dict[str, Any]) -> int:
        """Tencent's ``Fee``: the parts it bills; the fake counts ``【sign】`` and the
        parameters as the whole text, 70 characters in one, 67 per part of a longer one."""
        n = len(body.get("SignName", "")) + 2 + sum(len(p) for p in body["TemplateParamSet"])
        return 1 if n <= 70 else -(-n // 67)

    def _vendor_rules(self, action: str, body: dict[str, Any]) -> str:
        """What Tencent refuses although the request is well signed (its documented rules):
        VMS calls mainland mobiles only; one SendSms is all mainland or all other numbers,
        with a mainland template and a SignName, or an international template."""
        if action == "SendCodeVoice" and not str(body.get("CalledNumber", "")).startswith("+86"):
            return "InvalidParameterValue.IncorrectPhoneNumber"
        if action == "SendSms":
            numbers = body.get("PhoneNumberSet") or []
            if len(numbers) > 200:  # "单次请求最多支持200个手机号"
                return "LimitExceeded.PhoneNumberCountLimit"
            sides = {str(n).startswith("+86") for n in numbers}
            if len(sides) > 1:
                return "UnsupportedOperation.ContainDomesticAndInternationalPhoneNumber"
            mainland = sides == {True}
            if mainland == (body.get("TemplateId") in self.intl_templates):
                return "FailedOperation.TemplateIncorrectOrUnapproved"
            if mainland and not body.get("SignName"):
                return "FailedOperation.SignatureIncorrectOrUnapproved"
        return ""

    def _check_signature(self, rec: Recorded, service: str) -> str:
        """What Tencent's gateway checks, the final HMAC done by Tencent's SDK."""
        m = _TC_AUTH.match(rec.headers.get("Authorization", ""))
        if m is None:
            return "AuthFailure.InvalidAuthorization"
        if m["id"] != TC_SECRET_ID:
            return "AuthFailure.SecretIdNotFound"
        timestamp = int(rec.headers.get("X-TC-Timestamp", "0"))
        if abs(time.time() - timestamp) > 300:
            return "AuthFailure.SignatureExpire"
        if m["date"] != time.strftime("%Y-%m-%d", time.gmtime(timestamp)) or m["service"] != service:
            return "AuthFailure.SignatureFailure"
        signed = m["signed"].split(";")
        if not {"content-type", "host"} <= set(signed):
            return "AuthFailure.SignatureFailure"
        # the spec: names and values lowercased and trimmed
        headers = "".join(f"{h}:{rec.headers.get(h, '').strip().lower()}\n" for h in signed)
        canonical = "\n".join((rec.method, rec.path, "", headers, m["signed"],
                               hashlib.sha256(rec.body).hexdigest()))
        scope = f"{m['date']}/{service}/tc3_request"
        to_sign = (f"TC3-HMAC-SHA256\n{timestamp}\n{scope}\n"
                   f"{hashlib.sha256(canonical.encode()).hexdigest()}")
        if Sign.sign_tc3(TC_SECRET_KEY, m["date"], service, to_sign) != m["sig"]:
            return "AuthFailure.SignatureFailure"
        return ""


# -- Alibaba Cloud Dysmsapi / Dyvmsapi ------------------------------------------------------

ALI_KEY_ID = "LTAIfakeAccessKeyId01"
ALI_KEY_SECRET = "fakeAccessKeySecret+/01"
ALI_INTL_TEMPLATE = "SMS_900001"  # the fake's approved international template
_ALI_AUTH = re.compile(
    r"^ACS3-HMAC-SHA256 Credential=(?P<id>[^,]+),SignedHeaders=(?P<signed>[a-z0-9;-]+),"
    r"Signature=(?P<sig>[0-9a-f]{64})$"
)
_ALI_REQUIRED = {"host", "x-acs-action", "x-acs-version", "x-acs-date", "x-acs-signature-nonce",
                 "x-acs-content-sha256"}
# Alibaba's HTTP status for each error code it answers with.
ALI_STATUS = {
    "SignatureDoesNotMatch": 400, "InvalidAccessKeyId.NotFound": 404,
    "IncompleteSignature": 400, "Throttling.User": 400, "Throttling.Api": 400,
    "isp.SYSTEM_ERROR": 200, "ServiceUnavailable": 503,
}


def aliyun_error(code: str, message: str = "") -> dict[str, Any]:
    return {"RequestId": str(uuid.uuid4()).upper(), "Code": code, "Message": message or code,
            "HostId": "dysmsapi.aliyuncs.com",
            "Recommend": f"https://api.aliyun.com/troubleshoot?q={code}&product=Dysmsapi"}


@dataclass
class AliyunCall:
    action: str
    params: dict[str, str]
    mainland: bool = False  # whether Alibaba reads the call's number as a mainland one


def ali_reads_sms(number: str) -> str | None:
    """The mainland number SendSms reads ``PhoneNumbers`` as, or None for an international one.

    SendSms's documented forms: a mainland number is "+/+86/0086/86 or no prefix" and 11
    digits; anything else is "international code + number".
    """
    for prefix in ("+86", "0086", "86", "+"):
        if number.startswith(prefix):
            rest = number[len(prefix):]
            break
    else:
        rest = number
    return rest if len(rest) == 11 and rest.isdigit() and rest[0] == "1" else None


def ali_reads_voice(number: str) -> str | None:
    """The mainland number SingleCallByTts reads ``CalledNumber`` as, or None for an
    international call (the voice number-format guide: ``00``/``+`` and a code other than 86;
    anything without a prefix is domestic)."""
    for prefix in ("+86", "0086"):
        if number.startswith(prefix):
            return number[len(prefix):]
    if number.startswith(("+", "00")):
        return None
    return number


@dataclass
class AliyunFake:
    """Alibaba's dysmsapi.aliyuncs.com and dyvmsapi.aliyuncs.com on one loopback port.

    ``errors``: codes for the next calls, one per call; ``number_codes``: a code for every call
    to that number. ``calls``: the verified requests; ``rejected``: codes of refused ones.
    """

    api: FakeAPI
    errors: deque[str] = field(default_factory=deque)
    number_codes: dict[str, str] = field(default_factory=dict)
    calls: list[AliyunCall] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    nonces: set[str] = field(default_factory=set)
    intl_templates: set[str] = field(default_factory=lambda: {ALI_INTL_TEMPLATE})
    #: (BizId, OutId, PhoneNumbers) of each SendSms accepted, which ``report`` pushes for
    sent: list[tuple[str, str, str]] = field(default_factory=list)

    async def report(self, session: Any, url: str, success: bool = True,
                     code: str = "DELIVERED", msg: str = "用户接收成功") -> tuple[int, Any]:
        """SmsReport in HTTP batch push mode, as Alibaba posts it: one report per message."""
        now = time.strftime("%Y-%m-%d %H:%M:%S")
        reports = [{"phone_number": number, "send_time": now, "report_time": now,
                    "success": success, "err_code": code, "err_msg": msg, "sms_size": "1",
                    "biz_id": biz, "out_id": out} for biz, out, number in self.sent]
        async with session.post(url, json=reports) as r:
            return r.status, await r.json(content_type=None)

    def __post_init__(self) -> None:
        self.api.respond = self.respond

    def respond(self, rec: Recorded) -> Reply:
        problem = self._check_signature(rec)
        if problem:
            self.rejected.append(problem)
            return Reply(ALI_STATUS.get(problem, 400), aliyun_error(
                problem, "Specified signature is not matched with our calculation."
                if problem == "SignatureDoesNotMatch" else ""))
        action = rec.headers["x-acs-action"]
        if action == "SendMessageToGlobe":
            return self._globe(rec)
        number = rec.query.get("PhoneNumbers") or rec.query.get("CalledNumber", "")
        read = ali_reads_voice(number) if action == "SingleCallByTts" else ali_reads_sms(number)
        self.calls.append(AliyunCall(action, dict(rec.query), read is not None))
        code = self.errors.popleft() if self.errors else self.number_codes.get(number, "OK")
        if code == "OK":
            code = self._vendor_rules(action, rec.query, mainland=read is not None)
        if code != "OK":
            return Reply(ALI_STATUS.get(code, 200), aliyun_error(code))
        request_id = str(uuid.uuid4()).upper()
        if action == "SendSms":
            biz = f"{uuid.uuid4().int % 10**15:015d}^0"  # fixed widths: never a phone number
            self.sent.append((biz, rec.query.get("OutId", ""), number))
            return Reply(200, {"Code": "OK", "Message": "OK", "RequestId": request_id,
                               "BizId": biz})
        if action == "SingleCallByTts":
            return Reply(200, {"Code": "OK", "Message": "OK", "RequestId": request_id,
                               "CallId": f"{uuid.uuid4().int % 10**12:012d}^"
                                         f"{10**11 + uuid.uuid4().int % 10**11}"})
        return Reply(404, aliyun_error("InvalidAction.NotFound"))

    def _vendor_rules(self, action: str, query: Any, *, mainland: bool) -> str:
        """What Alibaba refuses although the request is well signed (its documented rules):
        the domestic voice service calls no international number; SendSms takes a mainland
        template and a SignName for a mainland number, an international template otherwise."""
        if action == "SingleCallByTts":
            return "OK" if mainland else "isv.MOBILE_NUMBER_ILLEGAL"
        if action == "SendSms":
            if mainland == (query.get("TemplateCode") in self.intl_templates):
                return "isv.SMS_TEMPLATE_ILLEGAL"
            if mainland and not query.get("SignName"):
                return "MissingSignName"
        return "OK"

    def _globe(self, rec: Recorded) -> Reply:
        """SendMessageToGlobe (Dysmsapi 2018-05-01): free text to numbers outside the mainland."""
        to = rec.query.get("To", "")
        self.calls.append(AliyunCall("SendMessageToGlobe", dict(rec.query), to.startswith("86")))
        if rec.headers.get("x-acs-version") != "2018-05-01":
            return Reply(400, aliyun_error("InvalidVersion"))
        if self.errors:
            code = self.errors.popleft()
            return Reply(ALI_STATUS.get(code, 200), aliyun_error(code))
        if not rec.query.get("Message") or not to.isdigit():
            return Reply(400, aliyun_error("MissingParameter"))
        ok = not to.startswith("86")  # "does not support sending messages to the Chinese mainland"
        return Reply(200, {
            "ResponseCode": "OK" if ok else "MobileNumberIllegal",
            "ResponseDescription": "The SMS Send Request was accepted" if ok else "mainland",
            "RequestId": str(uuid.uuid4()).upper(), "Segments": "1", "To": to,
            "From": rec.query.get("From", ""), "MessageId": str(uuid.uuid4().int % 10**14)})

    def _check_signature(self, rec: Recorded) -> str:
        """What Alibaba's gateway checks, the signature computed by Alibaba's SDK utility."""
        m = _ALI_AUTH.match(rec.headers.get("Authorization", ""))
        if m is None:
            return "IncompleteSignature"
        if m["id"] != ALI_KEY_ID:
            return "InvalidAccessKeyId.NotFound"
        signed = m["signed"].split(";")
        if not _ALI_REQUIRED <= set(signed):
            return "IncompleteSignature"
        nonce = rec.headers["x-acs-signature-nonce"]
        if nonce in self.nonces:
            return "SignatureNonceUsed"
        if rec.headers["x-acs-content-sha256"] != hashlib.sha256(rec.body).hexdigest():
            return "SignatureDoesNotMatch"
        req = TeaRequest()
        req.method = rec.method
        req.pathname = rec.path
        req.query = dict(rec.query)
        req.headers = {h: rec.headers.get(h, "") for h in signed}
        expected = AliyunUtil.get_authorization(
            req, "ACS3-HMAC-SHA256", rec.headers["x-acs-content-sha256"], ALI_KEY_ID, ALI_KEY_SECRET
        )
        if expected != rec.headers["Authorization"]:
            return "SignatureDoesNotMatch"
        self.nonces.add(nonce)
        return ""


# -- provider tables pointing at the fakes ---------------------------------------------------

CODE_MATCH = "验证码[^0-9]*(?P<code>[0-9]{4,8})"
EN_CODE_MATCH = "(?i)verification code is (?P<code>[0-9]{4,10})"


def tencent_table(url: str, **over: Any) -> dict[str, Any]:
    """A complete ``type = "tencent"`` provider table whose endpoints are the fake."""
    table: dict[str, Any] = {
        "name": "tencent", "type": "tencent", "secret_id": TC_SECRET_ID,
        "secret_key": TC_SECRET_KEY, "sdk_app_id": 1400006666, "sign_name": "腾讯云",
        "region": "ap-beijing", "endpoint": url, "voice_endpoint": url,
        "voice_sdk_app_id": "1400007777",
        "templates": [
            {"match": CODE_MATCH, "template": "1110", "params": ["{code}"]},
            {"match": EN_CODE_MATCH, "template": "1111", "params": ["{code}"]},
            {"match": EN_CODE_MATCH, "template": TC_INTL_TEMPLATE, "params": ["{code}"],
             "regions": ["international"]},
        ],
    }
    table.update(over)
    return {k: v for k, v in table.items() if v is not None}


def aliyun_table(url: str, **over: Any) -> dict[str, Any]:
    """A complete ``type = "aliyun"`` provider table whose endpoints are the fake."""
    table: dict[str, Any] = {
        "name": "aliyun", "type": "aliyun", "access_key_id": ALI_KEY_ID,
        "access_key_secret": ALI_KEY_SECRET, "sign_name": "阿里云短信测试", "endpoint": url,
        "voice_endpoint": url, "voice_template": "TTS_100001", "voice_show_number": "057188773344",
        "templates": [
            {"match": CODE_MATCH, "template": "SMS_154950909", "params": {"code": "{code}"}},
            {"match": EN_CODE_MATCH, "template": "SMS_154950910", "params": {"code": "{code}"}},
            {"match": EN_CODE_MATCH, "template": ALI_INTL_TEMPLATE, "params": {"code": "{code}"},
             "regions": ["international"]},
        ],
    }
    table.update(over)
    return {k: v for k, v in table.items() if v is not None}


def build_provider(table: dict[str, Any]) -> Any:
    """The provider a config with just this provider table makes (no I/O)."""
    from pathlib import Path

    from hapsms_relay import config
    from tests.helpers import base_config

    cfg = config.parse(base_config(Path("/nonexistent"), providers=[table],
                                   routes={"sms": [table["name"]]}))
    return cfg.providers[table["name"]]
