"""The ``smtp`` provider against a real aiosmtpd server on loopback: TLS, AUTH, the mail as
recorded, reply classification, the connection pool, and end to end through a relay."""

from __future__ import annotations

import asyncio
import tomllib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from hapsms_relay import config
from hapsms_relay.errors import ConfigError, PermanentError, TransientError, UnsupportedError
from hapsms_relay.outbox import State
from hapsms_relay.providers.base import DEFAULT_SIGNATURE_FORMAT, Common, Message, Sent
from hapsms_relay.providers.smtp import SmtpProvider
from hapsms_relay.table import Table
from tests import docs
from tests.helpers import SMS_BODY, VOICE_BODY, base_config, eventually, to_toml
from tests.smtp_server import Drop, Hold, SMTPServer

PASSWORD = "s3cret-pw-7f1d"
CHINESE = Message(1, "sms", "+8613800138000", "CN", "13800138000", "您的验证码是123456，感谢您的使用！",
                  "明道云")


def sms(i: int, to: str = "+8613800138000", national: str = "13800138000") -> Message:
    return Message(i, "sms", to, "CN", national, f"message {i}")


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
def smtp_server(ca: trustme.CA) -> Iterator[Callable[..., SMTPServer]]:
    """Start SMTP servers (``tls``, ``users``...); all are stopped after the test."""
    servers: list[SMTPServer] = []

    def start(*, started: bool = True, **kwargs: Any) -> SMTPServer:
        server = SMTPServer(cert=ca.issue_cert("127.0.0.1", "localhost"), **kwargs)
        servers.append(server)
        if started:
            server.start()
        return server

    yield start
    for s in servers:
        s.stop()


def settings(server: SMTPServer, **overrides: Any) -> dict[str, Any]:
    """A provider table for ``server`` (plaintext unless overridden)."""
    base = {"name": "gw", "type": "smtp", "host": "127.0.0.1", "port": server.port,
            "tls": "none", "allow_plaintext": True, "from": "HAP SMS <sms@relay.example>",
            "to": "{digits}@sms.example.com"}
    return {**base, **overrides}


def build(table: dict[str, Any], *, concurrency: int = 4, timeout: float = 5.0) -> SmtpProvider:
    common = Common("gw", "smtp", concurrency, timeout,
                    table.get("signature_format", DEFAULT_SIGNATURE_FORMAT))
    own = {k: v for k, v in table.items() if k not in ("name", "type", "signature_format")}
    t = Table(own, "providers[0]")
    provider = SmtpProvider.from_config(common, t)
    t.done()
    return provider


@pytest.fixture
async def opened(session: aiohttp.ClientSession) -> AsyncIterator[Callable[..., Any]]:
    """Build and open providers from a table; all are closed after the test."""
    providers: list[SmtpProvider] = []

    async def open_(table: dict[str, Any], **kwargs: Any) -> SmtpProvider:
        p = build(table, **kwargs)
        await p.open(session)
        providers.append(p)
        return p

    yield open_
    for p in providers:
        await p.close()


async def send(provider: SmtpProvider, message: Message) -> Any:
    (outcome,) = await provider.send([message])
    return outcome


# -- the mail as it arrives --------------------------------------------------------------------


async def test_mail_has_envelope_headers_and_utf8_body(smtp_server, opened) -> None:
    """A Chinese message with a signature arrives with the right envelope, headers and body."""
    server = smtp_server()
    provider = await opened(settings(server, subject="短信 {national}"))
    assert isinstance(await send(provider, CHINESE), Sent)
    (got,) = server.received
    assert got.mail_from == "sms@relay.example"
    assert got.rcpt_tos == ["8613800138000@sms.example.com"]
    mail = got.message()
    assert mail["From"] == "HAP SMS <sms@relay.example>"
    assert mail["To"] == "8613800138000@sms.example.com"
    assert mail["Subject"] == "短信 13800138000"
    assert mail["Message-ID"] == "<hapsms.1@relay.example>"
    assert mail["Date"]
    assert mail.get_content_type() == "text/plain" and mail.get_content_charset() == "utf-8"
    assert mail.get_content() == "【明道云】您的验证码是123456，感谢您的使用！"
    assert got.content.isascii()  # 7bit on the wire: no server needs 8BITMIME or SMTPUTF8


