"""The ``file`` dry-run provider: appends each message as one JSON line.

The default of ``make run``: nothing leaves the machine, and ``var/sent.jsonl`` shows exactly
what a real provider would have been asked to send.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, ClassVar

import aiohttp
import orjson

from hapsms_relay.providers.base import BaseProvider, Common, Message, Sent
from hapsms_relay.table import Table


@dataclass
class FileProvider(BaseProvider):
    path: Path = Path("sent.jsonl")
    supports_voice: ClassVar[bool] = True
    _fh: IO[bytes] | None = field(default=None, init=False, repr=False)

    @classmethod
    def from_config(cls, common: Common, table: Table) -> FileProvider:
        return cls(common, path=Path(table.string("path")))

    async def open(self, session: aiohttp.ClientSession) -> None:
        await super().open(session)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = self.path.open("ab")

    async def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        await super().close()

    async def send_one(self, message: Message) -> Sent:
        if self._fh is None:
            raise RuntimeError(f"provider {self.name} used before open()")
        record = {
            "id": str(message.id),
            "kind": message.kind,
            "to": message.to,
            "text": self.sms_text(message) if message.kind == "sms" else message.text,
            "code": message.code or None,
            "provider": self.name,
            "at": round(time.time(), 3),
        }
        self._fh.write(orjson.dumps(record) + b"\n")
        self._fh.flush()
        return self.sent(message)
