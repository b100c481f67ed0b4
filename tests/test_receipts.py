"""Each provider's receipt parser and verifier, table-driven: the vendors' documented
shapes, success and failure, signatures made by the vendors' own code (Twilio's
RequestValidator) or their documented test vector (Vonage), and what is refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import orjson
import pytest
from twilio.request_validator import RequestValidator

from hapsms_relay import config
from hapsms_relay.errors import BadRequest, ConfigError
from hapsms_relay.providers.twilio import twilio_signature
from hapsms_relay.providers.vonage import vonage_signature
from hapsms_relay.receipts import Receipt, ReceiptRequest, ReceiptSource
from tests.fake_clouds import aliyun_table, tencent_table
from tests.helpers import base_config

NOW = 1_700_000_000.0
TW_SID = "AC" + "0" * 30 + "a1"
TW_TOKEN = "twilio-auth-token-9c1e"
CALLBACK = "https://relay.example.com/receipts/tw"


def provider(table: dict[str, Any]) -> Any:
    doc = base_config(Path("/nonexistent"), providers=[table], routes={"sms": [table["name"]]})
    p = config.parse(doc).providers[table["name"]]
    assert isinstance(p, ReceiptSource)
    return p


def twilio(**over: Any) -> Any:
    return provider({"name": "tw", "type": "twilio", "account_sid": TW_SID, "auth_token": TW_TOKEN,
                     "from": "+15005550006", "status_callback": CALLBACK, "receipts": {}, **over})


def vonage(**over: Any) -> Any:
    return provider({"name": "vn", "type": "vonage", "api_key": "abc123", "api_secret": "s3cr3t",
                     "from": "HAPSMS", "receipts": {"secret": "path-secret-1"}, **over})


def request(body: bytes = b"", *, content_type: str = "application/json", path_qs: str = "/",
            headers: dict[str, str] | None = None, query: list[tuple[str, str]] | None = None,
            now: float = NOW) -> ReceiptRequest:
    return ReceiptRequest("POST", path_qs, query or [], content_type, body, headers or {}, now)


# -- Tencent ---------------------------------------------------------------------------------

TENCENT_OK = {"user_receive_time": "2015-10-17 08:03:04", "nationcode": "86",
              "mobile": "13800138000", "report_status": "SUCCESS", "errmsg": "DELIVRD",
              "description": "用户短信送达成功", "sid": "5000:1045710669157053657849499619"}


@pytest.mark.parametrize(("reports", "expected"), [
    ([TENCENT_OK], [Receipt("delivered", None, TENCENT_OK["sid"], "DELIVRD", "用户短信送达成功")]),
    ([{**TENCENT_OK, "report_status": "FAIL", "errmsg": "MK:0005", "description": "空号",
       "sid": "5000:2"}], [Receipt("undelivered", None, "5000:2", "MK:0005", "空号")]),
    ([], []),
])
def test_tencent_callback(reports: list[dict[str, str]], expected: list[Receipt]) -> None:
    """Tencent's callback array: one receipt per report, by SerialNo (sid); answered as
    Tencent wants."""
    p = provider(tencent_table("http://127.0.0.1:9", receipts={"secret": "tc-secret"}))
    batch = p.parse_receipts(request(orjson.dumps(reports)))
    assert batch.receipts == expected
    assert orjson.loads(batch.answer) == {"result": 0, "errmsg": "OK"}


# -- Alibaba ---------------------------------------------------------------------------------

ALI_OK = {"phone_number": "13800138000", "send_time": "2017-01-01 00:00:00",
          "report_time": "2017-01-01 00:00:00", "success": True, "err_code": "DELIVERED",
          "err_msg": "用户接收成功", "sms_size": "1", "biz_id": "932702304080415357^0",
          "out_id": "1796156343415676"}


@pytest.mark.parametrize(("reports", "expected"), [
    ([ALI_OK], [Receipt("delivered", 1796156343415676, ALI_OK["biz_id"], "DELIVERED",
                        "用户接收成功", 1)]),
    ([{**ALI_OK, "success": False, "err_code": "MK:0001", "err_msg": "失败", "out_id": ""}],
     [Receipt("undelivered", None, ALI_OK["biz_id"], "MK:0001", "失败", 1)]),
    ([{"To": "85212345678", "Status": "6", "MessageId": "1008030300", "TaskId": "42",
       "ErrorCode": "EXPIRED", "ErrorDescription": "expired", "SmsSize": "2"}],
     [Receipt("undelivered", 42, "1008030300", "EXPIRED", "expired", 2)]),
])
def test_aliyun_smsreport(reports: list[dict[str, Any]], expected: list[Receipt]) -> None:
    """SmsReport (mainland and international shapes): out_id/TaskId is the relay's id;
    answered {"code": 0}."""
    p = provider(aliyun_table("http://127.0.0.1:9", receipts={"secret": "ali-secret"}))
    batch = p.parse_receipts(request(orjson.dumps(reports)))
    assert batch.receipts == expected
    assert orjson.loads(batch.answer)["code"] == 0


@pytest.mark.parametrize("body", [b"{}", b"not json", b'[{"success": "yes"}]', b"[1]"])
def test_aliyun_refuses_what_is_not_a_report(body: bytes) -> None:
    """Anything but an array of reports is a 400 invalid_receipt."""
    p = provider(aliyun_table("http://127.0.0.1:9", receipts={"secret": "ali-secret"}))
    with pytest.raises(BadRequest) as e:
        p.parse_receipts(request(body))
    assert (e.value.status, e.value.code) == (400, "invalid_receipt")


@pytest.mark.parametrize("table", [tencent_table, aliyun_table])
def test_unsigned_vendors_need_a_secret(table: Any) -> None:
    """Tencent and Alibaba do not sign their pushes: receipts without a secret is a
    config error naming the key."""
    with pytest.raises(ConfigError, match=r"providers\[0\]\.receipts\.secret: required"):
        provider(table("http://127.0.0.1:9", receipts={"allow_ips": ["10.0.0.0/8"]}))


# -- Twilio ----------------------------------------------------------------------------------

TW_FORM = [("SmsSid", "SM" + "f" * 32), ("SmsStatus", "delivered"), ("MessageStatus", "delivered"),
           ("To", "+8613800138000"), ("MessageSid", "SM" + "f" * 32), ("AccountSid", TW_SID),
           ("From", "+15005550006"), ("ApiVersion", "2010-04-01")]


def signed(form: list[tuple[str, str]], url: str, token: str = TW_TOKEN) -> dict[str, str]:
    """Headers Twilio sends: the signature made by Twilio's own RequestValidator."""
    return {"X-Twilio-Signature": RequestValidator(token).compute_signature(url, dict(form))}


