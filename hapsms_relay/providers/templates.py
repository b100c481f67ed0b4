"""Template mapping: HAP's free text to a pre-approved template id and its parameters.

Tencent and Alibaba domestic SMS only send approved templates. An ordered list of
``[[providers.templates]]`` regexes (compiled once, at load) picks the template; the first
that matches fills the params from its named groups. No match is ``no_template``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from hapsms_relay.errors import ConfigError, UnsupportedError
from hapsms_relay.providers.base import check_template
from hapsms_relay.table import Table

#: Alibaba names its template params (``{"code": "123456"}``); Tencent numbers them.
Shape = Literal["named", "list"]

_TEXT_LIMIT = 60  # how much of an unmatched text the dead reason quotes


@dataclass(frozen=True, slots=True)
class Params:
    """Param templates such as ``{code}``, filled by name; ``names`` is empty for a list."""

    names: tuple[str, ...]
    values: tuple[str, ...]

    def fill(self, values: Mapping[str, str]) -> Filled:
        return Filled(self.names, tuple(v.format_map(values) for v in self.values))


@dataclass(frozen=True, slots=True)
class Filled:
    """Params with their values, in the order of the config."""

    names: tuple[str, ...]
    values: tuple[str, ...]

    def as_dict(self) -> dict[str, str]:
        return dict(zip(self.names, self.values, strict=True))

    def as_list(self) -> list[str]:
        return list(self.values)


@dataclass(frozen=True, slots=True)
class Rule:
    pattern: re.Pattern[str]
    template: str
    params: Params


@dataclass(frozen=True, slots=True)
class Match:
    template: str
    params: Filled


@dataclass(frozen=True)
class TemplateMap:
    rules: tuple[Rule, ...] = ()

    def match(self, text: str) -> Match | None:
        """The first rule whose regex is found in ``text``, with its params filled."""
        for rule in self.rules:
            m = rule.pattern.search(text)
            if m is not None:
                groups = {k: v or "" for k, v in m.groupdict().items()}
                return Match(rule.template, rule.params.fill(groups))
        return None

    def resolve(self, provider: str, text: str) -> Match:
        """``match``, or ``UnsupportedError("no_template")`` so the route moves on."""
        found = self.match(text)
        if found is None:
            shown = text if len(text) <= _TEXT_LIMIT else text[:_TEXT_LIMIT] + "…"
            raise UnsupportedError(
                provider, "no_template", f"no [[providers.templates]] match for {shown!r}"
            )
        return found


def load_templates(t: Table, shape: Shape, name: str = "templates") -> TemplateMap:
    """Read ``[[providers.templates]]``: every regex compiles, every ``{group}`` exists."""
    rules = []
    for rt in t.tables(name, []):
        source = rt.string("match")
        try:
            pattern = re.compile(source)
        except re.error as exc:
            raise rt.error("match", f"bad regex: {exc}") from None
        template = rt.string("template")
        groups = tuple(pattern.groupindex)
        params = read_params(rt, "params", shape, groups, default=[] if shape == "list" else {})
        rules.append(Rule(pattern, template, params))
        rt.done()
    return TemplateMap(tuple(rules))


def read_params(
    t: Table, name: str, shape: Shape, allowed: Iterable[str], default: object
) -> Params:
    """A table (``named``) or a list (``list``) of ``{placeholder}`` templates over ``allowed``."""
    allowed = tuple(allowed)
    raw = t.raw(name, default)
    key = t.path(name)
    if shape == "named":
        if not isinstance(raw, Mapping):
            raise ConfigError(key, "expected a table such as { code = \"{code}\" }")
        items = list(raw.items())
        names = tuple(str(k) for k, _ in items)
        keys = [f"{key}.{k}" for k in names]
        values = [v for _, v in items]
    else:
        if not isinstance(raw, list):
            raise ConfigError(key, "expected a list such as [\"{code}\"]")
        names = ()
        keys = [f"{key}[{i}]" for i in range(len(raw))]
        values = list(raw)
    checked = []
    for k, v in zip(keys, values, strict=True):
        if not isinstance(v, str):
            raise ConfigError(k, "expected a string template such as \"{code}\"")
        if not allowed and "{" in v.replace("{{", ""):
            raise ConfigError(k, "uses a placeholder, but the regex has no named group "
                                 "such as (?P<code>[0-9]+)")
        checked.append(check_template(v, k, allowed))
    return Params(names, tuple(checked))
