"""Delivery receipts end to end, per provider, from a HAP body: the fake vendor accepts the
send, then posts its receipt as the vendor does (success and failure, Vonage's parts one by
one, a repeat, a late "sent" after "delivered"), and the entry's state, ``queue show``,
``GET /messages/{id}`` and the metrics show it. Forged receipts change nothing."""

from __future__ import annotations

import asyncio
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families
from twilio.request_validator import RequestValidator

from hapsms_relay.outbox import State
from hapsms_relay.providers.vonage import vonage_signature
from tests.fake_clouds import AliyunFake, TencentFake, aliyun_table, tencent_table
from tests.fakes import FakeAPI, Recorded, Reply
from tests.helpers import SMS_BODY, RunningRelay, base_config, eventually, write_config
from tests.process import run_cli

ADMIN = "admin-token-4c2a"
ADMIN_AUTH = {"Authorization": f"Bearer {ADMIN}"}


def config(tmp_path: Path, table: dict[str, Any]) -> dict[str, Any]:
    return base_config(tmp_path, providers=[table], routes={"sms": [table["name"]]},
                       server={"admin_tokens": [ADMIN]})


async def state_of(relay: RunningRelay, i: str, wanted: State) -> None:
    async def reached() -> bool:
        d = await relay.relay.outbox.show(int(i))
        return d is not None and d.row.state == wanted

    await eventually(reached, what=f"entry {i} {wanted.name.lower()}")


async def post(relay: RunningRelay, session: aiohttp.ClientSession, body: Any = SMS_BODY) -> str:
    status, answer = await relay.post(session, body)
    assert status == 200, answer
    (i,) = answer["ids"]
    await state_of(relay, i, State.SENT)
    return str(i)


async def lookup(relay: RunningRelay, session: aiohttp.ClientSession, i: str,
                 headers: dict[str, str] = ADMIN_AUTH) -> tuple[int, Any]:
    async with session.get(f"{relay.url}/messages/{i}", headers=headers) as r:
        return r.status, await r.json(content_type=None)


async def metrics(relay: RunningRelay, session: aiohttp.ClientSession) -> dict[tuple[str, Any], float]:
    async with session.get(relay.url + "/metrics") as r:
        text = await r.text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


# -- Tencent -----------------------------------------------------------------------------------

TC_SECRET = "tc-receipts-9f1e"


@pytest.fixture
async def tencent(fake_api: FakeAPI) -> TencentFake:
    return TencentFake(fake_api)


async def test_tencent_delivered(tmp_path: Path, relay_factory: Any, session: aiohttp.ClientSession,
                                 tencent: TencentFake) -> None:
    """Tencent's callback for the SerialNo makes the entry delivered; the lookup, the CLI
    and the metrics show the whole story; a repeat changes nothing."""
    doc = config(tmp_path, tencent_table(tencent.api.url, receipts={"secret": TC_SECRET}))
    relay = await relay_factory(doc)
    i = await post(relay, session)
    url = f"{relay.url}/receipts/tencent/{TC_SECRET}"
    assert await tencent.report(session, url) == (200, {"result": 0, "errmsg": "OK"})
    await state_of(relay, i, State.DELIVERED)
    assert await tencent.report(session, url) == (200, {"result": 0, "errmsg": "OK"})  # a repeat

    status, record = await lookup(relay, session, i)
    assert status == 200
    assert (record["state"], record["provider"], record["receipt"]) == ("delivered", "tencent",
                                                                        "DELIVRD")
    assert record["provider_ids"] == [tencent.sent[0][1]] and record["segments"] == 1
    assert record["to"] == "+86*******8000" and record["sent_at"] and record["receipt_at"]
    assert [(e["event"], e.get("status")) for e in record["history"]] == [
        ("sent", None), ("receipt", "delivered"), ("receipt", "delivered")]

    code, out, _ = await run_cli("queue", "show", i, "--json", "--show-numbers",
                                 "--config", str(write_config(tmp_path, doc)))
    assert code == 0 and orjson.loads(out)["to"] == "+8613800138000"
    m = await metrics(relay, session)
    assert m[("hapsms_relay_receipts_total", (("provider", "tencent"), ("status", "delivered")))] == 2
    assert m[("hapsms_relay_delivery_seconds_count", (("provider", "tencent"),))] == 1


