"""The twilio provider against a loopback fake of Twilio's REST API: SMS and voice calls end
to end, Basic auth, TwiML, error classes, config errors; the SDK cross-checks our requests."""

from __future__ import annotations

import asyncio
import base64
import io
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hapsms_relay import config, log
from hapsms_relay.errors import ConfigError, PermanentError, TransientError
from hapsms_relay.outbox import State
from hapsms_relay.providers.base import Message, Sent
from hapsms_relay.providers.twilio import TwilioProvider
from tests.fakes import FakeAPI, Recorded, Reply
from tests.helpers import SMS_BODY, VOICE_BODY, base_config, eventually

SID = "AC" + "0" * 30 + "a1"
TOKEN = "twilio-auth-token-9c1e"
KEY = "SK" + "1" * 32
KEY_SECRET = "twilio-key-secret-77d0"
FROM = "+15005550006"


def form(rec: Recorded) -> dict[str, str]:
    return dict(parse_qsl(rec.body.decode(), keep_blank_values=True))


def basic(rec: Recorded) -> tuple[str, str]:
    scheme, _, value = rec.headers.get("Authorization", "").partition(" ")
    assert scheme == "Basic"
    user, _, password = base64.b64decode(value).decode().partition(":")
    return user, password


def twilio_error(status: int, code: int, message: str) -> Reply:
    """Twilio's error body, as the 2010-04-01 API sends it."""
    return Reply(status, {"code": code, "message": message,
                          "more_info": f"https://www.twilio.com/docs/errors/{code}", "status": status})


@dataclass
class TwilioFake:
    """Twilio's Messages and Calls resources: checks Basic auth, the path and the required
    parameters, answers 201 with the resource, or the error set for the 'To' number."""

    credentials: dict[str, str] = field(default_factory=lambda: {SID: TOKEN, KEY: KEY_SECRET})
    errors: dict[str, Reply] = field(default_factory=dict)

    def __call__(self, rec: Recorded) -> Reply:
        try:
            user, password = basic(rec)
        except (AssertionError, ValueError):
            user, password = "", ""
        if self.credentials.get(user) != password:
            return twilio_error(401, 20003, "Authenticate")
        m = re.fullmatch(r"/2010-04-01/Accounts/(AC\w{32})/(Messages|Calls)\.json", rec.path)
        if rec.method != "POST" or not m or m[1] != SID:
            return twilio_error(404, 20404, f"The requested resource {rec.path} was not found")
        f = form(rec)
        if "To" not in f:
            return twilio_error(400, 21604, "A 'To' phone number is required.")
        if m[2] == "Messages" and not ({"From", "MessagingServiceSid"} & f.keys() and "Body" in f):
            return twilio_error(400, 21603, "A 'From' or 'MessagingServiceSid' and a 'Body' are required.")
        if m[2] == "Calls" and not ("From" in f and "Twiml" in f):
            return twilio_error(400, 21213, "A 'From' phone number and 'Twiml' are required.")
        if f["To"] in self.errors:
            return self.errors[f["To"]]
        prefix = "SM" if m[2] == "Messages" else "CA"
        sid = prefix + "f" * 32
        return Reply(201, {
            "account_sid": SID, "api_version": "2010-04-01", "sid": sid, "status": "queued",
            "num_segments": "1" if m[2] == "Messages" else None,
            "to": f["To"], "from": f.get("From"), "body": f.get("Body"),
            "direction": "outbound-api", "error_code": None, "error_message": None,
            "uri": f"/2010-04-01/Accounts/{SID}/{m[2]}/{sid}.json",
        })


def provider_table(url: str, **settings: Any) -> dict[str, Any]:
    return {"name": "tw", "type": "twilio", "account_sid": SID, "auth_token": TOKEN,
            "from": FROM, "endpoint": url, **settings}


def build(url: str = "http://127.0.0.1:9", **settings: Any) -> TwilioProvider:
    doc = base_config(Path("/nonexistent"), providers=[provider_table(url, **settings)],
                      routes={"sms": ["tw"]})
    provider = config.parse(doc).providers["tw"]
    assert isinstance(provider, TwilioProvider)
    return provider


def message(kind: str = "sms", to: str = "+8613800138000", code: str = "") -> Message:
    return Message(7, kind, to, "CN", to[3:], "hello", "Acme", code)  # type: ignore[arg-type]


def parse(twiml: str) -> ET.Element:
    return ET.fromstring(twiml)  # noqa: S314 - documents built by our code or the SDK


def say(twiml: str) -> ET.Element:
    root = parse(twiml)
    assert root.tag == "Response" and [c.tag for c in root] == ["Say"]
    return root[0]


