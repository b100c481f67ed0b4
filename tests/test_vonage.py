"""The vonage provider against a loopback fake of the Vonage SMS API: SMS end to end, voice
codes as the fallback SMS, unicode detection, message parts, every status class."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import aiohttp
import pytest

from hapsms_relay import config, log
from hapsms_relay.errors import ConfigError, PermanentError, TransientError
from hapsms_relay.outbox import State
from hapsms_relay.providers.base import Message, Sent
from hapsms_relay.providers.vonage import STATUS, VonageProvider
from hapsms_relay.segments import is_gsm7
from tests.fakes import FakeAPI, Recorded, Reply
from tests.helpers import SMS_BODY, VOICE_BODY, base_config, eventually

KEY = "a1b2c3d4"
SECRET = "vonage-secret-5e9f"


def form(rec: Recorded) -> dict[str, str]:
    return dict(parse_qsl(rec.body.decode(), keep_blank_values=True))


def vonage_answer(to: str, *statuses: tuple[str, str]) -> Reply:
    """The SMS API's 200 answer: one entry per message part, with its status."""
    messages: list[dict[str, str]] = []
    for i, (status, error_text) in enumerate(statuses):
        if status == "0":
            messages.append({"to": to, "message-id": f"0C00000021{i:06d}", "status": "0",
                             "remaining-balance": "15.53590000", "message-price": "0.03330000",
                             "network": "46000"})
        else:
            messages.append({"status": status, "error-text": error_text})
    return Reply(200, {"message-count": str(len(messages)), "messages": messages})


