"""The relay as a subprocess, as systemd runs it: ``python -m hapsms_relay serve``, for
kill -9, signals and resource limits.

Its stdout is read line by line in the background (every line kept, for the log checks),
and the address comes from its ``listening address=`` line.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.helpers import eventually, leaked

# Sets the file-size limit (soft; the hard limit stays, so it can be raised again from
# outside with prlimit), ignores SIGXFSZ so writes past it fail with EFBIG as on a full disk,
# passes a listening socket as systemd does (fd 3, LISTEN_FDS and LISTEN_PID of this very
# process, which exec keeps), then becomes the relay.
_LAUNCH = """
import os, resource, signal, sys
fd = os.environ.pop("HAPSMS_TEST_LISTEN_FD", "")
if fd:
    os.dup2(int(fd), 3)
    os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
limit = int(sys.argv[1])
if limit:
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
os.execv(sys.executable, [sys.executable, "-m", "hapsms_relay", *sys.argv[2:]])
"""


async def run_cli(*args: str, env: Mapping[str, str] | None = None,
                  cwd: Path | None = None) -> tuple[int, str, str]:
    """Run ``python -m hapsms_relay ARGS`` to completion: exit status, stdout, stderr.
    Whatever it printed is checked for secrets and unmasked numbers."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hapsms_relay", *args, env={**os.environ, **(env or {})}, cwd=cwd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    # numbers in full where the operator asked for them
    check_output(out.decode() + err.decode(),
                 allow_numbers=args[:1] == ("send",) or "--show-numbers" in args)
    return proc.returncode, out.decode(), err.decode()


def check_output(text: str, *, allow_numbers: bool = False) -> None:
    """No secret of the suite in ``text``, nor (unless allowed) a phone number in full."""
    from tests.helpers import SECRETS

    bad = [line for line in text.splitlines()
           if (leaked(line) if not allow_numbers else any(s in line for s in SECRETS))]
    assert not bad, f"secret or unmasked number in the output: {bad[:3]}"


class RelayProcess:
    """``hapsms-relay serve --config PATH`` in a subprocess; ``lines`` is its stdout so far."""

    def __init__(self, config: Path, env: Mapping[str, str] | None = None,
                 args: Sequence[str] = (), *, fsize: int = 0, paused: bool = False,
                 listen: socket.socket | None = None) -> None:
        """``fsize``: a file-size limit in bytes (writes past it fail as on a full disk);
        ``paused``: serve with ``--pause-delivery``; ``listen``: a listening socket to
        serve, handed over as systemd's socket activation does (the caller keeps it open,
        as systemd does across restarts)."""
        self.config = config
        self.env = {**os.environ, **(env or {})}
        self.listen = listen
        if listen is not None:
            self.env["HAPSMS_TEST_LISTEN_FD"] = str(listen.fileno())
        self.args = list(args) + (["--pause-delivery"] if paused else [])
        self.fsize = fsize
        self.lines: list[str] = []
        self.proc: asyncio.subprocess.Process | None = None
        self.address = ""
        self._reader: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def text(self) -> str:
        return "\n".join(self.lines)

    async def start(self) -> RelayProcess:
        """Start (or start again): the output and address of an earlier run are dropped."""
        self.lines, self.address = [], ""
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _LAUNCH, str(self.fsize), "serve", "--config", str(self.config),
            *self.args, env=self.env, cwd=self.config.parent,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            pass_fds=() if self.listen is None else (self.listen.fileno(),),
        )
        self._reader = asyncio.create_task(self._read())
        await eventually(lambda: bool(self.address) or self.proc is None
                         or self.proc.returncode is not None, what="the listening line")
        assert self.address, f"the relay did not start: {self.lines}"
        return self

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append(line)
            if not self.address and "listening address=" in line:
                self.address = line.split("listening address=", 1)[1].split()[0]

    def saw(self, event: str) -> bool:
        """Whether a log line for ``event`` (its first word, after the priority) was printed."""
        return any(line.split(">", 1)[-1].split(" ", 1)[0] == event for line in self.lines)

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 30.0) -> int:
        """The exit status, once the process has exited and its output is read; checks that
        output for secrets and unmasked numbers."""
        assert self.proc is not None and self._reader is not None
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await self._reader
        check_output("\n".join(self.lines))
        return code

    def kill(self) -> None:
        """kill -9: no shutdown of any kind."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()

    async def stop(self) -> int:
        """SIGTERM if still running, then reap (test teardown); the exit status."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._reader is not None:
            await self._reader
        return self.proc.returncode if self.proc is not None and self.proc.returncode is not None else 0