async def test_tencent_failure_and_unknown(tmp_path: Path, relay_factory: Any,
                                           session: aiohttp.ClientSession,
                                           tencent: TencentFake) -> None:
    """FAIL makes the entry undelivered with Tencent's code and text; a report for a
    SerialNo the relay never got is answered as Tencent wants, counted, not stored."""
    relay = await relay_factory(config(tmp_path, tencent_table(
        tencent.api.url, receipts={"secret": TC_SECRET})))
    i = await post(relay, session)
    url = f"{relay.url}/receipts/tencent/{TC_SECRET}"
    await tencent.report(session, url, status="FAIL", errmsg="MK:0005", description="空号")
    await state_of(relay, i, State.UNDELIVERED)
    _, record = await lookup(relay, session, i)
    assert record["error"] == "tencent MK:0005: 空号"
    tencent.sent.append(("+8613800138001", "5000:404"))
    assert (await tencent.report(session, url, ["5000:404"]))[0] == 200
    m = await metrics(relay, session)
    assert m[("hapsms_relay_receipts_total", (("provider", "tencent"), ("status", "unknown")))] == 1


async def test_tencent_wrong_secret_changes_nothing(
    tmp_path: Path, relay_factory: Any, session: aiohttp.ClientSession, tencent: TencentFake
) -> None:
    """A callback without the endpoint's secret, or with another, is refused (403) and the
    entry stays sent."""
    relay = await relay_factory(config(tmp_path, tencent_table(
        tencent.api.url, receipts={"secret": TC_SECRET})))
    i = await post(relay, session)
    for path in ("/receipts/tencent", "/receipts/tencent/guess", f"/receipts/tencent/{TC_SECRET}x"):
        status, answer = await tencent.report(session, relay.url + path)
        assert (status, answer["error"]) == (403, "forged_receipt"), path
    d = await relay.relay.outbox.show(int(i))
    assert d is not None and d.row.state == State.SENT and len(d.events) == 1
    m = await metrics(relay, session)
    assert m[("hapsms_relay_receipts_refused_total",
              (("error", "forged_receipt"), ("provider", "tencent")))] == 3


# -- Alibaba -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("success", "state"), [(True, State.DELIVERED), (False, State.UNDELIVERED)])
async def test_aliyun_smsreport(tmp_path: Path, relay_factory: Any, session: aiohttp.ClientSession,
                                fake_api: FakeAPI, success: bool, state: State) -> None:
    """SmsReport's out_id is the relay's id (sent as OutId): success and failure move the
    entry; answered {"code": 0}."""
    aliyun = AliyunFake(fake_api)
    relay = await relay_factory(config(tmp_path, aliyun_table(
        fake_api.url, receipts={"secret": "ali-secret-7d"})))
    i = await post(relay, session)
    assert aliyun.sent[0][1] == i  # OutId
    status, answer = await aliyun.report(session, f"{relay.url}/receipts/aliyun/ali-secret-7d",
                                         success, "DELIVERED" if success else "MK:0001")
    assert (status, answer["code"]) == (200, 0)
    await state_of(relay, i, state)


# -- Twilio ------------------------------------------------------------------------------------

TW_SID = "AC" + "0" * 30 + "a1"
TW_TOKEN = "twilio-auth-token-9c1e"