def twilio_request(form: list[tuple[str, str]], headers: dict[str, str],
                   path_qs: str = "/receipts/tw?id=77") -> ReceiptRequest:
    _, _, q = path_qs.partition("?")
    query = [tuple(kv.split("=", 1)) for kv in q.split("&")] if q else []
    return request(urlencode(form).encode(), content_type="application/x-www-form-urlencoded",
                   path_qs=path_qs, headers=headers, query=query)  # type: ignore[arg-type]


@pytest.mark.parametrize(("status", "error", "expected"), [
    ("delivered", None, "delivered"),
    ("read", None, "delivered"),
    ("undelivered", "30003", "undelivered"),
    ("failed", "30008", "undelivered"),
    ("sent", None, "progress"),
    ("queued", None, "progress"),
])
def test_twilio_status_callback(status: str, error: str | None, expected: str) -> None:
    """A status callback signed as Twilio signs it: its status, the relay's id from the
    callback URL, the MessageSid and the ErrorCode."""
    form = [(k, status if k in ("SmsStatus", "MessageStatus") else v) for k, v in TW_FORM]
    if error:
        form.append(("ErrorCode", error))
    (r,) = twilio().parse_receipts(twilio_request(form, signed(form, CALLBACK + "?id=77"))).receipts
    assert r == Receipt(expected, 77, "SM" + "f" * 32, error or status, status)  # type: ignore[arg-type]


