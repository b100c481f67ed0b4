"""The number fast path against phonenumbers: whatever the fast path answers, phonenumbers
answers the same (E.164, region, national number), and the type it names is phonenumbers'."""

from __future__ import annotations

import os
import re

import phonenumbers
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hapsms_relay.numbers import InvalidNumber, _fast_path, normalise, number_type, slow

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "2000"))
REGIONS = ["CN", "US", "GB", "HK", "DE", "IN", "SG", "RU", "IT", "FR", "BR", "JP"]

# Near misses around mobile numbers: real mobile prefixes, prefixes phonenumbers treats
# specially (national prefix 0, CN carrier codes 1[12]xx and 179xx, premium 16[08]), lengths
# one off, country codes with and without '+' / '00'.
_prefix = st.sampled_from(["", "+", "00", "+86", "0086", "86", "+1", "1", "+44", "0", "+852",
                           "+7", "7", "+39", "39", "0044", "+8686", "8686", "+860", "860"])
_lead = st.sampled_from(["13", "139", "14", "145", "15", "16", "160", "168", "165", "17",
                         "170", "174", "1740", "179", "11", "12", "18", "19", "10", "1", "2",
                         "3", "4", "6", "7", "8", "9", "0", "20", "400", "800", "95", "3", "5"])
_digits = st.text(alphabet="0123456789", min_size=0, max_size=12)
_space = st.sampled_from(["", " ", "  ", "\t"])
_shaped = st.builds(lambda s1, p, lead, d, s2: s1 + p + lead + d + s2,
                    _space, _prefix, _lead, _digits, _space)
_raw = st.one_of(_shaped, st.from_regex(r"\A\+?[0-9]{1,16}\Z"), st.text(max_size=20))


@settings(max_examples=EXAMPLES, deadline=None)
@given(raw=_raw, region=st.sampled_from(REGIONS))
def test_fast_path_agrees_with_phonenumbers(raw: str, region: str) -> None:
    """Every number the fast path takes is what phonenumbers makes of it, and a mobile."""
    fast = _fast_path(region)
    got = fast.normalise(raw) if fast is not None else None
    if got is None:
        return
    ref = slow(raw, region)
    assert ref is not None, raw
    assert (got.e164, got.region, got.national) == tuple(ref[:3]), raw
    assert got.type == number_type(got.e164) == "mobile", raw


@settings(max_examples=EXAMPLES // 4, deadline=None)
@given(nsn=st.from_regex(re.compile(phonenumbers.PhoneMetadata.metadata_for_region("CN").mobile
                                    .national_number_pattern, re.ASCII), fullmatch=True))
def test_every_cn_mobile_takes_the_fast_path(nsn: str) -> None:
    """CN mobiles, generated from phonenumbers' own pattern, take the fast path in every form
    HAP sends, with phonenumbers' answer."""
    fast = _fast_path("CN")
    assert fast is not None
    for raw in (nsn, "+86" + nsn, "0086" + nsn, "86" + nsn):
        got = fast.normalise(raw)
        assert got is not None, raw
        assert (got.e164, got.region, got.national) == tuple(slow(raw, "CN")[:3])  # type: ignore[index]


@pytest.mark.parametrize(("raw", "region", "e164"), [
    ("13800138000", "CN", "+8613800138000"),
    ("+8613800138000", "US", "+8613800138000"),
    ("008613800138000", "CN", "+8613800138000"),
    ("8613800138000", "CN", "+8613800138000"),
    (" 13800138000 ", "CN", "+8613800138000"),
    ("+447911123456", "GB", "+447911123456"),
    ("07911123456", "GB", "+447911123456"),  # national prefix: phonenumbers' path
    ("+86 138 0013 8000", "CN", "+8613800138000"),  # spaces: phonenumbers' path
    ("16012345678", "CN", "+16012345678"),  # not a CN mobile: read as +1
    ("+86 (138) 0013-8014", "CN", "+8613800138014"),
    ("138.0013.8014", "CN", "+8613800138014"),
    # full-width digits, as a Chinese input method types them
    ("\uff11\uff13\uff18\uff10\uff10\uff11\uff13\uff18\uff10\uff11\uff14", "CN", "+8613800138014"),
    ("\u00a0138 0013 8014", "CN", "+8613800138014"),
])
def test_normalise_forms(raw: str, region: str, e164: str) -> None:
    """The forms HAP sends normalise to E.164 whichever path takes them."""
    assert normalise(raw, region).e164 == e164


@pytest.mark.parametrize("raw", ["", "123", "1380013800", "+86 000", "17912345678", "+8612345678901", "abc",
                                 "+86 138 0013 8014 ext. 123", "+86 138 0013 8014 x123",
                                 "+86-138-0013-8014;ext=1", "13800138014#1",
                                 "tel:+8613800138014", "sms:13800138014",
                                 "\U0001f4f113800138014", "13800138014\U0001f4f1",
                                 "138\u200b00138014", "1-800-FLOWERS", "+1 800 FLOWERS",
                                 "+86 138 0013 8014 (mobile)", "*13800138014", "++8613800138014"])
def test_invalid_numbers_are_refused(raw: str) -> None:
    """Invalid numbers are refused, and so are valid ones wrapped in anything but digits and
    separators: an extension, a URI, an emoji, letters (the fast path never accepts them)."""
    with pytest.raises(InvalidNumber):
        normalise(raw, "CN")


@pytest.mark.parametrize(("raw", "region", "e164", "where", "type_"), [
    ("13800138000", "CN", "+8613800138000", "CN", "mobile"),  # the fast path says its type
    ("+8613800138000", "US", "+8613800138000", "CN", ""),  # US's fast path takes US mobiles
    ("008613800138000", "CN", "+8613800138000", "CN", "mobile"),
    ("008613800138000", "US", "+8613800138000", "CN", ""),  # 00 is not US's IDD: phonenumbers
    ("8613800138000", "CN", "+8613800138000", "CN", "mobile"),
    ("+1 (202) 555-0123", "US", "+12025550123", "US", ""),
])
def test_forms_and_what_is_known_of_them(raw: str, region: str, e164: str, where: str,
                                         type_: str) -> None:
    """Each accepted form gives the E.164 number and its region; a number the fast path
    took carries its type ("mobile"), one phonenumbers parsed leaves it to be looked up."""
    n = normalise(raw, region)
    assert (n.e164, n.region, n.type) == (e164, where, type_)
    assert n.national == e164[len(e164) - len(n.national):] and n.national


@pytest.mark.parametrize("raw", ["+86" + " " * 19 + "13800138000", "1" * 33, "+", "", "   "])
def test_too_long_or_empty_is_invalid(raw: str) -> None:
    """More than 32 characters, or nothing, is not a number (and the error names it)."""
    with pytest.raises(InvalidNumber) as err:
        normalise(raw, "CN")
    assert err.value.args == (raw,)
    assert slow(raw, "CN") is None


def test_32_characters_are_still_read() -> None:
    """A number padded to exactly 32 characters is still read."""
    raw = "+86" + " " * 18 + "13800138000"
    assert len(raw) == 32 and slow(raw, "CN") is not None
