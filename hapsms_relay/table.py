"""Typed reading of one TOML table, with errors that name the key.

Every getter records which keys it read; ``done()`` then rejects the keys nobody read, so a
typo such as ``retry_bsae`` is an error rather than a silently ignored setting.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from hapsms_relay.errors import ConfigError
from hapsms_relay.secret import Secret

T = TypeVar("T")

_MISSING: object = object()
#: Pass as a default to make a setting required.
REQUIRED = _MISSING
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """``"15m"`` -> 900.0; units ms, s, m, h, d."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"expected a duration such as \"2s\", \"15m\", \"1h\"; got {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


class Table:
    """One TOML table being read; ``key`` is its dotted path for error messages."""

    def __init__(self, data: Mapping[str, object], key: str = "") -> None:
        self.data = data
        self.key = key
        self._read: set[str] = set()

    def path(self, name: str) -> str:
        return f"{self.key}.{name}" if self.key else name

    def error(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.path(name), problem)

    def has(self, name: str) -> bool:
        return name in self.data

    def _get(self, name: str, default: object) -> object:
        self._read.add(name)
        if name in self.data:
            return self.data[name]
        if default is _MISSING:
            raise self.error(name, "required")
        return default

    def _typed(self, name: str, kind: type[T], what: str, default: object) -> T:
        value = self._get(name, default)
        # bool is an int in Python; a TOML `true` is never a number here.
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise self.error(name, f"expected {what}, got {_describe(value)}")
        return value

    def string(self, name: str, default: object = _MISSING, *, nonempty: bool = True) -> str:
        value = self._typed(name, str, "a string", default)
        if nonempty and not value and name in self.data:
            raise self.error(name, "must not be empty")
        return value

    def optional_str(self, name: str) -> str | None:
        if name not in self.data:
            self._read.add(name)
            return None
        return self.string(name)

    def boolean(self, name: str, default: object = _MISSING) -> bool:
        return self._typed(name, bool, "true or false", default)

    def integer(
        self, name: str, default: object = _MISSING, *, min: int | None = None,
        max: int | None = None,
    ) -> int:
        value = self._typed(name, int, "an integer", default)
        if min is not None and value < min:
            raise self.error(name, f"must be at least {min}, got {value}")
        if max is not None and value > max:
            raise self.error(name, f"must be at most {max}, got {value}")
        return value

    def duration(self, name: str, default: object = _MISSING, *, positive: bool = True) -> float:
        value = self._get(name, default)
        if isinstance(value, int | float) and not isinstance(value, bool):
            seconds = float(value)
        elif isinstance(value, str):
            try:
                seconds = parse_duration(value)
            except ValueError as exc:
                raise self.error(name, str(exc)) from None
        else:
            raise self.error(name, f"expected a duration such as \"2s\", got {_describe(value)}")
        if positive and seconds <= 0:
            raise self.error(name, "must be greater than zero")
        return seconds

    def choice(self, name: str, choices: Sequence[str], default: object = _MISSING) -> str:
        value = self.string(name, default)
        if value not in choices:
            raise self.error(name, f"must be one of {', '.join(map(repr, choices))}; got {value!r}")
        return value

    def str_list(self, name: str, default: object = _MISSING, *, nonempty: bool = False) -> list[str]:
        value = self._get(name, default)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self.error(name, f"expected a list of strings, got {_describe(value)}")
        if nonempty and not value:
            raise self.error(name, "must not be empty")
        return list(value)

    def int_list(self, name: str, default: object = _MISSING) -> list[int]:
        value = self._get(name, default)
        if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise self.error(name, f"expected a list of integers, got {_describe(value)}")
        return list(value)

    def table(self, name: str, default: object = _MISSING) -> Table:
        value = self._get(name, default)
        if not isinstance(value, Mapping):
            raise self.error(name, f"expected a table, got {_describe(value)}")
        return Table(value, self.path(name))

    def raw(self, name: str, default: object = _MISSING) -> object:
        """A value of any shape (a body template); the caller validates it."""
        return self._get(name, default)

    def tables(self, name: str, default: object = _MISSING) -> list[Table]:
        value = self._get(name, default)
        if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
            raise self.error(name, f"expected an array of tables ([[{self.path(name)}]])")
        return [Table(v, f"{self.path(name)}[{i}]") for i, v in enumerate(value)]

    def secret(self, name: str, default: object = _MISSING) -> Secret:
        value = self._get(name, default)
        if isinstance(value, Secret):
            return value
        return resolve_secret(value, self.path(name))

    def optional_secret(self, name: str) -> Secret | None:
        if name not in self.data:
            self._read.add(name)
            return None
        return self.secret(name)

    def secret_list(self, name: str, default: object = _MISSING) -> list[Secret]:
        value = self._get(name, default)
        if not isinstance(value, list):
            raise self.error(name, f"expected a list of secrets, got {_describe(value)}")
        return [resolve_secret(v, f"{self.path(name)}[{i}]") for i, v in enumerate(value)]

    def done(self) -> None:
        """Reject keys that no getter read: they are typos or settings of another version."""
        unknown = sorted(set(self.data) - self._read)
        if unknown:
            raise self.error(unknown[0], "unknown setting")


def resolve_secret(value: object, key: str) -> Secret:
    """A secret is a string, or ``{env = NAME}``, ``{file = PATH}``, ``{credential = NAME}``."""
    if isinstance(value, str):
        if not value:
            raise ConfigError(key, "must not be empty")
        return Secret(value, "inline")
    if not isinstance(value, Mapping) or len(value) != 1:
        raise ConfigError(
            key, "expected a string or one of {env = \"NAME\"}, {file = \"PATH\"}, "
            "{credential = \"NAME\"}",
        )
    (kind, ref), = value.items()
    if not isinstance(ref, str) or not ref:
        raise ConfigError(f"{key}.{kind}", "expected a non-empty string")
    if kind == "env":
        env = os.environ.get(ref)
        if not env:
            raise ConfigError(key, f"environment variable {ref} is not set or empty")
        return Secret(env, f"env:{ref}")
    if kind == "file":
        return Secret(_read_secret_file(Path(ref), key), f"file:{ref}")
    if kind == "credential":
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise ConfigError(
                key, f"credential {ref!r} needs $CREDENTIALS_DIRECTORY (systemd LoadCredential=)"
            )
        if "/" in ref:
            raise ConfigError(key, "a credential name cannot contain '/'")
        return Secret(_read_secret_file(Path(directory) / ref, key), f"credential:{ref}")
    raise ConfigError(key, f"unknown secret source {kind!r}; use env, file or credential")


def _read_secret_file(path: Path, key: str) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(key, f"{path} is not UTF-8 text") from None
    text = text.rstrip("\r\n")
    if not text:
        raise ConfigError(key, f"{path} is empty")
    return text


def _describe(value: object) -> str:
    if value is _MISSING:
        return "nothing"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "a table"
    return type(value).__name__