async def started(fake: TwilioFake) -> FakeAPI:
    api = FakeAPI(fake)
    await api.start()
    return api


@pytest.fixture
async def twilio() -> Any:
    fake = TwilioFake()
    api = await started(fake)
    yield fake, api
    await api.stop()


async def test_sms_end_to_end(tmp_path: Path, relay_factory: Any, session: Any, twilio: Any) -> None:
    """A HAP SMS body becomes one form-encoded Messages.json request with Basic auth."""
    _, api = twilio
    cb = "https://hooks.example.com/twilio"
    doc = base_config(tmp_path, providers=[provider_table(api.url, status_callback=cb)],
                      routes={"sms": ["tw"]})
    relay = await relay_factory(doc)
    status, answer = await relay.post(session, SMS_BODY)
    assert status == 200
    await eventually(lambda: len(api.accepted) == 1, what="the Messages request")
    rec = api.accepted[0]
    assert rec.path == f"/2010-04-01/Accounts/{SID}/Messages.json"
    assert rec.headers["Content-Type"] == "application/x-www-form-urlencoded"
    assert basic(rec) == (SID, TOKEN)
    # the relay's id rides in the callback URL, which is what Twilio posts (and signs)
    assert form(rec) == {"To": "+8613800138000", "From": FROM,
                         "StatusCallback": f"{cb}?id={answer['ids'][0]}",
                         "Body": "【明道云】您的验证码是123456，感谢您的使用！"}
    await relay.settled(sent=1)


async def test_api_key_and_messaging_service(
    tmp_path: Path, relay_factory: Any, session: Any, twilio: Any
) -> None:
    """With an API key the key SID and secret authenticate; the URL keeps the Account SID, and
    a Messaging Service sends instead of 'From'."""
    _, api = twilio
    table = provider_table(api.url, api_key=KEY, api_secret=KEY_SECRET,
                           messaging_service_sid="MG" + "2" * 32)
    del table["auth_token"], table["from"]
    relay = await relay_factory(base_config(tmp_path, providers=[table], routes={"sms": ["tw"]}))
    assert (await relay.post(session, SMS_BODY))[0] == 200
    await eventually(lambda: len(api.accepted) == 1, what="the Messages request")
    rec = api.accepted[0]
    assert basic(rec) == (KEY, KEY_SECRET)
    assert rec.path == f"/2010-04-01/Accounts/{SID}/Messages.json"
    assert form(rec)["MessagingServiceSid"] == "MG" + "2" * 32 and "From" not in form(rec)


async def test_voice_end_to_end(tmp_path: Path, relay_factory: Any, session: Any, twilio: Any) -> None:
    """A HAP voice body places a call whose TwiML reads the code digit by digit, twice."""
    _, api = twilio
    doc = base_config(tmp_path, providers=[provider_table(api.url, voice_language="en-GB",
                                                          voice_name="Polly.Amy")],
                      routes={"sms": ["tw"], "voice": ["tw"]})
    relay = await relay_factory(doc)
    assert (await relay.post(session, VOICE_BODY))[0] == 200
    await eventually(lambda: len(api.accepted) == 1, what="the Calls request")
    rec = api.accepted[0]
    assert rec.path == f"/2010-04-01/Accounts/{SID}/Calls.json"
    assert basic(rec) == (SID, TOKEN)
    f = form(rec)
    assert (f["To"], f["From"]) == ("+8613800138000", FROM)
    el = say(f["Twiml"])
    assert el.attrib == {"language": "en-GB", "voice": "Polly.Amy", "loop": "2"}
    assert el.text == "Your verification code is 1, 2, 3, 4, 5, 6."


async def test_voice_as_sms_without_calls(
    tmp_path: Path, relay_factory: Any, session: Any, twilio: Any
) -> None:
    """With voice = false a voice code goes as the fallback SMS through Messages.json."""
    _, api = twilio
    doc = base_config(tmp_path, providers=[provider_table(api.url, voice=False)],
                      routes={"sms": ["tw"], "voice": ["tw"]})
    relay = await relay_factory(doc)
    assert (await relay.post(session, VOICE_BODY))[0] == 200
    await eventually(lambda: len(api.accepted) == 1, what="the Messages request")
    assert api.accepted[0].path.endswith("/Messages.json")
    assert form(api.accepted[0])["Body"] == "Your verification code is 123456"


