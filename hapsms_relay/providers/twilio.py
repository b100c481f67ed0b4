"""The ``twilio`` provider: SMS through the Messages resource, voice codes as a call that
reads the code with inline TwiML ``<Say>``.

API docs: https://www.twilio.com/docs/messaging/api/message-resource (SMS),
https://www.twilio.com/docs/voice/api/call-resource (calls, ``Twiml``),
https://www.twilio.com/docs/voice/twiml/say (``<Say>``),
https://www.twilio.com/docs/usage/requests-to-twilio (Basic auth, API keys),
https://www.twilio.com/docs/api/errors (error codes).

Receipts: ``StatusCallback`` (the relay's ``/receipts/<name>`` URL, the entry's id in its
query) gets a form POST per status change, ``MessageStatus`` (``CallStatus`` for calls),
``MessageSid``, ``ErrorCode``:
https://www.twilio.com/docs/messaging/guides/track-outbound-message-status,
https://www.twilio.com/docs/voice/api/call-resource#statuscallback. Each is signed in
``X-Twilio-Signature``: base64 HMAC-SHA1, keyed with the auth token, of the full URL Twilio
posted to and the form's names and values sorted by name
(https://www.twilio.com/docs/usage/webhooks/webhooks-security). The URL checked is the
configured ``status_callback`` (what Twilio was told), not what a proxy in front of the
relay turned it into; with and without the scheme's default port, as Twilio's own
``RequestValidator`` checks it.
"""

from __future__ import annotations

import base64
import hmac
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar
from urllib.parse import urlsplit

import aiohttp
import orjson

from hapsms_relay import receipts
from hapsms_relay.errors import DeliveryError, PermanentError, TransientError
from hapsms_relay.providers.base import (
    BaseProvider,
    Common,
    Message,
    Sent,
    check_template,
    classify_http_status,
    mask_number,
    retry_after,
    url_setting,
)
from hapsms_relay.secret import Secret
from hapsms_relay.table import Table

DEFAULT_ENDPOINT = "https://api.twilio.com"
DEFAULT_VOICE_TEXT = "Your verification code is {digits}."
VOICE_PLACEHOLDERS = ("digits", "code")
_TEXT_LIMIT = 300

#: Error codes whose class the HTTP status alone does not tell. Everything else follows the
#: status: 429 and 5xx transient, other 4xx permanent (21211 invalid 'To', 21614 not a
#: mobile number, 21610 unsubscribed recipient, 20003 authentication failed...).
_TRANSIENT_CODES = frozenset({
    20429,  # too many requests
    21611,  # the 'From' number's queue is full: another provider may still deliver in time
})
_PERMANENT_CODES = frozenset({21211, 21614, 21610, 20003})

#: MessageStatus and CallStatus values as receipt statuses; any other is on its way.
RECEIPT_STATUS: dict[str, receipts.Status] = {
    "delivered": "delivered", "read": "delivered", "completed": "delivered",
    "undelivered": "undelivered", "failed": "undelivered", "canceled": "undelivered",
    "busy": "undelivered", "no-answer": "undelivered",
}
_HASHES = {"HMAC_SHA1": "sha1", "HMAC_SHA256": "sha256"}


