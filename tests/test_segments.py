"""Segment counting: GSM-7 against UCS-2, single and concatenated limits, extension
characters counting double and never split, surrogate pairs never split."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hapsms_relay import segments
from hapsms_relay.segments import Segments

CASES = [
    # (text, encoding, units, segments)
    ("", "gsm7", 0, 1),
    ("a", "gsm7", 1, 1),
    ("a" * 160, "gsm7", 160, 1),
    ("a" * 161, "gsm7", 161, 2),
    ("a" * 306, "gsm7", 306, 2),
    ("a" * 307, "gsm7", 307, 3),
    ("€" * 80, "gsm7", 160, 1),  # extension characters: two septets each
    ("€" * 81, "gsm7", 162, 2),
    ("a" * 159 + "€", "gsm7", 161, 2),
    # 152 septets then an escape pair: the pair does not fit part 1's 153, so 3 parts not 2
    ("a" * 152 + "€" + "a" * 152, "gsm7", 306, 3),
    ("Ä@£$¥èé\n\r", "gsm7", 9, 1),  # accented letters of the basic table: one septet
    ("ç", "ucs2", 1, 1),  # lower-case c cedilla is not in GSM-7 (only upper-case Ç)
    ("您" * 70, "ucs2", 70, 1),
    ("您" * 71, "ucs2", 71, 2),
    ("您" * 134, "ucs2", 134, 2),
    ("您" * 135, "ucs2", 135, 3),
    ("a" * 159 + "您", "ucs2", 160, 3),  # one non-GSM character makes the whole text UCS-2
    ("😀" * 35, "ucs2", 70, 1),  # astral characters: a surrogate pair, two units
    ("😀" * 36, "ucs2", 72, 2),
    ("a" * 66 + "😀" + "a" * 66, "ucs2", 134, 3),  # the pair is not split across parts
    ("【明道云】您的验证码是123456，感谢您的使用！", "ucs2", 25, 1),
]


@pytest.mark.parametrize(("text", "encoding", "units", "count"), CASES)
def test_count(text: str, encoding: str, units: int, count: int) -> None:
    """Each text's encoding, units and segments as a handset receives them."""
    assert segments.count(text) == Segments(encoding, units, count)  # type: ignore[arg-type]


@given(st.text(max_size=800))
def test_segments_hold_the_text(text: str) -> None:
    """Whatever the text, its parts carry all its units, no part is over the limit, and
    each part but the last is full but for at most the one unit a split would need."""
    s = segments.count(text)
    single, part = ((segments.GSM7_SINGLE, segments.GSM7_PART) if s.encoding == "gsm7"
                    else (segments.UCS2_SINGLE, segments.UCS2_PART))
    if s.units <= single:
        assert s.count == 1
    else:
        assert (s.count - 1) * (part - 1) < s.units <= s.count * part