@dataclass
class VonageFake:
    """``POST /sms/json``: checks the key and secret and the required parameters as Vonage
    does (status 4 and 2 in a 200 answer), splits long texts into parts, or answers with the
    parts set for the 'to' number."""

    errors: dict[str, Reply] = field(default_factory=dict)

    def __call__(self, rec: Recorded) -> Reply:
        if rec.method != "POST" or rec.path != "/sms/json":
            return Reply(404, "Not Found")
        f = form(rec)
        if f.get("api_key") != KEY or f.get("api_secret") != SECRET:
            return vonage_answer("", ("4", "Bad Credentials"))
        missing = [k for k in ("from", "to", "text") if not f.get(k)]
        if missing:
            return vonage_answer("", ("2", f"Missing {missing[0]}"))
        if f["to"] in self.errors:
            return self.errors[f["to"]]
        per_part = 67 if f.get("type") == "unicode" else 153
        parts = max(1, -(-len(f["text"]) // per_part)) if len(f["text"]) > per_part + 3 else 1
        return vonage_answer(f["to"], *[("0", "")] * parts)


@pytest.fixture
async def vonage() -> Any:
    fake = VonageFake()
    api = FakeAPI(fake)
    await api.start()
    yield fake, api
    await api.stop()


def provider_table(url: str, **settings: Any) -> dict[str, Any]:
    return {"name": "vg", "type": "vonage", "api_key": KEY, "api_secret": SECRET,
            "from": "Acme", "endpoint": url, **settings}


def build(url: str, **settings: Any) -> VonageProvider:
    doc = base_config(Path("/nonexistent"), providers=[provider_table(url, **settings)],
                      routes={"sms": ["vg"]})
    provider = config.parse(doc).providers["vg"]
    assert isinstance(provider, VonageProvider)
    return provider


def message(text: str = "hello", to: str = "+447700900000") -> Message:
    return Message(9, "sms", to, "GB", to[3:], text)


async def test_sms_end_to_end(tmp_path: Path, relay_factory: Any, session: Any, vonage: Any) -> None:
    """A HAP SMS body becomes one form POST to /sms/json; Chinese text goes as unicode."""
    _, api = vonage
    cb = "https://hooks.example.com/dlr"
    relay = await relay_factory(base_config(
        tmp_path, providers=[provider_table(api.url, callback=cb)], routes={"sms": ["vg"]}))
    status, answer = await relay.post(session, SMS_BODY)
    assert status == 200
    await eventually(lambda: len(api.accepted) == 1, what="the SMS API request")
    assert form(api.accepted[0]) == {
        "api_key": KEY, "api_secret": SECRET, "from": "Acme", "to": "8613800138000",
        "text": "【明道云】您的验证码是123456，感谢您的使用！", "type": "unicode",
        "client-ref": answer["ids"][0], "callback": cb,
    }
    await relay.settled(sent=1)


async def test_voice_code_goes_as_fallback_sms(
    tmp_path: Path, relay_factory: Any, session: Any, vonage: Any
) -> None:
    """Vonage places no calls: a voice code is sent as the GSM-7 fallback text."""
    _, api = vonage
    relay = await relay_factory(base_config(
        tmp_path, providers=[provider_table(api.url, **{"from": "+447700900001"})],
        routes={"sms": ["vg"], "voice": ["vg"]}))
    assert (await relay.post(session, VOICE_BODY))[0] == 200
    await eventually(lambda: len(api.accepted) == 1, what="the SMS API request")
    f = form(api.accepted[0])
    assert (f["from"], f["text"]) == ("447700900001", "Your verification code is 123456")
    assert "type" not in f


@pytest.mark.parametrize(("text", "gsm"), [
    ("Your code is 123456", True),
    ("Prix: 5€ [promo] {x} ~ ^ | \\ café Ñ ß", True),
    ("line\nbreak\r", True),
    ("您的验证码是123456", False),
    ("emoji 🙂", False),
    ("ç lower cedilla", False),  # GSM 03.38 has only the capital Ç
    ("`backtick`", False),
])
def test_gsm7_detection(text: str, gsm: bool) -> None:
    """GSM-7 covers the default alphabet and its extension table, nothing else."""
    assert is_gsm7(text) is gsm


async def test_long_message_parts_all_accepted(vonage: Any, session: aiohttp.ClientSession) -> None:
    """A long text answered as several parts, all status 0, is sent: one message id per part."""
    _, api = vonage
    p = build(api.url)
    await p.open(session)
    (outcome,) = await p.send([message("x" * 400)])
    assert isinstance(outcome, Sent) and outcome.segments == len(outcome.ids) == 3
    assert len(set(outcome.ids)) == 3


CASES: list[tuple[str, Reply, type[Exception], str, str]] = [
    ("throttled", vonage_answer("", ("1", "Throughput Rate Exceeded - please wait [ 30 ] and retry")),
     TransientError, "1", "Throughput Rate Exceeded - please wait [ 30 ] and retry"),
    ("missing parameters", vonage_answer("", ("2", "Missing to param")), PermanentError, "2",
     "Missing to param"),
    ("invalid parameters", vonage_answer("", ("3", "Invalid to address")), PermanentError, "3",
     "Invalid to address"),
    ("invalid credentials", vonage_answer("", ("4", "Bad Credentials")), PermanentError, "4",
     "Bad Credentials"),
    ("internal error", vonage_answer("", ("5", "Internal Error")), TransientError, "5", "Internal Error"),
    ("number barred", vonage_answer("", ("7", "")), PermanentError, "7", "Number Barred"),
    ("out of credit", vonage_answer("", ("9", "Quota Exceeded - rejected")), PermanentError, "9",
     "Quota Exceeded - rejected"),
    ("too many binds", vonage_answer("", ("10", "")), TransientError, "10", "Too Many Existing Binds"),
    ("non-whitelisted", vonage_answer("", ("29", "Non White-listed Destination - rejected")),
     PermanentError, "29", "Non White-listed Destination - rejected"),
    ("unknown status", vonage_answer("", ("99", "")), PermanentError, "99", ""),
    ("one part throttled", vonage_answer("447700900000", ("0", ""), ("1", "Throttled")),
     TransientError, "1", "part 2 of 2: Throttled"),
    ("one part rejected", vonage_answer("447700900000", ("6", "Invalid Message"), ("0", "")),
     PermanentError, "6", "part 1 of 2: Invalid Message"),
    ("not json", Reply(200, "<html>portal</html>"), TransientError, "bad_response", "<html>portal</html>"),
    ("no parts", Reply(200, {"message-count": "0", "messages": []}), TransientError, "bad_response",
     '{"message-count": "0", "messages": []}'),
    ("http 401", Reply(401, "Unauthorized"), PermanentError, "http_401", "Unauthorized"),
    ("http 429", Reply(429, "Too Many Requests"), TransientError, "http_429", "Too Many Requests"),
    ("http 502", Reply(502, "Bad Gateway"), TransientError, "http_502", "Bad Gateway"),
]


@pytest.mark.parametrize(("reply", "kind", "code", "text"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
async def test_status_classes(
    vonage: Any, session: aiohttp.ClientSession, reply: Reply, kind: type[Exception], code: str,
    text: str,
) -> None:
    """Each per-message status (and HTTP failure) maps to permanent or transient, keeping
    Vonage's status and error text."""
    fake, api = vonage
    fake.errors["447700900000"] = reply
    p = build(api.url)
    await p.open(session)
    (outcome,) = await p.send([message()])
    assert type(outcome) is kind
    assert (outcome.code, outcome.text) == (code, text)


def test_status_table_covers_the_documented_codes() -> None:
    """Only throttling, internal errors and binds are transient among Vonage's statuses."""
    assert {s for s, (_, transient) in STATUS.items() if transient} == {"1", "5", "10"}
    assert {"2", "3", "4", "9"} <= {s for s, (_, transient) in STATUS.items() if not transient}


async def test_bad_secret_is_dead_and_never_logged(
    tmp_path: Path, relay_factory: Any, session: Any, vonage: Any
) -> None:
    """A wrong secret is status 4, dead at once; the secret is in no log line or reason."""
    logs = io.StringIO()
    log.setup("debug", logs)
    _, api = vonage
    wrong = "wrong-secret-0b7a"
    relay = await relay_factory(base_config(
        tmp_path, providers=[provider_table(api.url, api_secret=wrong)], routes={"sms": ["vg"]}))
    assert (await relay.post(session, SMS_BODY))[0] == 200
    await relay.settled(dead=1)
    (row,) = await relay.relay.outbox.list(State.DEAD, 10)
    assert row.error == "vg 4: Bad Credentials"
    assert len(api.requests) == 1
    out = logs.getvalue() + repr(relay.relay.config.providers["vg"]) + row.error
    assert "dead" in out and wrong not in out and SECRET not in out


async def test_throttled_fails_over(
    tmp_path: Path, relay_factory: Any, session: Any, vonage: Any
) -> None:
    """Status 1 (throttled) moves the message to the route's next provider."""
    fake, api = vonage
    fake.errors["8613800138000"] = vonage_answer("", ("1", "Throttled"))
    dev = {"name": "dev", "type": "file", "path": str(tmp_path / "sent.jsonl")}
    relay = await relay_factory(base_config(
        tmp_path, providers=[provider_table(api.url), dev], routes={"sms": ["vg", "dev"]}))
    assert (await relay.post(session, SMS_BODY))[0] == 200
    await relay.settled(sent=1)
    assert len(api.requests) == 1
    assert "+8613800138000" in (tmp_path / "sent.jsonl").read_text()


@pytest.mark.parametrize(("change", "error"), [
    ({"api_secret": None}, r"api_secret: required"),
    ({"api_key": None}, r"api_key: required"),
    ({"from": None}, r"from: required"),
    ({"from": "AcmeCorporation"}, r"from: an alphanumeric sender ID has at most 11 characters"),
    ({"endpoint": "rest.nexmo.com"}, r"endpoint: must start with http"),
    ({"callback": "dlr"}, r"callback: must start with http"),
    ({"voice": True}, r"voice: unknown setting"),
])
def test_config_errors_name_the_key(change: dict[str, Any], error: str) -> None:
    """Each bad Vonage setting is refused with its key named."""
    table = {k: v for k, v in provider_table("https://rest.nexmo.com", **change).items()
             if v is not None}
    doc = base_config(Path("/nonexistent"), providers=[table], routes={"sms": ["vg"]})
    with pytest.raises(ConfigError, match=r"^providers\[0\]\." + error):
        config.parse(doc)
