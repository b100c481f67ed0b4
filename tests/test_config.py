"""Config: every invalid setting is refused naming its key; secrets come from the config,
the environment, a file or $CREDENTIALS_DIRECTORY and never show in repr or errors."""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hapsms_relay import config
from hapsms_relay.errors import ConfigError
from tests.helpers import API_KEY, SECRETS, TOKEN, base_config, http_provider, to_toml

Edit = Callable[[dict[str, Any]], None]


def _set(section: str, **values: Any) -> Edit:
    def edit(doc: dict[str, Any]) -> None:
        doc.setdefault(section, {}).update(values)
    return edit


def _provider(**values: Any) -> Edit:
    def edit(doc: dict[str, Any]) -> None:
        doc["providers"][0].update(values)
    return edit


def _http(**values: Any) -> Edit:
    def edit(doc: dict[str, Any]) -> None:
        doc["providers"] = [{**http_provider("api", "http://127.0.0.1:9"), **values}]
        doc["routes"] = {"sms": ["api"]}
    return edit


def _drop(section: str, key: str | None = None) -> Edit:
    def edit(doc: dict[str, Any]) -> None:
        if key is None:
            del doc[section]
        else:
            del doc[section][key]
    return edit


def _doc(edit: Edit) -> dict[str, Any]:
    doc = base_config(Path("/tmp/unused"))
    edit(doc)
    return doc


