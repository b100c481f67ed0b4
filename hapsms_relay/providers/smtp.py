"""The ``smtp`` provider: email-to-SMS gateways (a mail to ``<number>@<gateway>`` becomes an SMS).

SMTP: RFC 5321 https://www.rfc-editor.org/rfc/rfc5321 (reply codes: section 4.2), STARTTLS
RFC 3207, AUTH RFC 4954; client: aiosmtplib https://aiosmtplib.readthedocs.io/. Gateways:
ClickSend https://www.clicksend.com/us/help/email-to-sms, TextMagic
https://docs.textmagic.com/#section/Email-to-SMS, Esendex https://www.esendex.com/.
"""

from __future__ import annotations

import asyncio
import base64
import email.policy
import email.utils
import re
import socket
import ssl
from dataclasses import dataclass, field
from email.header import Header
from typing import ClassVar

import aiohttp
import aiosmtplib

from hapsms_relay import log
from hapsms_relay.errors import ConfigError, DeliveryError, PermanentError, TransientError
from hapsms_relay.providers.base import BaseProvider, Common, Message, Sent, check_template
from hapsms_relay.providers.smtp_pool import SMTPPool
from hapsms_relay.secret import Secret
from hapsms_relay.table import Table

ADDRESS_PLACEHOLDERS = ("e164", "digits", "national")
TEXT_PLACEHOLDERS = (*ADDRESS_PLACEHOLDERS, "message", "signature", "code", "id")
DEFAULT_PORTS = {"starttls": 587, "implicit": 465, "none": 25}
# Everything is 7bit on the wire (RFC 2047 headers, base64 bodies), so no server needs
# 8BITMIME or SMTPUTF8.
POLICY = email.policy.SMTP.clone(cte_type="7bit")
_MIME_HEADERS = "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_SEVEN_BIT = re.compile(r"[\t\x20-\x7e]{0,998}")


@dataclass(frozen=True)
class Gateway:
    """Numbers starting with ``prefix`` (E.164) go to the address ``to`` renders."""

    prefix: str
    to: str


