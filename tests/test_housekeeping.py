"""Housekeeping forgets what has expired and nothing else: limits windows and dedup answers
in memory (a chunk at a time), delivered entries and expired answers on disk (in chunks);
the start rebuilds windows and answers from the outbox read in chunks; and the loop runs
every queue.housekeeping of the relay's clock."""

from __future__ import annotations

import time
from pathlib import Path

import aiohttp

from hapsms_relay import guard, outbox_sqlite
from hapsms_relay.budget import Budget
from hapsms_relay.clock import ManualClock
from hapsms_relay.dedup import Replies
from hapsms_relay.kinds import KIND_SMS
from hapsms_relay.limits import Limiter, LimitsConfig, Window
from hapsms_relay.metrics import Metrics
from hapsms_relay.outbox import NewEntry, State
from hapsms_relay.outbox_sqlite import SQLiteOutbox
from tests.fakes import FakeAPI
from tests.helpers import (
    SMS_BODY,
    base_config,
    eventually,
    http_provider,
    outbox_rows,
    outbox_states,
    sending,
    settled,
    start_relay,
)

DAY = 86400.0


def test_limiter_prune_drops_only_numbers_outside_every_window() -> None:
    """A number is forgotten once its newest message leaves every window, even if it was
    first seen before numbers still held; a chunk limit bounds each call."""
    lim = Limiter(LimitsConfig(sms=(Window(2, DAY, "2/1d"),)))
    lim.take(KIND_SMS, "+8613900000001", 0.0)
    lim.take(KIND_SMS, "+8613900000002", 10.0)
    lim.take(KIND_SMS, "+8613900000003", 20.0)
    lim.take(KIND_SMS, "+8613900000001", 30.0)  # seen again: held as long as the newest
    assert lim.prune(DAY + 15.0, limit=0) == 0
    assert lim.prune(DAY + 15.0) == 1  # only ...002 is out of the window
    assert lim.check(KIND_SMS, "+8613900000001", "CN", DAY + 15.0, "mobile") is None
    lim.take(KIND_SMS, "+8613900000001", DAY + 16.0)
    refused = lim.check(KIND_SMS, "+8613900000001", "CN", DAY + 17.0, "mobile")
    assert refused is not None and refused.code == "rate_limited"
    assert lim.prune(DAY + 25.0) == 1  # ...003
    assert lim.prune(2 * DAY + 20.0) == 1  # ...001, whose newest was at DAY + 16
    assert lim.prune(3 * DAY) == 0


def test_replies_prune_short_answers_behind_a_long_one() -> None:
    """Body answers (seconds) expire on time even when an Idempotency-Key answer (a day)
    was stored between them; the long one stays findable until it expires."""
    r = Replies()
    r.stored([(b"body-1", 10.0)], range(1, 1 + 1), b"")
    r.stored([(b"idem-1", DAY), (b"body-2", 11.0)], range(2, 2 + 1), b"")
    r.stored([(b"body-3", 12.0)], range(3, 3 + 1), b"")
    r.stored([(b"body-4", 30.0)], range(4, 4 + 1), b"")
    assert r.prune(11.5, limit=1) == 1
    assert r.prune(12.5) == 2
    assert len(r) == 2
    assert r.find([b"body-2"], 12.5) is None
    found = r.find([b"idem-1"], 12.5)
    assert isinstance(found, tuple) and list(found.ids) == [2]
    assert r.prune(DAY + 1) == 2
    assert len(r) == 0


def test_replies_key_answered_again_after_expiry() -> None:
    """A key stored again after its answer expired gets the new answer, which outlives the
    old one's pruning."""
    r = Replies()
    r.stored([(b"k", 10.0)], range(1, 1 + 1), b"")
    r.stored([(b"other", 15.0)], range(2, 2 + 1), b"")
    r.stored([(b"k", 20.0)], range(3, 3 + 1), b"")
    assert r.prune(16.0) == 1  # "other"
    found = r.find([b"k"], 16.0)
    assert isinstance(found, tuple) and list(found.ids) == [3]
    assert r.prune(21.0) == 1


async def test_cleanup_deletes_in_chunks_only_old_delivered(tmp_path: Path) -> None:
    """Cleanup removes every delivered entry older than the cut across many chunks, keeps
    pending, dead and newer delivered ones, and removes only expired answers."""
    clock = ManualClock()
    outbox = SQLiteOutbox(str(tmp_path / "outbox.db"), clock=clock)
    await outbox.open()
    try:
        n = outbox_sqlite.CLEANUP_CHUNK * 2 + 37
        entries = [NewEntry(KIND_SMS, f"+86139{i:08d}", "CN", f"139{i:08d}", "hi", "Acme")
                   for i in range(n)]
        now = clock.time()
        ids = await outbox.enqueue(entries, DAY, keys=[(b"gone", now + 1), (b"live", now + 60)])
        kept_pending = ids[::100]
        await outbox.sent("dev", sending([i for i in ids if i not in set(kept_pending)]))
        clock.advance(2)
        newer = await outbox.enqueue(entries[:3], DAY)
        await outbox.sent("dev", sending(newer))
        removed = await outbox.cleanup(clock.time() - 1)
        assert removed == n - len(kept_pending)
        left = [r.id for r in await outbox.list(None, 10 * n)][::-1]
        keys = [k for _, k, *_ in await outbox.replies(0.0, -1, 100)]
    finally:
        await outbox.close()
    assert left == [*kept_pending, *newer]
    assert keys == [b"live"]


