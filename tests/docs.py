"""The documentation as the doc tests read it: README.md (the front page) and docs/."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"


def pages() -> dict[str, str]:
    """Every page of the documentation by its path from the repository root."""
    paths = [README, *sorted(DOCS.rglob("*.md"))]
    return {str(p.relative_to(ROOT)): p.read_text() for p in paths}


def page(path: str) -> str:
    """One page, by its path from the repository root (``docs/webhook.md``)."""
    return (ROOT / path).read_text()


def section(text: str, heading: str) -> str:
    """The body of the ``## heading`` section of a page, up to the next ``## ``."""
    marker = f"\n## {heading}\n"
    assert marker in text, f"no section ## {heading}"
    return text.split(marker, 1)[1].split("\n## ", 1)[0]


def toml_blocks(text: str) -> list[str]:
    """The ```toml code blocks of a page, in order."""
    return re.findall(r"```toml\n(.*?)```", text, re.S)


def provider_page(kind: str) -> str:
    """The page of one provider type: docs/providers/<type>.md."""
    return page(f"docs/providers/{kind}.md")


def provide_secrets(node: Any, directory: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Provide every secret the example names: credential files and environment variables."""
    if isinstance(node, dict):
        if set(node) == {"credential"}:
            (directory / node["credential"]).write_text("s3cret\n")
        elif set(node) == {"env"}:
            monkeypatch.setenv(node["env"], "s3cret")
        for value in node.values():
            provide_secrets(value, directory, monkeypatch)
    elif isinstance(node, list):
        for value in node:
            provide_secrets(value, directory, monkeypatch)

