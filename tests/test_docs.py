"""The shipped example config and the dev config are valid, and the docs match the code."""

from __future__ import annotations

from pathlib import Path

import pytest

from hapsms_relay import config
from hapsms_relay.errors import ConfigError

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
