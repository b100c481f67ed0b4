"""Every provider type has its page in docs/providers/, and the examples there load as written."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from hapsms_relay import config
from hapsms_relay.providers import REGISTRY
from tests import docs

ROOT = docs.ROOT
BLOCKS = [b for kind in REGISTRY for b in docs.toml_blocks(docs.provider_page(kind))
          if "[server]" not in b]


def test_every_type_has_a_page_and_an_example() -> None:
    """Each registered type has docs/providers/<type>.md, titled with the type, with a config
    example of that type, a row in docs/providers/README.md, and a commented example in
    systemd/config.example.toml; and every page there is a registered type's or named in
    the index."""
    example = (ROOT / "systemd/config.example.toml").read_text()
    index = docs.page("docs/providers/README.md")
    for kind in REGISTRY:
        page = docs.provider_page(kind)
        assert page.startswith(f"# `{kind}`"), f"docs/providers/{kind}.md: title lacks `{kind}`"
        assert any(f'type = "{kind}"' in b for b in docs.toml_blocks(page)), \
            f"docs/providers/{kind}.md lacks a config example"
        assert f"| `{kind}` | [{kind}.md]({kind}.md) |" in index, f"index lacks {kind}"
        assert re.search(rf'^#? ?type = "{kind}"', example, re.M), f"example config lacks {kind}"
    for path in (docs.DOCS / "providers").glob("*.md"):
        linked = path.name == "README.md" or f"]({path.name})" in index
        assert path.stem in REGISTRY or linked, f"{path} is not linked from the index"


@pytest.mark.parametrize("block", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_provider_page_examples_load(
    block: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each provider example in docs/providers/ is a valid config as written."""
    doc = tomllib.loads(block)
    docs.provide_secrets(doc, tmp_path, monkeypatch)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    names = [p["name"] for p in doc["providers"]]
    doc |= {"server": {"tokens": ["t"]}, "queue": {"path": str(tmp_path / "o.db")},
            "routes": {"sms": names}}
    cfg = config.parse(doc)
    assert list(cfg.providers) == names
