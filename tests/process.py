"""The relay as a real subprocess (``hapsms-relay serve``), for kill -9 and resource limits."""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sys
from pathlib import Path

# Sets the file-size limit (soft; the hard limit stays, so it can be raised again from
# outside with prlimit), ignores SIGXFSZ so writes past it fail with EFBIG as on a full disk,
# then becomes the relay.
_LAUNCH = """
import os, resource, signal, sys
limit = int(sys.argv[1])
if limit:
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
os.execv(sys.executable, [sys.executable, "-m", "hapsms_relay", *sys.argv[2:]])
"""


class RelayProcess:
    def __init__(self, config: Path, *, fsize: int = 0, paused: bool = False) -> None:
        self.config = config
        self.fsize = fsize
        self.paused = paused
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []
        self.url = ""
        self._reader: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, timeout: float = 20.0) -> None:
        args = ["serve", "--config", str(self.config)] + (["--pause-delivery"] if self.paused else [])
        self.lines = []
        self.url = ""
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _LAUNCH, str(self.fsize), *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        self._reader = asyncio.create_task(self._read())
        async with asyncio.timeout(timeout):
            while not self.url:
                if self.proc.returncode is not None:
                    raise RuntimeError("relay exited:\n" + "\n".join(self.lines))
                await asyncio.sleep(0.01)

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append(line)
            m = re.search(r"listening address=(\S+)", line)
            if m:
                self.url = "http://" + m.group(1)

    def text(self) -> str:
        return "\n".join(self.lines)

    async def wait(self) -> int:
        assert self.proc is not None
        code = await self.proc.wait()
        if self._reader is not None:
            await self._reader
        return code

    def kill(self) -> None:
        """kill -9: no shutdown of any kind."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()

    async def stop(self) -> int:
        if self.proc is None:
            return 0
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
        return await self.wait()
