"""The documentation's shape: a short front page, and every page reachable and linked right."""

from __future__ import annotations

import ast
import re
from pathlib import Path, PurePosixPath

from tests import docs

_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(text: str) -> set[str]:
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    return {_slug(h) for h in re.findall(r"^#+ (.*)$", prose, re.M)}


def _links(path: str, text: str) -> list[tuple[str, str]]:
    """(target page, anchor) of each relative link of a page; code is not read."""
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    prose = re.sub(r"``.*?``|`[^`\n]*`", "", prose)
    out = []
    for target in _LINK.findall(prose):
        if re.match(r"[a-z]+:", target):
            continue  # https://, file://, mailto:
        page, _, anchor = target.partition("#")
        resolved = str(PurePosixPath(path).parent / page) if page else path
        out.append((str(Path(resolved)), anchor))
    return out


def test_every_relative_link_resolves() -> None:
    """Each relative link of README.md and docs/ names a file that exists, and its #anchor
    a heading of that page."""
    pages = docs.pages()
    broken = []
    for path, text in pages.items():
        for target, anchor in _links(path, text):
            if not (docs.ROOT / target).exists():
                broken.append(f"{path}: {target}")
            elif anchor and anchor not in _anchors((docs.ROOT / target).read_text()):
                broken.append(f"{path}: {target}#{anchor}")
    assert not broken


def test_every_page_is_reachable_from_the_front_page() -> None:
    """Following links from README.md reaches every page under docs/."""
    pages = docs.pages()
    seen, todo = {"README.md"}, ["README.md"]
    while todo:
        path = todo.pop()
        for target, _ in _links(path, pages[path]):
            if target in pages and target not in seen:
                seen.add(target)
                todo.append(target)
    assert sorted(set(pages) - seen) == []


def test_front_page_is_short_and_keeps_the_quick_start() -> None:
    """README.md is a front page (about 150 lines at most) whose quick start is exactly the
    two commands `make run` and `make test`."""
    readme = docs.page("README.md")
    assert len(readme.splitlines()) <= 160
    quick = docs.section(readme, "Quick start")
    first = quick.split("```sh\n", 1)[1].split("```", 1)[0]
    assert [line.split("#")[0].strip() for line in first.splitlines()] == ["make run", "make test"]


def test_architecture_names_every_module() -> None:
    """docs/architecture.md's table of who owns what names every module of the package."""
    table = docs.section(docs.page("docs/architecture.md"), "Who owns what")
    modules = sorted(p.name for p in (docs.ROOT / "hapsms_relay").glob("*.py")
                     if not p.name.startswith("__"))
    assert [m for m in modules if f"`{m}`" not in table] == []
    assert "`providers/`" in table


def test_every_test_says_what_it_pins_down() -> None:
    """Every test function has a docstring, as docs/development.md says."""
    bare = []
    for path in sorted((docs.ROOT / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) \
                    and node.name.startswith("test_") and not ast.get_docstring(node):
                bare.append(f"{path.name}::{node.name}")
    assert bare == []
