"""What a provider's outcome carries when it accepts a message: the provider's message id
(``message_id_field`` of the http provider) and the segments the message costs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from hapsms_relay import config
from hapsms_relay.providers.base import Message, Sent
from tests.fakes import FakeAPI, Reply
from tests.helpers import base_config, http_provider


def build(url: str, **settings: Any) -> Any:
    doc = base_config(Path("/nonexistent"), providers=[http_provider("api", url, **settings)],
                      routes={"sms": ["api"]})
    return config.parse(doc).providers["api"]


def sms(text: str) -> Message:
    return Message(1, "sms", "+8613800138000", "CN", "13800138000", text)


@pytest.mark.parametrize(("answer", "ids"), [
    ({"data": {"id": "msg-7f3a"}}, ("msg-7f3a",)),
    ({"data": {"id": 1234}}, ("1234",)),  # numbers are kept as their text
    ({"data": {}}, ()),  # accepted without an id: still sent
    ({"data": {"id": {"nested": 1}}}, ()),
    ("not json", ()),
])
async def test_message_id_field(fake_api: FakeAPI, session: aiohttp.ClientSession,
                                answer: Any, ids: tuple[str, ...]) -> None:
    """The answer's field at ``message_id_field`` becomes the entry's provider id."""
    fake_api.script.append(Reply(200, answer))
    p = build(fake_api.url, message_id_field="data.id")
    await p.open(session)
    assert await p.send([sms("hello")]) == [Sent(ids, 1)]


@pytest.mark.parametrize(("text", "segments"), [
    ("a" * 160, 1), ("a" * 161, 2), ("您" * 70, 1), ("您" * 71, 2),
])
async def test_segments_of_the_text_sent(fake_api: FakeAPI, session: aiohttp.ClientSession,
                                         text: str, segments: int) -> None:
    """A free-text provider reports the segments of the text it sent."""
    p = build(fake_api.url)
    await p.open(session)
    assert await p.send([sms(text)]) == [Sent((), segments)]