async def test_line_breaks_stay_out_of_headers(smtp_server, opened) -> None:
    """A multi-line text keeps its line breaks in the body and cannot add headers via Subject."""
    server = smtp_server()
    provider = await opened(settings(server, subject="{message}", **{"from": "短信 <sms@relay.example>"}))
    text = "第一行\nBcc: victim@example.com\r\n第三行"
    message = Message(7, "sms", "+8613800138000", "CN", "13800138000", text)
    assert isinstance(await send(provider, message), Sent)
    mail = server.received[0].message()
    assert mail.keys() == ["From", "To", "Subject", "Date", "Message-ID", "MIME-Version",
                           "Content-Type", "Content-Transfer-Encoding"]
    assert mail["From"] == "短信 <sms@relay.example>"
    assert mail["Subject"] == "第一行 Bcc: victim@example.com 第三行"
    assert mail.get_content() == "第一行\r\nBcc: victim@example.com\r\n第三行"


async def test_body_template_and_address_placeholders(smtp_server, opened) -> None:
    """``to`` and ``body`` templates see {national}, {e164}, {message}, {signature}, {code}."""
    server = smtp_server()
    provider = await opened(settings(
        server, to="{national}@gw.example", body="to {e164}: {message} / {signature}",
        signature_format="{message}",
    ))
    assert isinstance(await send(provider, CHINESE), Sent)
    (got,) = server.received
    assert got.rcpt_tos == ["13800138000@gw.example"]
    assert got.message().get_content() == ("to +8613800138000: 您的验证码是123456，感谢您的使用！ / 明道云")


async def test_gateway_by_prefix_first_match_wins(smtp_server, opened) -> None:
    """Per-prefix gateways: the first matching prefix picks the address, else ``to``."""
    server = smtp_server()
    provider = await opened(settings(server, gateways=[
        {"prefix": "+1", "to": "{national}@us.gw.example"},
        {"prefix": "+1415", "to": "{national}@never.example"},
    ]))
    us = Message(2, "sms", "+14155550123", "US", "4155550123", "hi")
    assert isinstance(await send(provider, us), Sent)
    assert isinstance(await send(provider, CHINESE), Sent)
    assert [r.rcpt_tos for r in server.received] == [["4155550123@us.gw.example"],
                                                     ["8613800138000@sms.example.com"]]


async def test_no_matching_gateway_is_unsupported(smtp_server, opened) -> None:
    """Without ``to``, a number no gateway matches is handed on to the next provider."""
    server = smtp_server()
    table = settings(server, gateways=[{"prefix": "+1", "to": "{national}@us.gw.example"}])
    del table["to"]
    provider = await opened(table)
    outcome = await send(provider, CHINESE)
    assert isinstance(outcome, UnsupportedError) and outcome.code == "no_gateway"
    assert "13800138000" not in outcome.reason()  # the number is masked
    assert server.connections == 0


# -- TLS and AUTH ------------------------------------------------------------------------------


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
async def test_tls_with_private_ca(tls: str, smtp_server, opened, ca_file: str) -> None:
    """STARTTLS and implicit TLS verify the server against ``ca_file`` and deliver."""
    server = smtp_server(tls=tls)
    provider = await opened(settings(server, tls=tls, ca_file=ca_file, allow_plaintext=False))
    assert isinstance(await send(provider, CHINESE), Sent)
    (got,) = server.received
    assert got.tls and got.message().get_content().startswith("【明道云】")


async def test_tls_with_untrusted_certificate_is_transient(smtp_server, opened) -> None:
    """A certificate the system CAs do not vouch for fails the connection (transient)."""
    server = smtp_server(tls="implicit")
    provider = await opened(settings(server, tls="implicit", allow_plaintext=False))
    outcome = await send(provider, CHINESE)
    assert isinstance(outcome, TransientError) and "CERTIFICATE_VERIFY_FAILED" in outcome.text
    assert server.received == []


