"""Phone numbers from HAP to E.164, with phonenumbers, cached.

HAP passes numbers as its users typed them: ``+8613800138000``, ``008613800138000``,
``8613800138000`` or ``13800138000``. Parsing is the costliest step of a webhook request, and
the same numbers recur, so results are cached.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import phonenumbers


class Number(NamedTuple):
    e164: str
    region: str
    national: str


class InvalidNumber(ValueError):
    """The string is not a valid phone number."""


def normalise(raw: str, default_region: str) -> Number:
    """E.164 for ``raw`` or ``InvalidNumber``; see the module docstring for accepted forms."""
    result = _cached(raw, default_region)
    if result is None:
        raise InvalidNumber(raw)
    return result


# 4096 recent numbers (~1.6 MB): retries and repeated codes hit it. A larger cache bought no
# hits under varied traffic but cost ~400 bytes an entry and a slower full GC (65536 entries:
# 26 MB of RSS and 24 ms per collection, a latency spike).
@lru_cache(maxsize=4096)
def _cached(raw: str, default_region: str) -> Number | None:
    text = raw.strip()
    if not text or len(text) > 32 or "\x00" in text:
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
