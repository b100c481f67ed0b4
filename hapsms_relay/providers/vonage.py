"""The ``vonage`` provider: SMS through the Vonage (formerly Nexmo) SMS API.

API docs: https://developer.vonage.com/en/api/sms (``POST /sms/json``),
https://developer.vonage.com/en/messaging/sms/guides/troubleshooting-sms (``status`` codes),
https://developer.vonage.com/en/api-errors/sms (what each status means).
No voice calls here: the dispatcher hands Type 2 codes to it as the voice fallback SMS.

Receipts: a delivery receipt (DLR) per message part, to the account's DLR webhook (GET,
POST form or POST-JSON, as set in the dashboard): ``messageId`` (the part), ``client-ref``
(the relay's id, sent with every message), ``status`` (delivered, expired, failed,
rejected, accepted, buffered, unknown), ``err-code``
(https://developer.vonage.com/en/messaging/sms/guides/delivery-receipts). Signed only when
the account has signed webhooks on: then ``sig`` over the other parameters (``timestamp``
and ``nonce`` among them) with the signature secret and the dashboard's method, MD5 hash
by default (https://developer.vonage.com/en/getting-started/concepts/signing-messages);
without ``signature_secret`` the endpoint needs its path secret.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import aiohttp
import orjson

from hapsms_relay import receipts
from hapsms_relay.errors import DeliveryError, PermanentError, TransientError
from hapsms_relay.providers.base import (
    BaseProvider,
    Common,
    Message,
    Sent,
    classify_http_status,
    mask_number,
    url_setting,
)
from hapsms_relay.secret import Secret
from hapsms_relay.segments import is_gsm7
from hapsms_relay.table import Table

DEFAULT_ENDPOINT = "https://rest.nexmo.com"
_TEXT_LIMIT = 300

#: Per-message ``status`` values (Vonage's troubleshooting table) and whether another
#: attempt can help. Any other non-zero status is permanent.
STATUS: dict[str, tuple[str, bool]] = {
    "1": ("Throttled", True),
    "2": ("Missing Parameters", False),
    "3": ("Invalid Parameters", False),
    "4": ("Invalid Credentials", False),
    "5": ("Internal Error", True),
    "6": ("Invalid Message", False),
    "7": ("Number Barred", False),
    "8": ("Partner Account Barred", False),
    "9": ("Partner Quota Violation", False),  # out of credit: not within a code's lifetime
    "10": ("Too Many Existing Binds", True),
    "11": ("Account Not Enabled For HTTP", False),
    "12": ("Message Too Long", False),
    "14": ("Invalid Signature", False),
    "15": ("Invalid Sender Address", False),
    "22": ("Invalid Network Code", False),
    "23": ("Invalid Callback Url", False),
    "29": ("Non-Whitelisted Destination", False),
    "32": ("Signature And API Secret Disallowed", False),
    "33": ("Number De-activated", False),
}


#: DLR ``status`` values as receipt statuses; accepted, buffered and unknown are on the way.
RECEIPT_STATUS: dict[str, receipts.Status] = {
    "delivered": "delivered", "expired": "undelivered", "failed": "undelivered",
    "rejected": "undelivered",
}
#: the dashboard's signature methods (``md5hash``: MD5 of the string and the secret)
SIGNATURE_METHODS = ("md5hash", "md5", "sha1", "sha256", "sha512")
MAX_SKEW = 300.0  # seconds a signed webhook's timestamp may be off the relay's clock


def vonage_signature(secret: str, method: str, params: Sequence[tuple[str, str]]) -> str:
    """``sig`` of signed webhook parameters: ``&name=value`` for each but ``sig`` in name
    order, ``&`` and ``=`` in values as ``_``; MD5 of that and the secret (``md5hash``),
    else the HMAC of it keyed with the secret; lower-case hex."""
    data = "".join(f"&{k}={v.replace('&', '_').replace('=', '_')}"
                   for k, v in sorted(params) if k != "sig")
    if method == "md5hash":
        return hashlib.md5((data + secret).encode(), usedforsecurity=False).hexdigest()
    return hmac.new(secret.encode(), data.encode(), method).hexdigest()


@dataclass
class VonageProvider(BaseProvider):
    api_key: str = ""
    api_secret: Secret | None = None
    sender: str = ""  # "from": an alphanumeric sender ID or a Vonage number
    callback: str | None = None
    signature_secret: Secret | None = None
    signature_method: str = "md5hash"
    endpoint: str = DEFAULT_ENDPOINT
    supports_voice: ClassVar[bool] = False

    @classmethod
    def from_config(cls, common: Common, t: Table) -> VonageProvider:
        sender = t.string("from")
        if sender.startswith("+") and sender[1:].isdigit():
            sender = sender[1:]  # Vonage writes numbers without '+'
        if not sender.isdigit() and len(sender) > 11:
            raise t.error("from", "an alphanumeric sender ID has at most 11 characters")
        signature_secret = t.optional_secret("signature_secret")
        return cls(
            common, api_key=t.string("api_key"), api_secret=t.secret("api_secret"),
            sender=sender, signature_secret=signature_secret,
            signature_method=t.choice("signature_method", SIGNATURE_METHODS, "md5hash"),
            receipt_config=receipts.read_config(t, signed=signature_secret is not None),
            callback=url_setting(t, "callback") if t.has("callback") else None,
            endpoint=url_setting(t, "endpoint", DEFAULT_ENDPOINT),
        )

    def form(self, message: Message) -> dict[str, str]:
        assert self.api_secret is not None
        text = self.sms_text(message)
        form = {
            "api_key": self.api_key, "api_secret": self.api_secret.reveal(),
            "from": self.sender, "to": message.to.lstrip("+"), "text": text,
            "client-ref": str(message.id),  # ties delivery receipts to the outbox entry
        }
        if not is_gsm7(text):
            form["type"] = "unicode"
        if self.callback:
            form["callback"] = self.callback
        return form

    async def send_one(self, message: Message) -> Sent:
        async with self.http().post(
            f"{self.endpoint}/sms/json", data=self.form(message),
            timeout=aiohttp.ClientTimeout(total=self.common.timeout),
        ) as resp:
            text = mask_number(await resp.text(errors="replace"), message)
            if resp.status != 200:
                raise classify_http_status(self.name, resp.status, text[:_TEXT_LIMIT], resp.headers)
        outcome = self.check(text)
        if isinstance(outcome, DeliveryError):
            raise outcome
        return outcome

    def parse_receipts(self, request: receipts.ReceiptRequest) -> receipts.ReceiptBatch:
        if request.content_type == "application/json":
            doc = request.json()
            if not isinstance(doc, dict):
                raise receipts.invalid("expected a JSON object")
            params = [(str(k), str(v)) for k, v in doc.items() if v is not None]
        else:
            params = request.form() or list(request.query)
        form = dict(params)
        if self.signature_secret is not None:
            sig = form.get("sig", "").lower()
            expected = vonage_signature(self.signature_secret.reveal(), self.signature_method,
                                        params)
            if not sig or not hmac.compare_digest(sig, expected):
                raise receipts.forged("sig does not match (check signature_secret and "
                                      "signature_method)")
            stamp = form.get("timestamp", "")
            if not stamp.isdigit() or abs(request.now - int(stamp)) > MAX_SKEW:
                raise receipts.forged("the signed timestamp is missing or over 5 minutes off")
        status, ref = form.get("status", ""), form.get("messageId", "")
        if not status or not ref:
            raise receipts.invalid("expected a delivery receipt: messageId and status")
        receipt = receipts.Receipt(
            RECEIPT_STATUS.get(status, "progress"), receipts.entry_id(form.get("client-ref")),
            ref, form.get("err-code") or status, status)
        return receipts.ReceiptBatch([receipt], b"", "text/plain")

    def check(self, body: str) -> Sent | DeliveryError:
        """A 200 answer lists one entry per message part (long texts are split); the text
        is sent only if every part has status 0. Each part has its ``message-id``, and its
        delivery receipt comes on its own."""
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError:
            answer = None
        parts = answer.get("messages") if isinstance(answer, dict) else None
        if not isinstance(parts, list) or not parts or not all(isinstance(p, dict) for p in parts):
            # unknown whether anything went out: sending again beats losing a code
            return TransientError(self.name, "bad_response", body[:_TEXT_LIMIT])
        for i, part in enumerate(parts, 1):
            status = str(part.get("status", ""))
            if status == "0":
                continue
            meaning, transient = STATUS.get(status, ("", False))
            text = str(part.get("error-text") or meaning)
            if len(parts) > 1:
                text = f"part {i} of {len(parts)}: {text}"
            error = TransientError if transient else PermanentError
            return error(self.name, status or "bad_response", text[:_TEXT_LIMIT])
        return Sent(tuple(str(p.get("message-id", "")) for p in parts), len(parts))