async def test_starttls_required_but_not_offered_is_transient(smtp_server, opened, ca_file) -> None:
    """tls = "starttls" never falls back to plaintext when the server does not offer it."""
    server = smtp_server(tls="none")
    provider = await opened(settings(server, tls="starttls", ca_file=ca_file))
    outcome = await send(provider, CHINESE)
    assert isinstance(outcome, TransientError) and "STARTTLS" in outcome.text.upper()
    assert server.received == []


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_auth_succeeds(mechanism: str, smtp_server, opened, ca_file: str) -> None:
    """AUTH PLAIN and AUTH LOGIN (whichever the server offers) log in and deliver."""
    other = "LOGIN" if mechanism == "PLAIN" else "PLAIN"
    server = smtp_server(tls="starttls", users={"relay": PASSWORD}, exclude_auth=(other,))
    provider = await opened(settings(server, tls="starttls", ca_file=ca_file, username="relay",
                                     password=PASSWORD))
    assert isinstance(await send(provider, CHINESE), Sent)
    assert server.auth_attempts == [(mechanism, "relay", True)]
    assert server.received[0].login == "relay"


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_auth_failure_is_permanent_and_logged_once(
    mechanism: str, smtp_server, opened, ca_file: str, caplog: pytest.LogCaptureFixture
) -> None:
    """535 is permanent, logged once for many messages, and the password appears nowhere."""
    other = "LOGIN" if mechanism == "PLAIN" else "PLAIN"
    server = smtp_server(tls="implicit", users={"relay": "another"}, exclude_auth=(other,))
    provider = await opened(settings(server, tls="implicit", ca_file=ca_file, username="relay",
                                     password=PASSWORD))
    outcomes = await provider.send([sms(1)]) + await provider.send([sms(2)])
    for o in outcomes:
        assert isinstance(o, PermanentError) and o.code == "auth_failed"
        assert o.text.startswith("535") and PASSWORD not in o.reason()
    out = caplog.text
    assert out.count("smtp_auth_failed") == 1
    assert "username=relay" in out and PASSWORD not in out and PASSWORD not in repr(provider)
    assert server.received == []


# -- how replies and failures are classified ---------------------------------------------------


@pytest.mark.parametrize(("stage", "reply", "kind"), [
    ("rcpt", "550 5.1.1 No such user", PermanentError),
    ("rcpt", "451 4.3.0 Try again later", TransientError),
    ("rcpt", "421 4.3.2 Shutting down", TransientError),
    ("data", "554 5.7.1 Message rejected", PermanentError),
    ("data", "452 4.3.1 Insufficient storage", TransientError),
    ("data", "421 4.3.2 Shutting down", TransientError),
])
async def test_reply_classification(stage: str, reply: str, kind: type, smtp_server, opened) -> None:
    """4xx replies are transient, 5xx permanent, with the server's reply as the reason; the
    next message goes through."""
    server = smtp_server()
    (server.handler.rcpt_script if stage == "rcpt" else server.handler.data_script).append(reply)
    provider = await opened(settings(server))
    outcome = await send(provider, sms(1))
    assert type(outcome) is kind
    assert outcome.code == f"smtp_{reply[:3]}" and outcome.text == reply
    assert isinstance(await send(provider, sms(2)), Sent)
    # an ASCII body goes as 7bit text, which SMTP ends with a line break
    assert [r.message().get_content() for r in server.received] == ["message 2\r\n"]


async def test_timeout_is_transient(smtp_server, opened) -> None:
    """A server that does not answer within ``timeout`` is a transient timeout."""
    server = smtp_server()
    server.handler.data_script.append(Hold())
    provider = await opened(settings(server), timeout=0.2)
    outcome = await send(provider, sms(1))
    assert isinstance(outcome, TransientError) and outcome.code == "timeout"
    server.release()


async def test_server_down_is_transient(smtp_server, opened) -> None:
    """Nothing listening is a transient connection error, and opening the provider succeeds."""
    server = smtp_server(started=False)
    server.reserve_port()
    provider = await opened(settings(server))
    outcome = await send(provider, sms(1))
    assert isinstance(outcome, TransientError) and outcome.code == "connection_error"


# -- the pool ----------------------------------------------------------------------------------


