"""The vendor error tables the provider pages list are the code's own: a code moved from
transient to permanent (or added, or dropped) in one place and not the other fails here."""

from __future__ import annotations

import re

from hapsms_relay.errors import PermanentError, TransientError
from hapsms_relay.providers import aliyun, tencent, twilio
from hapsms_relay.providers.vonage import STATUS
from tests import docs


def _paragraph(kind: str, start: str) -> str:
    """The paragraph (or list item) of docs/providers/<kind>.md that begins with ``start``."""
    text = docs.provider_page(kind)
    assert start in text, f"{kind}: no paragraph starting {start!r}"
    return re.split(r"\n\n|\n- ", text.split(start, 1)[1], maxsplit=1)[0]


def _sides(text: str, first: str, second: str) -> tuple[str, str]:
    """``text`` cut at ``first`` (what precedes it) and then at ``second``."""
    before, rest = text.split(first, 1)
    return before, rest.split(second, 1)[0]


def test_twilio_codes() -> None:
    """twilio.md's permanent and transient error codes are the provider's two tables."""
    para = _paragraph("twilio", "Errors follow Twilio's JSON error `code`")
    permanent, transient = _sides(para, "are permanent;", "are transient")
    codes = lambda s: {int(c) for c in re.findall(r"\b(\d{5})\b", s)}  # noqa: E731
    assert codes(permanent) == twilio._PERMANENT_CODES
    assert codes(transient) == twilio._TRANSIENT_CODES


def test_vonage_statuses() -> None:
    """vonage.md's transient and permanent statuses are exactly the provider's STATUS table."""
    para = _paragraph("vonage", "Vonage answers 200 with a `status` per message part")
    transient, permanent = _sides(para.split("Status 1", 1)[1], "are transient;", "are permanent")
    numbers = lambda s: set(re.findall(r"\b(\d{1,2})\b", s))  # noqa: E731
    assert {"1"} | numbers(transient) == {k for k, (_, t) in STATUS.items() if t}
    assert numbers(permanent) == {k for k, (_, t) in STATUS.items() if not t}


def _codes(text: str) -> list[str]:
    return re.findall(r"`([A-Za-z][\w.*]*)`", text)


def test_tencent_codes() -> None:
    """tencent.md's transient prefixes are the provider's, its per-number caps and permanent
    codes classify as it says."""
    para = _paragraph("tencent", "**Errors**")
    transient, rest = para.split("are transient", 1)
    prefixes = [c.rstrip("*") for c in _codes(transient) if c.endswith("*")]
    assert tuple(prefixes) == tencent._TRANSIENT
    for prefix in prefixes:
        assert isinstance(tencent.classify("t", prefix + "X", ""), TransientError)
    caps, permanent = rest.split("are permanent for that message", 1)
    (cap,) = _codes(caps)
    for code in (cap.replace("*", w) for w in ("Daily", "Hourly", "30s")):
        err = tencent.classify("t", code, "")
        assert isinstance(err, PermanentError) and "cap" in err.text
    listed = _codes(permanent.split("are permanent", 1)[0])
    assert len(listed) >= 3
    for code in listed:
        assert isinstance(tencent.classify("t", code.replace("*", "X"), ""), PermanentError), code


def test_aliyun_codes() -> None:
    """aliyun.md's transient codes are the provider's, its per-number cap is the code's, and
    the permanent codes it lists classify so."""
    para = _paragraph("aliyun", "**Errors**")
    transient, rest = para.split("are transient", 1)
    listed = [c for c in _codes(transient) if c not in ("OK", "isp.SYSTEM_ERROR", "Code")]
    assert tuple(c.rstrip("*") for c in listed) == aliyun._TRANSIENT
    for code in listed:
        assert isinstance(aliyun.classify("a", code.replace("*", "X"), ""), TransientError)
    caps, permanent = rest.split("is permanent for that message", 1)
    assert _codes(caps) == [aliyun._PERMANENT_CAP]
    for code in _codes(permanent.split("are permanent", 1)[0]):
        assert isinstance(aliyun.classify("a", code.replace("*", "X"), ""), PermanentError), code
