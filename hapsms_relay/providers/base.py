"""The one Protocol every provider implements, and what providers share.

A provider gets a batch of messages that share kind, text and code (most take one at a time:
``max_batch = 1``) and returns one outcome per message: ``Sent`` when the provider accepted it
(with the provider's message ids and the segments it bills), or a ``DeliveryError`` saying
whether retrying can help.
"""

from __future__ import annotations

import asyncio
import email.utils
import string
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, runtime_checkable

import aiohttp

from hapsms_relay import log, segments
from hapsms_relay.errors import (
    ConfigError,
    DeliveryError,
    PermanentError,
    TransientError,
    UnsupportedError,
)
from hapsms_relay.kinds import Kind
from hapsms_relay.rate import Rate
from hapsms_relay.receipts import ReceiptConfig
from hapsms_relay.table import REQUIRED, Table

DEFAULT_SIGNATURE_FORMAT = "【{signature}】{message}"


@dataclass(frozen=True, slots=True)
class Message:
    """One message to one recipient, as the dispatcher hands it to a provider."""

    id: int
    kind: Kind
    to: str  # E.164, "+8613800138000"
    region: str  # the number's ISO region ("CN"), "" when phonenumbers cannot tell
    national: str  # national significant number, "13800138000"
    text: str  # the message text (for voice: the fallback text with the code filled in)
    signature: str = ""  # HAP's Signature, without 【】
    code: str = ""  # the verification code of a voice message

    @property
    def country_code(self) -> str:
        """The calling code without '+', derived from the E.164 form and the national part."""
        return self.to[1 : len(self.to) - len(self.national)]


@dataclass(frozen=True, slots=True)
class Sent:
    """A provider accepted a message, and what it returned about it.

    ``ids``: the provider's message id, one per part where the provider splits a long text
    and answers for each (Vonage); empty when the API names none. ``segments``: the parts
    the message is billed as (the provider's own count where it gives one); 0 for a call.
    """

    ids: tuple[str, ...] = ()
    segments: int = 0


Outcome = Sent | DeliveryError


@dataclass(frozen=True, slots=True)
class Common:
    """Settings every provider has, read by the config loader before the provider's own."""

    name: str
    type: str
    concurrency: int = 16
    timeout: float = 10.0
    signature_format: str = DEFAULT_SIGNATURE_FORMAT
    rate: Rate | None = None  # at most this many API calls per window (``rate.py``)


@runtime_checkable
class Provider(Protocol):
    """What the dispatcher needs of a provider. Implementations live one per module."""

    @property
    def common(self) -> Common:
        """Name, type, concurrency, timeout, signature format."""

    @property
    def supports_voice(self) -> bool:
        """Whether ``send`` can place voice calls for ``kind == "voice"`` messages. When it
        cannot, the dispatcher hands it the voice message as an SMS with the fallback text."""

    @property
    def max_batch(self) -> int:
        """Most recipients one ``send`` call may carry; the dispatcher never exceeds it."""

    async def open(self, session: aiohttp.ClientSession) -> None:
        """Acquire what sending needs (the shared HTTP session, a connection pool)."""

    async def close(self) -> None:
        """Release what ``open`` acquired."""

    async def send(self, batch: Sequence[Message]) -> Sequence[Outcome]:
        """Deliver every message of the batch; one outcome per message, in order."""

    def notes(self) -> list[str]:
        """What ``check-config`` says under the provider: how it carries which numbers."""

    def config_warnings(self, *, mainland: bool) -> list[str]:
        """What ``check-config`` warns about; ``mainland``: a route sends it +86 numbers."""


#: The registry's view of a provider class: build it from its config table (no I/O here).
ProviderFactory = Callable[[Common, Table], Provider]


