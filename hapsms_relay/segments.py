"""What one SMS text costs: its encoding and how many segments (billed parts) it takes.

GSM 03.38: a text of the GSM-7 alphabet takes 7-bit units, 160 in one segment or 153 per part
of a longer one (the user-data header takes the rest); an extension character (``€``, ``[``,
...) is ESC plus a character, two units, and never split across parts. Any other text goes as
UCS-2: UTF-16 code units, 70 in one segment or 67 per part, a surrogate pair never split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# GSM 03.38: the default alphabet (ESC left out) and the extension table reached through ESC.
_GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_GSM7_EXTENSION = frozenset("\f^{}\\[~]|€")
GSM7 = _GSM7_BASIC | _GSM7_EXTENSION

GSM7_SINGLE, GSM7_PART = 160, 153
UCS2_SINGLE, UCS2_PART = 70, 67

Encoding = Literal["gsm7", "ucs2"]


@dataclass(frozen=True, slots=True)
class Segments:
    encoding: Encoding
    units: int  # GSM-7 septets or UTF-16 code units
    count: int  # segments: 1 for a text that fits one, else the parts of a concatenated SMS


def is_gsm7(text: str) -> bool:
    """Whether ``text`` fits the GSM-7 alphabet; otherwise it goes as UCS-2 (``unicode``)."""
    return GSM7.issuperset(text)


def count(text: str) -> Segments:
    """The encoding and segment count of ``text`` as a handset receives it."""
    # runs for every message sent: the usual short text is counted without a walk in Python
    if GSM7.issuperset(text):
        units = len(text) + sum(1 for c in text if c in _GSM7_EXTENSION)
        if units <= GSM7_SINGLE:
            return Segments("gsm7", units, 1)
        sizes = [2 if c in _GSM7_EXTENSION else 1 for c in text]
        return Segments("gsm7", units, _parts(sizes, GSM7_PART))
    units = len(text.encode("utf-16-le", "surrogatepass")) // 2
    if units <= UCS2_SINGLE:
        return Segments("ucs2", units, 1)
    sizes = [2 if ord(c) > 0xFFFF else 1 for c in text]
    return Segments("ucs2", units, _parts(sizes, UCS2_PART))


def _parts(sizes: list[int], part: int) -> int:
    """Parts of at most ``part`` units for characters of these unit sizes, filled in order,
    no character split between two."""
    parts, used = 1, 0
    for size in sizes:
        if used + size > part:
            parts, used = parts + 1, 0
        used += size
    return parts
