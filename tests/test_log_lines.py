"""Log lines: numbers of every length masked (no length slips through whole), values quoted
so a line always parses as ``event key=value ...``, and journald's priority prefix."""

from __future__ import annotations

import io
import logging

import pytest

from hapsms_relay import log
from hapsms_relay.log import mask

DIGITS = "98765432109876543210"


@pytest.mark.parametrize("length", range(21))
def test_bare_digits_of_every_length(length: int) -> None:
    """A number without ``+`` of any length keeps its length, hides at least half of its
    digits (stars first) and shows at most the last four."""
    raw = DIGITS[:length]
    masked = mask(raw)
    shown = min(4, length // 2)
    assert masked == "*" * (length - shown) + raw[length - shown:]


@pytest.mark.parametrize("length", range(1, 16))
def test_e164_of_every_length(length: int) -> None:
    """+86 numbers of any national length: the calling code stays, the national part is
    masked by the same rule; a full number never appears."""
    national = DIGITS[:length]
    masked = mask("+86" + national)
    shown = min(4, length // 2)
    assert masked == "+86" + "*" * (length - shown) + national[length - shown:]
    assert national not in masked or length == 0


@pytest.mark.parametrize(("number", "masked"), [
    ("+1", "+1"), ("+12", "+1*"), ("+1234", "+1**4"),  # one-digit code
    ("+35212", "+352*2"), ("+3521", "+352*"), ("+352", "+352"),  # three-digit code
    ("+999123456", "+*****3456"),  # no such calling code: all of it national
    ("+", "+"), ("+0123", "+**23"),
])
def test_calling_code_lengths(number: str, masked: str) -> None:
    """Calling codes of one to three digits are kept; an unknown one is masked with the rest."""
    assert mask(number) == masked


@pytest.mark.parametrize(("value", "shown"), [
    (7, "7"), (2.5, "2.5"), ("plain", "plain"), ("", '""'), ("two words", '"two words"'),
    ('say "hi"', '"say \\"hi\\""'), ("a=b", '"a=b"'), ("back\\slash", '"back\\\\slash"'),
    ("line\nbreak", '"line\\nbreak"'), ("tab\there", '"tab\\x09here"'), ("bell\x07", '"bell\\x07"'),
    (True, "True"), (None, "None"), ("中文", "中文"),
])
def test_values_are_quoted_only_when_they_must_be(value: object, shown: str) -> None:
    """Spaces, quotes, '=', backslashes and unprintable characters make a value quoted and
    escaped, so a line splits back into its fields; plain values stay bare."""
    assert log._value(value) == shown


def test_line_leaves_out_none_fields() -> None:
    """Fields are written in order as key=value; a None field is left out."""
    assert log._line("dead", {"id": 5, "code": None, "reason": "bad number"}) == \
        'dead id=5 reason="bad number"'
    assert log._line("start", {}) == "start"


def capture(level: str, tty: bool) -> tuple[io.StringIO, logging.Logger]:
    class Stream(io.StringIO):
        def isatty(self) -> bool:
            return tty

    out = Stream()
    log.setup(level, out)
    return out, logging.getLogger("aiohttp.server")


def test_journald_prefix_per_level_and_none_on_a_terminal() -> None:
    """Off a terminal each line starts with its syslog priority; on a terminal it does not."""
    out, _ = capture("debug", tty=False)
    log.debug("d", a=1)
    log.info("i")
    log.warning("w")
    log.error("e")
    log.LOGGER.critical("c")
    assert out.getvalue().splitlines() == ["<7>d a=1", "<6>i", "<4>w", "<3>e", "<2>c"]
    out, _ = capture("info", tty=True)
    log.info("i", b="x y")
    assert out.getvalue() == 'i b="x y"\n'
    log.setup("debug")


def test_defaults_stdout_info_and_no_access_log(capsys) -> None:
    """Without a stream the lines go to whatever sys.stdout is when written; the default
    level is info; an unknown level gets the info prefix; aiohttp's access log stays off."""
    log.setup()
    log.debug("hidden")
    log.info("shown", a=1)
    log.LOGGER.log(25, "between")
    assert capsys.readouterr().out == "<6>shown a=1\n<6>between\n"
    assert not logging.getLogger("aiohttp.access").isEnabledFor(logging.INFO)
    log.setup("debug")


def test_levels_filter_and_other_loggers_are_tagged() -> None:
    """Below the configured level nothing is written; another library's record is tagged with
    its logger's name and its text quoted as one value."""
    out, aiohttp_log = capture("warning", tty=False)
    log.debug("d")
    log.info("i")
    log.warning("w")
    aiohttp_log.warning("Error handling request from %s", "1.2.3.4")
    assert out.getvalue().splitlines() == ["<4>w",
                                           '<4>aiohttp.server "Error handling request from 1.2.3.4"']
    log.setup("debug")


def test_exceptions_are_one_line_unless_debug() -> None:
    """An exception adds exc=Type: text on the line; the traceback only at debug level."""
    out, _ = capture("info", tty=False)
    try:
        raise ValueError("boom")
    except ValueError:
        log.LOGGER.exception("internal_error path=%s", "/x")
    assert out.getvalue() == '<3>internal_error path=/x exc="ValueError: boom"\n'
    out, _ = capture("debug", tty=False)
    try:
        raise ValueError("boom")
    except ValueError:
        log.LOGGER.exception("internal_error")
    text = out.getvalue()
    assert text.startswith('<3>internal_error "Traceback (most recent call last):\\n')
    assert text.count("\n") == 1  # still one line
    log.setup("debug")