@dataclass
class BaseProvider:
    """Convenience base: one message per call, the shared session kept on ``open``."""

    common: Common
    #: the ``receipts`` table of a provider whose vendor posts receipts (``ReceiptSource``)
    receipt_config: ReceiptConfig | None = None
    supports_voice: ClassVar[bool] = False
    max_batch: ClassVar[int] = 1
    session: aiohttp.ClientSession | None = field(default=None, init=False, repr=False)

    @property
    def name(self) -> str:
        return self.common.name

    async def open(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    async def close(self) -> None:
        self.session = None

    async def send(self, batch: Sequence[Message]) -> Sequence[Outcome]:
        if len(batch) == 1:  # what the dispatcher hands most providers: no gather, no task
            return [await self._send_one_caught(batch[0])]
        return await asyncio.gather(*(self._send_one_caught(m) for m in batch))

    async def _send_one_caught(self, message: Message) -> Outcome:
        try:
            return await self.send_one(message)
        except DeliveryError as exc:
            return exc
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return self.transport_error(exc)

    def notes(self) -> list[str]:
        return []

    def config_warnings(self, *, mainland: bool) -> list[str]:
        return []

    def transport_error(self, exc: aiohttp.ClientError | OSError | TimeoutError) -> TransientError:
        """A failure to talk to the API at all (refused, reset, timed out): always transient."""
        if isinstance(exc, TimeoutError):
            return TransientError(self.name, "timeout", f"no answer within {self.common.timeout:g}s")
        return TransientError(self.name, "connection_error", _exc_text(exc))

    async def send_one(self, message: Message) -> Sent:
        raise NotImplementedError

    def sent(self, message: Message, *ids: str, billed: int = 0) -> Sent:
        """``Sent`` for ``message`` with the provider's ``ids``: ``billed`` segments if the
        provider said, else the segments of the text this provider sends (0 for a call)."""
        if not billed and message.kind == "sms":
            billed = segments.count(self.sms_text(message)).count
        return Sent(ids, billed)

    def http(self) -> aiohttp.ClientSession:
        if self.session is None:
            raise RuntimeError(f"provider {self.name} used before open()")
        return self.session

    def sms_text(self, message: Message) -> str:
        """The text a free-text provider sends: signature rendered, voice codes as text."""
        return render_text(self.common.signature_format, message)

    def unsupported(self, code: str, text: str) -> UnsupportedError:
        return UnsupportedError(self.name, code, text)


def sign_name_warning(name: str, sign_name: str, mainland: bool) -> list[str]:
    """check-config's warning for Tencent and Alibaba, which both require a SignName for
    mainland SMS: without ``sign_name`` only messages with HAP's Signature can go."""
    if not mainland or sign_name:
        return []
    return [f"provider {name}: no sign_name, and routes send it mainland numbers: an SMS "
            "without HAP's Signature (every voice code sent as SMS) cannot be sent there "
            "(no_sign_name)"]


def render_text(fmt: str, message: Message) -> str:
    """``signature_format`` applied; without a signature the message stands alone."""
    if not message.signature:
        return message.text
    return fmt.format_map({"signature": message.signature, "message": message.text})


def check_template(value: str, key: str, allowed: Iterable[str]) -> str:
    """Reject a ``{placeholder}`` template that names anything but ``allowed``."""
    names = set(allowed)
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(value) if f is not None]
    except ValueError as exc:
        raise ConfigError(key, f"bad template: {exc}") from None
    for f in fields:
        if f not in names:
            choices = ", ".join("{" + n + "}" for n in sorted(names))
            raise ConfigError(key, f"unknown placeholder {{{f}}}; use {choices}")
    return value


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), if present."""
    value = headers.get("Retry-After")
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def classify_http_status(
    provider: str, status: int, text: str, headers: Mapping[str, str]
) -> DeliveryError:
    """The rule for HTTP APIs: 4xx but 408/429 is permanent; 408, 429 and 5xx are transient."""
    code = f"http_{status}"
    if 400 <= status < 500 and status not in (408, 429):
        return PermanentError(provider, code, text)
    return TransientError(provider, code, text, retry_after=retry_after(headers))


def _exc_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def url_setting(t: Table, name: str, default: object = REQUIRED) -> str:
    """An http(s) URL setting (an API endpoint, a callback), without its trailing slash."""
    value = t.string(name, default)
    if not value.startswith(("http://", "https://")):
        raise t.error(name, "must start with http:// or https://")
    return value.rstrip("/")


def mask_number(text: str, message: Message) -> str:
    """A provider's error text with the recipient's number masked, as in every log line:
    vendors quote the number back ("The 'To' number +1500... is not valid")."""
    return text.replace(message.to, log.mask(message.to)) if message.to else text