def test_twilio_signature_matches_the_sdk() -> None:
    """Our signature is RequestValidator's, repeated names and all."""
    form = [*TW_FORM, ("X", "b"), ("X", "a")]
    url = CALLBACK + "?id=1&x=%20y"
    validator = RequestValidator(TW_TOKEN)
    ours = twilio_signature(TW_TOKEN, url, form)
    from multidict import MultiDict

    assert validator.validate(url, MultiDict(form), ours)


def test_twilio_behind_a_proxy() -> None:
    """Behind a proxy the request reaches the relay at another host, port and path; the
    signature is checked against status_callback, what Twilio posted to (with its port or
    without, as Twilio's validator allows)."""
    for public in (CALLBACK + "?id=77", "https://relay.example.com:443/receipts/tw?id=77"):
        form = TW_FORM
        req = twilio_request(form, signed(form, public), path_qs="/internal/tw?id=77")
        assert twilio().parse_receipts(req).receipts[0].entry == 77


@pytest.mark.parametrize(("what", "headers", "path_qs", "form"), [
    ("no signature", {}, "/receipts/tw?id=77", TW_FORM),
    ("wrong token", signed(TW_FORM, CALLBACK + "?id=77", "other-token"), "/receipts/tw?id=77",
     TW_FORM),
    ("another entry's id", signed(TW_FORM, CALLBACK + "?id=77"), "/receipts/tw?id=78", TW_FORM),
    ("a changed status", signed(TW_FORM, CALLBACK + "?id=77"), "/receipts/tw?id=77",
     [(k, "undelivered" if k == "MessageStatus" else v) for k, v in TW_FORM]),
    ("signed for another URL", signed(TW_FORM, "https://evil.example.com/receipts/tw?id=77"),
     "/receipts/tw?id=77", TW_FORM),
])
def test_twilio_forged(what: str, headers: dict[str, str], path_qs: str,
                       form: list[tuple[str, str]]) -> None:
    """Anything Twilio did not sign as it arrives is 403 forged_receipt."""
    with pytest.raises(BadRequest) as e:
        twilio().parse_receipts(twilio_request(form, headers, path_qs))
    assert (e.value.status, e.value.code) == (403, "forged_receipt"), what


def test_twilio_receipts_need_the_auth_token_and_callback() -> None:
    """Receipts with an API key (no auth token to check signatures) or without
    status_callback are config errors naming the key."""
    with pytest.raises(ConfigError, match=r"providers\[0\]\.receipts: .*auth_token"):
        provider({"name": "tw", "type": "twilio", "account_sid": TW_SID, "api_key": "SK" + "1" * 32,
                  "api_secret": "x", "from": "+15005550006", "status_callback": CALLBACK,
                  "receipts": {}})
    with pytest.raises(ConfigError, match=r"providers\[0\]\.status_callback: required"):
        provider({"name": "tw", "type": "twilio", "account_sid": TW_SID, "auth_token": TW_TOKEN,
                  "from": "+15005550006", "receipts": {}})


# -- Vonage ----------------------------------------------------------------------------------

def test_vonage_signature_test_vector() -> None:
    """Vonage's documented example: a=1, b=2, timestamp=1461605396, secret "secret"."""
    params = [("a", "1"), ("b", "2"), ("timestamp", "1461605396")]
    assert vonage_signature("secret", "md5hash", params) == "6af838ef94998832dbfc29020b564830"


DLR = {"msisdn": "8613800138000", "to": "HAPSMS", "network-code": "46000",
       "messageId": "0C00000021000001", "price": "0.03330000", "status": "delivered",
       "scts": "2001011400", "err-code": "0", "client-ref": "1796156343415676",
       "message-timestamp": "2020-01-01 14:00:00", "api-key": "abc123"}


