"""One line per event on stdout, ``event key=value ...``, with a syslog level prefix.

journald reads the ``<N>`` prefix as the line's priority (``journalctl -p warning`` works);
on a terminal the prefix is left out. Phone numbers go through ``mask()``; message text and
codes are logged only at debug level; secrets never (``Secret`` masks itself anyway).
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
from typing import IO

import phonenumbers

LOGGER = logging.getLogger("hapsms_relay")
_SPECIAL = re.compile(r'[ "=\\]')  # characters that make a value need quotes

_PREFIX = {
    logging.DEBUG: "<7>",
    logging.INFO: "<6>",
    logging.WARNING: "<4>",
    logging.ERROR: "<3>",
    logging.CRITICAL: "<2>",
}


# ITU calling codes are prefix-free, so at most one of a number's first 1-3 digits is one.
_CALLING_CODES = frozenset(str(c) for c in phonenumbers.COUNTRY_CODE_TO_REGION_CODE)
_TAIL = 4  # at most this many last digits are shown


def mask(number: str) -> str:
    """A number as logs show it: enough to tell numbers apart, not to dial.

    The rule, for every region: an E.164 number keeps ``+`` and its calling code; of the
    national number the last ``min(4, len // 2)`` digits are shown and every other digit is
    a ``*`` (one per digit), so at least half of it is always hidden.
    ``+8613800138000`` -> ``+86*******8000``, ``+85291234567`` -> ``+852****4567``,
    ``+6581234567`` -> ``+65****4567``. Anything else (no ``+``, an unknown calling code) is
    all national number: ``12345`` -> ``***45``.
    """
    head, national = "", number
    if number[:1] == "+":
        n = _CODE_LENGTH.get(number[1:4])
        if n is None:
            n = next((n for n in (1, 2, 3) if number[1 : 1 + n] in _CALLING_CODES), 0)
            if len(_CODE_LENGTH) < 4096:
                _CODE_LENGTH[number[1:4]] = n
        head, national = number[: 1 + n], number[1 + n :]
    shown = min(_TAIL, len(national) // 2)
    return head + "*" * (len(national) - shown) + national[len(national) - shown :]


# the calling code's length by a number's first three digits (prefix-free codes decide it):
# one look-up per `sent` line instead of up to three slices and set look-ups
_CODE_LENGTH: dict[str, int] = {}


_PLAIN: dict[str, str] = {}  # values seen before, as written: provider names, kinds, masks
_PLAIN_MAX = 4096


def _value(v: object) -> str:
    if type(v) is int or type(v) is float:  # ids, counts, latencies: nothing to quote
        return str(v)
    s = str(v)
    done = _PLAIN.get(s)
    if done is not None:  # most values of a `delivered` line repeat: one dict look-up
        return done
    # one C-level scan each instead of a generator per character set
    if not s or _SPECIAL.search(s) or not s.isprintable():
        q = '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
        q = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in q)
    else:
        q = s
    if len(s) <= 40:
        if len(_PLAIN) >= _PLAIN_MAX:
            _PLAIN.clear()
        _PLAIN[s] = q
    return q


def _line(event: str, fields: dict[str, object]) -> str:
    parts = [event]
    for k, v in fields.items():
        if v is None:
            continue
        # ids, counts, latencies need no quoting: no call for them (a `delivered` line per
        # message has four)
        parts.append(f"{k}={v}" if type(v) is int or type(v) is float else f"{k}={_value(v)}")
    return " ".join(parts)


def debug(event: str, **fields: object) -> None:
    if LOGGER.isEnabledFor(logging.DEBUG):
        _emit(logging.DEBUG, _line(event, fields))


def info(event: str, **fields: object) -> None:
    if LOGGER.isEnabledFor(logging.INFO):
        _emit(logging.INFO, _line(event, fields))


def warning(event: str, **fields: object) -> None:
    if LOGGER.isEnabledFor(logging.WARNING):
        _emit(logging.WARNING, _line(event, fields))


def error(event: str, **fields: object) -> None:
    if LOGGER.isEnabledFor(logging.ERROR):
        _emit(logging.ERROR, _line(event, fields))


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler ``setup`` installs. Its stream is flushed once per turn of the event
    loop rather than once per line: a ``delivered`` line per message made a write(2) per
    message. A line waits at most for the end of the loop's current turn (``kill -9`` may
    lose that turn's lines, never an outbox write); outside a loop, at once."""

    def __init__(self, stream: IO[str] | _Stdout, prefix: bool) -> None:
        super().__init__(stream)
        self.prefix = prefix
        self.flush_due = False
        self.setFormatter(_Formatter(prefix))

    def flush_soon(self) -> None:
        if self.flush_due:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self.flush_due = True
        loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self.flush_due = False
        self.flush()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
            with self.lock:  # type: ignore[union-attr]
                self.stream.write(line)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)
            return
        self.flush_soon()


_HANDLER: _Handler | None = None


def _emit(level: int, text: str) -> None:
    """One of the relay's own lines. When ``setup``'s handler is the only one (as in
    production), written straight to it: the ``LogRecord``, handler and formatter calls of
    ``logging`` were most of a ``delivered`` line's cost, and the line is all they would
    produce. Any other handler (pytest's caplog, a test's own) gets the record as usual."""
    h = _HANDLER
    handlers = logging.root.handlers
    if (h is None or LOGGER.handlers or LOGGER.filters or not LOGGER.propagate
            or len(handlers) != 1
            or handlers[0] is not h or h.filters or level < h.level):
        LOGGER.log(level, text)
        return
    line = (_PREFIX[level] + text if h.prefix else text) + "\n"
    with h.lock:  # type: ignore[union-attr]
        h.stream.write(line)
    h.flush_soon()


class _Formatter(logging.Formatter):
    def __init__(self, prefix: bool) -> None:
        super().__init__()
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.name != LOGGER.name:  # aiohttp, asyncio: keep their words, tag the source
            text = f"{record.name} {_value(text)}"
        if record.exc_info and LOGGER.isEnabledFor(logging.DEBUG):
            text += " " + _value(self.formatException(record.exc_info))
        elif record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            text += f" exc={_value(type(exc).__name__ + ': ' + str(exc))}"
        if self.prefix:
            return _PREFIX.get(record.levelno, "<6>") + text
        return text


class _Stdout:
    """Whatever ``sys.stdout`` is when a line is written (test runners swap it)."""

    def write(self, text: str) -> int:
        return sys.stdout.write(text)

    def flush(self) -> None:
        sys.stdout.flush()

    def isatty(self) -> bool:
        return sys.stdout.isatty()


def setup(level: str = "info", stream: IO[str] | None = None) -> None:
    """Send the relay's and its libraries' log records to stdout, one line each."""
    global _HANDLER
    out: IO[str] | _Stdout = stream or _Stdout()
    handler = _HANDLER = _Handler(out, prefix=not out.isatty())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    # What the lines leave out, not gathered per record (the logging HOWTO's "Optimization"):
    # ~1.4 us of the 6.6 us a `delivered` line cost, once per delivered message.
    logging._srcfile = None  # the caller's file and line
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    LOGGER.setLevel(level.upper())
    # aiohttp's access log would print every request; the relay logs its own events instead.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