async def test_pool_reuses_connections(smtp_server, opened) -> None:
    """200 messages, 4 at a time, go over at most 4 connections."""
    server = smtp_server()
    provider = await opened(settings(server), concurrency=4)
    sem = asyncio.Semaphore(4)  # the dispatcher's per-provider limit

    async def one(i: int) -> Any:
        async with sem:
            return await send(provider, sms(i))

    outcomes = await asyncio.gather(*(one(i) for i in range(200)))
    assert len(outcomes) == 200 and all(isinstance(o, Sent) for o in outcomes)
    assert len(server.received) == 200
    assert 1 <= server.connections <= 4


async def test_idle_connection_checked_with_noop_and_replaced(smtp_server, opened) -> None:
    """A pooled connection idle past ``idle_check`` gets a NOOP; a failed NOOP means a new
    connection, and the message is delivered without a failed attempt."""
    server = smtp_server()
    server.handler.noop_script.append("421 4.4.2 Idle too long")
    provider = await opened(settings(server, idle_check="0s"))
    assert isinstance(await send(provider, sms(1)), Sent)
    assert isinstance(await send(provider, sms(2)), Sent)
    assert server.handler.noops == 1 and server.connections == 2
    assert isinstance(await send(provider, sms(3)), Sent)
    assert server.handler.noops == 2 and server.connections == 2


async def test_fresh_connection_reused_without_noop(smtp_server, opened) -> None:
    """A connection used within ``idle_check`` is reused as it is."""
    server = smtp_server()
    provider = await opened(settings(server))
    for i in range(3):
        assert isinstance(await send(provider, sms(i)), Sent)
    assert server.handler.noops == 0 and server.connections == 1


async def test_closed_connection_is_reopened(smtp_server, opened) -> None:
    """After the server restarts, the next message goes over a new connection."""
    server = smtp_server()
    provider = await opened(settings(server))
    assert isinstance(await send(provider, sms(1)), Sent)
    server.stop()
    server.start()
    await eventually(lambda: not provider.pool._idle[0][0].is_connected, what="the drop noticed")
    assert isinstance(await send(provider, sms(2)), Sent)
    assert server.connections == 2 and len(server.received) == 2


async def test_close_quits_idle_connections(smtp_server, session) -> None:
    """Closing the provider (stop, reload) ends its pooled connections with QUIT."""
    server = smtp_server()
    provider = build(settings(server))
    await provider.open(session)
    await asyncio.gather(*(send(provider, sms(i)) for i in range(3)))
    await provider.close()
    assert server.handler.quits == server.connections == 3


async def test_slow_connection_does_not_stall_others(smtp_server, opened) -> None:
    """While one transaction waits on the server, other messages go over other connections."""
    server = smtp_server()
    server.handler.data_script.append(Hold())
    provider = await opened(settings(server))
    held = asyncio.create_task(send(provider, sms(1)))
    await eventually(lambda: server.handler.held == 1, what="the first mail held")
    assert isinstance(await send(provider, sms(2)), Sent)
    assert isinstance(await send(provider, sms(3)), Sent)
    assert not held.done()
    server.release()
    assert isinstance(await held, Sent)
    assert len(server.received) == 3


# -- through a relay ---------------------------------------------------------------------------


def relay_config(tmp_path: Path, server: SMTPServer, **provider: Any) -> dict[str, Any]:
    return base_config(tmp_path, providers=[settings(server, **provider)],
                       routes={"sms": ["gw"], "voice": ["gw"]})


async def only_row(relay: Any) -> Any:
    rows = await relay.relay.outbox.list(None, 10)
    assert len(rows) == 1
    return rows[0]


async def test_relay_sms_and_voice_bodies(tmp_path: Path, smtp_server, relay_factory, session) -> None:
    """HAP's Type 1 body arrives as the signed text; a Type 2 body as the fallback SMS text."""
    server = smtp_server()
    relay = await relay_factory(relay_config(tmp_path, server))
    assert (await relay.post(session, SMS_BODY))[0] == 200
    assert (await relay.post(session, VOICE_BODY))[0] == 200
    await eventually(lambda: len(server.received) == 2, what="two mails")
    bodies = sorted(r.message().get_content() for r in server.received)
    assert bodies == ["Your verification code is 123456\r\n", "【明道云】您的验证码是123456，感谢您的使用！"]
    assert {tuple(r.rcpt_tos) for r in server.received} == {("8613800138000@sms.example.com",)}


