"""Log lines: numbers of every length masked (no length slips through whole), values quoted
so a line always parses as ``event key=value ...``, and journald's priority prefix."""

from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import Iterator

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


class Flushes(io.StringIO):
    """A stream off a terminal that counts its flushes."""

    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0

    def isatty(self) -> bool:
        return False

    def flush(self) -> None:
        self.flushes += 1


@pytest.fixture
def flushes() -> Iterator[Flushes]:
    """The relay's lines to a Flushes stream at info level, as in production: set up in the
    test itself, so that pytest's own log handlers (added for each test phase) are gone."""
    out = Flushes()
    yield out
    log.setup("debug")


def test_outside_a_loop_each_line_is_flushed_at_once(flushes: Flushes) -> None:
    """With no event loop running, every line is flushed as it is written."""
    log.setup("info", flushes)
    log.info("a")
    assert flushes.flushes == 1
    log.warning("b")
    log.LOGGER.error("c")  # through logging's own path
    assert (flushes.getvalue(), flushes.flushes) == ("<6>a\n<4>b\n<3>c\n", 3)


async def test_in_a_loop_lines_are_flushed_once_per_turn(flushes: Flushes) -> None:
    """Inside the event loop the lines of one turn are written at once and flushed once, after
    the turn; a later turn's lines get a flush of their own."""
    log.setup("info", flushes)
    loop = asyncio.get_running_loop()
    for turn in (1, 2):
        log.info("a", turn=turn)
        log.info("b")
        log.LOGGER.warning("c")
        assert flushes.flushes == turn - 1  # written, not flushed yet
        turn_over = loop.create_future()
        loop.call_soon(turn_over.set_result, None)  # after the flush scheduled by the lines
        await turn_over
        assert flushes.flushes == turn
    assert flushes.getvalue() == "<6>a turn=1\n<6>b\n<4>c\n<6>a turn=2\n<6>b\n<4>c\n"


class Recorder(logging.Handler):
    """A handler of a test's own (as pytest's caplog adds), recording the messages."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.getMessage()}")


def test_other_handlers_on_the_root_get_every_line(flushes: Flushes) -> None:
    """A handler added beside setup's (pytest's caplog) gets each line as a record, with its
    text; one replacing setup's gets them alone."""
    log.setup("info", flushes)
    other = Recorder()
    logging.getLogger().addHandler(other)
    log.info("sent", id=1)
    assert other.lines == ["INFO sent id=1"] and flushes.getvalue() == "<6>sent id=1\n"
    root = logging.getLogger()
    root.removeHandler(root.handlers[0])  # setup's handler: the other one is left alone
    log.warning("dead", id=2)
    assert other.lines == ["INFO sent id=1", "WARNING dead id=2"]
    assert flushes.getvalue() == "<6>sent id=1\n"
    root.removeHandler(other)


def test_handlers_and_filters_on_the_relay_logger_are_honoured(flushes: Flushes) -> None:
    """A handler or a filter on the relay's own logger sees (or drops) its lines as logging
    would; with propagation off, setup's handler on the root gets none."""
    log.setup("info", flushes)
    own = Recorder()
    log.LOGGER.addHandler(own)
    try:
        log.info("one")
        assert own.lines == ["INFO one"] and flushes.getvalue() == "<6>one\n"
    finally:
        log.LOGGER.removeHandler(own)
    drop = logging.Filter("elsewhere")  # passes only records of another logger
    log.LOGGER.addFilter(drop)
    try:
        log.info("two")
    finally:
        log.LOGGER.removeFilter(drop)
    log.LOGGER.propagate = False
    try:
        log.info("three")
    finally:
        log.LOGGER.propagate = True
    log.info("four")
    assert flushes.getvalue() == "<6>one\n<6>four\n"


def test_setup_handler_level_and_filters_are_honoured(flushes: Flushes) -> None:
    """The handler setup installs keeps logging's own controls: a level set on it drops lines
    under it, and a filter added to it drops what it refuses."""
    log.setup("info", flushes)
    handler = logging.getLogger().handlers[0]
    handler.setLevel(logging.WARNING)
    log.info("under")
    log.warning("at")
    handler.setLevel(logging.NOTSET)
    handler.addFilter(logging.Filter("elsewhere"))
    log.error("filtered")
    assert flushes.getvalue() == "<4>at\n"


@pytest.mark.parametrize("numbers", [
    ["+1", "+35", "+1354445555", "+44", "+1441234567", "+3", "+35212345"],
    ["+35212345", "+3", "+1441234567", "+44", "+1354445555", "+35", "+1"],
])
def test_a_mask_does_not_depend_on_the_numbers_masked_before(numbers: list[str]) -> None:
    """Short and long numbers sharing leading digits are masked the same in any order: what
    is learnt of one number's calling code never decides another's."""
    expected = {"+1": "+1", "+35": "+*5", "+1354445555": "+1*****5555", "+44": "+44",
                "+1441234567": "+1*****4567", "+3": "+*", "+35212345": "+352***45"}
    assert [mask(n) for n in numbers] == [expected[n] for n in numbers]
