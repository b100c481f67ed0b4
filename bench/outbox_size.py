"""Outbox bytes per message: N posts of HAP's sample code SMS to a relay on loopback (the
file provider), waiting or sent, then the file's size after a checkpoint and VACUUM.
The figures in docs/operations.md, "Disk sizing".

    python bench/outbox_size.py --count 5000
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import tempfile
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.helpers import base_config, start_relay

TEXT = "您的验证码是{:06d}，感谢您的使用！"


async def measure(count: int, deliver: bool) -> float:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d)
        relay = await start_relay(base_config(path, queue={"housekeeping": "1h"}), paused=not deliver)
        async with aiohttp.ClientSession() as session:
            for start in range(0, count, 100):
                await asyncio.gather(*(relay.post(session, {"Type": 1, "Data": {
                    "Mobiles": [f"13800{i:06d}"], "Message": TEXT.format(i), "Signature": "明道云"}})
                    for i in range(start, min(start + 100, count))))
        if deliver:
            await relay.settled(sent=count)
        await relay.stop()
        db = sqlite3.connect(path / "outbox.db")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.execute("VACUUM")
        db.close()
        return (path / "outbox.db").stat().st_size / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=5000)
    args = parser.parse_args()
    for deliver in (False, True):
        size = asyncio.run(measure(args.count, deliver))
        print(f"{'sent' if deliver else 'waiting'}: {size:.0f} bytes/message ({args.count} messages)")


if __name__ == "__main__":
    main()