@dataclass
class TwilioProvider(BaseProvider):
    account_sid: str = ""
    # Basic auth: the Account SID with its Auth Token, or an API Key SID with its secret
    username: str = ""
    password: Secret | None = None
    sender: str | None = None  # "From": a Twilio number or alphanumeric sender ID
    messaging_service_sid: str | None = None
    status_callback: str | None = None
    endpoint: str = DEFAULT_ENDPOINT
    voice: bool = True
    voice_language: str = "en-US"
    voice_name: str = "woman"
    voice_text: str = DEFAULT_VOICE_TEXT
    repeat: int = 2
    supports_voice: ClassVar[bool] = True

    def __post_init__(self) -> None:
        # an instance attribute shadows the ClassVar: calls need a 'From' number
        self.supports_voice = self.voice  # type: ignore[misc]

    @classmethod
    def from_config(cls, common: Common, t: Table) -> TwilioProvider:
        account_sid = _sid(t, "account_sid", "AC")
        assert account_sid is not None
        auth_token = t.optional_secret("auth_token")
        api_key = _sid(t, "api_key", "SK", required=False)
        api_secret = t.optional_secret("api_secret")
        if auth_token is not None and (api_key or api_secret):
            raise t.error("api_key" if api_key else "api_secret",
                          "use either auth_token or api_key with api_secret, not both")
        if auth_token is None and not (api_key and api_secret):
            missing = "api_secret" if api_key else "api_key" if api_secret else "auth_token"
            raise t.error(missing, "required (auth_token, or api_key with api_secret)")
        sender = t.optional_str("from")
        service = _sid(t, "messaging_service_sid", "MG", required=False)
        if sender is None and service is None:
            raise t.error("from", "required unless messaging_service_sid is set")
        voice = t.boolean("voice", sender is not None)
        if voice and sender is None:
            raise t.error("from", "voice calls need a Twilio number to call from; "
                          "or set voice = false to send voice codes as SMS")
        receipt_config = receipts.read_config(t, signed=True)
        if receipt_config is not None:
            if auth_token is None:
                raise t.error("receipts", "Twilio signs status callbacks with the account's "
                              "auth_token: configure auth_token to take receipts")
            if not t.has("status_callback"):
                raise t.error("status_callback", "required with receipts: the relay's "
                              "/receipts URL as Twilio reaches it")
        provider = cls(
            common, receipt_config=receipt_config, account_sid=account_sid,
            username=api_key or account_sid, password=auth_token or api_secret,
            sender=sender, messaging_service_sid=service,
            status_callback=url_setting(t, "status_callback") if t.has("status_callback") else None,
            endpoint=url_setting(t, "endpoint", DEFAULT_ENDPOINT), voice=voice,
            voice_language=t.string("voice_language", "en-US"),
            voice_name=t.string("voice_name", "woman"),
            voice_text=check_template(t.string("voice_text", DEFAULT_VOICE_TEXT),
                                      t.path("voice_text"), VOICE_PLACEHOLDERS),
            repeat=t.integer("repeat", 2, min=1, max=10),
        )
        try:  # characters XML 1.0 cannot carry (control codes) would break every call
            ET.fromstring(provider.twiml("1234").encode())  # noqa: S314 - our own document
        except (ET.ParseError, UnicodeEncodeError) as exc:
            raise t.error("voice_text", f"cannot be carried in TwiML ({exc}); check "
                          "voice_text, voice_name and voice_language") from None
        return provider

    def twiml(self, code: str) -> str:
        """The call's TwiML: the code read digit by digit, ``repeat`` times. ElementTree
        escapes the text and the attributes, so no template or code can break the XML."""
        response = ET.Element("Response")
        say = ET.SubElement(response, "Say", {
            "language": self.voice_language, "voice": self.voice_name, "loop": str(self.repeat),
        })
        say.text = self.voice_text.format(digits=", ".join(code), code=code)
        return ET.tostring(response, encoding="unicode")

    def _form(self, message: Message) -> tuple[str, dict[str, str]]:
        if message.kind == "voice":
            assert self.sender is not None  # from_config: voice needs 'from'
            form = {"To": message.to, "From": self.sender, "Twiml": self.twiml(message.code)}
            resource = "Calls.json"
        else:
            form = {"To": message.to, "Body": self.sms_text(message)}
            # a Messaging Service picks the sender from its pool; else our 'From'
            if self.messaging_service_sid:
                form["MessagingServiceSid"] = self.messaging_service_sid
            else:
                assert self.sender is not None
                form["From"] = self.sender
            resource = "Messages.json"
        if self.status_callback:
            # the relay's id rides in the URL: Twilio posts the status to exactly this URL
            sep = "&" if "?" in self.status_callback else "?"
            form["StatusCallback"] = f"{self.status_callback}{sep}id={message.id}"
        return f"{self.endpoint}/2010-04-01/Accounts/{self.account_sid}/{resource}", form

    async def send_one(self, message: Message) -> Sent:
        url, form = self._form(message)
        async with self.http().post(
            url, data=form,
            headers={"Accept": "application/json", "Authorization": self._basic_auth()},
            timeout=aiohttp.ClientTimeout(total=self.common.timeout),
        ) as resp:
            text = await resp.text(errors="replace")
            if not 200 <= resp.status < 300:
                raise self.classify(resp.status, mask_number(text, message), resp.headers)
        try:  # the Message (or Call) resource: its sid, and the segments Twilio bills
            doc = orjson.loads(text)
        except orjson.JSONDecodeError:
            doc = None
        if not isinstance(doc, dict):
            return self.sent(message)
        sid = doc.get("sid")
        billed = str(doc.get("num_segments") or "")
        return self.sent(message, *((sid,) if isinstance(sid, str) and sid else ()),
                         billed=int(billed) if billed.isdigit() else 0)

    def parse_receipts(self, request: receipts.ReceiptRequest) -> receipts.ReceiptBatch:
        params = request.form()
        signature = request.headers.get("X-Twilio-Signature", "")
        algorithm = _HASHES.get(_signature_algorithm(
            request.headers.get("X-Twilio-Webhooks-Signature-Settings", "")))
        assert self.password is not None and self.status_callback is not None
        _, _, query = request.path_qs.partition("?")
        url = self.status_callback + (("&" if "?" in self.status_callback else "?") + query
                                      if query else "")
        if not signature or algorithm is None or not any(
            hmac.compare_digest(twilio_signature(self.password.reveal(), u, params, algorithm),
                                signature)
            for u in _with_and_without_port(url)
        ):
            raise receipts.forged("X-Twilio-Signature does not match status_callback and the "
                                  "form (check status_callback and auth_token)")
        form = dict(params)
        status = form.get("MessageStatus") or form.get("CallStatus") or ""
        ref = form.get("MessageSid") or form.get("SmsSid") or form.get("CallSid") or ""
        entry = receipts.entry_id(dict(request.query).get("id"))
        if not status or not (ref or entry):
            raise receipts.invalid("expected MessageStatus (or CallStatus) and MessageSid")
        receipt = receipts.Receipt(RECEIPT_STATUS.get(status, "progress"), entry, ref,
                                   form.get("ErrorCode") or status, status)
        return receipts.ReceiptBatch([receipt], b"", "text/plain")

    def _basic_auth(self) -> str:
        # built per request and never stored, so no object holding the secret lingers
        # (aiohttp.BasicAuth is deprecated, and its repr shows the password)
        assert self.password is not None
        pair = f"{self.username}:{self.password.reveal()}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")

    def classify(self, status: int, body: str, headers: Mapping[str, str]) -> DeliveryError:
        """Twilio's JSON error ``code`` decides, keeping its code and message; without one,
        the HTTP status does."""
        try:
            error = orjson.loads(body)
        except orjson.JSONDecodeError:
            error = None
        code = error.get("code") if isinstance(error, dict) else None
        if not isinstance(code, int) or isinstance(code, bool):
            return classify_http_status(self.name, status, body[:_TEXT_LIMIT], headers)
        assert isinstance(error, dict)
        text = str(error.get("message") or "")[:_TEXT_LIMIT]
        if code in _PERMANENT_CODES:
            return PermanentError(self.name, str(code), text)
        if code in _TRANSIENT_CODES or status in (408, 429) or status >= 500:
            return TransientError(self.name, str(code), text, retry_after=retry_after(headers))
        return PermanentError(self.name, str(code), text)


