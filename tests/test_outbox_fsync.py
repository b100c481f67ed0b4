"""What the SQLite outbox makes the disk do, counted on its real system calls: strace
attached to this very process (and its writer thread) while the outbox works. Every commit
that holds an accepted entry or an outcome is fsynced before its caller resumes; a commit
of claims alone is not (``SQLiteOutbox._sync_for`` says why that loses nothing)."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from hapsms_relay.outbox_sqlite import SQLiteOutbox
from tests.helpers import eventually, sending, sms_entry


class Syncs:
    """The fsyncs of files under ``where`` (SQLite on Linux calls fdatasync; fsync counted
    too) between steps, a step being marked by a getppid() that strace shows in between."""

    def __init__(self, trace: Path, where: Path) -> None:
        self.trace = trace
        self.where = str(where)

    def step(self) -> None:
        os.getppid()

    def counts(self) -> list[int]:
        """Per step marked, the fsyncs from its mark to the next one (or to the end)."""
        counts: list[int] = []
        for line in self.trace.read_text().splitlines():
            if "getppid(" in line:
                counts.append(0)
            elif counts and ("fdatasync(" in line or "fsync(" in line) and self.where in line:
                counts[-1] += 1
        return counts


@asynccontextmanager
async def traced(where: Path, trace: Path) -> AsyncIterator[Syncs]:
    """strace attached to this process and its threads; a getpgrp() it shows says so."""
    strace = shutil.which("strace")
    assert strace, "make test installs strace (Debian's package)"
    syncs = Syncs(trace, where)
    proc = await asyncio.create_subprocess_exec(
        strace, "-f", "-qq", "-y", "-o", str(trace),
        "-e", "trace=getpgrp,getppid,fdatasync,fsync", "-p", str(os.getpid()))

    def attached() -> bool:
        assert proc.returncode is None, "strace could not attach"
        os.getpgrp()
        return trace.exists() and "getpgrp(" in trace.read_text()

    try:
        await eventually(attached, what="strace attached")
        yield syncs
    finally:
        syncs.step()  # the end of the last step
        proc.terminate()  # strace detaches and writes out what it traced
        await asyncio.wait_for(proc.wait(), 15)


async def test_only_claims_alone_commit_without_an_fsync(tmp_path: Path) -> None:
    """Claims in a transaction of their own are not fsynced, the first ones after a start
    included; an enqueue, an outcome, and a claim that shares its transaction with an
    enqueue each are, once per transaction."""
    (tmp_path / "db").mkdir()
    path = str(tmp_path / "db" / "outbox.db")
    before = SQLiteOutbox(path)  # a relay that accepted messages and stopped
    await before.open()
    await before.enqueue([sms_entry(i) for i in range(6)], 60)
    await before.close()
    outbox = SQLiteOutbox(path)
    await outbox.open()
    try:
        async with traced(tmp_path / "db", tmp_path / "trace") as syncs:
            syncs.step()  # the first claims after a start, a transaction each, and a look
            for _ in range(3):  # for the next due
                assert len(await outbox.claim("t", 1, 1e12, 30)) == 1
            assert await outbox.next_due() is not None
            syncs.step()  # an enqueue
            await outbox.enqueue([sms_entry(6)], 60)
            syncs.step()  # a claim and an enqueue in one transaction
            claimed, _ = await asyncio.gather(outbox.claim("t", 1, 1e12, 30),
                                              outbox.enqueue([sms_entry(7)], 60))
            syncs.step()  # an outcome
            await outbox.sent("p", sending([claimed[0].id]))
            syncs.step()  # claims alone again, after synced commits
            assert len(await outbox.claim("t", 2, 1e12, 30)) == 2
            syncs.step()  # a retry (the claim before it commits on its own)
            (e,) = await outbox.claim("t", 1, 1e12, 30)
            await outbox.retry("t", e.id, 1e12, "p", "later")
    finally:
        await outbox.close()
    counts = syncs.counts()
    assert len(counts) == 7, counts  # six steps and the end
    claims, enqueue, claim_and_enqueue, outcome, claims_again, claim_then_retry, _ = counts
    assert claims == 0
    assert enqueue == 1
    assert claim_and_enqueue == 1
    assert outcome == 1
    assert claims_again == 0
    assert claim_then_retry == 1