@dataclass
class SmtpProvider(BaseProvider):
    host: str = ""
    port: int = 587
    tls: str = "starttls"
    username: str | None = None
    password: Secret | None = None
    sender: str = ""  # the From header as configured ("SMS <relay@example.com>")
    to: str | None = None  # the address template for numbers no gateway matches
    subject: str | None = None
    body: str = "{message}"
    gateways: tuple[Gateway, ...] = ()
    tls_context: ssl.SSLContext | None = field(default=None, repr=False)
    idle_check: float = 30.0
    supports_voice: ClassVar[bool] = False
    _envelope_from: str = field(default="", init=False)
    _from_header: str = field(default="", init=False)
    _domain: str = field(default="", init=False)
    _local_hostname: str = field(default="", init=False)
    _pool: SMTPPool | None = field(default=None, init=False, repr=False)
    _auth_failure_logged: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self._envelope_from = email.utils.parseaddr(self.sender)[1]
        self._domain = self._envelope_from.rpartition("@")[2]
        self._from_header = POLICY.header_factory("From", self.sender).fold(policy=POLICY)

    @classmethod
    def from_config(cls, common: Common, t: Table) -> SmtpProvider:
        host = t.string("host")
        tls = t.choice("tls", tuple(DEFAULT_PORTS), "starttls")
        if not t.boolean("allow_plaintext", False) and tls == "none":
            raise t.error("tls", "\"none\" sends mail and any password unencrypted; set "
                          "allow_plaintext = true to do that on purpose")
        port = t.integer("port", DEFAULT_PORTS[tls], min=1, max=65535)
        username = t.optional_str("username")
        password = t.optional_secret("password")
        if (username is None) != (password is None):
            missing = "password" if password is None else "username"
            raise t.error(missing, "username and password go together")
        ca_file = t.optional_str("ca_file")
        if ca_file is not None and tls == "none":
            raise t.error("ca_file", "needs tls = \"starttls\" or \"implicit\"")
        sender = t.string("from")
        addr = email.utils.parseaddr(sender)[1]
        if "@" not in addr or addr.startswith("@") or addr.endswith("@") or not sender.isprintable():
            raise t.error("from", f"expected an address such as \"sms@example.com\"; got {sender!r}")
        gateways = tuple(_gateway(g) for g in t.tables("gateways", []))
        to = t.optional_str("to")
        if to is not None:
            _check_address(to, t.path("to"))
        elif not gateways:
            raise t.error("to", "required (an address template such as \"{digits}@sms.example.com\")"
                          " unless [[providers.gateways]] are given")
        subject = t.optional_str("subject")
        if subject is not None:
            check_template(subject, t.path("subject"), TEXT_PLACEHOLDERS)
        return cls(
            common, host=host, port=port, tls=tls, username=username, password=password,
            sender=sender, to=to, subject=subject,
            body=check_template(t.string("body", "{message}"), t.path("body"), TEXT_PLACEHOLDERS),
            gateways=gateways,
            tls_context=None if tls == "none" else _tls_context(ca_file, t.path("ca_file")),
            idle_check=t.duration("idle_check", "30s", positive=False),
        )

    async def open(self, session: aiohttp.ClientSession) -> None:
        await super().open(session)
        # The EHLO name, looked up once rather than on every new connection.
        self._local_hostname = await asyncio.to_thread(socket.getfqdn)
        self._pool = SMTPPool(self._connect, size=self.common.concurrency, idle_check=self.idle_check)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
        await super().close()

    @property
    def pool(self) -> SMTPPool:
        if self._pool is None:
            raise RuntimeError(f"provider {self.name} used before open()")
        return self._pool

    async def send_one(self, message: Message) -> Sent:
        rcpt = self.address(message)
        if rcpt is None:
            raise self.unsupported("no_gateway", f"no gateway for {log.mask(message.to)}")
        data = self.render(message, rcpt)
        try:
            # One deadline for the whole hand-over: waiting for a slot, connecting, the transaction.
            async with asyncio.timeout(self.common.timeout), self.pool.connection() as conn:
                await conn.sendmail(self._envelope_from, [rcpt], data)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            raise _classify(self.name, exc.recipients[0]) from None
        except aiosmtplib.SMTPResponseException as exc:
            raise _classify(self.name, exc) from None
        except (aiosmtplib.SMTPTimeoutError, aiosmtplib.SMTPServerDisconnected,
                aiosmtplib.SMTPConnectError):
            raise  # the base maps these to timeout / connection_error
        except aiosmtplib.SMTPException as exc:  # e.g. STARTTLS not offered
            raise TransientError(self.name, "smtp_error", exc.message) from None
        return self.sent(message)  # a gateway sends no receipts: the entry stays sent

    def address(self, message: Message) -> str | None:
        """The gateway address for the message's number: the first matching gateway's, else ``to``."""
        template = next((g.to for g in self.gateways if message.to.startswith(g.prefix)), self.to)
        if template is None:
            return None
        return template.format_map(_address_values(message))

    def render(self, message: Message, rcpt: str) -> bytes:
        """The mail as sent: From, To, optional Subject, Date, Message-ID, a UTF-8 text body.

        Put together by hand rather than through ``EmailMessage``, whose header parsing
        costs about 0.5 ms a message: most of what one core spends per message.
        """
        values = {
            **_address_values(message), "message": self.sms_text(message),
            "signature": message.signature, "code": message.code, "id": str(message.id),
        }
        parts = [self._from_header, f"To: {rcpt}\r\n"]
        if self.subject is not None:
            parts.append(_subject(self.subject.format_map(values)))
        parts.append(f"Date: {email.utils.formatdate()}\r\n")
        # The same on every attempt for the message: a gateway can drop a repeat after a
        # connection was lost between our data and its reply.
        parts.append(f"Message-ID: <hapsms.{message.id}@{self._domain}>\r\n")
        parts.append(_body(self.body.format_map(values)))
        return "".join(parts).encode("ascii")

    async def _connect(self) -> aiosmtplib.SMTP:
        conn = aiosmtplib.SMTP(
            hostname=self.host, port=self.port, timeout=self.common.timeout,
            local_hostname=self._local_hostname or None, use_tls=self.tls == "implicit",
            start_tls=self.tls == "starttls", tls_context=self.tls_context,
        )
        await conn.connect()
        if self.username is None or self.password is None:
            return conn
        try:
            await conn.login(self.username, self.password.reveal())
        except aiosmtplib.SMTPAuthenticationError as exc:
            conn.close()
            if exc.code // 100 != 5:  # 454: a temporary failure on the server's side
                raise
            self._log_auth_failure(f"{exc.code} {exc.message}")
            raise PermanentError(self.name, "auth_failed", f"{exc.code} {exc.message}") from None
        except aiosmtplib.SMTPException as exc:
            conn.close()
            if isinstance(exc, aiosmtplib.SMTPServerDisconnected | aiosmtplib.SMTPTimeoutError):
                raise
            # No AUTH offered (often: only after TLS): a setup problem, not a passing one.
            self._log_auth_failure(exc.message)
            raise PermanentError(self.name, "auth_failed", exc.message) from None
        self._auth_failure_logged = False
        return conn

    def _log_auth_failure(self, reply: str) -> None:
        # Once until a login succeeds again: every message fails the same way meanwhile.
        if not self._auth_failure_logged:
            self._auth_failure_logged = True
            log.error("smtp_auth_failed", provider=self.name, host=self.host, port=self.port,
                      username=self.username, reply=reply)


