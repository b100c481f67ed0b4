"""The number fast path against phonenumbers, on generated numbers: whatever the fast path
answers, phonenumbers answers the same (E.164, region, national number), and the type it
names is phonenumbers'. ``make fuzz`` runs it with more examples."""

from __future__ import annotations

import os
import re

import phonenumbers
from hypothesis import given, settings
from hypothesis import strategies as st

from hapsms_relay.numbers import _fast_path, number_type, slow

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
