"""Phone numbers as HAP sends them, read into E.164 by the fast path or phonenumbers: each
form, each rule of the fast path at its edge, and what is refused (the generated cases
against phonenumbers are in test_numbers_fuzz.py)."""

from __future__ import annotations

import pytest

from hapsms_relay.numbers import FastPath, InvalidNumber, normalise, slow


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


@pytest.mark.parametrize(("region", "cc"), [
    ("CN", "86"), ("HK", "852"), ("DE", "49"), ("IN", "91"), ("FR", "33"), ("JP", "81"),
    ("US", None),  # mobiles and fixed lines share one pattern: phonenumbers' to tell apart
    ("GB", None), ("IT", None), ("RU", None),  # +44, +39, +7 are shared with other regions
])
def test_which_regions_have_a_fast_path(region: str, cc: str | None) -> None:
    """A region gets a fast path only when its calling code is its own and phonenumbers'
    metadata tells its mobiles apart; the fast path carries that code."""
    fast = FastPath.build(region)
    if cc is None:
        assert fast is None
    else:
        assert fast is not None and (fast.region, fast.cc) == (region, cc)


@pytest.mark.parametrize(("raw", "region", "fast", "e164"), [
    ("13800138000", "CN", True, "+8613800138000"),
    ("+8613123456789", "CN", True, "+8613123456789"),
    ("008613123456789", "CN", True, "+8613123456789"),
    ("8613123456789", "CN", True, "+8613123456789"),
    ("8001234567", "IN", True, "+918001234567"),
    ("1012345678", "CN", False, "+861012345678"),  # a Beijing fixed line
    ("7410410123", "IN", False, "+917410410123"),  # fixed line or mobile: not only mobile
    ("+868001234567", "IN", False, "+868001234567"),  # another region's code
    ("00868001234567", "IN", False, "+868001234567"),
    ("4915123456789", "DE", False, "+494915123456789"),  # the code in front, read nationally
    ("6755622732", "AR", False, "+546755622732"),  # AR's national prefix matches: phonenumbers' call
    ("05799097", "BF", False, "+22605799097"),  # a leading zero: phonenumbers' call
])
def test_fast_path_takes_only_what_phonenumbers_reads_as_its_mobile(
        raw: str, region: str, fast: bool, e164: str) -> None:
    """The fast path takes a region's mobiles in the forms HAP sends, with phonenumbers'
    answer and the type "mobile"; a number it leaves (another type, another code, a national
    prefix or leading zero to interpret) gets phonenumbers' answer, its type left unknown."""
    path = FastPath.build(region)
    assert path is not None
    got = path.normalise(raw)
    ref = slow(raw, region)
    assert ref is not None and ref.e164 == e164
    if fast:
        assert got is not None and tuple(got) == (*ref[:3], "mobile")
    else:
        assert got is None
    n = normalise(raw, region)
    assert (n.e164, n.type) == (e164, "mobile" if fast else "")


@pytest.mark.parametrize(("raw", "region", "e164"), [
    ("13123456789", "CN", "+8613123456789"),  # valid with "+" too (a US number): national first
    ("8613800138000", "CN", "+8613800138000"),  # a CN mobile with 86 in front
    ("861012345678", "DE", "+49861012345678"),  # valid both ways: read nationally
    ("8613123456789", "DE", "+498613123456789"),
    ("0086 138 0013 8000", "US", "+8613800138000"),  # 00 as the international prefix
])
def test_digits_alone_are_read_nationally_first(raw: str, region: str, e164: str) -> None:
    """Digits without "+" are read as a national number of the default region first and as
    an international one only if that fails, except the exact shape of a CN mobile with 86
    in front; "00" in front is read as "+"."""
    n = slow(raw, region)
    assert n is not None and n.e164 == e164