@dataclass
class TwilioFake:
    """Twilio's Messages resource: accepts, remembers the StatusCallback, and posts signed
    status changes to it as Twilio does (``relay_url``: where that URL's host really is)."""

    token: str = TW_TOKEN
    callbacks: dict[str, str] = field(default_factory=dict)  # MessageSid -> StatusCallback

    def __call__(self, rec: Recorded) -> Reply:
        form = dict(parse_qsl(rec.body.decode()))
        # hex as Twilio's, with a letter every 8 characters: no run of digits in it is ever
        # a phone number to the suite's leak check (it once held 15071282158)
        sid = "SM" + "".join("a" if i % 8 == 0 else c for i, c in enumerate(uuid.uuid4().hex))
        self.callbacks[sid] = form["StatusCallback"]
        return Reply(201, {"sid": sid, "status": "queued", "num_segments": "1", "to": form["To"]})

    async def report(self, session: aiohttp.ClientSession, relay_url: str, status: str,
                     error: str | None = None, token: str | None = None) -> int:
        (sid, callback), = self.callbacks.items()
        form = {"MessageSid": sid, "SmsSid": sid, "MessageStatus": status, "SmsStatus": status,
                "AccountSid": TW_SID, "To": "+8613800138000", "From": "+15005550006",
                "ApiVersion": "2010-04-01"}
        if error:
            form["ErrorCode"] = error
        signature = RequestValidator(token or self.token).compute_signature(callback, form)
        parts = urlsplit(callback)
        async with session.post(f"{relay_url}{parts.path}?{parts.query}", data=form,
                                headers={"X-Twilio-Signature": signature}) as r:
            return r.status


def twilio_table(url: str, callback: str) -> dict[str, Any]:
    return {"name": "tw", "type": "twilio", "account_sid": TW_SID, "auth_token": TW_TOKEN,
            "from": "+15005550006", "endpoint": url, "status_callback": callback, "receipts": {}}


@pytest.mark.parametrize("public", [None, "https://sms.example.com/receipts/tw"],
                         ids=["direct", "behind a proxy"])
async def test_twilio_status_callbacks(tmp_path: Path, relay_factory: Any,
                                       session: aiohttp.ClientSession, fake_api: FakeAPI,
                                       public: str | None) -> None:
    """Twilio's signed callbacks: sent, then delivered, then a late sent that does not move
    it back; behind a proxy Twilio signs the public URL and the relay checks that one."""
    twilio = TwilioFake()
    fake_api.respond = twilio
    port = await _free_port()
    callback = public or f"http://127.0.0.1:{port}/receipts/tw"
    doc = config(tmp_path, twilio_table(fake_api.url, callback))
    doc["server"]["listen"] = f"127.0.0.1:{port}" if public is None else "127.0.0.1:0"
    relay = await relay_factory(doc)
    i = await post(relay, session)
    assert await twilio.report(session, relay.url, "sent") == 200
    assert await twilio.report(session, relay.url, "delivered") == 200
    await state_of(relay, i, State.DELIVERED)
    assert await twilio.report(session, relay.url, "sent") == 200  # late
    _, record = await lookup(relay, session, i)
    assert record["state"] == "delivered"
    assert [e.get("status") for e in record["history"] if e["event"] == "receipt"] == [
        "progress", "delivered", "progress"]


async def test_twilio_forged_callback(tmp_path: Path, relay_factory: Any,
                                      session: aiohttp.ClientSession, fake_api: FakeAPI) -> None:
    """A callback signed with another token is refused (403) and changes nothing."""
    twilio = TwilioFake()
    fake_api.respond = twilio
    relay = await relay_factory(config(tmp_path, twilio_table(
        fake_api.url, "https://sms.example.com/receipts/tw")))
    i = await post(relay, session)
    assert await twilio.report(session, relay.url, "undelivered", "30003", "other-token") == 403
    d = await relay.relay.outbox.show(int(i))
    assert d is not None and d.row.state == State.SENT and len(d.events) == 1


async def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- Vonage ------------------------------------------------------------------------------------