def twilio_signature(token: str, url: str, params: Sequence[tuple[str, str]],
                     digest: str = "sha1") -> str:
    """``X-Twilio-Signature`` of a request: the URL, then each name and its (distinct,
    sorted) values in name order, HMAC-SHA1 (or the settings header's algorithm), base64."""
    by_name: dict[str, set[str]] = {}
    for name, value in params:
        by_name.setdefault(name, set()).add(value)
    data = url + "".join(n + v for n in sorted(by_name) for v in sorted(by_name[n]))
    mac = hmac.new(token.encode(), data.encode(), digest)
    return base64.b64encode(mac.digest()).decode()


def _signature_algorithm(settings: str) -> str:
    """The algorithm ``X-Twilio-Webhooks-Signature-Settings`` names; HMAC_SHA1 without one."""
    for part in settings.split(","):
        name, sep, value = part.partition("=")
        if sep and name.strip() == "algorithm" and value.strip():
            return value.strip().upper()
    return "HMAC_SHA1"


def _with_and_without_port(url: str) -> tuple[str, str]:
    """The URL with the scheme's default port and without any: Twilio signs either."""
    parts = urlsplit(url)
    if parts.port is not None:
        return url, parts._replace(netloc=parts.netloc.rsplit(":", 1)[0]).geturl()
    port = 443 if parts.scheme == "https" else 80
    return parts._replace(netloc=f"{parts.netloc}:{port}").geturl(), url


def _sid(t: Table, name: str, prefix: str, *, required: bool = True) -> str | None:
    """A Twilio SID setting; its two-letter prefix catches a key pasted into the wrong slot."""
    value = t.string(name) if required else t.optional_str(name)
    if value is not None and not value.startswith(prefix):
        raise t.error(name, f"a Twilio {name.replace('_', ' ')} starts with {prefix!r}")
    return value
