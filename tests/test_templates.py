"""Template mapping: HAP's free text to an approved template, checked when the config loads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hapsms_relay import cli
from hapsms_relay.errors import ConfigError, UnsupportedError
from hapsms_relay.outbox import State
from hapsms_relay.providers.templates import Shape, TemplateMap, load_templates
from hapsms_relay.table import Table
from tests.fake_clouds import AliyunFake, TencentFake, aliyun_table, tencent_table
from tests.fakes import FakeAPI
from tests.helpers import base_config, post_settled, write_config

MAPPINGS: list[dict[str, Any]] = [
    {"match": "验证码[^0-9]*(?P<code>[0-9]{4,8})", "template": "SMS_CODE",
     "params": {"code": "{code}"}},
    {"match": "(?P<name>\\S+)邀请您加入(?P<org>\\S+?)[，,]", "template": "SMS_INVITE",
     "params": {"user": "{name}", "org": "{org}"}},
    {"match": "(?i)(?:code|verification code)\\D{0,20}(?P<code>\\d{4,8})"
              "(?:.*valid for (?P<minutes>\\d+) min)?",
     "template": "SMS_EN_CODE", "params": {"code": "{code}", "ttl": "{minutes}"}},
    {"match": "^Your order (?P<order>[A-Z0-9-]+) has shipped$", "template": "SMS_SHIPPED",
     "params": {"order": "{order}", "literal": "{{fixed}}"}},
]

CASES: list[tuple[str, str | None, dict[str, str]]] = [
    ("您的验证码是123456，感谢您的使用！", "SMS_CODE", {"code": "123456"}),
    ("【明道云】验证码：8848，5分钟内有效", "SMS_CODE", {"code": "8848"}),
    ("验证码 12345678", "SMS_CODE", {"code": "12345678"}),
    ("张三邀请您加入明道科技，请点击链接", "SMS_INVITE", {"user": "张三", "org": "明道科技"}),
    ("Your verification code is 482913. It is valid for 10 minutes.", "SMS_EN_CODE",
     {"code": "482913", "ttl": "10"}),
    ("Code: 5521", "SMS_EN_CODE", {"code": "5521", "ttl": ""}),  # an unmatched group is ""
    ("Your order AB-1234 has shipped", "SMS_SHIPPED", {"order": "AB-1234", "literal": "{fixed}"}),
    ("Your order AB-1234 has shipped today", None, {}),  # anchored: no match
    ("您的验证码是12，感谢您的使用！", None, {}),  # too short for {4,8}
    ("会议将于明天上午十点开始", None, {}),
    ("Hello from HAP", None, {}),
]


def load(mappings: list[dict[str, Any]], shape: Shape = "named") -> TemplateMap:
    t = Table({"templates": mappings}, "providers[0]")
    return load_templates(t, shape)


@pytest.mark.parametrize(("text", "template", "params"), CASES)
def test_messages_against_mappings(text: str, template: str | None, params: dict[str, str]) -> None:
    """The first mapping whose regex is found fills its params from the named groups."""
    found = load(MAPPINGS).match(text, "CN")
    if template is None:
        assert found is None
    else:
        assert found is not None
        assert (found.template, found.params.as_dict()) == (template, params)


def test_list_params_keep_their_order() -> None:
    """Tencent's list form gives TemplateParamSet in the order the config lists it."""
    tm = load([{"match": "(?P<a>\\d+)-(?P<b>\\d+)", "template": "1", "params": ["{b}", "{a}", "x{a}"]}],
              "list")
    found = tm.match("call 12-34", "CN")
    assert found is not None and found.params.as_list() == ["34", "12", "x12"]


def test_first_match_wins() -> None:
    """Mappings are tried in order: an earlier catch-all shadows a later specific one."""
    tm = load([{"match": ".", "template": "ANY"}, MAPPINGS[0]])
    found = tm.match("您的验证码是123456", "CN")
    assert found is not None and (found.template, found.params.as_dict()) == ("ANY", {})


def test_no_match_is_unsupported_no_template() -> None:
    """resolve() refuses an unmatched text with UnsupportedError no_template, quoting it."""
    with pytest.raises(UnsupportedError) as info:
        load(MAPPINGS).resolve("sms-cn", "Hello from HAP", "CN")
    assert info.value.code == "no_template" and "Hello from HAP" in info.value.text


