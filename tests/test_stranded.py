"""Entries whose outcome could not be written (the disk filled up after the send) are not
stranded in flight until a restart: their lease runs out and they are delivered again."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp

from hapsms_relay.clock import ManualClock
from hapsms_relay.errors import StorageError
from hapsms_relay.outbox import Sending, State
from hapsms_relay.outbox_sqlite import SQLiteOutbox
from tests.fakes import FakeAPI
from tests.helpers import SMS_BODY, base_config, eventually, outbox_states, start_relay


class OutcomeWriteFailsOnce(SQLiteOutbox):
    """The real SQLite outbox, whose first "sent" write fails as on a full disk."""

    failed = False

    async def sent(self, provider: str, entries: Sequence[Sending]) -> None:
        if not self.failed:
            self.failed = True
            raise StorageError("outbox: database or disk is full")
        await super().sent(provider, entries)


def _provider(api: FakeAPI) -> dict[str, object]:
    return {"name": "api", "type": "http", "url": api.url + "/send",
            "body": {"to": "{to}", "text": "{message}"}}


async def test_unrecorded_delivery_is_sent_again_after_its_lease(
    tmp_path: Path, session: aiohttp.ClientSession, fake_api: FakeAPI
) -> None:
    """A delivery whose record failed stays in flight until its lease runs out, not a moment
    less; then it is sent again (at least once) and recorded as delivered."""
    clock = ManualClock(time.time())
    doc = base_config(tmp_path, providers=[_provider(fake_api)], routes={"sms": ["api"]},
                      queue={"lease": "30s"})
    outbox = OutcomeWriteFailsOnce(str(tmp_path / "outbox.db"), clock=clock)
    relay = await start_relay(doc, outbox=outbox, clock=clock)
    try:
        assert (await relay.post(session, SMS_BODY))[0] == 200
        await eventually(lambda: outbox.failed and relay.relay.dispatcher.inflight == 0,
                         what="the failed record")
        assert await outbox_states(tmp_path / "outbox.db") == [State.INFLIGHT]
        assert len(fake_api.accepted) == 1
        clock.advance(29)  # the lease holds: nobody sends it again yet
        relay.relay.dispatcher.notify()
        await eventually(lambda: relay.relay.dispatcher.inflight == 0, what="a claim round")
        assert len(fake_api.requests) == 1

        clock.advance(1)

        async def delivered() -> bool:
            return await outbox_states(tmp_path / "outbox.db") == [State.SENT]

        await eventually(delivered, what="delivered again and recorded")
        assert len(fake_api.accepted) == 2  # at least once: the lost record costs a resend
        (row,) = await relay.relay.outbox.list(None, 1)
        assert row.attempts == 2
    finally:
        await relay.stop()


async def test_lease_is_renewed_while_delivering(
    tmp_path: Path, session: aiohttp.ClientSession, fake_api: FakeAPI
) -> None:
    """An entry still being delivered past its lease is renewed, not claimed a second time."""
    clock = ManualClock(time.time())
    fake_api.delay = 5.0
    doc = base_config(tmp_path, providers=[_provider(fake_api)], routes={"sms": ["api"]},
                      queue={"lease": "30s"})
    relay = await start_relay(doc, clock=clock)
    try:
        assert (await relay.post(session, SMS_BODY))[0] == 200
        await eventually(lambda: len(fake_api.requests) == 1, what="the send under way")
        dispatcher = relay.relay.dispatcher
        for _ in range(6):  # a minute of this clock, a renewal every 10 s
            clock.advance(10)
            await eventually(lambda: dispatcher.renewed_at == clock.time(), what="a renewal")
        await eventually(lambda: len(fake_api.accepted) == 1, what="the delivery")
        await eventually(lambda: relay.relay.outbox.undelivered == 0, what="recorded")
        assert len(fake_api.requests) == 1
    finally:
        await relay.stop()
