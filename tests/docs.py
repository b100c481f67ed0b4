"""The documentation as the doc tests read it: README.md (the front page) and docs/."""

from __future__ import annotations

import re
from pathlib import Path

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
