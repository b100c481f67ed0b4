"""Template mapping: HAP's free text to a pre-approved template id and its parameters.

Tencent and Alibaba domestic SMS only send approved templates. An ordered list of
``[[providers.templates]]`` regexes (compiled once, at load) picks the template; the first
that matches fills the params from its named groups. No match is ``no_template``.

Both vendors approve mainland and international templates separately and refuse one for the
other kind of number, so each mapping says which numbers it is for (``regions``: "mainland",
the default; "international", every number outside mainland China; or ISO regions such as
"HK"), and a number is only ever matched against the mappings for it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import phonenumbers

from hapsms_relay.errors import ConfigError, UnsupportedError
from hapsms_relay.providers.base import Message, check_template
from hapsms_relay.table import Table

#: Alibaba names its template params (``{"code": "123456"}``); Tencent numbers them.
Shape = Literal["named", "list"]

_TEXT_LIMIT = 60  # how much of an unmatched text the dead reason quotes

MAINLAND = "mainland"  # +86 numbers: phonenumbers' region CN
INTERNATIONAL = "international"  # every other number (Hong Kong, Macao and Taiwan included)


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
    regions: frozenset[str] = frozenset({MAINLAND})

    def applies(self, region: str) -> bool:
        """Whether this mapping is for numbers of ``region`` ("CN": mainland China)."""
        if region in self.regions:
            return True
        return MAINLAND in self.regions if region == "CN" else INTERNATIONAL in self.regions


@dataclass(frozen=True, slots=True)
class Match:
    template: str
    params: Filled


@dataclass(frozen=True)
class TemplateMap:
    rules: tuple[Rule, ...] = ()

    def match(self, text: str, region: str) -> Match | None:
        """The first rule for numbers of ``region`` whose regex is found in ``text``, with
        its params filled."""
        for rule in self.rules:
            if not rule.applies(region):
                continue
            m = rule.pattern.search(text)
            if m is not None:
                groups = {k: v or "" for k, v in m.groupdict().items()}
                return Match(rule.template, rule.params.fill(groups))
        return None

    def resolve(self, provider: str, text: str, region: str) -> Match:
        """``match``, or ``UnsupportedError("no_template")`` so the route moves on."""
        found = self.match(text, region)
        if found is None:
            shown = text if len(text) <= _TEXT_LIMIT else text[:_TEXT_LIMIT] + "…"
            if region == "CN":
                which = "mainland numbers"
            else:
                which = f'{region or "these"} numbers (regions = ["{INTERNATIONAL}"] or ["{region}"])'
            raise UnsupportedError(
                provider, "no_template", f"no [[providers.templates]] for {which} matches {shown!r}"
            )
        return found

    def describe(self) -> str:
        """How many mappings there are for mainland and for other numbers (check-config)."""
        mainland = sum(MAINLAND in r.regions or "CN" in r.regions for r in self.rules)
        other = [r for r in self.rules if r.regions - {MAINLAND, "CN"}]
        named = sorted({g for r in other for g in r.regions - {MAINLAND, INTERNATIONAL, "CN"}})
        return (f"templates: {mainland} mainland, {len(other)} international"
                + (f" ({', '.join(named)} only for some)" if named else ""))


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
        rules.append(Rule(pattern, template, params, _regions(rt)))
        rt.done()
    return TemplateMap(tuple(rules))


def template_region(message: Message) -> str:
    """The region a message's number is matched as: "CN" for every +86 number."""
    return "CN" if message.country_code == "86" else message.region


def _regions(t: Table) -> frozenset[str]:
    names = t.str_list("regions", [MAINLAND], nonempty=True)
    out = set()
    for i, name in enumerate(names):
        if name in (MAINLAND, INTERNATIONAL):
            out.add(name)
        elif name.upper() in phonenumbers.SUPPORTED_REGIONS:
            out.add(name.upper())
        else:
            raise ConfigError(f"{t.path('regions')}[{i}]", f'unknown region {name!r}; use '
                              f'"{MAINLAND}", "{INTERNATIONAL}" or an ISO code such as "HK"')
    return frozenset(out)


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