@pytest.mark.parametrize("shape", ["get", "form", "json"])
@pytest.mark.parametrize(("status", "code", "expected"), [
    ("delivered", "0", "delivered"), ("failed", "6", "undelivered"),
    ("expired", "1", "undelivered"), ("rejected", "5", "undelivered"),
    ("accepted", "0", "progress"), ("buffered", "0", "progress"), ("unknown", "99", "progress"),
])
def test_vonage_dlr(shape: str, status: str, code: str, expected: str) -> None:
    """A DLR in each of the dashboard's formats (GET, POST form, POST-JSON)."""
    dlr = {**DLR, "status": status, "err-code": code}
    if shape == "get":
        req = request(b"", content_type="", query=list(dlr.items()))
    elif shape == "form":
        req = request(urlencode(dlr).encode(), content_type="application/x-www-form-urlencoded")
    else:
        req = request(orjson.dumps(dlr))
    (r,) = vonage().parse_receipts(req).receipts
    assert r == Receipt(expected, 1796156343415676, "0C00000021000001", code, status)  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["md5hash", "md5", "sha1", "sha256", "sha512"])
def test_vonage_signed_webhook(method: str) -> None:
    """With signature_secret, a DLR signed by that method is taken; a changed one, an
    unsigned one and a stale timestamp are forged."""
    p = vonage(signature_secret="sig-secret-4b1d", signature_method=method)
    dlr = {**DLR, "timestamp": str(int(NOW)), "nonce": "7a1f0b"}
    dlr["sig"] = vonage_signature("sig-secret-4b1d", method, list(dlr.items()))
    assert p.parse_receipts(request(orjson.dumps(dlr))).receipts[0].status == "delivered"
    for bad in ({**dlr, "status": "failed"}, {k: v for k, v in dlr.items() if k != "sig"}):
        with pytest.raises(BadRequest) as e:
            p.parse_receipts(request(orjson.dumps(bad)))
        assert e.value.code == "forged_receipt"
    with pytest.raises(BadRequest, match="timestamp"):
        p.parse_receipts(request(orjson.dumps(dlr), now=NOW + 3600))


def test_vonage_unsigned_needs_a_secret() -> None:
    """Without signature_secret the endpoint needs its path secret."""
    with pytest.raises(ConfigError, match=r"receipts\.secret: required"):
        vonage(receipts={})


# -- the generic http provider ------------------------------------------------------------------

def http(**over: Any) -> Any:
    table = {"name": "api", "type": "http", "url": "http://127.0.0.1:9/send",
             "body": {"to": "{to}", "ref": "{id}"}, "receipts": {"secret": "api-secret"},
             "receipt_id_field": "ref", "receipt_status_field": "report.status",
             "receipt_delivered": ["DELIVRD"], "receipt_undelivered": ["UNDELIV"],
             "receipt_code_field": "report.err", "receipt_answer": "OK", **over}
    return provider({k: v for k, v in table.items() if v is not None})


@pytest.mark.parametrize(("body", "content_type", "expected"), [
    (orjson.dumps({"ref": "41", "report": {"status": "DELIVRD", "err": "000"}}),
     "application/json", [Receipt("delivered", 41, "", "000", "DELIVRD")]),
    (orjson.dumps([{"ref": 42, "report": {"status": "UNDELIV", "err": "013"}},
                   {"ref": "43", "report": {"status": "ACCEPTD"}}]), "application/json",
     [Receipt("undelivered", 42, "", "013", "UNDELIV"),
      Receipt("progress", 43, "", "ACCEPTD", "ACCEPTD")]),
])
def test_http_receipt_mapping(body: bytes, content_type: str, expected: list[Receipt]) -> None:
    """The configured fields make receipts of a JSON object or array; answered as set."""
    batch = http().parse_receipts(request(body, content_type=content_type))
    assert batch.receipts == expected and (batch.answer, batch.content_type) == (b"OK", "text/plain")


def test_http_receipt_by_the_api_id_and_form() -> None:
    """receipt_id = "provider": the id is the API's (found by message_id_field's value);
    a form body works as JSON does."""
    p = http(receipt_id="provider", receipt_status_field="stat", receipt_code_field=None)
    req = request(urlencode({"ref": "abc-1", "stat": "DELIVRD"}).encode(),
                  content_type="application/x-www-form-urlencoded")
    assert p.parse_receipts(req).receipts == [Receipt("delivered", None, "abc-1", "DELIVRD",
                                                      "DELIVRD")]
    with pytest.raises(BadRequest) as e:
        p.parse_receipts(request(orjson.dumps({"stat": "DELIVRD"})))
    assert e.value.code == "invalid_receipt"
