"""The one errors tree of hapsms-relay.

Config errors name the key at fault; a refused request carries its HTTP status and error
code. Delivery errors say whether retrying can help (transient) or not (permanent) and
carry the provider's own code and text for the logs.
"""

from __future__ import annotations

import orjson


class RelayError(Exception):
    """Base of every error hapsms-relay raises on purpose."""


class BadRequest(RelayError):
    """A request the relay refuses: answered ``status`` with :meth:`body`, the one JSON
    error body (``{"ok": false, "error": code, "detail": ...}``) of the webhook, the probes
    and the front door."""

    def __init__(self, status: int, code: str, detail: str,
                 headers: dict[str, str] | None = None, refused: bytes = b"") -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers
        self.refused = refused  # a JSON list of refused recipients, or b""

    def body(self) -> bytes:
        body = orjson.dumps({"ok": False, "error": self.code, "detail": self.detail})
        if self.refused:
            body = body[:-1] + b',"refused":' + self.refused + b"}"
        return body


class ClientGone(RelayError, ConnectionError):
    """The client disconnected before its request was read whole: nobody to answer."""


class ConfigError(RelayError, ValueError):
    """The configuration is invalid; ``key`` names the offending setting."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}" if key else problem)
        self.key = key
        self.problem = problem


class StorageError(RelayError, OSError):
    """The outbox could not read or write its storage (disk full, read-only, corrupt)."""


class DeliveryError(RelayError):
    """A provider did not deliver a message.

    ``code`` and ``text`` are the provider's own words (an HTTP status, an API error code, an
    SMTP reply), kept for the logs and for ``queue list --dead``. Never put secrets in them.
    """

    def __init__(self, provider: str, code: str, text: str = "") -> None:
        super().__init__(f"{provider}: {code}" + (f" {text}" if text else ""))
        self.provider = provider
        self.code = code
        self.text = text[:500]

    def reason(self) -> str:
        """The one-line reason stored with the entry."""
        return f"{self.provider} {self.code}" + (f": {self.text}" if self.text else "")


class PermanentError(DeliveryError):
    """Retrying cannot help: a bad number, rejected credentials, rejected content."""


class TransientError(DeliveryError):
    """Retrying may help: timeouts, connection resets, 5xx, 429.

    ``retry_after`` is the provider's own hint in seconds (``Retry-After``), if any.
    """

    def __init__(
        self, provider: str, code: str, text: str = "", *, retry_after: float | None = None
    ) -> None:
        super().__init__(provider, code, text)
        self.retry_after = retry_after


class UnsupportedError(DeliveryError):
    """This provider cannot carry this message (no matching template, no voice calls).

    Not a failure of the message: the dispatcher moves on to the next provider of the route
    at once, and the entry is dead with this reason only when no provider can carry it.
    """
