"""Alibaba Cloud: SMS through Dysmsapi ``SendSms``, voice codes through Dyvmsapi ``SingleCallByTts``.

SendSms https://help.aliyun.com/zh/sms/developer-reference/api-dysmsapi-2017-05-25-sendsms,
SingleCallByTts https://help.aliyun.com/zh/vms/developer-reference/api-dyvmsapi-2017-05-25-singlecallbytts,
error codes https://help.aliyun.com/zh/sms/developer-reference/api-error-codes, signature V3
https://help.aliyun.com/zh/sdk/product-overview/v3-request-structure-and-signature.

Numbers, by the vendor's rules:

- SendSms ``PhoneNumbers`` (the SendSms page above): a mainland number is written
  "+/+86/0086/86 or no prefix" before the 11-digit number; any other is "international
  code + number" (``85291234567``). So a +1 number in that form (``13125551234``) is exactly
  a bare mainland mobile: the relay never sends one to SendSms (``ambiguous_number``, cannot
  carry) and sends mainland numbers as their bare 11 digits. ``reads_as_mainland`` is the
  check every non-mainland ``PhoneNumbers`` value passes first.
- Templates: SendSms's ``TemplateCode`` must be an international/HK-Macao-Taiwan template
  for a number outside the mainland ("发送国际/港澳台消息时，请使用国际/港澳台短信模版", the
  SendSms page), so each template mapping says which numbers it is for (``templates.py``);
  a number with no mapping for it is ``no_template`` (cannot carry).
- SendMessageToGlobe (``international_api``), Dysmsapi 2018-05-01 on the international site
  https://www.alibabacloud.com/help/en/sms/developer-reference/api-dysmsapi-2018-05-01-sendmessagetoglobe:
  free text (``Message``) to Hong Kong, Macao, Taiwan and abroad, ``To`` = country code +
  number, ``Type`` OTP/NOTIFY/MKT, optional Sender ID ``From``; it "does not support sending
  messages to the Chinese mainland", so mainland numbers never go to it and +1 numbers are
  unambiguous there. It answers ``ResponseCode``/``ResponseDescription``.
- SingleCallByTts: the voice number-format guide
  https://help.aliyun.com/zh/vms/product-overview/number-format-standards-guide reads
  a number without ``00``/``+`` as domestic and says the domestic voice service places no
  international calls (the SingleCallByTts page: outside the mainland discontinued since
  March 2022). Voice codes to other numbers are not called: they go as the fallback SMS.

Signed with ACS3-HMAC-SHA256 (signature V3), not the RPC HMAC-SHA1 one: Alibaba documents V2
as discontinued in favour of V3, V3 signs the Host, the headers and a hash of the body rather
than the parameters alone, and SHA-1 is past its time.

One number per SendSms call (``max_batch = 1``) although the API takes a comma-separated list:
it answers once for the whole list, so one illegal or capped number would fail, or a
throttle retry the whole batch, and the relay reports every recipient on its own.

Receipts: SmsReport in the console's HTTP batch push mode
(https://help.aliyun.com/zh/sms/developer-reference/smsreport-2) POSTs a JSON array:
``biz_id`` (SendSms's BizId), ``out_id`` (the relay's id, sent as ``OutId``), ``success``,
``err_code``, ``err_msg``, ``sms_size``, ``report_time``; answered ``{"code": 0}``. The
international site's push (https://help.aliyun.com/zh/sms/smsreport-http-intl) has
``MessageId``, ``TaskId`` (sent as ``TaskId``), ``Status`` 1/2/6, ``ErrorCode``. Pushes are
not signed: the endpoint takes a secret in the path (``receipts.secret``) and ``allow_ips``.
They can also be pulled with QuerySendDetails
(https://help.aliyun.com/zh/sms/developer-reference/api-dysmsapi-2017-05-25-querysenddetails);
the relay does not poll.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import ClassVar
from urllib.parse import quote

import aiohttp
import orjson
from yarl import URL

from hapsms_relay import log, receipts, segments
from hapsms_relay.errors import DeliveryError, PermanentError, TransientError, UnsupportedError
from hapsms_relay.providers.base import (
    BaseProvider,
    Common,
    Message,
    Sent,
    classify_http_status,
    sign_name_warning,
)
from hapsms_relay.providers.signing import hmac_sha256, host_header, read_endpoint, sha256_hex
from hapsms_relay.providers.templates import (
    Params,
    TemplateMap,
    load_templates,
    read_params,
    template_region,
)
from hapsms_relay.secret import Secret
from hapsms_relay.table import Table

SMS_ENDPOINT = "https://dysmsapi.aliyuncs.com"
VMS_ENDPOINT = "https://dyvmsapi.aliyuncs.com"
VERSION = "2017-05-25"  # both Dysmsapi and Dyvmsapi
# SendMessageToGlobe: Dysmsapi 2018-05-01 on the international site (alibabacloud.com)
GLOBE_ENDPOINT = "https://dysmsapi.ap-southeast-1.aliyuncs.com"
GLOBE_VERSION = "2018-05-01"
SENDSMS, GLOBE = "SendSms", "SendMessageToGlobe"  # the choices of international_api
ALGORITHM = "ACS3-HMAC-SHA256"
_TEXT_LIMIT = 300

_PERMANENT_CAP = "isv.BUSINESS_LIMIT_CONTROL"  # Alibaba's per-number minute/hour/day caps
_TRANSIENT = ("Throttling", "isp.", "ServiceUnavailable", "InternalError")
#: the international receipt's Status: 1 delivered, 2 failed, 6 expired
_INTL_STATUS: dict[str, receipts.Status] = {"1": "delivered", "2": "undelivered", "6": "undelivered"}
DEFAULT_VOICE_PARAMS = Params(("code",), ("{code}",))  # TtsParam {"code": "<the code>"}


def percent(text: str) -> str:
    """RFC 3986 encoding as V3 wants it: only ``A-Za-z0-9-_.~`` left as they are."""
    return quote(text, safe="~")


def canonical_query(params: Mapping[str, str]) -> str:
    """The query both sent and signed: sorted by name, names and values percent-encoded."""
    return "&".join(f"{percent(k)}={percent(v)}" for k, v in sorted(params.items()))


def acs3_authorization(
    access_key_id: str, access_key_secret: str, *, method: str, path: str, query: str,
    headers: Mapping[str, str],
) -> str:
    """The ``Authorization`` header over ``headers`` (host and the x-acs-* ones, including
    ``x-acs-content-sha256``, the body's hash) and the canonical ``query``."""
    signed = {k.lower(): v.strip() for k, v in headers.items()}
    names = sorted(signed)
    canonical = "\n".join((
        method, path, query, "".join(f"{n}:{signed[n]}\n" for n in names), ";".join(names),
        signed["x-acs-content-sha256"],
    ))
    to_sign = f"{ALGORITHM}\n{sha256_hex(canonical.encode())}"
    signature = hmac_sha256(access_key_secret.encode(), to_sign).hex()
    return f"{ALGORITHM} Credential={access_key_id},SignedHeaders={';'.join(names)},Signature={signature}"


def classify(provider: str, code: str, text: str, status: int = 200) -> DeliveryError:
    """Alibaba's ``Code`` (anything but ``OK``) as our error."""
    if code.startswith(_TRANSIENT) or (not code and status >= 500):
        return TransientError(provider, code or f"http_{status}", text)
    if code == _PERMANENT_CAP:
        return PermanentError(
            provider, code, f"Alibaba's own cap for this number, not retried: {text}"
        )
    # isv.MOBILE_NUMBER_ILLEGAL, isv.SMS_TEMPLATE_ILLEGAL, isv.SMS_SIGNATURE_ILLEGAL,
    # InvalidAccessKeyId.*, SignatureDoesNotMatch and anything unknown.
    return PermanentError(provider, code or f"http_{status}", text)


@dataclass
class AliyunProvider(BaseProvider):
    access_key_id: Secret = field(default_factory=lambda: Secret(""), repr=False)
    access_key_secret: Secret = field(default_factory=lambda: Secret(""), repr=False)
    sign_name: str = ""
    endpoint: URL = field(default_factory=lambda: URL(SMS_ENDPOINT + "/"))
    templates: TemplateMap = field(default_factory=TemplateMap)
    voice_template: str = ""
    voice_params: Params = DEFAULT_VOICE_PARAMS
    voice_show_number: str = ""
    voice_endpoint: URL = field(default_factory=lambda: URL(VMS_ENDPOINT + "/"))
    play_times: int = 2
    international_api: str = SENDSMS
    globe_type: str = "NOTIFY"
    globe_from: str = ""
    globe_endpoint: URL = field(default_factory=lambda: URL(GLOBE_ENDPOINT + "/"))
    globe_access_key_id: Secret | None = field(default=None, repr=False)
    globe_access_key_secret: Secret | None = field(default=None, repr=False)
    supports_voice: ClassVar[bool] = False

    def __post_init__(self) -> None:
        # voice calls need an approved TTS template; without one, codes come as SMS
        self.supports_voice = bool(self.voice_template)  # type: ignore[misc]

    @classmethod
    def from_config(cls, common: Common, t: Table) -> AliyunProvider:
        return cls(
            common,
            receipt_config=receipts.read_config(t, signed=False),
            access_key_id=t.secret("access_key_id"),
            access_key_secret=t.secret("access_key_secret"),
            sign_name=t.string("sign_name", ""),
            endpoint=read_endpoint(t, "endpoint", SMS_ENDPOINT),
            templates=load_templates(t, "named"),
            voice_template=t.string("voice_template", ""),
            voice_params=read_params(t, "voice_params", "named", ("code",), {"code": "{code}"}),
            voice_show_number=t.string("voice_show_number", ""),
            voice_endpoint=read_endpoint(t, "voice_endpoint", VMS_ENDPOINT),
            play_times=t.integer("play_times", 2, min=1, max=3),
            international_api=t.choice("international_api", (SENDSMS, GLOBE), SENDSMS),
            globe_type=t.choice("globe_type", ("NOTIFY", "OTP", "MKT"), "NOTIFY"),
            globe_from=t.string("globe_from", ""),
            globe_endpoint=read_endpoint(t, "globe_endpoint", GLOBE_ENDPOINT),
            globe_access_key_id=t.optional_secret("globe_access_key_id"),
            globe_access_key_secret=t.optional_secret("globe_access_key_secret"),
        )

    def notes(self) -> list[str]:
        sign = self.sign_name or "HAP's Signature"
        if self.international_api == GLOBE:
            intl = (f"international: SendMessageToGlobe at {self.globe_endpoint.host}, "
                    f"Type {self.globe_type} (OTP for codes)"
                    + (f", From {self.globe_from}" if self.globe_from else ""))
        else:
            intl = "international: SendSms with international templates, +1 numbers not at all"
        return [
            f"mainland: SendSms with SignName {sign}", intl, self.templates.describe(),
            "voice: SingleCallByTts, mainland numbers only" if self.supports_voice
            else "voice: as SMS",
        ]

    def config_warnings(self, *, mainland: bool) -> list[str]:
        return sign_name_warning(self.name, self.sign_name, mainland)

    async def send_one(self, message: Message) -> Sent:
        mainland = message.country_code == "86"
        if message.kind == "voice" and not mainland:
            # mainland-only voice API: the code goes as the fallback SMS, no call wasted
            message = replace(message, kind="sms")
        if message.kind == "voice":
            params = {
                "CalledNumber": message.national,
                "TtsCode": self.voice_template,
                "TtsParam": _json(self.voice_params.fill({"code": message.code}).as_dict()),
                "PlayTimes": str(self.play_times),
                "OutId": str(message.id),
            }
            if self.voice_show_number:
                params["CalledShowNumber"] = self.voice_show_number
            doc = await self._call(self.voice_endpoint, "SingleCallByTts", params)
            return self.sent(message, *_ref(doc, "CallId"))
        if not mainland and self.international_api == GLOBE:
            return await self._globe(message)
        number = self.sendsms_number(message)
        match = self.templates.resolve(self.name, message.text, template_region(message))
        sign = self.sign_name or message.signature
        if not sign:
            raise UnsupportedError(self.name, "no_sign_name",
                                   "set sign_name: this message has no signature")
        doc = await self._call(self.endpoint, "SendSms", {
            "PhoneNumbers": number,
            "SignName": sign,
            "TemplateCode": match.template,
            "TemplateParam": _json(match.params.as_dict()),
            # echoed as out_id in the receipt (SmsReport): the relay's id of the entry
            "OutId": str(message.id),
        })
        # Alibaba counts the signature in 【】 into the text's length (its sending rules)
        billed = segments.count(f"【{sign}】{message.text}").count
        return self.sent(message, *_ref(doc, "BizId"), billed=billed)

    async def _globe(self, message: Message) -> Sent:
        """Free text to a number outside mainland China through SendMessageToGlobe."""
        params = {
            "To": message.to[1:],  # country code + number; the API never reaches the mainland
            "Message": self.sms_text(message),
            "Type": "OTP" if message.code else self.globe_type,
            "TaskId": str(message.id),  # echoed as TaskId in the international receipt
        }
        if self.globe_from:
            params["From"] = self.globe_from
        doc = await self._call(
            self.globe_endpoint, "SendMessageToGlobe", params, version=GLOBE_VERSION,
            key_id=self.globe_access_key_id or self.access_key_id,
            key_secret=self.globe_access_key_secret or self.access_key_secret,
        )
        code = doc.get("ResponseCode")
        if code != "OK":
            raise classify(self.name, str(code or "bad_response"),
                           str(doc.get("ResponseDescription", "")))
        billed = str(doc.get("Segments") or "")
        return self.sent(message, *_ref(doc, "MessageId"),
                         billed=int(billed) if billed.isdigit() else 0)

    def parse_receipts(self, request: receipts.ReceiptRequest) -> receipts.ReceiptBatch:
        found = []
        for o in receipts.objects(request.json(), "Alibaba's SmsReport"):
            if "success" in o:  # the mainland's SmsReport
                ok, ref, entry = o.get("success"), o.get("biz_id"), o.get("out_id")
                code, text = o.get("err_code"), o.get("err_msg")
                status: receipts.Status | None = (
                    "delivered" if ok is True else "undelivered" if ok is False else None)
                size = o.get("sms_size")
            else:  # the international site's: Status 1 delivered, 2 failed, 6 expired
                ref, entry, code = o.get("MessageId"), o.get("TaskId"), o.get("ErrorCode")
                text, size = o.get("ErrorDescription"), o.get("SmsSize")
                status = _INTL_STATUS.get(str(o.get("Status")))
            if status is None or not (isinstance(ref, str) and ref):
                raise receipts.invalid("each report needs biz_id and success (or MessageId "
                                       "and Status)")
            found.append(receipts.Receipt(
                status, receipts.entry_id(entry), ref, str(code or ""), str(text or ""),
                int(size) if isinstance(size, str) and size.isdigit() else 0))
        return receipts.ReceiptBatch(found, orjson.dumps({"code": 0, "msg": "接收成功"}))

    def sendsms_number(self, message: Message) -> str:
        """``PhoneNumbers`` for one recipient: a mainland number as its bare 11 digits, any
        other as country code + number, unless Alibaba would read that as a mainland one."""
        if message.country_code == "86":
            return message.national
        number = message.to[1:]
        if reads_as_mainland(number):
            raise UnsupportedError(
                self.name, "ambiguous_number",
                f"SendSms reads {log.mask(message.to)} written as its country code and number "
                "as a mainland number; set international_api = \"SendMessageToGlobe\" or route it "
                "to another provider",
            )
        return number

    async def _call(
        self, url: URL, action: str, params: Mapping[str, str], *, version: str = VERSION,
        key_id: Secret | None = None, key_secret: Secret | None = None,
    ) -> dict[str, object]:
        """One signed RPC call, parameters in the query and an empty body; the answer, or
        the error its ``Code`` names."""
        query = canonical_query(params)
        headers = {
            "host": host_header(url),
            "x-acs-action": action,
            "x-acs-version": version,
            "x-acs-date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "x-acs-signature-nonce": uuid.uuid4().hex,
            "x-acs-content-sha256": sha256_hex(b""),
        }
        headers["Authorization"] = acs3_authorization(
            (key_id or self.access_key_id).reveal(),
            (key_secret or self.access_key_secret).reveal(), method="POST",
            path=url.raw_path, query=query, headers=headers,
        )
        async with self.http().post(
            URL(f"{url}?{query}", encoded=True), headers=headers,
            timeout=aiohttp.ClientTimeout(total=self.common.timeout),
        ) as resp:
            text = await resp.text(errors="replace")
            status, resp_headers = resp.status, resp.headers
        try:
            doc = orjson.loads(text)
        except orjson.JSONDecodeError:
            doc = None
        if not isinstance(doc, dict) or not isinstance(
            doc.get("Code") or doc.get("ResponseCode"), str
        ):
            if status != 200:
                raise classify_http_status(self.name, status, text[:_TEXT_LIMIT], resp_headers)
            raise TransientError(self.name, "bad_response", text[:_TEXT_LIMIT])
        code = doc.get("Code")
        if isinstance(code, str) and code != "OK":  # SendMessageToGlobe answers ResponseCode
            raise classify(self.name, code, str(doc.get("Message", "")), status)
        return doc


_MAINLAND_PREFIXES = ("+86", "0086", "86", "+")  # SendSms's mainland forms, longest first


def reads_as_mainland(number: str) -> bool:
    """Whether SendSms would take ``number`` for a mainland one: one of the documented
    mainland prefixes (or none) before an 11-digit number starting with 1 (a mainland mobile).
    ``13125551234`` (+1 312...) does; ``85291234567`` (+852) does not."""
    for prefix in _MAINLAND_PREFIXES:
        if number.startswith(prefix):
            number = number[len(prefix):]
            break
    return len(number) == 11 and number.isdigit() and number[0] == "1"


def _ref(doc: Mapping[str, object], name: str) -> tuple[str, ...]:
    """The answer's id field (``BizId``, ``CallId``) as ``Sent.ids``."""
    value = doc.get(name)
    return (value,) if isinstance(value, str) and value else ()


def _json(params: Mapping[str, str]) -> str:
    return orjson.dumps(params).decode()
