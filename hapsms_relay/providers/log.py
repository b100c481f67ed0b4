"""The ``log`` dry-run provider: one log line per message, nothing sent.

The text itself is logged only at debug level, like everywhere else in the relay.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from hapsms_relay import log
from hapsms_relay.providers.base import BaseProvider, Common, Message, Sent
from hapsms_relay.table import Table


@dataclass
class LogProvider(BaseProvider):
    supports_voice: ClassVar[bool] = True

    @classmethod
    def from_config(cls, common: Common, table: Table) -> LogProvider:
        return cls(common)

    async def send_one(self, message: Message) -> Sent:
        log.info(
            "dry_run", id=message.id, kind=message.kind, to=log.mask(message.to),
            provider=self.name, chars=len(message.text),
        )
        log.debug("dry_run_text", id=message.id, text=self.sms_text(message))
        return self.sent(message)