async def test_guard_load_reads_a_day_in_chunks(tmp_path: Path) -> None:
    """Windows and answers rebuilt at start count every accepted entry (pending ones too),
    across the chunks the outbox is read in."""
    path = str(tmp_path / "outbox.db")
    outbox = SQLiteOutbox(path)
    await outbox.open()
    try:
        n = guard.LOAD_CHUNK + 5
        many = [NewEntry(KIND_SMS, f"+86139{i:08d}", "CN", f"139{i:08d}", "hi", "Acme")
                for i in range(1, n)]
        await outbox.enqueue(many, DAY)
        again = NewEntry(KIND_SMS, "+8613900000001", "CN", "13900000001", "hi", "Acme")
        for _ in range(4):  # the first number's 2nd..5th message, in the last chunk
            await outbox.enqueue([again], DAY)
        await outbox.enqueue([many[1]], DAY, keys=[(b"answer", time.time() + 60)])
        g = guard.Guard(LimitsConfig(), Budget(LimitsConfig(), Metrics()), Metrics())
        await g.load(outbox)
    finally:
        await outbox.close()
    now = time.time()
    refused = g.limiter.check(KIND_SMS, "+8613900000001", "CN", now, "mobile")
    assert refused is not None and refused.code == "rate_limited"
    assert g.limiter.check(KIND_SMS, "+8613900000002", "CN", now, "mobile") is None
    assert g.limiter.check(KIND_SMS, f"+86139{n - 1:08d}", "CN", now, "mobile") is None
    found = g.replies.find([b"answer"], now)
    assert isinstance(found, tuple) and len(found.ids) == 1


def test_replies_give_back_what_was_stored() -> None:
    """An answer comes back with its ids, count and refused list, whether or not it has one,
    until its expiry (to the millisecond) and not after."""
    r = Replies()
    first = int(time.time() * 1_000_000)
    r.stored([(b"plain", 100.25)], range(first, first + 7), b"")
    r.stored([(b"noted", 100.5)], range(first + 7, first + 7 + 2), b'[{"mobile":"+1"}]')
    plain = r.find([b"plain"], 100.0)
    noted = r.find([b"noted"], 100.0)
    assert isinstance(plain, tuple) and list(plain.ids) == list(range(first, first + 7))
    assert plain.note == b"" and plain.expires == 100.25
    assert isinstance(noted, tuple) and list(noted.ids) == [first + 7, first + 8]
    assert noted.note == b'[{"mobile":"+1"}]'
    assert r.find([b"plain"], 100.25) is None
    assert isinstance(r.find([b"noted"], 100.25), tuple)


async def test_housekeeping_loop_runs_every_interval(
        tmp_path: Path, session: aiohttp.ClientSession, fake_api: FakeAPI) -> None:
    """The housekeeping loop itself, every queue.housekeeping of the relay's clock: a
    delivered entry is kept by the round before it is past keep_delivered and deleted by the
    first round after, not earlier."""
    clock = ManualClock(time.time())
    doc = base_config(tmp_path, providers=[http_provider("api", fake_api.url)],
                      routes={"sms": ["api"]}, queue={"housekeeping": "45s", "keep_delivered": "1m"})
    started = clock.time()
    relay = await start_relay(doc, clock=clock)
    try:
        status, answer = await relay.post(session, SMS_BODY)
        assert status == 200
        await settled(relay, answer["ids"])
        await relay.caught_up()
        # the housekeeping loop waits for its first round, 45 s after the start
        first = started + 45
        await eventually(lambda: first in clock.deadlines, what="housekeeping asleep")
        clock.advance(first - clock.time())  # a round: 45 s old, within keep_delivered
        # its next wait taken, the round is over (the other loops' waits tell nothing)
        nxt = clock.time() + 45
        await eventually(lambda: nxt in clock.deadlines, what="the round over")
        assert await outbox_states(tmp_path / "outbox.db") == [State.SENT]
        clock.advance(44.9)  # past keep_delivered, but no round yet
        assert await outbox_states(tmp_path / "outbox.db") == [State.SENT]
        clock.advance(0.1)  # the next round deletes it

        async def deleted() -> bool:
            return await outbox_rows(tmp_path / "outbox.db") == []

        await eventually(deleted, what="the delivered entry deleted")
    finally:
        await relay.stop()
