"""Message kinds, one vocabulary: a small int in the outbox (its ``kind`` column), named
``"sms"`` or ``"voice"`` everywhere else (providers, routes, metrics, logs, the CLI).
"""

from __future__ import annotations

from typing import Final, Literal

Kind = Literal["sms", "voice"]

KIND_SMS: Final = 1
KIND_VOICE: Final = 2


def kind_name(code: int) -> Kind:
    """The name of a stored kind."""
    return "voice" if code == KIND_VOICE else "sms"