def test_twiml_escapes_a_hostile_template() -> None:
    """Markup, ampersands and quotes in the template and attributes stay text in the XML."""
    hostile = "</Say><Play>http://evil</Play> & \"quoted\" 'single' {digits} <![CDATA[x]]>"
    p = build(voice_text=hostile, voice_name='Polly."Amy"&<x>', repeat=3)
    el = say(p.twiml("0042"))
    assert el.text == hostile.replace("{digits}", "0, 0, 4, 2")
    assert el.attrib == {"language": "en-US", "voice": 'Polly."Amy"&<x>', "loop": "3"}


@given(st.text(alphabet=st.characters(exclude_characters="{}"), max_size=60),
       st.text(alphabet="0123456789", min_size=4, max_size=10))
def test_twiml_parses_for_any_template(text: str, code: str) -> None:
    """Any template is either refused at load or yields TwiML that parses back to it."""
    try:
        p = build(voice_text=text + "{digits}")
    except ConfigError:
        return
    expected = text + ", ".join(code)
    # XML end-of-line handling reads \r and \r\n as \n; a voice reads them alike anyway
    assert say(p.twiml(code)).text == expected.replace("\r\n", "\n").replace("\r", "\n")


def test_twiml_matches_the_sdk() -> None:
    """Our TwiML is the same document as the twilio SDK's VoiceResponse builds."""
    from twilio.twiml.voice_response import VoiceResponse

    p = build(voice_text="验证码 {digits} <&>", voice_language="cmn-CN", voice_name="Polly.Zhiyu")
    sdk = VoiceResponse()
    sdk.say("验证码 1, 2, 3, 4 <&>", language="cmn-CN", voice="Polly.Zhiyu", loop=2)
    ours, theirs = parse(p.twiml("1234")), parse(sdk.to_xml())
    assert ET.canonicalize(ET.tostring(ours)) == ET.canonicalize(ET.tostring(theirs))


async def test_sms_request_matches_the_sdk(twilio: Any, session: aiohttp.ClientSession) -> None:
    """The SDK's messages.create and our provider send the same form and auth header."""
    from twilio.rest import Client

    _, api = twilio
    p = build(api.url, status_callback="https://hooks.example.com/cb")
    await p.open(session)
    (outcome,) = await p.send([message()])
    assert outcome == Sent(("SM" + "f" * 32,), 1)

    def sdk_send() -> None:
        client = Client(SID, TOKEN)
        client.api.base_url = api.url
        try:
            client.messages.create(to="+8613800138000", from_=FROM, body="【Acme】hello",
                                   status_callback="https://hooks.example.com/cb?id=7")
        finally:
            client.http_client.session.close()  # type: ignore[attr-defined]

    await asyncio.to_thread(sdk_send)
    ours, theirs = api.accepted
    assert ours.path == theirs.path
    assert form(ours) == form(theirs)
    assert ours.headers["Authorization"] == theirs.headers["Authorization"]


CASES: list[tuple[str, Reply, type[Exception], str]] = [
    ("invalid number",
     twilio_error(400, 21211, "The 'To' number +8613800138000 is not a valid phone number."),
     PermanentError, "21211"),
    ("not a mobile", twilio_error(400, 21614, "'To' number is not a valid mobile number"),
     PermanentError, "21614"),
    ("unsubscribed", twilio_error(400, 21610, "Attempt to send to unsubscribed recipient"),
     PermanentError, "21610"),
    ("other 4xx", twilio_error(400, 21408, "Permission to send an SMS has not been enabled for the region"),
     PermanentError, "21408"),
    ("not found", twilio_error(404, 20404, "The requested resource was not found"),
     PermanentError, "20404"),
    ("too many requests", twilio_error(429, 20429, "Too Many Requests"), TransientError, "20429"),
    ("429 without json", Reply(429, "slow down"), TransientError, "http_429"),
    ("queue full",
     twilio_error(400, 21611, "This 'From' number has exceeded the maximum number of queued messages"),
     TransientError, "21611"),
    ("internal error", twilio_error(500, 20500, "Internal Server Error"), TransientError, "20500"),
    ("503 html", Reply(503, "<html>Service Unavailable</html>"), TransientError, "http_503"),
]