@pytest.mark.parametrize(("mappings", "shape", "key"), [
    ([{"match": "验证码(?P<code>[0-9]+", "template": "T"}], "named",
     "providers[0].templates[0].match: bad regex"),
    ([MAPPINGS[0], {"match": "(?P<code>\\d+)", "template": "T", "params": {"code": "{digits}"}}],
     "named", "providers[0].templates[1].params.code: unknown placeholder {digits}"),
    ([{"match": "(?P<code>\\d+)", "template": "T", "params": ["{code}", "{nope}"]}], "list",
     "providers[0].templates[0].params[1]: unknown placeholder {nope}"),
    ([{"match": "\\d+", "template": "T", "params": {"code": "{code}"}}], "named",
     "providers[0].templates[0].params.code: uses a placeholder, but the regex has no named group"),
    ([{"match": "(?P<code>\\d+)", "template": "T", "params": {"code": 5}}], "named",
     "providers[0].templates[0].params.code: expected a string"),
    ([{"match": "(?P<code>\\d+)", "template": "T", "params": {"code": "{code"}}], "named",
     "providers[0].templates[0].params.code: bad template"),
    ([{"template": "T"}], "named", "providers[0].templates[0].match: required"),
    ([{"match": "x"}], "named", "providers[0].templates[0].template: required"),
    ([{"match": "x", "template": "T", "param": {}}], "named",
     "providers[0].templates[0].param: unknown setting"),
])
def test_bad_mappings_are_refused_naming_the_key(
    mappings: list[dict[str, Any]], shape: Shape, key: str
) -> None:
    """Config loading rejects a bad regex or an unknown group, naming the key."""
    with pytest.raises(ConfigError) as info:
        load(mappings, shape)
    assert str(info.value).startswith(key)


@pytest.mark.parametrize(("templates", "key"), [
    ([{"match": "(", "template": "SMS_1"}], "providers[0].templates[0].match: bad regex"),
    ([{"match": "(?P<code>\\d+)", "template": "SMS_1", "params": {"code": "{cdoe}"}}],
     "providers[0].templates[0].params.code: unknown placeholder {cdoe}"),
])
def test_check_config_names_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], templates: list[dict[str, Any]], key: str
) -> None:
    """`hapsms-relay check-config` exits 78 and names the mapping's key."""
    doc = base_config(tmp_path, providers=[aliyun_table("https://dysmsapi.aliyuncs.com",
                                                        templates=templates)],
                      routes={"sms": ["aliyun"]})
    path = write_config(tmp_path, doc)
    assert cli.main(["check-config", "--config", str(path)]) == cli.EX_CONFIG
    assert key in capsys.readouterr().err


# -- through a relay -------------------------------------------------------------------------

async def test_no_match_fails_over_to_free_text_provider(
    tmp_path: Path, relay_factory, session, fake_api: FakeAPI
) -> None:
    """An unmatched text skips the template provider, without a failure, for the next one."""
    aliyun = AliyunFake(fake_api)
    relay = await relay_factory(base_config(
        tmp_path, providers=[aliyun_table(fake_api.url),
                             {"name": "dev", "type": "file", "path": str(tmp_path / "sent.jsonl")}],
        routes={"sms": ["aliyun", "dev"]}))
    (row,) = await post_settled(relay, session, {"Type": 1, "Data": {
        "Mobiles": ["13800138000"], "Message": "会议将于明天上午十点开始", "Signature": "明道云"}})
    assert (row.state, row.provider, row.attempts) == (State.SENT, "dev", 1)
    assert aliyun.calls == [] and fake_api.requests == []


async def test_no_match_anywhere_is_dead_no_template(
    tmp_path: Path, relay_factory, session, fake_api: FakeAPI
) -> None:
    """When no provider of the route has a matching template the entry is dead: no_template."""
    tencent = TencentFake(fake_api)
    relay = await relay_factory(base_config(
        tmp_path, providers=[tencent_table(fake_api.url), aliyun_table(fake_api.url)],
        routes={"sms": ["tencent", "aliyun"]}))
    rows = await post_settled(relay, session, {"Type": 1, "Data": {
        "Mobiles": ["13800138000", "13800138001"], "Message": "Hello from HAP"}})
    for row in rows:
        assert row.state == State.DEAD and "no_template" in row.error
    assert tencent.calls == [] and fake_api.requests == []

