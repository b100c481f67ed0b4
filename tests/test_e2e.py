"""HAP's two sample bodies, end to end through a relay on a real socket."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import orjson

from tests.fakes import FakeAPI
from tests.helpers import SMS_BODY, VOICE_BODY, base_config, eventually


async def test_sample_bodies_reach_file_provider(tmp_path: Path, relay_factory, session) -> None:
    """Both documented HAP bodies are acknowledged with ids and written by the file provider."""
    relay = await relay_factory(base_config(tmp_path, routes={"sms": ["dev"], "voice": ["dev"]}))
    status, body = await relay.post(session, SMS_BODY)
    assert status == 200 and body["ok"] is True and len(body["ids"]) == 1
    status, body2 = await relay.post(session, VOICE_BODY)
    assert status == 200 and len(body2["ids"]) == 1
    sent = tmp_path / "sent.jsonl"

    def lines() -> list[dict[str, object]]:
        return [orjson.loads(x) for x in sent.read_bytes().splitlines()] if sent.exists() else []

    await eventually(lambda: len(lines()) == 2, what="two delivered lines")
    by_kind = {r["kind"]: r for r in lines()}
    assert by_kind["sms"]["to"] == "+8613800138000"
    assert by_kind["sms"]["text"] == "【明道云】您的验证码是123456，感谢您的使用！"
    assert by_kind["voice"]["code"] == "123456"
    assert {r["id"] for r in lines()} == {body["ids"][0], body2["ids"][0]}


async def test_sample_body_reaches_http_provider(
    tmp_path: Path, relay_factory, session: aiohttp.ClientSession, fake_api: FakeAPI
) -> None:
    """An SMS body with two recipients becomes two JSON requests to a generic HTTP API."""
    provider = {
        "name": "api", "type": "http", "url": fake_api.url + "/send",
        "headers": {"X-Key": "k-123"},
        "body": {"to": "{to}", "text": "{message}", "ref": "{id}"},
    }
    relay = await relay_factory(base_config(tmp_path, providers=[provider], routes={"sms": ["api"]}))
    body = {"Type": 1, "Data": {"Mobiles": ["+8613800138000", "13800138001", "8613800138000"],
                                "Message": "hello", "Signature": "【Acme】"}}
    status, answer = await relay.post(session, body)
    assert status == 200 and len(answer["ids"]) == 2  # the repeated number is sent once
    await eventually(lambda: len(fake_api.accepted) == 2, what="two provider requests")
    got = sorted((r.json()["to"], r.json()["text"], r.headers["X-Key"]) for r in fake_api.accepted)
    assert got == [("+8613800138000", "【Acme】hello", "k-123"), ("+8613800138001", "【Acme】hello", "k-123")]
    assert {r.json()["ref"] for r in fake_api.accepted} == set(answer["ids"])


async def test_log_lines_reach_stdout_masked(tmp_path: Path, relay_factory, session, capsys) -> None:
    """The relay logs accepted and sent lines to stdout, with the number masked."""
    relay = await relay_factory(base_config(tmp_path))
    status, _ = await relay.post(session, SMS_BODY)
    assert status == 200
    await eventually(lambda: relay.relay.dispatcher.activity.sent == 1, what="the send")
    out = capsys.readouterr().out
    assert "accepted " in out and "\nsent " in out.replace("<6>", "\n")
    assert "to=+86*******8000" in out
    assert "13800138000" not in out and "验证码" not in out