INVALID: list[tuple[str, Edit, str]] = [
    ("listen without port", _set("server", listen="127.0.0.1"), "server.listen"),
    ("listen port too big", _set("server", listen="127.0.0.1:70000"), "server.listen"),
    ("listen a number", _set("server", listen=8080), "server.listen"),
    ("path relative", _set("server", path="sms"), "server.path"),
    ("path shadows a probe", _set("server", path="/healthz"), "server.path"),
    ("no token", _drop("server", "tokens"), "server.tokens"),
    ("empty token list", _set("server", tokens=[]), "server.tokens"),
    ("token empty", _set("server", tokens=[""]), "server.tokens[0]"),
    ("token a number", _set("server", tokens=[123]), "server.tokens[0]"),
    ("tokens a string", _set("server", tokens=TOKEN), "server.tokens"),
    ("token env unset", _set("server", tokens=[{"env": "HAPSMS_TEST_UNSET"}]), "server.tokens[0]"),
    ("token file missing", _set("server", tokens=[{"file": "/nonexistent/token"}]),
     "server.tokens[0]"),
    ("token credential without directory", _set("server", tokens=[{"credential": "tok"}]),
     "server.tokens[0]"),
    ("token unknown source", _set("server", tokens=[{"vault": "x"}]), "server.tokens[0]"),
    ("token two sources", _set("server", tokens=[{"env": "A", "file": "B"}]), "server.tokens[0]"),
    ("allow_unauthenticated a string", _set("server", allow_unauthenticated="yes"),
     "server.allow_unauthenticated"),
    ("max_body_bytes too small", _set("server", max_body_bytes=10), "server.max_body_bytes"),
    ("max_body_bytes a string", _set("server", max_body_bytes="64k"), "server.max_body_bytes"),
    ("max_recipients zero", _set("server", max_recipients=0), "server.max_recipients"),
    ("max_recipients true", _set("server", max_recipients=True), "server.max_recipients"),
    ("shutdown_timeout bad", _set("server", shutdown_timeout="soon"), "server.shutdown_timeout"),
    ("server typo", _set("server", tokenz=[TOKEN]), "server.tokenz"),
    ("ttl in words", _set("queue", ttl="15 minutes"), "queue.ttl"),
    ("ttl zero", _set("queue", ttl="0s"), "queue.ttl"),
    ("ttl negative", _set("queue", ttl=-1), "queue.ttl"),
    ("retry_base a list", _set("queue", retry_base=[1]), "queue.retry_base"),
    ("retry_max below retry_base", _set("queue", retry_base="10s", retry_max="1s"),
     "queue.retry_max"),
    ("max_pending zero", _set("queue", max_pending=0), "queue.max_pending"),
    ("workers too many", _set("queue", workers=100_000), "queue.workers"),
    ("queue typo", _set("queue", retry_bsae="1s"), "queue.retry_bsae"),
    ("queue not a table", lambda d: d.update(queue="fast"), "queue"),
    ("unknown region", _set("numbers", default_region="XX"), "numbers.default_region"),
    ("numbers typo", _set("numbers", region="CN"), "numbers.region"),
    ("no providers", lambda d: d.update(providers=[]), "providers"),
    ("provider without name", lambda d: d["providers"][0].pop("name"), "providers[0].name"),
    ("provider unknown type", _provider(type="carrier-pigeon"), "providers[0].type"),
    ("provider duplicate name",
     lambda d: d["providers"].append(dict(d["providers"][0])), "providers[1].name"),
    ("file provider without path", lambda d: d["providers"][0].pop("path"), "providers[0].path"),
    ("provider typo", _provider(concurency=4), "providers[0].concurency"),
    ("concurrency zero", _provider(concurrency=0), "providers[0].concurrency"),
    ("timeout bad", _provider(timeout="10 seconds"), "providers[0].timeout"),
    ("signature_format unknown placeholder", _provider(signature_format="{sig}{message}"),
     "providers[0].signature_format"),
    ("signature_format attribute access", _provider(signature_format="{message.upper}"),
     "providers[0].signature_format"),
    ("signature_format unbalanced", _provider(signature_format="{message"),
     "providers[0].signature_format"),
    ("http without url", lambda d: (_http()(d), d["providers"][0].pop("url")), "providers[0].url"),
    ("http url not http", _http(url="ftp://example.com/"), "providers[0].url"),
    ("http bad method", _http(method="DELETE"), "providers[0].method"),
    ("http body placeholder", _http(body={"to": "{phone}"}), "providers[0].body.to"),
    ("http body nested placeholder", _http(body={"a": [{"b": "{x}"}]}), "providers[0].body.a[0].b"),
    ("http form body not flat", _http(body_format="form", body={"a": {"b": "c"}}),
     "providers[0].body"),
    ("http no body", lambda d: (_http()(d), d["providers"][0].pop("body")), "providers[0].body"),
    ("http bad regex", _http(success_regex="("), "providers[0].success_regex"),
    ("http success_field alone", _http(success_field="status"), "providers[0].success_value"),
    ("http success_status empty", _http(success_status=[]), "providers[0].success_status"),
    ("http header secret unset", _http(headers={"X-Key": {"env": "HAPSMS_TEST_UNSET"}}),
     "providers[0].headers.X-Key"),
    ("http query placeholder", _http(query={"to": "{dest}"}), "providers[0].query.to"),
    ("http voice a string", _http(voice="yes"), "providers[0].voice"),
    ("routes unknown provider", _set("routes", sms=["nope"]), "routes.sms"),
    ("routes empty", _set("routes", sms=[]), "routes.sms"),
    ("routes sms a string", _set("routes", sms="dev"), "routes.sms"),
    ("routes needed with two providers",
     lambda d: (d["providers"].append({"name": "b", "type": "log"}), d.pop("routes")), "routes.sms"),
    ("routes voice unknown", _set("routes", voice=["nope"]), "routes.voice"),
    ("strategy unknown", _set("routes", strategy="round-robin"), "routes.strategy"),
    ("rule prefix without +", _set("routes", rules=[{"prefix": "1", "sms": ["dev"]}]),
     "routes.rules[0].prefix"),
    ("rule unknown provider", _set("routes", rules=[{"prefix": "+1", "sms": ["nope"]}]),
     "routes.rules[0].sms"),
    ("rule typo", _set("routes", rules=[{"prefix": "+1", "smss": ["dev"]}]), "routes.rules[0].smss"),
    ("voice_fallback_text placeholder", _set("routes", voice_fallback_text="code {number}"),
     "routes.voice_fallback_text"),
    ("log_level unknown", lambda d: d.update(log_level="verbose"), "log_level"),
    ("top-level typo", lambda d: d.update(providerz=[]), "providerz"),
]


@pytest.mark.parametrize(("edit", "key"), [(e, k) for _, e, k in INVALID],
                         ids=[i for i, _, _ in INVALID])
