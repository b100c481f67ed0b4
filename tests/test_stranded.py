"""Entries whose outcome could not be written (the disk filled up after the send) are not
stranded in flight until a restart: the dispatcher releases them and delivers them again."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import aiohttp

from hapsms_relay.errors import StorageError
from hapsms_relay.outbox import State
from hapsms_relay.outbox_sqlite import SQLiteOutbox
from tests.fakes import FakeAPI
from tests.helpers import SMS_BODY, base_config, eventually, outbox_rows, start_relay


class OutcomeWriteFailsOnce(SQLiteOutbox):
    """The real SQLite outbox, whose first "delivered" write fails as on a full disk."""

    failed = False

    async def delivered(self, ids: Sequence[int], provider: str) -> None:
        if not self.failed:
            self.failed = True
            raise StorageError("outbox: database or disk is full")
        await super().delivered(ids, provider)


async def test_unrecorded_delivery_is_released_and_sent_again(
    tmp_path: Path, session: aiohttp.ClientSession, fake_api: FakeAPI
) -> None:
    """A delivery whose record failed leaves its entry in flight; release_stranded() puts it
    back, it is sent again (at least once) and then recorded as delivered."""
    provider = {"name": "api", "type": "http", "url": fake_api.url + "/send",
                "body": {"to": "{to}", "text": "{message}"}}
    doc = base_config(tmp_path, providers=[provider], routes={"sms": ["api"]})
    outbox = OutcomeWriteFailsOnce(str(tmp_path / "outbox.db"))
    relay = await start_relay(doc, outbox=outbox)
    try:
        assert (await relay.post(session, SMS_BODY))[0] == 200
        await eventually(lambda: outbox.failed and relay.relay.dispatcher.inflight == 0,
                         what="the failed record")
        rows = outbox_rows(tmp_path / "outbox.db")
        assert [r["state"] for r in rows] == [State.INFLIGHT]  # stranded: nobody delivers it
        assert len(fake_api.accepted) == 1

        assert await relay.relay.dispatcher.release_stranded(grace=0) == 1
        await eventually(lambda: [r["state"] for r in outbox_rows(tmp_path / "outbox.db")]
                         == [State.DELIVERED], what="delivered and recorded")
        assert len(fake_api.accepted) == 2  # at least once: the lost record costs a resend
        assert relay.relay.outbox.undelivered == 0
        assert await relay.relay.dispatcher.release_stranded(grace=0) == 0  # nothing left
    finally:
        await relay.stop()


async def test_release_leaves_deliveries_in_flight_alone(
    tmp_path: Path, session: aiohttp.ClientSession, fake_api: FakeAPI
) -> None:
    """An entry still being delivered is not released, even when the flag is up."""
    fake_api.delay = 1.0
    provider = {"name": "api", "type": "http", "url": fake_api.url + "/send",
                "body": {"to": "{to}", "text": "{message}"}}
    relay = await start_relay(base_config(tmp_path, providers=[provider], routes={"sms": ["api"]}))
    try:
        assert (await relay.post(session, SMS_BODY))[0] == 200
        await eventually(lambda: len(fake_api.requests) == 1, what="the send under way")
        relay.relay.dispatcher.stranded = True
        assert await relay.relay.dispatcher.release_stranded(grace=0) == 0
        await eventually(lambda: len(fake_api.accepted) == 1, what="the delivery")
        await eventually(lambda: relay.relay.outbox.undelivered == 0, what="recorded")
        assert len(fake_api.requests) == 1
    finally:
        await relay.stop()
