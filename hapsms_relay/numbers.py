"""Phone numbers from HAP to E.164 (a fast path for the default region's mobiles, else
phonenumbers, cached), and their types by the names ``[limits]`` uses.

HAP passes numbers as its users typed them: ``+8613800138000``, ``008613800138000``,
``8613800138000`` or ``13800138000``. Parsing with phonenumbers is the costliest step of a
webhook request (~16 µs for a number not seen before), so the dominant case, a mobile of the
default region in one of those forms, is checked against phonenumbers' own metadata instead
(~1 µs); anything else goes through phonenumbers, and its results are cached. A number holds
digits, an optional leading "+" and the separators space, "-", ".", "(" and ")"; nothing
else (see ``_PLAIN``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import phonenumbers
from phonenumbers import PhoneMetadata, PhoneNumberDesc


class Number(NamedTuple):
    e164: str
    region: str
    national: str
    type: str = ""  # phonenumbers' type by its config name ("mobile") when known, else ""


class InvalidNumber(ValueError):
    """The string is not a valid phone number."""


def normalise(raw: str, default_region: str) -> Number:
    """E.164 for ``raw`` or ``InvalidNumber``; see the module docstring for accepted forms."""
    fast = _fast_path(default_region)
    result = fast.normalise(raw) if fast is not None else None
    if result is None:
        result = _cached(raw, default_region)
        if result is None:
            raise InvalidNumber(raw)
    return result


# 4096 recent numbers (~1.6 MB): retries and repeated codes hit it. A larger cache bought no
# hits under varied traffic but cost ~400 bytes an entry and a slower full GC (65536 entries:
# 26 MB of RSS and 24 ms per collection, a latency spike).
@lru_cache(maxsize=4096)
def _cached(raw: str, default_region: str) -> Number | None:
    return slow(raw, default_region)


# What a number may contain: an optional "+" in front, digits (phonenumbers reads full-width
# and other scripts' digits too) and the separators people type. phonenumbers itself
# drops whatever surrounds a number and reads letters as keypad digits, so without this
# "+86 138 0013 8014 ext. 123", "tel:+86...", an emoji in front or "1-800-FLOWERS" were
# valid: an extension or a URI is not a mobile number, and a typo is not a phoneword.
_PLAIN = re.compile(r"[+\uff0b]?[\d \u00a0().\-]+")


def slow(raw: str, default_region: str) -> Number | None:
    """What phonenumbers makes of ``raw``: the reference the fast path must agree with."""
    text = raw.strip()
    if not text or len(text) > 32 or not _PLAIN.fullmatch(text):
        return None
    digits = "".join(c for c in text if c.isdigit())
    candidates = [text]
    if text.startswith("00"):
        candidates = ["+" + text[2:]]
    elif digits == text:
        # "8613800138000": a country code without its '+'. Read nationally first, unless it
        # has the exact shape of a CN mobile with 86 in front (13 digits, 861...).
        cn_mobile = default_region == "CN" and len(digits) == 13 and digits.startswith("861")
        candidates = ["+" + digits, text] if cn_mobile else [text, "+" + digits]
    for candidate in candidates:
        try:
            n = phonenumbers.parse(candidate, default_region)
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_valid_number(n):
            region = phonenumbers.region_code_for_number(n) or ""
            return Number(
                phonenumbers.format_number(n, phonenumbers.PhoneNumberFormat.E164),
                region,
                phonenumbers.national_significant_number(n),
            )
    return None


# -- the fast path ---------------------------------------------------------------------------

#: The types phonenumbers tells apart by their own patterns, in the order it tries them
#: (``_number_type_helper``), before fixed line and mobile.
SPECIAL_TYPES = ("premium_rate", "toll_free", "shared_cost", "voip", "personal_number", "pager",
                 "uan", "voicemail")
_TYPES_BEFORE_MOBILE = (*SPECIAL_TYPES, "fixed_line")


@dataclass(frozen=True)
class FastPath:
    """Mobiles of one region, by the rules phonenumbers applies, from its own metadata.

    A national significant number (NSN) is taken here only when phonenumbers would find it
    valid and of type mobile: it matches the region's general and mobile descriptions
    (pattern and possible lengths) and none of the descriptions phonenumbers tries before
    mobile (``_number_type_helper``'s order). Whatever could make phonenumbers read the
    digits differently (a national prefix or carrier code in front, the country code at the
    start of a national number, a leading zero) is left to phonenumbers.
    """

    region: str
    cc: str
    general: re.Pattern[str]
    general_lengths: frozenset[int]
    mobile: re.Pattern[str]
    mobile_lengths: frozenset[int]
    earlier: dict[int, re.Pattern[str] | None]  # by NSN length: the types checked before mobile
    national_prefix: re.Pattern[str] | None
    international_prefix: re.Pattern[str] | None

    @classmethod
    def build(cls, region: str) -> FastPath | None:
        meta = PhoneMetadata.metadata_for_region(region)
        if meta is None or meta.mobile is None or meta.same_mobile_and_fixed_line_pattern:
            return None
        cc = str(meta.country_code)
        codes = phonenumbers.COUNTRY_CODE_TO_REGION_CODE
        # "+<cc>..." must be read as this region: one region on the code, and no shorter
        # code that phonenumbers' left-to-right extraction would take first
        if tuple(codes.get(int(cc), ())) != (region,) or any(
            int(cc[:i]) in codes for i in range(1, len(cc))
        ):
            return None
        general, mobile = meta.general_desc, meta.mobile
        if not (general and general.national_number_pattern and mobile.national_number_pattern):
            return None
        lengths = set(mobile.possible_length) or set(general.possible_length)
        earlier: dict[int, re.Pattern[str] | None] = {}
        for n in lengths:
            alternatives = [
                d.national_number_pattern
                for d in (getattr(meta, name) for name in _TYPES_BEFORE_MOBILE)
                if _applies(d, n)
            ]
            earlier[n] = re.compile("|".join(f"(?:{p})" for p in alternatives)) if alternatives else None
        prefix = meta.national_prefix_for_parsing
        idd = meta.international_prefix
        return cls(
            region, cc, re.compile(general.national_number_pattern),
            frozenset(general.possible_length), re.compile(mobile.national_number_pattern),
            frozenset(mobile.possible_length), earlier, re.compile(prefix) if prefix else None,
            re.compile(idd) if idd else None,
        )

    def normalise(self, raw: str) -> Number | None:
        """The number if ``raw`` is one of this region's mobiles in a plain form, else None
        (which says nothing about validity: ask phonenumbers)."""
        text = raw.strip()
        if not text.isascii():
            return None
        cc = self.cc
        if text[:1] == "+":
            nsn = text[1 + len(cc):] if text.startswith(cc, 1) else ""
        elif text[:2] == "00":
            nsn = text[2 + len(cc):] if text.startswith(cc, 2) else ""
        elif text.startswith(cc):
            # "<cc><nsn>" is read as international first only for CN's exact mobile shape
            # (see slow()); anything else starting with the code is phonenumbers' to untangle
            if self.region != "CN" or len(text) != 13 or text[2] != "1":
                return None
            nsn = text[2:]
        elif self.international_prefix is not None and self.international_prefix.match(text):
            return None  # phonenumbers would read it as an international call prefix
        else:
            nsn = text
        return self.mobile_number(nsn)

    def mobile_number(self, nsn: str) -> Number | None:
        n = len(nsn)
        if (
            n not in self.earlier or not nsn.isdigit() or nsn[0] == "0"
            or (self.general_lengths and n not in self.general_lengths)
            or (self.mobile_lengths and n not in self.mobile_lengths)
            or (self.national_prefix is not None and self.national_prefix.match(nsn))
            or not self.general.fullmatch(nsn) or not self.mobile.fullmatch(nsn)
        ):
            return None
        earlier = self.earlier[n]
        if earlier is not None and earlier.fullmatch(nsn):
            return None
        return Number("+" + self.cc + nsn, self.region, nsn, "mobile")


def _applies(desc: PhoneNumberDesc | None, length: int) -> bool:
    """Whether phonenumbers' ``_is_number_matching_desc`` would try this desc's pattern on an
    NSN of ``length`` digits."""
    if desc is None or not desc.national_number_pattern:
        return False
    return not desc.possible_length or length in desc.possible_length


@lru_cache(maxsize=64)
def _fast_path(region: str) -> FastPath | None:
    return FastPath.build(region)


# -- number types, by the names [limits] uses ------------------------------------------------

#: The number types phonenumbers knows, by the lower-case names the config uses.
NUMBER_TYPES = {
    name.lower(): getattr(phonenumbers.PhoneNumberType, name)
    for name in dir(phonenumbers.PhoneNumberType) if name.isupper()
}


def denied_type(denied: frozenset[str], e164: str, region: str) -> str | None:
    """The type of ``e164`` if it is one of ``denied``, else None.

    The special types are matched against the region's own patterns (a few µs: this runs for
    every new number on the hot path); the others need phonenumbers' full classification.
    """
    if denied.issubset(SPECIAL_TYPES):
        national = e164[1 + len(str(phonenumbers.country_code_for_region(region))):]
        for name in SPECIAL_TYPES:
            if name in denied:
                pattern = _pattern(region, name)
                if pattern is not None and pattern.fullmatch(national):
                    return name
        return None
    t = number_type(e164)
    return t if t in denied else None


@lru_cache(maxsize=4096)
def _pattern(region: str, name: str) -> re.Pattern[str] | None:
    meta = phonenumbers.PhoneMetadata.metadata_for_region(region) if region else None
    desc = getattr(meta, name, None) if meta is not None else None
    text = getattr(desc, "national_number_pattern", None)
    return re.compile(text) if text else None


@lru_cache(maxsize=65536)
def number_type(e164: str) -> str:
    """phonenumbers' type of a valid E.164 number, as a config name (``premium_rate``)."""
    try:
        t = phonenumbers.number_type(phonenumbers.parse(e164))
    except phonenumbers.NumberParseException:
        return "unknown"
    for name, value in NUMBER_TYPES.items():
        if value == t:
            return name
    return "unknown"
