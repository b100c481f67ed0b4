"""The shipped example config and the dev config are valid, and the docs match the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hapsms_relay import cli, config
from hapsms_relay.errors import ConfigError
from tests import docs

ROOT = Path(__file__).resolve().parent.parent


def test_example_config_is_valid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """systemd/config.example.toml loads once its credential exists."""
    (tmp_path / "webhook-token").write_text("t0k3n\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    cfg = config.load(str(ROOT / "systemd/config.example.toml"))
    assert cfg.server.tokens[0].reveal() == "t0k3n"


def test_dev_config_is_valid() -> None:
    """examples/dev.toml, what `make run` serves, loads and accepts dev-token."""
    cfg = config.load(str(ROOT / "examples/dev.toml"))
    assert [t.reveal() for t in cfg.server.tokens] == ["dev-token"]


def test_example_config_without_credential_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without $CREDENTIALS_DIRECTORY the error names server.tokens[0]."""
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(ConfigError, match=r"^server\.tokens\[0\]: "):
        config.load(str(ROOT / "systemd/config.example.toml"))


def test_docs_document_every_error_code() -> None:
    """Every error code the webhook can answer with is in docs/webhook.md's table."""
    readme = docs.page("docs/webhook.md")
    source = "\n".join(p.read_text() for p in (ROOT / "hapsms_relay").glob("*.py"))
    codes = set(re.findall(r'BadRequest\(\s*\d{3},\s*"([a-z_]+)"', source))
    codes |= set(re.findall(r'BadRequest\(\s*status,\s*"([a-z_]+)"', source))  # door.py
    codes |= set(re.findall(r'Refusal\(\s*"([a-z_]+)"', source))  # limits.py
    codes |= set(re.findall(r'^RATE_LIMITED = "([a-z_]+)"', source, re.M))
    assert codes, "no error codes found in webhook.py"
    missing = sorted(c for c in codes if f"`{c}`" not in readme)
    assert not missing, f"docs/webhook.md lacks error codes: {missing}"


def test_docs_document_every_cli_verb() -> None:
    """Every subcommand of the CLI appears in docs/operations.md."""
    readme = docs.page("docs/operations.md")
    parser = cli.build_parser()
    verbs = next(a for a in parser._actions if a.dest == "command").choices
    assert verbs
    missing = sorted(v for v in verbs if f"hapsms-relay {v}" not in readme)
    assert not missing, f"docs/operations.md lacks CLI verbs: {missing}"
