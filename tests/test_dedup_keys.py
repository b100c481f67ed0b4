"""Dedup in memory: each component of a body's key (type, recipients, text, signature, code)
tells bodies apart, the order of recipients does not; stored answers are found until they
expire, concurrent duplicates wait for the first, and pruning forgets only what expired."""

from __future__ import annotations

import asyncio

import pytest

from hapsms_relay.dedup import Replies, Reply, body_key, header_key
from hapsms_relay.kinds import KIND_SMS, KIND_VOICE
from hapsms_relay.outbox import NewEntry

A, B = "+8613800138000", "+8613800138001"


def sms(*to: str, text: str = "hello", signature: str = "Acme", region: str = "CN") -> list[NewEntry]:
    return [NewEntry(KIND_SMS, n, region, n[3:], text, signature, "") for n in to]


def voice(to: str, code: str = "123456") -> list[NewEntry]:
    return [NewEntry(KIND_VOICE, to, "CN", to[3:], "", "", code)]


BASE = body_key(sms(A, B))


def span(first: int, count: int) -> range:
    """The ids of one body's entries, as the outbox hands them back."""
    return range(first, first + count)


def answer(first: int, count: int, note: bytes, expires: float) -> tuple[list[int], bytes, float]:
    return list(span(first, count)), note, expires


def got(found: object) -> tuple[list[int], bytes, float] | object:
    """An answer found, comparable whatever sequence holds its ids."""
    return (list(found.ids), found.note, found.expires) if isinstance(found, Reply) else found


@pytest.mark.parametrize(("what", "other"), [
    ("another text", sms(A, B, text="hello!")),
    ("another signature", sms(A, B, signature="Acme Ltd")),
    ("no signature", sms(A, B, signature="")),
    ("a recipient fewer", sms(A)),
    ("a recipient more", sms(A, B, "+8613800138002")),
    ("another recipient", sms(A, "+8613800138002")),
    ("a voice code", [e._replace(kind=KIND_VOICE) for e in sms(A, B)]),
    ("a code", [e._replace(code="1234") for e in sms(A, B)]),
])
def test_each_component_of_the_key_counts(what: str, other: list[NewEntry]) -> None:
    """Bodies that differ in any one component have different keys."""
    assert body_key(other) != BASE, what


def test_what_is_not_part_of_the_key() -> None:
    """Recipients in another order, or the number's region and national form (derived from
    the number), give the same key."""
    assert body_key(sms(B, A)) == BASE
    assert body_key([e._replace(region="", national="") for e in sms(A, B)]) == BASE


def test_components_do_not_run_into_each_other() -> None:
    """Moving characters between text and signature changes the key (fields are separated)."""
    assert body_key(sms(A, text="ab", signature="c")) != body_key(sms(A, text="a", signature="bc"))
    assert body_key(voice(A, "1234")) != body_key(voice(A, "12345"))
    assert body_key(voice(A, "1234")) != body_key(voice(B, "1234"))


def test_keys_are_16_byte_digests_and_header_keys_stand_apart() -> None:
    """Both keys are 16-byte digests, and an Idempotency-Key never equals a body key."""
    assert len(BASE) == 16 and len(header_key("k")) == 16
    assert header_key("k") == header_key("k") and header_key("k") != header_key("K")
    assert header_key("hello") != body_key(sms(A, text="hello"))


def test_keys_are_stable_across_versions() -> None:
    """Keys are stored in the outbox: a key computed by another version of the relay (after
    an upgrade and restart) must be the same, so these known answers never change."""
    assert header_key("hap-7f3a-0001").hex() == "c08293ff72a23bd89f913c6cc545adea"
    body = [NewEntry(KIND_SMS, n, "CN", n[3:], "您的验证码是123456", "明道云", "") for n in (A, B)]
    assert body_key(body).hex() == "220f03cc7beb6aa7e6041dae737ca519"
    assert body_key(voice(A)).hex() == "d3a8739e693e84654fa3623d5cd1ce13"


