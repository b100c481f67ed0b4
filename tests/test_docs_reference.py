"""Every config key, CLI verb, endpoint and error code is documented, and exactly once."""

from __future__ import annotations

import re
import tomllib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from hapsms_relay import cli, config, webhook
from hapsms_relay.providers import REGISTRY
from hapsms_relay.table import Table
from tests import docs

#: The settings every provider type shares, documented once in docs/providers/README.md.
SHARED = ("name", "type", "concurrency", "timeout", "signature_format", "rate")
#: Tables whose keys are the user's own (HTTP headers, a body template, template params).
FREE_FORM = ("headers", "body", "query", "params", "voice_params", "provider_budgets")
_ROW = re.compile(r"^\| `([a-z_.]+)` \|", re.M)


@pytest.fixture
def keys_read(monkeypatch: pytest.MonkeyPatch) -> Iterator[set[str]]:
    """The dotted keys (list indexes dropped) that config.parse reads, present or not:
    every getter records its key, and ``Table.done`` is where a table's reads are final."""
    read: set[str] = set()
    done = Table.done

    def recording(self: Table) -> None:
        read.update(re.sub(r"\[\d+\]", "", self.path(k)) for k in self._read)
        done(self)

    monkeypatch.setattr(Table, "done", recording)
    yield read


def _settings(keys: set[str]) -> set[str]:
    """The keys that are settings: not tables holding others, not the user's own names."""
    parents = {k.rsplit(".", 1)[0] for k in keys if "." in k}
    return {k for k in keys if k not in parents
            and not any(f".{t}." in f".{k}" and not k.endswith(f".{t}") for t in FREE_FORM)}


def test_every_setting_has_one_row_in_the_reference(keys_read: set[str], tmp_path: Path) -> None:
    """The table "Every setting" of docs/operations.md has exactly one row per key that the
    config reads outside [[providers]], and no row for a key it does not read."""
    config.parse({"server": {"tokens": ["t"]}, "queue": {"path": str(tmp_path / "o.db")},
                  "providers": [{"name": "p", "type": "log"}],
                  "routes": {"sms": ["p"], "rules": [{"prefix": "+1"}]},
                  "limits": {"provider_budgets": {"p": 5}, "provider_segment_budgets": {"p": 9}}})
    keys = {k for k in _settings(keys_read) if not k.startswith("providers")}
    rows = _ROW.findall(docs.section(docs.page("docs/operations.md"), "Configuration"))
    assert [k for k, n in Counter(rows).items() if n > 1] == []
    assert sorted(keys - set(rows)) == [], "settings missing from the reference"
    assert sorted(set(rows) - keys) == [], "rows for settings that do not exist"
    elsewhere = [p for p, text in docs.pages().items()
                 if p != "docs/operations.md" and set(_ROW.findall(text)) & keys]
    assert elsewhere == []