@pytest.mark.parametrize("replies", [["421 4.3.2 Shutting down"], ["451 4.3.0 Try later"] * 2])
async def test_relay_retries_4xx_then_delivers(
    replies: list[str], tmp_path: Path, smtp_server, relay_factory, session
) -> None:
    """421 and 451 are retried; the message is delivered once the server accepts it."""
    server = smtp_server()
    server.handler.data_script.extend(replies)
    relay = await relay_factory(relay_config(tmp_path, server))
    await relay.post(session, SMS_BODY)
    await eventually(lambda: len(server.received) == 1, what="the mail")
    row = await only_row(relay)
    await eventually(lambda: relay.relay.outbox.undelivered == 0, what="delivered recorded")
    row = await only_row(relay)
    assert row.state == State.SENT and row.attempts == len(replies) + 1


async def test_relay_550_is_dead_with_reply(tmp_path: Path, smtp_server, relay_factory, session) -> None:
    """550 from the server makes the message dead at once, with the server's reply as reason."""
    server = smtp_server()
    server.handler.rcpt_script.append("550 5.1.1 <8613800138000@sms.example.com>: no such user")
    relay = await relay_factory(relay_config(tmp_path, server))
    await relay.post(session, SMS_BODY)
    await eventually(lambda: relay.relay.outbox.undelivered == 0, what="the entry settled")
    row = await only_row(relay)
    assert row.state == State.DEAD and row.attempts == 1
    assert row.error == "gw smtp_550: 550 5.1.1 <8613800138000@sms.example.com>: no such user"


async def test_relay_connection_dropped_mid_data(
    tmp_path: Path, smtp_server, relay_factory, session
) -> None:
    """A connection dropped during DATA is retried and delivered once the server is back."""
    server = smtp_server()
    server.handler.data_script.append(Drop())
    relay = await relay_factory(relay_config(tmp_path, server))
    await relay.post(session, SMS_BODY)
    await eventually(lambda: server.handler.drops == 1, what="the drop")
    server.stop()

    async def failed_again() -> bool:
        return (await only_row(relay)).attempts >= 2

    await eventually(failed_again, what="a retry against the stopped server")
    server.start()
    await eventually(lambda: relay.relay.outbox.undelivered == 0, what="delivered")
    assert (await only_row(relay)).state == State.SENT
    assert len(server.received) == 1


async def test_relay_server_down_at_start(tmp_path: Path, smtp_server, relay_factory, session) -> None:
    """With the server down when the relay starts, messages wait and go once it is up."""
    server = smtp_server(started=False)
    server.reserve_port()
    relay = await relay_factory(relay_config(tmp_path, server))
    body = {"Type": 1, "Data": {"Mobiles": ["13800138000", "13800138001"], "Message": "hi"}}
    assert (await relay.post(session, body))[0] == 200

    async def tried() -> bool:
        rows = await relay.relay.outbox.list(None, 10)
        return all(r.attempts >= 1 and r.state == State.PENDING for r in rows)

    await eventually(tried, what="failed first attempts")
    server.start()
    await eventually(lambda: len(server.received) == 2, what="both mails")


async def test_relay_pool_200_messages(tmp_path: Path, smtp_server, relay_factory, session) -> None:
    """200 recipients of one HAP body go over at most ``concurrency`` connections."""
    server = smtp_server()
    relay = await relay_factory(relay_config(tmp_path, server, concurrency=4))
    mobiles = [f"1380013{i:04d}" for i in range(200)]
    status, answer = await relay.post(session, {"Type": 1, "Data": {"Mobiles": mobiles, "Message": "x"}})
    assert status == 200 and len(answer["ids"]) == 200
    await eventually(lambda: len(server.received) == 200, what="200 mails")
    assert 1 <= server.connections <= 4
    assert len({r.rcpt_tos[0] for r in server.received}) == 200