def _classify(provider: str, exc: aiosmtplib.SMTPResponseException) -> DeliveryError:
    """RFC 5321 4.2.1: 4yz is a transient failure, 5yz a permanent one; the reply is the reason."""
    text = f"{exc.code} {exc.message}"
    if 500 <= exc.code < 600:
        return PermanentError(provider, f"smtp_{exc.code}", text)
    return TransientError(provider, f"smtp_{exc.code}", text)


def _subject(text: str) -> str:
    """One header line whatever HAP sent: line breaks become spaces (no header injection),
    non-ASCII text is RFC 2047-encoded, long text folded."""
    text = " ".join(text.splitlines())
    charset = "us-ascii" if text.isascii() else "utf-8"
    return "Subject: " + Header(text, charset, header_name="Subject").encode(linesep="\r\n") + "\r\n"


def _body(text: str) -> str:
    """The MIME headers and body for exactly ``text`` (line breaks as CRLF): 7bit when it is
    printable ASCII, else base64 of its UTF-8. Nothing is appended: a gateway may send an
    extra line break as two more characters, and a second SMS part."""
    canonical = _LINE_BREAK.sub("\r\n", text)
    if all(_SEVEN_BIT.fullmatch(line) for line in canonical.split("\r\n")):
        return _MIME_HEADERS + "Content-Transfer-Encoding: 7bit\r\n\r\n" + canonical
    encoded = base64.encodebytes(canonical.encode()).decode("ascii").replace("\n", "\r\n")
    return _MIME_HEADERS + "Content-Transfer-Encoding: base64\r\n\r\n" + encoded


def _address_values(m: Message) -> dict[str, str]:
    return {"e164": m.to, "digits": m.to.lstrip("+"), "national": m.national}


def _check_address(template: str, key: str) -> str:
    check_template(template, key, ADDRESS_PLACEHOLDERS)
    sample = template.format_map({"e164": "+8613800138000", "digits": "8613800138000",
                                  "national": "13800138000"})
    local, at, domain = sample.rpartition("@")
    if not at or not local or not domain or any(c.isspace() or c in "<>," for c in sample):
        raise ConfigError(key, f"expected an address template such as \"{{digits}}@sms.example.com\"; "
                          f"got {template!r}")
    return template


def _gateway(t: Table) -> Gateway:
    prefix = t.string("prefix")
    if not prefix.startswith("+") or not prefix[1:].isdigit():
        raise t.error("prefix", f"expected an E.164 prefix such as \"+1\"; got {prefix!r}")
    gateway = Gateway(prefix, _check_address(t.string("to"), t.path("to")))
    t.done()
    return gateway


def _tls_context(ca_file: str | None, key: str) -> ssl.SSLContext:
    """The system's CAs, or only ``ca_file``'s (a private CA); hostnames are always checked."""
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(key, f"cannot load {ca_file}: {getattr(exc, 'strerror', None) or exc}") \
            from None

