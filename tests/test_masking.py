"""How log lines mask phone numbers: the calling code and at most the last 4 digits show."""

from __future__ import annotations

import phonenumbers
import pytest

from hapsms_relay.log import mask


def _examples() -> list[tuple[str, str, str]]:
    """(region, E.164, national number) of phonenumbers' example mobile of every region."""
    out = []
    for region in sorted(phonenumbers.SUPPORTED_REGIONS):
        n = phonenumbers.example_number_for_type(region, phonenumbers.PhoneNumberType.MOBILE)
        if n is not None:
            e164 = phonenumbers.format_number(n, phonenumbers.PhoneNumberFormat.E164)
            out.append((region, e164, phonenumbers.national_significant_number(n)))
    return out


EXAMPLES = _examples()


@pytest.mark.parametrize(("number", "masked"), [
    ("+8613800138000", "+86*******8000"),
    ("+85291234567", "+852****4567"),  # was +85291****4567: two digits hidden
    ("+6581234567", "+65****4567"),  # was +65812****4567: one digit hidden
    ("+85366123456", "+853****3456"),
    ("+886912345678", "+886*****5678"),
    ("+13125551234", "+1******1234"),
    ("+447700900123", "+44******0123"),
    ("+3524", "+352*"),  # a short national number shows at most half of it
    ("12345", "***45"),  # not E.164: all of it is national number
    ("", ""),
])
def test_mask_table(number: str, masked: str) -> None:
    """The masked form of numbers of several regions and shapes, exactly."""
    assert mask(number) == masked


@pytest.mark.parametrize(("region", "e164", "national"), EXAMPLES, ids=[r for r, _, _ in EXAMPLES])
def test_every_region_hides_at_least_half(region: str, e164: str, national: str) -> None:
    """For every region's example mobile: the calling code stays, at most the last 4 digits
    of the national number show, at least half of it is hidden, and the length is kept."""
    cc = e164[1 : len(e164) - len(national)]
    masked = mask(e164)
    assert masked.startswith("+" + cc) and len(masked) == len(e164)
    rest = masked[1 + len(cc):]
    hidden = rest.count("*")
    assert rest == "*" * hidden + national[hidden:]  # stars first, then the tail as it was
    assert len(national) - hidden <= 4
    assert hidden * 2 >= len(national)