def test_invalid_config_names_the_key(edit: Edit, key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each invalid setting is refused with a ConfigError whose key and message name it."""
    monkeypatch.delenv("HAPSMS_TEST_UNSET", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    doc = _doc(edit)
    with pytest.raises(ConfigError) as info:
        config.parse(tomllib.loads(to_toml(doc)))
    assert info.value.key == key
    assert str(info.value).startswith(f"{key}: ")
    assert not any(s in str(info.value) for s in SECRETS)


def test_valid_base_config_parses() -> None:
    """The table's starting point is itself valid (so each case fails for its own reason)."""
    cfg = config.parse(tomllib.loads(to_toml(_doc(lambda d: None))))
    assert cfg.server.tokens[0].reveal() == TOKEN


@pytest.mark.parametrize(("text", "problem"), [
    ("[server\nlisten = 1", "not valid TOML"),
    ("a = \xff", "not UTF-8"),
], ids=["not TOML", "not UTF-8"])
def test_unreadable_config_file(text: str, problem: str, tmp_path: Path) -> None:
    """A file that is not TOML, not UTF-8, or missing is refused with the file named."""
    path = tmp_path / "config.toml"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(ConfigError, match=problem):
        config.load(str(path))
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(str(tmp_path / "missing.toml"))


def test_secrets_from_env_file_and_credentials_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Secrets resolve from the environment, a file (trailing newline removed) and
    $CREDENTIALS_DIRECTORY, and repr(config) shows none of them."""
    monkeypatch.setenv("HAPSMS_TEST_TOKEN", "env-secret-3a1b")
    (tmp_path / "token").write_text("file-secret-77d0\n")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "api-key").write_text("cred-secret-9e42")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    doc = base_config(tmp_path, server={"tokens": [
        {"env": "HAPSMS_TEST_TOKEN"}, {"file": str(tmp_path / "token")}, TOKEN,
    ]})
    doc["providers"] = [http_provider("api", "http://127.0.0.1:9", headers={
        "X-Key": {"credential": "api-key"}, "Authorization": f"Bearer {API_KEY}",
    })]
    doc["routes"] = {"sms": ["api"]}
    cfg = config.parse(tomllib.loads(to_toml(doc)))
    assert [t.reveal() for t in cfg.server.tokens] == ["env-secret-3a1b", "file-secret-77d0", TOKEN]
    headers = cfg.providers["api"].headers  # type: ignore[attr-defined]
    assert {k: v.reveal() for k, v in headers.items()} == {
        "X-Key": "cred-secret-9e42", "Authorization": f"Bearer {API_KEY}"}
    shown = repr(cfg) + str(cfg) + f"{cfg}"
    assert not [s for s in SECRETS if s in shown], shown
    assert "env:HAPSMS_TEST_TOKEN" in shown  # where a secret came from is fine to show


def test_credential_name_cannot_leave_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``{credential = "../x"}`` is refused: credentials are names inside the directory."""
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    doc = base_config(tmp_path, server={"tokens": [{"credential": "../etc/passwd"}]})
    with pytest.raises(ConfigError, match="cannot contain '/'") as info:
        config.parse(tomllib.loads(to_toml(doc)))
    assert info.value.key == "server.tokens[0]"


def test_config_path_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    """--config wins over $HAPSMS_RELAY_CONFIG, which wins over the packaged default."""
    monkeypatch.delenv("HAPSMS_RELAY_CONFIG", raising=False)
    assert config.config_path(None) == "/etc/hapsms-relay/config.toml"
    monkeypatch.setenv("HAPSMS_RELAY_CONFIG", "/srv/relay.toml")
    assert config.config_path(None) == "/srv/relay.toml"
    assert config.config_path("/tmp/x.toml") == "/tmp/x.toml"


def test_queue_path_defaults_to_state_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without queue.path the outbox is $STATE_DIRECTORY/outbox.db (systemd StateDirectory=)."""
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/hapsms-relay-test")
    doc = _doc(lambda d: d["queue"].pop("path"))
    cfg = config.parse(tomllib.loads(to_toml(doc)))
    assert cfg.queue.path == "/var/lib/hapsms-relay-test/outbox.db"