@pytest.mark.parametrize("kind", list(REGISTRY))
def test_every_provider_setting_is_in_its_page_example_once(
    kind: str, keys_read: set[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first config example of docs/providers/<type>.md names every setting the type
    reads (as `key = ...` or commented `# key = ...`), each once in its table; the settings
    every type shares are described once, in docs/providers/README.md."""
    block = docs.toml_blocks(docs.provider_page(kind))[0]
    doc = tomllib.loads(block)
    docs.provide_secrets(doc, tmp_path, monkeypatch)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    names = [p["name"] for p in doc["providers"]]
    config.parse(doc | {"server": {"tokens": ["t"]}, "queue": {"path": str(tmp_path / "o.db")},
                        "routes": {"sms": names}})
    settings = {k.removeprefix("providers.") for k in _settings(keys_read)
                if k.startswith("providers.")}
    # The example's tables: the provider's own, then each [[providers.X]] sub-table once.
    tables = re.split(r"^\[\[providers\.([a-z_]+)\]\].*$", block, flags=re.M)
    written: dict[str, list[str]] = {"": re.findall(r"^#? ?([a-z_]+) = ", tables[0], re.M)}
    for name, body in zip(tables[1::2], tables[2::2], strict=True):
        written.setdefault(name, re.findall(r"^#? ?([a-z_]+) = ", body, re.M))
    for key in sorted(settings):
        table, _, leaf = key.rpartition(".")
        if not table and leaf in SHARED:
            continue
        if "." not in key and leaf in written:
            continue  # a sub-table: [[providers.templates]]
        assert written.get(table, []).count(leaf) == 1, f"{kind}: {key}"
    shared = docs.section(docs.page("docs/providers/README.md"), "Settings every provider shares")
    assert all(f"`{k}`" in shared for k in SHARED[2:])


def test_every_key_the_code_reads_is_documented() -> None:
    """Each key name that a getter of hapsms_relay/ reads is a documented setting: a row of
    the reference, a key of a provider page's example, or a shared provider setting. (The
    two tests above enumerate keys by parsing; this catches one no example reaches.)"""
    source = "\n".join(p.read_text() for p in (docs.ROOT / "hapsms_relay").rglob("*.py"))
    getters = ("string|optional_str|boolean|integer|duration|choice|str_list|int_list|table|"
               "raw|tables|secret|optional_secret|secret_list|has")
    names = set(re.findall(rf'\.(?:{getters})\(\s*"([a-z_]+)"', source))
    assert len(names) > 50
    documented = set(SHARED)
    for key in _ROW.findall(docs.page("docs/operations.md")):
        documented.update(key.split("."))
    for kind in REGISTRY:
        block = docs.toml_blocks(docs.provider_page(kind))[0]
        documented.update(re.findall(r"^#? ?\[?\[?(?:providers\.)?([a-z_]+)(?: = |\]\])", block, re.M))
    assert sorted(names - documented) == []


def test_every_error_code_has_one_row() -> None:
    """Each error code the webhook answers with is one row of one table in the docs, with
    the status the code gives it where the source spells it out."""
    source = "\n".join(p.read_text() for p in (docs.ROOT / "hapsms_relay").glob("*.py"))
    literal = dict(
        (code, int(status))
        for status, code in re.findall(r'BadRequest\(\s*(\d{3}),\s*"([a-z_]+)"', source))
    codes = set(literal)
    codes |= set(re.findall(r'BadRequest\(\s*status,\s*"([a-z_]+)"', source))  # door.py
    codes |= set(re.findall(r'Refusal\(\s*"([a-z_]+)"', source))  # limits.py
    codes |= set(re.findall(r'^RATE_LIMITED = "([a-z_]+)"', source, re.M))
    rows = [(int(s), c) for text in docs.pages().values()
            for s, c in re.findall(r"^\| (\d{3}) \| `([a-z_]+)` \|", text, re.M)]
    assert [c for c, n in Counter(c for _, c in rows).items() if n > 1] == []
    assert sorted({c for _, c in rows} ^ codes) == []
    assert [(s, c) for s, c in rows if literal.get(c, s) != s] == []


def test_every_cli_verb_is_described_once() -> None:
    """Each subcommand (and each `queue` action) is on one usage line and has one bullet."""
    section = docs.section(docs.page("docs/operations.md"), "Command line")
    usage = section.split("```\n", 1)[1].split("```", 1)[0]
    parser = cli.build_parser()
    verbs = next(a for a in parser._actions if a.dest == "command").choices
    assert verbs is not None
    bullets = [b for text in docs.pages().values() for b in re.findall(r"^- `([a-z-]+)`", text, re.M)]
    for verb in verbs:
        assert sum(line.startswith(f"hapsms-relay {verb} ") or line == f"hapsms-relay {verb}"
                   for line in usage.splitlines()) == 1, verb
        assert bullets.count(verb) == 1, verb
    queue = verbs["queue"]
    actions = next(a for a in queue._actions if a.dest == "queue_command").choices
    assert actions is not None
    line = next(ln for ln in usage.splitlines() if ln.startswith("hapsms-relay queue "))
    assert all(re.search(rf"(^| ){a}( |$)", line.removeprefix("hapsms-relay queue ")) for a in actions)


def test_every_endpoint_is_defined_once() -> None:
    """The webhook and each probe are defined (`METHOD /path`: ...) once in the docs."""
    # webhook._PROBES is the set the server routes; the webhook's path is server.path.
    endpoints = [f"GET {p}" for p in sorted(webhook._PROBES)]
    endpoints.append(f"POST {config.ServerConfig.path}")
    text = "\n".join(docs.pages().values())
    for endpoint in endpoints:
        assert len(re.findall(rf"`{re.escape(endpoint)}`(?::| \(the path)", text)) == 1, endpoint