@dataclass
class VonageFake:
    """Vonage's SMS API: splits a long text into parts (153 characters each, as GSM-7 does),
    answers a message-id per part, and posts one DLR per part, signed if asked."""

    sent: list[tuple[str, list[str]]] = field(default_factory=list)  # client-ref, part ids

    def __call__(self, rec: Recorded) -> Reply:
        form = dict(parse_qsl(rec.body.decode()))
        n = 1 if len(form["text"]) <= 160 else -(-len(form["text"]) // 153)
        ids = [f"0C{uuid.uuid4().hex[:14].upper()}" for _ in range(n)]
        self.sent.append((form["client-ref"], ids))
        return Reply(200, {"message-count": str(n), "messages": [
            {"to": form["to"], "message-id": m, "status": "0", "remaining-balance": "1.0",
             "message-price": "0.0333", "network": "46000", "client-ref": form["client-ref"]}
            for m in ids]})

    async def dlr(self, session: aiohttp.ClientSession, url: str, part: int, status: str,
                  err: str = "0", secret: str | None = None, now: float | None = None) -> int:
        ref, ids = self.sent[0]
        params = {"msisdn": "8613800138000", "to": "HAPSMS", "network-code": "46000",
                  "messageId": ids[part], "price": "0.0333", "status": status,
                  "scts": "2001011400", "err-code": err, "client-ref": ref,
                  "message-timestamp": "2020-01-01 14:00:00", "api-key": "abc123"}
        if secret is not None:
            import time

            params["timestamp"] = str(int(now or time.time()))
            params["nonce"] = uuid.uuid4().hex
            params["sig"] = vonage_signature(secret, "sha256", list(params.items()))
        async with session.post(url, json=params) as r:
            return r.status


def vonage_table(url: str, **over: Any) -> dict[str, Any]:
    return {"name": "vn", "type": "vonage", "api_key": "abc123", "api_secret": "s3cr3t",
            "from": "HAPSMS", "endpoint": url, **over}


async def test_vonage_parts_report_separately(tmp_path: Path, relay_factory: Any,
                                              session: aiohttp.ClientSession,
                                              fake_api: FakeAPI) -> None:
    """A three-part message is delivered once each part's DLR says so; a repeat of the
    first part does not count twice; the segments are the parts."""
    vonage = VonageFake()
    fake_api.respond = vonage
    relay = await relay_factory(config(tmp_path, vonage_table(
        fake_api.url, receipts={"secret": "vn-secret-1"})))
    body = {"Type": 1, "Data": {"Mobiles": ["13800138000"], "Message": "x" * 400}}
    i = await post(relay, session, body)
    url = f"{relay.url}/receipts/vn/vn-secret-1"
    for part in (0, 0, 1):
        assert await vonage.dlr(session, url, part, "delivered") == 200
    await asyncio.sleep(0)  # nothing to wait for: the answers came after the writes
    d = await relay.relay.outbox.show(int(i))
    assert d is not None and d.row.state == State.SENT and d.segments == 3
    assert await vonage.dlr(session, url, 2, "delivered") == 200
    await state_of(relay, i, State.DELIVERED)


async def test_vonage_signed_dlr(tmp_path: Path, relay_factory: Any,
                                 session: aiohttp.ClientSession, fake_api: FakeAPI) -> None:
    """With signed webhooks, a DLR signed with another secret is refused (403) and changes
    nothing; the right signature's failed DLR makes the entry undelivered."""
    vonage = VonageFake()
    fake_api.respond = vonage
    relay = await relay_factory(config(tmp_path, vonage_table(
        fake_api.url, signature_secret="sig-secret-4b1d", signature_method="sha256",
        receipts={})))
    i = await post(relay, session)
    url = f"{relay.url}/receipts/vn"
    assert await vonage.dlr(session, url, 0, "failed", "6", secret="wrong-secret") == 403
    assert (await relay.relay.outbox.show(int(i))).row.state == State.SENT  # type: ignore[union-attr]
    assert await vonage.dlr(session, url, 0, "failed", "6", secret="sig-secret-4b1d") == 200
    await state_of(relay, i, State.UNDELIVERED)


# -- the status lookup -------------------------------------------------------------------------

async def test_lookup_needs_the_admin_token(tmp_path: Path, relay_factory: Any,
                                            session: aiohttp.ClientSession) -> None:
    """GET /messages/{id} answers the admin token only, never HAP's; without admin_tokens
    it does not exist."""
    from tests.helpers import AUTH

    relay = await relay_factory(base_config(tmp_path, server={"admin_tokens": [ADMIN]}))
    _, answer = await relay.post(session, SMS_BODY)
    (i,) = answer["ids"]
    assert (await lookup(relay, session, i))[0] == 200
    for headers in (AUTH, {}, {"Authorization": f"Basic {ADMIN}"}):
        status, body = await lookup(relay, session, i, headers)
        assert (status, body["error"]) == (401, "unauthorized")
    assert (await lookup(relay, session, "999999"))[0] == 404
    off = await relay_factory(base_config(tmp_path / "b"))
    status, body = await lookup(off, session, i)
    assert (status, body["error"]) == (404, "not_found")


async def test_queue_find(tmp_path: Path, relay_factory: Any,
                          session: aiohttp.ClientSession) -> None:
    """queue find --to takes the number as the user gave it and shows its entries newest
    first, masked unless --show-numbers."""
    doc = base_config(tmp_path)
    relay = await relay_factory(doc)
    ids = [(await relay.post(session, SMS_BODY))[1]["ids"][0] for _ in range(2)]
    other = {"Type": 1, "Data": {"Mobiles": ["13900139000"], "Message": "hi"}}
    await relay.post(session, other)
    path = str(write_config(tmp_path, doc))
    code, out, _ = await run_cli("queue", "find", "--to", "138 0013 8000", "--json",
                                 "--config", path)
    records = [orjson.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["id"] for r in records] == ids[::-1]
    assert {r["to"] for r in records} == {"+86*******8000"}
    code, out, _ = await run_cli("queue", "find", "--to", "+8613800138000", "--show-numbers",
                                 "--since", "1h", "--config", path)
    assert code == 0 and out.count("to=+8613800138000") == 2
    assert re.search(r"state=(pending|inflight|sent)", out)
    assert (await run_cli("queue", "find", "--to", "nonsense", "--config", path))[0] == 2


# -- the generic http provider ---------------------------------------------------------------

async def test_http_receipts(tmp_path: Path, relay_factory: Any, session: aiohttp.ClientSession,
                             fake_api: FakeAPI) -> None:
    """An HTTP API that echoes the relay's id ({id}) posts its receipt to the configured
    mapping: the entry is delivered; a wrong secret changes nothing."""
    table = {"name": "api", "type": "http", "url": fake_api.url + "/send",
             "body": {"to": "{to}", "text": "{message}", "ref": "{id}"},
             "receipts": {"secret": "api-secret-3"}, "receipt_id_field": "ref",
             "receipt_status_field": "status", "receipt_delivered": ["DELIVRD"],
             "receipt_undelivered": ["UNDELIV"], "receipt_answer": "OK"}
    relay = await relay_factory(config(tmp_path, table))
    i = await post(relay, session)
    ref = fake_api.accepted[0].json()["ref"]
    async with session.post(f"{relay.url}/receipts/api/wrong", json={"ref": ref,
                                                                     "status": "UNDELIV"}) as r:
        assert r.status == 403
    async with session.post(f"{relay.url}/receipts/api/api-secret-3",
                            json={"ref": ref, "status": "DELIVRD"}) as r:
        assert (r.status, await r.text()) == (200, "OK")
    await state_of(relay, i, State.DELIVERED)
