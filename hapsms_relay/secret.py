"""Secret values: tokens, API keys, passwords.

A ``Secret`` never shows its value in ``repr``/``str``/f-strings, so it cannot leak into a
log line or an error message by accident; code that needs the value calls ``reveal()``.
"""

from __future__ import annotations

import hmac
from typing import Final


class Secret:
    """A string that masks itself everywhere but ``reveal()``."""

    __slots__ = ("_source", "_value")

    def __init__(self, value: str, source: str = "inline") -> None:
        self._value: Final = value
        self._source: Final = source

    def reveal(self) -> str:
        return self._value

    @property
    def source(self) -> str:
        """Where the value came from (``env:NAME``, ``file:PATH``...), safe to print."""
        return self._source

    def __repr__(self) -> str:
        return f"Secret({self._source}, '***')"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> str:  # keep secrets out of pickles too
        raise TypeError("Secret values cannot be pickled")


def reveal(value: str | Secret) -> str:
    """The plain value of a setting that may or may not be a secret."""
    return value.reveal() if isinstance(value, Secret) else value