def test_text_with_lone_surrogates_still_has_a_key() -> None:
    """Text JSON may carry (lone surrogates) is hashed, not an error."""
    assert body_key(sms(A, text="\ud800")) != body_key(sms(A, text="\ud801"))


async def test_answer_found_until_it_expires() -> None:
    """A stored answer is found while ``now`` is before its expiry, not at or after it."""
    r = Replies()
    r.stored([(BASE, 110.0)], ids=span(41, 2), note=b"")
    assert got(r.find([BASE], 109.999)) == answer(41, 2, b"", 110.0)
    assert r.find([BASE], 110.0) is None
    assert r.find([header_key("x")], 100.0) is None
    assert len(r) == 1


async def test_answer_with_refused_recipients_keeps_its_note() -> None:
    """An answer that refused some recipients is given again with the same refused list."""
    r = Replies()
    r.stored([(BASE, 110.0)], ids=span(7, 1), note=b'[{"mobile":"+1"}]')
    reply = r.find([BASE], 100.0)
    assert got(reply) == answer(7, 1, b'[{"mobile":"+1"}]', 110.0)


@pytest.mark.parametrize("expires", [1_800_000_010.5, 1_800_000_010.501])
@pytest.mark.parametrize(("first", "count"), [(0, 1), (1, 1000), ((1 << 64) - 1, 1),
                                              (1 << 64, 1), (5, (1 << 20) - 1), (5, 1 << 20)])
async def test_answers_round_trip_at_the_edges(first: int, count: int, expires: float) -> None:
    """Ids and counts at and past the packing's edges come back as stored, whatever the
    expiry's last bits."""
    r = Replies()
    r.stored([(BASE, expires)], ids=span(first, count), note=b"")
    reply = r.find([BASE], 1_800_000_000.0)
    assert isinstance(reply, Reply)
    assert list(reply.ids) == list(span(first, count)) and reply.note == b""
    assert abs(reply.expires - expires) < 0.002


@pytest.mark.parametrize("ids", [(5, 7), (7, 6), (1, 2, 4), (3,)])
async def test_ids_that_are_not_one_run_come_back_as_stored(ids: tuple[int, ...]) -> None:
    """A body whose ids are not consecutive (writers interleaved) is answered with exactly
    those ids, in order."""
    r = Replies()
    r.stored([(BASE, 110.0)], ids=ids, note=b"")
    assert got(r.find([BASE], 100.0)) == (list(ids), b"", 110.0)


async def test_any_key_of_a_request_finds_its_answer() -> None:
    """A request's Idempotency-Key or its body key, whichever was stored, finds the answer."""
    r = Replies()
    key = header_key("hap-1")
    r.stored([(key, 500.0), (BASE, 110.0)], ids=span(3, 1), note=b"")
    assert got(r.find([header_key("other"), key], 200.0)) == answer(3, 1, b"", 500.0)
    assert got(r.find([BASE], 100.0)) == answer(3, 1, b"", 110.0)
    assert r.find([BASE], 200.0) is None  # the body key expired; the header key has not


async def test_duplicate_waits_for_the_first_to_be_stored() -> None:
    """While the first body is being stored a duplicate gets a future with its answer."""
    r = Replies()
    r.storing([BASE])
    fut = r.find([BASE], 100.0)
    assert isinstance(fut, asyncio.Future) and not fut.done()
    r.stored([(BASE, 110.0)], ids=span(9, 1), note=b"")
    assert got(await fut) == answer(9, 1, b"", 110.0)
    assert got(r.find([BASE], 100.0)) == answer(9, 1, b"", 110.0)


async def test_duplicate_of_a_failed_store_becomes_a_first_request() -> None:
    """When storing the first failed, waiting duplicates are told None, and the key is free."""
    r = Replies()
    r.storing([BASE])
    waiters = [r.find([BASE], 100.0) for _ in range(3)]
    r.failed([BASE])
    assert [await w for w in waiters] == [None, None, None]  # type: ignore[misc]
    assert r.find([BASE], 100.0) is None
    r.failed([BASE, header_key("never stored")])  # nothing waits: nothing to do, no error
    r.stored([(header_key("nobody waits"), 110.0)], ids=span(1, 1), note=b"")


