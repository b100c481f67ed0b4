"""Daily budgets in segments through the whole relay: what fits is sent, what would not is
refused (or held), and the segments sent survive a restart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp

from tests.helpers import eventually, start_relay
from tests.test_limits import limited, metric, sent, sms

LONG = "a" * 200  # "【Acme】" makes it UCS-2: 206 characters, 4 segments of 67
SHORT = "hello"  # "【Acme】hello": 1 segment


async def test_segment_budget_refuse(tmp_path: Path, relay_factory: Any,
                                     session: aiohttp.ClientSession) -> None:
    """daily_segment_budget = 5, refuse: a 4-segment message and a 1-segment one are sent,
    then the budget is used up: the next is refused with 429 and the gauge shows 0."""
    relay = await relay_factory(limited(tmp_path, daily_segment_budget=5, over_budget="refuse"))
    assert (await relay.post(session, sms("13800138000", text=LONG)))[0] == 200
    await eventually(lambda: len(sent(tmp_path)) == 1, what="the long one sent")
    assert (await relay.post(session, sms("13800138001", text=SHORT)))[0] == 200
    await eventually(lambda: len(sent(tmp_path)) == 2, what="the short one sent")
    status, body = await relay.post(session, sms("13800138002", text=SHORT))
    assert status == 429 and body["error"] == "rate_limited"
    assert await metric(session, relay.url, "hapsms_relay_budget_segments_remaining") == 0
    assert await metric(session, relay.url, "hapsms_relay_segments_total") == 5


async def test_segment_budget_holds_what_would_not_fit(tmp_path: Path,
                                                      session: aiohttp.ClientSession) -> None:
    """hold: a message whose expected segments exceed what is left waits in the outbox;
    after a restart the segments sent today still count."""
    doc = limited(tmp_path, provider_segment_budgets={"dev": 5}, over_budget="hold")
    relay = await start_relay(doc)
    try:
        for n in range(2):
            assert (await relay.post(session, sms(f"1380013800{n}", text=LONG)))[0] == 200
        await eventually(lambda: len(sent(tmp_path)) == 1, what="the first sent")
        await eventually(lambda: relay.relay.outbox.undelivered == 1, what="the second held")
    finally:
        await relay.stop()
    relay = await start_relay(doc)
    try:
        assert relay.relay.guard.budget.left("dev", "segments") == 1  # type: ignore[attr-defined]
        assert relay.relay.outbox.undelivered == 1
    finally:
        await relay.stop()