# -- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize(("change", "error"), [
    ({"allow_plaintext": False}, r"providers\[0\]\.tls: \"none\" sends mail .* allow_plaintext = true"),
    ({"tls": "ssl"}, r"providers\[0\]\.tls: must be one of"),
    ({"username": "u"}, r"providers\[0\]\.password: username and password go together"),
    ({"password": "p"}, r"providers\[0\]\.username: username and password go together"),
    ({"from": "nobody"}, r"providers\[0\]\.from: expected an address"),
    ({"to": None}, r"providers\[0\]\.to: required"),
    ({"to": "{number}@x.example"}, r"providers\[0\]\.to: unknown placeholder \{number\}"),
    ({"to": "{digits}"}, r"providers\[0\]\.to: expected an address template"),
    ({"subject": "{oops}"}, r"providers\[0\]\.subject: unknown placeholder"),
    ({"body": "{message"}, r"providers\[0\]\.body: bad template"),
    ({"ca_file": "/nonexistent/ca.pem"}, r"providers\[0\]\.ca_file: needs tls"),
    ({"tls": "starttls", "ca_file": "/nonexistent/ca.pem"}, r"providers\[0\]\.ca_file: cannot load"),
    ({"gateways": [{"prefix": "1", "to": "{national}@x.example"}]},
     r"providers\[0\]\.gateways\[0\]\.prefix: expected an E.164 prefix"),
    ({"gateways": [{"prefix": "+1", "to": "{national}@x.example", "via": "x"}]},
     r"providers\[0\]\.gateways\[0\]\.via: unknown setting"),
    ({"idle_check": "soon"}, r"providers\[0\]\.idle_check: expected a duration"),
    ({"port": 0}, r"providers\[0\]\.port: must be at least 1"),
])
def test_config_errors_name_the_key(change: dict[str, Any], error: str, tmp_path: Path) -> None:
    """Each bad setting is rejected with an error naming its key."""
    provider = {"name": "gw", "type": "smtp", "host": "127.0.0.1", "tls": "none",
                "allow_plaintext": True, "from": "sms@relay.example", "to": "{digits}@x.example"}
    provider.update(change)
    provider = {k: v for k, v in provider.items() if v is not None}
    doc = base_config(tmp_path, providers=[provider], routes={"sms": ["gw"]})
    with pytest.raises(ConfigError, match=error):
        config.parse(tomllib.loads(to_toml(doc)))


def test_config_defaults(tmp_path: Path) -> None:
    """tls defaults to starttls on port 587, implicit TLS to 465; the password stays masked."""
    provider = {"name": "gw", "type": "smtp", "host": "smtp.example.com",
                "from": "sms@relay.example", "to": "{digits}@x.example", "username": "u",
                "password": PASSWORD}
    doc = base_config(tmp_path, providers=[provider], routes={"sms": ["gw"]})
    gw = config.parse(tomllib.loads(to_toml(doc))).providers["gw"]
    assert isinstance(gw, SmtpProvider)
    assert (gw.tls, gw.port, gw.body, gw.supports_voice) == ("starttls", 587, "{message}", False)
    assert PASSWORD not in repr(gw)
    doc["providers"][0]["tls"] = "implicit"
    assert config.parse(tomllib.loads(to_toml(doc))).providers["gw"].port == 465  # type: ignore[attr-defined]


ROOT = Path(__file__).resolve().parent.parent


def _docs_example() -> str:
    return docs.toml_blocks(docs.provider_page("smtp"))[0]


def _config_example() -> str:
    text = (ROOT / "systemd/config.example.toml").read_text()
    start = text.index('# [[providers]]\n# name = "mailgw"')
    block = text[start:].split("\n\n", 1)[0]
    return "\n".join(line[2:] for line in block.splitlines())


@pytest.mark.parametrize("example", [_docs_example, _config_example],
                         ids=["docs", "config.example.toml"])
def test_documented_example_is_valid(
    example: Callable[[], str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The smtp examples in docs/providers/smtp.md and systemd/config.example.toml load as
    written."""
    (tmp_path / "mailgw-password").write_text("pw\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    doc = tomllib.loads(example())
    doc["providers"][0].pop("ca_file", None)  # a path on the reader's machine
    cfg = config.parse(base_config(tmp_path, providers=doc["providers"], routes={"sms": ["mailgw"]}))
    gw = cfg.providers["mailgw"]
    assert isinstance(gw, SmtpProvider) and gw.password is not None
    assert gw.address(Message(1, "sms", "+14155550123", "US", "4155550123", "x")) == \
        "4155550123@us.sms.gateway.example"
