"""Tencent Cloud: SMS through API 3.0 ``SendSms``, voice codes through VMS ``SendCodeVoice``.

SendSms https://cloud.tencent.com/document/api/382/55981 (errors: /382/59177, /382/52075),
SendCodeVoice https://cloud.tencent.com/document/api/1128/51559, signature v3 (TC3-HMAC-SHA256)
https://cloud.tencent.com/document/api/382/52072. Up to 200 numbers go in one SendSms call.

Outside mainland China, by the vendor's rules (each on the SendSms page unless named):

- ``PhoneNumberSet``: E.164 (``+`` and the country code, so no number reads as another
  country's), at most 200, "all mainland or all other numbers": one call per side.
- ``TemplateId``: "to a number outside the mainland only an international/HK-Macao-Taiwan
  template": each template mapping says which numbers it is for (``templates.py``), and a
  number with no mapping for it is ``no_template`` (cannot carry).
- ``SignName``: required for mainland SMS ("国内短信为必填参数", the 2019-07-11 SendSms page
  https://cloud.tencent.com/document/product/1125/38778): without ``sign_name`` or HAP's
  Signature a mainland message is ``no_sign_name`` (cannot carry). International SMS are
  sent without it; ``SenderId`` only if Tencent approved one ("默认使用公共 SenderId").
- VMS reaches mainland mobiles only ("支持的号码：仅支持中国大陆地区手机号码",
  https://cloud.tencent.com/document/api/1128/51568): voice codes to other numbers are not
  called but go as the fallback SMS.

Receipts: the status callback configured in the console ("短信下发状态通知",
https://cloud.tencent.com/document/product/382/52077, in English
https://www.tencentcloud.com/document/api/382/43547) POSTs a JSON array, one object per
message: ``sid`` (the SendSms ``SerialNo``), ``report_status`` (``SUCCESS`` or ``FAIL``),
``errmsg`` (the status code, ``DELIVRD``...), ``description``, ``mobile``,
``user_receive_time``; answered ``{"result": 0, "errmsg": "OK"}``. The callback is not
signed: its endpoint takes a secret in the path (``receipts.secret``) and ``allow_ips``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, ClassVar

import aiohttp
import orjson
from yarl import URL

from hapsms_relay import receipts
from hapsms_relay.errors import DeliveryError, PermanentError, TransientError
from hapsms_relay.providers.base import (
    BaseProvider,
    Common,
    Message,
    Outcome,
    Sent,
    classify_http_status,
    sign_name_warning,
)
from hapsms_relay.providers.signing import hmac_sha256, host_header, read_endpoint, sha256_hex
from hapsms_relay.providers.templates import Match, TemplateMap, load_templates, template_region
from hapsms_relay.secret import Secret
from hapsms_relay.table import Table

SMS_ENDPOINT = "https://sms.tencentcloudapi.com"
SMS_VERSION = "2021-01-11"
VMS_ENDPOINT = "https://vms.tencentcloudapi.com"
VMS_VERSION = "2020-09-02"
CONTENT_TYPE = "application/json"
MAX_NUMBERS = 200  # SendSms: "单次请求最多支持200个手机号"
_TEXT_LIMIT = 300

# Tencent's own caps per number (30 s, 1 h, 1 day, same content): resending cannot help.
_PER_NUMBER_CAP = re.compile(r"^LimitExceeded\.PhoneNumber\w*Limit$")
_TRANSIENT = ("InternalError", "RequestLimitExceeded", "ResourceUnavailable")


def tc3_authorization(
    secret_id: str, secret_key: str, *, service: str, host: str, path: str, payload: bytes,
    timestamp: int,
) -> str:
    """The ``Authorization`` header of a JSON POST, signed as Tencent's SDKs sign it:
    ``content-type`` and ``host`` signed, the body hashed, a key derived per date and service."""
    date = datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d")
    canonical = "\n".join((
        "POST", path, "", f"content-type:{CONTENT_TYPE}\nhost:{host}\n", "content-type;host",
        sha256_hex(payload),
    ))
    scope = f"{date}/{service}/tc3_request"
    to_sign = f"TC3-HMAC-SHA256\n{timestamp}\n{scope}\n{sha256_hex(canonical.encode())}"
    key = hmac_sha256(("TC3" + secret_key).encode(), date)
    key = hmac_sha256(hmac_sha256(key, service), "tc3_request")
    signature = hmac_sha256(key, to_sign).hex()
    return (f"TC3-HMAC-SHA256 Credential={secret_id}/{scope}, SignedHeaders=content-type;host, "
            f"Signature={signature}")


def classify(provider: str, code: str, text: str) -> DeliveryError:
    """Tencent's error code (``Response.Error.Code`` or a number's ``Code``) as our error."""
    if code.startswith(_TRANSIENT):
        return TransientError(provider, code, text)
    if _PER_NUMBER_CAP.match(code):
        return PermanentError(
            provider, code, f"Tencent's own cap for this number, not retried: {text}"
        )
    # AuthFailure.*, InvalidParameterValue.IncorrectPhoneNumber, FailedOperation.* (unapproved
    # template or signature, blacklisted number, no balance) and anything unknown.
    return PermanentError(provider, code, text)


@dataclass
class TencentProvider(BaseProvider):
    secret_id: Secret = field(default_factory=lambda: Secret(""), repr=False)
    secret_key: Secret = field(default_factory=lambda: Secret(""), repr=False)
    sdk_app_id: str = ""
    sign_name: str = ""
    sender_id: str = ""
    region: str = "ap-guangzhou"
    endpoint: URL = field(default_factory=lambda: URL(SMS_ENDPOINT + "/"))
    templates: TemplateMap = field(default_factory=TemplateMap)
    voice_sdk_app_id: str = ""
    voice_region: str = "ap-guangzhou"
    voice_endpoint: URL = field(default_factory=lambda: URL(VMS_ENDPOINT + "/"))
    play_times: int = 2
    supports_voice: ClassVar[bool] = False
    max_batch: ClassVar[int] = MAX_NUMBERS

    def __post_init__(self) -> None:
        # voice calls need a VMS application; without one, codes come as SMS
        self.supports_voice = bool(self.voice_sdk_app_id)  # type: ignore[misc]

    @classmethod
    def from_config(cls, common: Common, t: Table) -> TencentProvider:
        return cls(
            common,
            receipt_config=receipts.read_config(t, signed=False),
            secret_id=t.secret("secret_id"),
            secret_key=t.secret("secret_key"),
            sdk_app_id=_app_id(t, "sdk_app_id", required=True),
            sign_name=t.string("sign_name", ""),
            sender_id=t.string("sender_id", ""),
            region=t.string("region", "ap-guangzhou"),
            endpoint=read_endpoint(t, "endpoint", SMS_ENDPOINT),
            templates=load_templates(t, "list"),
            voice_sdk_app_id=_app_id(t, "voice_sdk_app_id", required=False),
            voice_region=t.string("voice_region", "ap-guangzhou"),
            voice_endpoint=read_endpoint(t, "voice_endpoint", VMS_ENDPOINT),
            play_times=t.integer("play_times", 2, min=1, max=3),
        )

    async def send(self, batch: Sequence[Message]) -> Sequence[Outcome]:
        if not batch:
            return []
        if batch[0].kind == "voice":
            if all(m.country_code == "86" for m in batch):
                return await super().send(batch)
            # VMS calls mainland numbers only: the others get the fallback SMS, no call wasted
            calls = [m for m in batch if m.country_code == "86"]
            texts = [replace(m, kind="sms") for m in batch if m.country_code != "86"]
            by_id = dict(zip((m.id for m in calls), await super().send(calls), strict=True))
            by_id.update(zip((m.id for m in texts), await self.send(texts), strict=True))
            return [by_id[m.id] for m in batch]
        # One call per side of the border and template: SendSms takes only mainland or only
        # other numbers, and a template is approved for one or the other.
        outcomes: dict[int, Outcome] = {}
        found: dict[str, Match | DeliveryError] = {}
        groups: dict[tuple[bool, str, tuple[str, ...]], list[Message]] = {}
        for m in batch:
            region = template_region(m)
            match = found.get(region)
            if match is None:
                try:
                    match = self.templates.resolve(self.name, m.text, region)
                except DeliveryError as exc:
                    match = exc
                found[region] = match
            if isinstance(match, DeliveryError):
                outcomes[m.id] = match
            else:
                key = (m.country_code == "86", match.template, match.params.values)
                groups.setdefault(key, []).append(m)
        for (mainland, template, params), part in groups.items():
            outcomes.update(await self._send_sms(part, template, list(params), mainland=mainland))
        return [outcomes[m.id] for m in batch]

    async def _send_sms(
        self, part: Sequence[Message], template: str, params: list[str], *, mainland: bool
    ) -> dict[int, Outcome]:
        payload: dict[str, Any] = {
            "PhoneNumberSet": [m.to for m in part],
            "SmsSdkAppId": self.sdk_app_id,
            "TemplateId": template,
            "TemplateParamSet": params,
            # echoed in each SendStatus: the relay's id of the call's first message, which
            # ties Tencent's console records to the relay's entries
            "SessionContext": str(part[0].id),
        }
        if mainland:
            sign = self.sign_name or part[0].signature
            if not sign:  # Tencent requires SignName for mainland SMS: refuse it here
                refused = self.unsupported(
                    "no_sign_name",
                    "set sign_name: this message has no signature, and Tencent requires one "
                    "for mainland numbers")
                return {m.id: refused for m in part}
            payload["SignName"] = sign
        elif self.sender_id:  # international SMS: no SignName; SenderId if one is approved
            payload["SenderId"] = self.sender_id
        try:
            resp = await self._call(self.endpoint, "sms", "SendSms", SMS_VERSION, self.region, payload)
        except DeliveryError as exc:
            return {m.id: exc for m in part}
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            err = self.transport_error(exc)
            return {m.id: err for m in part}
        statuses = {
            s.get("PhoneNumber"): s for s in resp.get("SendStatusSet") or [] if isinstance(s, dict)
        }
        result: dict[int, Outcome] = {}
        for m in part:
            status = statuses.get(m.to)
            if status is None:
                # not reported: maybe sent, maybe not; at least once beats never
                result[m.id] = TransientError(self.name, "missing_status", "no SendStatus for this number")
            elif status.get("Code") == "Ok":
                # SerialNo: what the status callback names the message by (its ``sid``)
                serial, fee = status.get("SerialNo"), status.get("Fee")
                result[m.id] = self.sent(
                    m, *((serial,) if isinstance(serial, str) and serial else ()),
                    billed=fee if isinstance(fee, int) and not isinstance(fee, bool) else 0)
            else:
                result[m.id] = classify(self.name, str(status.get("Code")), str(status.get("Message", "")))
        return result

    def notes(self) -> list[str]:
        sign = self.sign_name or "HAP's Signature"
        return [
            f"SendSms: mainland with SignName {sign}; international without SignName"
            + (f", SenderId {self.sender_id}" if self.sender_id else ""),
            self.templates.describe(),
            "voice: SendCodeVoice, mainland numbers only" if self.supports_voice
            else "voice: as SMS",
        ]

    def config_warnings(self, *, mainland: bool) -> list[str]:
        return sign_name_warning(self.name, self.sign_name, mainland)

    def parse_receipts(self, request: receipts.ReceiptRequest) -> receipts.ReceiptBatch:
        found = []
        for o in receipts.objects(request.json(), "Tencent's status callback"):
            sid, status = o.get("sid"), o.get("report_status")
            if not isinstance(sid, str) or not sid or status not in ("SUCCESS", "FAIL"):
                raise receipts.invalid("each report needs sid and report_status SUCCESS or FAIL")
            found.append(receipts.Receipt(
                "delivered" if status == "SUCCESS" else "undelivered", None, sid,
                str(o.get("errmsg") or status), str(o.get("description") or "")))
        return receipts.ReceiptBatch(found, b'{"result":0,"errmsg":"OK"}')

    async def send_one(self, message: Message) -> Sent:
        """A voice code: SendCodeVoice reads ``CodeMessage`` out after its own prompt."""
        payload = {
            "CodeMessage": message.code,
            "CalledNumber": message.to,
            "VoiceSdkAppid": self.voice_sdk_app_id,
            "PlayTimes": self.play_times,
            "SessionContext": str(message.id),
        }
        resp = await self._call(
            self.voice_endpoint, "vms", "SendCodeVoice", VMS_VERSION, self.voice_region, payload
        )
        status = resp.get("SendStatus")
        call = status.get("CallId") if isinstance(status, dict) else None
        return self.sent(message, *((call,) if isinstance(call, str) and call else ()))

    async def _call(
        self, url: URL, service: str, action: str, version: str, region: str,
        payload: Mapping[str, Any],
    ) -> dict[str, Any]:
        """One signed API 3.0 call; its ``Response`` object, or the error it names."""
        body = orjson.dumps(payload)
        host = host_header(url)
        timestamp = int(time.time())
        headers = {
            "Authorization": tc3_authorization(
                self.secret_id.reveal(), self.secret_key.reveal(), service=service, host=host,
                path=url.raw_path, payload=body, timestamp=timestamp,
            ),
            "Content-Type": CONTENT_TYPE,
            "Host": host,
            "X-TC-Action": action,
            "X-TC-Timestamp": str(timestamp),
            "X-TC-Version": version,
            "X-TC-Region": region,
        }
        async with self.http().post(
            url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=self.common.timeout)
        ) as resp:
            text = await resp.text(errors="replace")
            if resp.status != 200:
                raise classify_http_status(self.name, resp.status, text[:_TEXT_LIMIT], resp.headers)
        try:
            doc = orjson.loads(text)
        except orjson.JSONDecodeError:
            doc = None
        response = doc.get("Response") if isinstance(doc, dict) else None
        if not isinstance(response, dict):
            raise TransientError(self.name, "bad_response", text[:_TEXT_LIMIT])
        error = response.get("Error")
        if isinstance(error, dict):
            raise classify(self.name, str(error.get("Code")), str(error.get("Message", "")))
        return response


def _app_id(t: Table, name: str, *, required: bool) -> str:
    """An application id such as 1400006666: TOML users write it as a number or a string."""
    value = t.raw(name, None)
    if value is None and not required:
        return ""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return str(value)
    if isinstance(value, str) and value.isdigit():
        return value
    raise t.error(name, "required" if value is None else "expected a numeric id such as 1400006666")
