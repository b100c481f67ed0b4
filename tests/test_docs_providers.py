"""Every provider type is documented, and the README's provider examples load as written."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from hapsms_relay import config
from hapsms_relay.providers import REGISTRY

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
PROVIDERS = README.split("\n## Providers\n", 1)[1].split("\n## ", 1)[0]
BLOCKS = re.findall(r"```toml\n(.*?)```", PROVIDERS, re.S)


def test_every_type_has_a_readme_section_and_an_example() -> None:
    """Each registered type has a ### section under Providers and a commented example."""
    example = (ROOT / "systemd/config.example.toml").read_text()
    headings = re.findall(r"^### (.*)$", PROVIDERS, re.M)
    for kind in REGISTRY:
        assert any(f"`{kind}`" in h for h in headings), f"README lacks a ### section for {kind}"
        assert f'type = "{kind}"' in PROVIDERS, f"README lacks a config example for {kind}"
        assert re.search(rf'^#? ?type = "{kind}"', example, re.M), f"example config lacks {kind}"


def _secrets(node: Any, directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Provide every secret the example names: credential files and environment variables."""
    if isinstance(node, dict):
        if set(node) == {"credential"}:
            (directory / node["credential"]).write_text("s3cret\n")
        elif set(node) == {"env"}:
            monkeypatch.setenv(node["env"], "s3cret")
        for value in node.values():
            _secrets(value, directory, monkeypatch)
    elif isinstance(node, list):
        for value in node:
            _secrets(value, directory, monkeypatch)


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_provider_examples_load(
    block: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each provider example in the README is a valid config as written."""
    doc = tomllib.loads(block)
    _secrets(doc, tmp_path, monkeypatch)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    names = [p["name"] for p in doc["providers"]]
    doc |= {"server": {"tokens": ["t"]}, "queue": {"path": str(tmp_path / "o.db")},
            "routes": {"sms": names}}
    cfg = config.parse(doc)
    assert list(cfg.providers) == names