async def test_load_restores_answers_and_skips_expired_ones_on_find() -> None:
    """Answers read back from the outbox answer as stored ones do."""
    r = Replies()
    r.load([(BASE, span(1, 2), b"", 110.0), (header_key("k"), span(5, 1), b"[]", 90.0),
            (header_key("n"), (8,), b'[{"mobile":"+1"}]', 120.0)])
    assert got(r.find([BASE], 100.0)) == answer(1, 2, b"", 110.0)
    assert r.find([header_key("k")], 100.0) is None
    assert got(r.find([header_key("n")], 100.0)) == answer(8, 1, b'[{"mobile":"+1"}]', 120.0)
    assert len(r) == 3


async def test_prune_forgets_expired_answers_only() -> None:
    """Expired answers are forgotten (at most ``limit`` a call), live ones kept, in every lane."""
    r = Replies()
    keys = [header_key(str(i)) for i in range(6)]
    # a day-long Idempotency-Key and short body keys: kept in separate lanes
    r.stored([(keys[0], 100_000.0)], ids=span(1, 1), note=b"")
    for i in range(1, 6):
        r.stored([(keys[i], 100.0 + i)], ids=span(10 + i, 1), note=b"")
    assert len(r) == 6
    assert r.prune(101.0) == 1  # only the one that expired at 101
    assert r.prune(200.0, limit=2) == 2
    assert r.prune(200.0) == 2
    assert r.prune(200.0) == 0
    assert len(r) == 1 and got(r.find([keys[0]], 200.0)) == answer(1, 1, b"", 100_000.0)
    assert r.prune(100_000.0) == 1 and len(r) == 0
    r.stored([(BASE, 300_000.0)], ids=span(2, 1), note=b"")  # lanes emptied and made again
    assert got(r.find([BASE], 200_000.0)) == answer(2, 1, b"", 300_000.0)


async def test_a_key_answered_again_after_expiry_gets_the_new_answer() -> None:
    """A body repeated after its window is a new message; the new answer replaces the old."""
    r = Replies()
    r.stored([(BASE, 110.0)], ids=span(1, 1), note=b"")
    assert r.find([BASE], 120.0) is None
    r.stored([(BASE, 130.0)], ids=span(2, 1), note=b"")
    assert got(r.find([BASE], 120.0)) == answer(2, 1, b"", 130.0)
    assert r.prune(125.0) == 0  # the old copy moved, so nothing live is lost
    assert got(r.find([BASE], 125.0)) == answer(2, 1, b"", 130.0)


async def test_prune_counts_every_lane() -> None:
    """One prune that empties answers from several lanes reports them all."""
    r = Replies()
    a, b, c = header_key("a"), header_key("b"), header_key("c")
    r.stored([(a, 200.0)], ids=span(1, 1), note=b"")
    r.stored([(b, 100.0)], ids=span(2, 1), note=b"")  # before a's expiry: a lane of its own
    r.stored([(c, 300.0)], ids=span(3, 1), note=b"")
    assert r.prune(1000.0) == 3 and len(r) == 0


async def test_an_answer_stored_again_moves_behind_the_later_ones() -> None:
    """Storing a key again keeps its lane ordered by expiry, so a prune does not stop at it
    while an earlier answer behind it has expired."""
    r = Replies()
    k1, k2 = header_key("1"), header_key("2")
    r.stored([(k1, 110.0)], ids=span(1, 1), note=b"")
    r.stored([(k2, 120.0)], ids=span(2, 1), note=b"")
    r.stored([(k1, 130.0)], ids=span(3, 1), note=b"")
    assert r.prune(125.0) == 1
    assert r.find([k2], 0.0) is None and got(r.find([k1], 125.0)) == answer(3, 1, b"", 130.0)