@pytest.mark.parametrize(("reply", "kind", "code"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
async def test_error_classes(
    twilio: Any, session: aiohttp.ClientSession, reply: Reply, kind: type[Exception], code: str
) -> None:
    """Twilio's JSON code decides permanent or transient; the code and message are kept."""
    fake, api = twilio
    reply.headers["Retry-After"] = "7"
    fake.errors["+8613800138000"] = reply
    p = build(api.url)
    await p.open(session)
    (outcome,) = await p.send([message()])
    assert type(outcome) is kind and outcome.code == code
    if isinstance(reply.body, dict):
        assert outcome.text == reply.body["message"].replace("+8613800138000", "+86*******8000")
    if isinstance(outcome, TransientError):
        assert outcome.retry_after == 7.0


async def test_bad_credentials_are_permanent_and_secret(
    tmp_path: Path, relay_factory: Any, session: Any, twilio: Any
) -> None:
    """A wrong token is 20003, dead at once; neither token shows in logs, reasons or repr."""
    logs = io.StringIO()
    log.setup("debug", logs)
    fake, api = twilio
    fake.credentials[SID] = "the-right-token"
    doc = base_config(tmp_path, providers=[provider_table(api.url)], routes={"sms": ["tw"]})
    relay = await relay_factory(doc)
    assert (await relay.post(session, SMS_BODY))[0] == 200
    await relay.settled(dead=1)
    (row,) = await relay.relay.outbox.list(State.DEAD, 10)
    assert row.error == "tw 20003: Authenticate"
    assert len(api.requests) == 1  # permanent: never retried
    out = logs.getvalue() + repr(relay.relay.config.providers["tw"])
    assert "dead" in out and TOKEN not in out and "the-right-token" not in out
    assert base64.b64encode(f"{SID}:{TOKEN}".encode()).decode() not in out


async def test_permanent_stops_transient_fails_over(
    tmp_path: Path, relay_factory: Any, session: Any, twilio: Any
) -> None:
    """21211 kills that recipient's entry; 20429 moves the other to the next provider."""
    fake, api = twilio
    fake.errors["+8613800138001"] = twilio_error(400, 21211, "invalid")
    fake.errors["+8613800138002"] = twilio_error(429, 20429, "Too Many Requests")
    dev = {"name": "dev", "type": "file", "path": str(tmp_path / "sent.jsonl")}
    doc = base_config(tmp_path, providers=[provider_table(api.url), dev], routes={"sms": ["tw", "dev"]})
    relay = await relay_factory(doc)
    body = {"Type": 1, "Data": {"Mobiles": ["13800138000", "13800138001", "13800138002"],
                                "Message": "hi", "Signature": ""}}
    assert (await relay.post(session, body))[0] == 200
    await relay.settled(sent=2, dead=1)
    (row,) = await relay.relay.outbox.list(State.DEAD, 10)
    assert row.recipient == "+8613800138001" and row.error == "tw 21211: invalid"
    assert (tmp_path / "sent.jsonl").read_text().count("+8613800138002") == 1


BAD_CONFIGS: list[tuple[dict[str, Any], str]] = [
    ({"account_sid": "SK123"}, r"account_sid: a Twilio account sid starts with 'AC'"),
    ({"auth_token": None}, r"auth_token: required"),
    ({"api_key": KEY}, r"api_key: use either auth_token or api_key"),
    ({"auth_token": None, "api_key": KEY}, r"api_secret: required"),
    ({"auth_token": None, "api_secret": "x"}, r"api_key: required"),
    ({"from": None}, r"from: required unless messaging_service_sid"),
    ({"from": None, "messaging_service_sid": "MG1", "voice": True}, r"from: voice calls need"),
    ({"messaging_service_sid": "XX1"}, r"messaging_service_sid: .* starts with 'MG'"),
    ({"endpoint": "api.twilio.com"}, r"endpoint: must start with http"),
    ({"status_callback": "ftp://x"}, r"status_callback: must start with http"),
    ({"voice_text": "code {pin}"}, r"voice_text: unknown placeholder \{pin\}"),
    ({"voice_text": "bad \x01 char {digits}"}, r"voice_text: cannot be carried in TwiML"),
    ({"repeat": 0}, r"repeat: must be at least 1"),
    ({"auth": "x"}, r"auth: unknown setting"),
]


@pytest.mark.parametrize(("change", "error"), BAD_CONFIGS)
def test_config_errors_name_the_key(change: dict[str, Any], error: str) -> None:
    """Each bad Twilio setting is refused with its key named."""
    table = provider_table("https://api.twilio.com", **change)
    table = {k: v for k, v in table.items() if v is not None}
    doc = base_config(Path("/nonexistent"), providers=[table], routes={"sms": ["tw"]})
    with pytest.raises(ConfigError, match=r"^providers\[0\]\." + error):
        config.parse(doc)


def test_service_only_config_sends_voice_as_sms() -> None:
    """A Messaging Service without 'from' loads, and cannot place calls."""
    table = provider_table("https://api.twilio.com", messaging_service_sid="MG" + "2" * 32)
    del table["from"]
    doc = base_config(Path("/nonexistent"), providers=[table], routes={"sms": ["tw"]})
    p = config.parse(doc).providers["tw"]
    assert p.supports_voice is False
