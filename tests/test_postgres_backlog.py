"""What a relay of a cluster reports as the cluster's undelivered count between recounts
(`/readyz`'s `undelivered`, `hapsms_relay_queue_depth`): never less than nothing, and the
database's count at the next recount."""

from __future__ import annotations

from hapsms_relay.clock import ManualClock
from hapsms_relay.kinds import KIND_SMS
from hapsms_relay.outbox import NewEntry
from hapsms_relay.outbox_postgres import PostgresOutbox
from hapsms_relay.secret import Secret
from tests.helpers import sending


async def test_a_relay_that_only_delivers_never_counts_below_zero(pg_url: str) -> None:
    """A relay sending what another accepted after its last count reports 0 waiting, not
    minus what it sent; the one that accepted them reports them until its recount, which
    finds none."""
    clock = ManualClock()
    takes, sends = (PostgresOutbox(Secret(pg_url), clock=clock, node=n) for n in ("a", "b"))
    await takes.open()
    await sends.open()
    try:
        ids = await takes.enqueue([NewEntry(KIND_SMS, f"+861390000000{i}", "CN",
                                            f"1390000000{i}", "hi") for i in range(3)], 600)
        assert [e.id for e in await sends.claim("b", 10, clock.time(), 30)] == ids
        await sends.sent("p", sending(ids[:2]))
        await sends.dead("b", ids[2], "p", "p http_400: no such number")
        assert (sends.undelivered, sends.oldest_undelivered) == (0, None)
        assert takes.undelivered == 3  # as of its enqueue
        assert await takes.refresh() == 0 == await sends.refresh()
        assert takes.oldest_undelivered is None
    finally:
        await sends.close()
        await takes.close()
