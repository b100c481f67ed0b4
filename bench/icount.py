"""Instructions per message, counted by valgrind's callgrind: a measure of the relay's CPU
cost that holds on a loaded machine, where rates and CPU times swing with the neighbours.

    python bench/icount.py                     # ingest: delivery paused, type1 bodies
    python bench/icount.py --live              # the pipeline: accepted and delivered
    python bench/icount.py --live --recipients 10 --posts 300

The relay runs under callgrind with instrumentation off until it has started and taken
``--warmup`` posts; then it counts while ``--posts`` posts are acknowledged (and, with
``--live``, until the sink has every message), and prints JSON: instructions per message for
each thread of the relay and in all. Under valgrind the relay runs ~50 times slower: counts,
not times, are what this measures. Needs Debian's ``valgrind``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import uvloop

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))
from run import TOKEN, free_port, pinned, relay_config, wait_http  # noqa: E402

MESSAGE = "您的验证码是123456，感谢您的使用！"


async def post_all(url: str, first: int, posts: int, recipients: int, concurrency: int) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    todo = iter(range(first, first + posts))

    async def worker(session: aiohttp.ClientSession) -> None:
        for n in todo:
            mobiles = [f"139{(n * recipients + i) % 100_000_000:08d}" for i in range(recipients)]
            body = orjson.dumps({"Type": 1, "Data": {"Mobiles": mobiles, "Message": MESSAGE,
                                                     "Signature": "明道云"}})
            async with session.post(url, data=body, headers=headers) as resp:
                await resp.read()
                if resp.status != 200:
                    raise SystemExit(f"icount: the relay answered {resp.status}")

    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))


def sink_count(sink: str) -> int:
    import urllib.request
    with urllib.request.urlopen(sink + "/stats", timeout=5) as resp:  # noqa: S310 - loopback
        return int(json.loads(resp.read())["count"])


def totals(out_dir: Path) -> dict[str, int]:
    """Instructions per thread from callgrind's dumps (``--separate-threads=yes``)."""
    per: dict[str, int] = {}
    for f in sorted(out_dir.glob("callgrind.out*")):
        m = re.search(r"-(\d+)$", f.name)
        thread = ("loop" if m.group(1) == "01" else f"thread{int(m.group(1))}") if m else "all"
        for line in f.read_text(errors="replace").splitlines():
            if line.startswith("totals:"):
                per[thread] = per.get(thread, 0) + int(line.split()[1])
                break
    return per


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--live", action="store_true", help="deliver to the sink (default: paused)")
    p.add_argument("--posts", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--recipients", type=int, default=1)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--work", default=str(ROOT / "var" / "icount"))
    args = p.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("icount: valgrind is missing; apt-get install valgrind")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out_dir = Path(tempfile.mkdtemp(dir=work))
    sink_port = free_port()
    sink = f"http://127.0.0.1:{sink_port}"
    sink_proc = subprocess.Popen(pinned("1", [sys.executable, str(BENCH / "sink.py"), "--port",
                                              str(sink_port), "--no-record"]),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port = free_port()
    outbox = out_dir / "outbox.db"
    cfg = relay_config(out_dir, port, sink_port, outbox, 10_000_000)
    argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes",
            f"--callgrind-out-file={out_dir}/callgrind.out", sys.executable, "-m", "hapsms_relay",
            "serve", "--config", str(cfg)]
    if not args.live:
        argv.append("--pause-delivery")
    log = open(out_dir / "relay.log", "wb")
    relay = subprocess.Popen(pinned("0", argv), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(sink + "/stats", sink_proc)
        wait_http(base + "/healthz", relay, timeout=300)
        url = base + "/sms/webhook"
        uvloop.run(post_all(url, 0, args.warmup, args.recipients, args.concurrency))
        want = sink_count(sink) + args.posts * args.recipients
        if args.live:
            deadline = time.monotonic() + 600
            while sink_count(sink) < args.warmup * args.recipients and time.monotonic() < deadline:
                time.sleep(0.2)
            want = sink_count(sink) + args.posts * args.recipients
        subprocess.run(["callgrind_control", "-i", "on", str(relay.pid)], check=True,
                       capture_output=True)
        uvloop.run(post_all(url, args.warmup, args.posts, args.recipients, args.concurrency))
        if args.live:
            deadline = time.monotonic() + 900
            while sink_count(sink) < want and time.monotonic() < deadline:
                time.sleep(0.2)
        subprocess.run(["callgrind_control", "-i", "off", str(relay.pid)], check=True,
                       capture_output=True)
        subprocess.run(["callgrind_control", "-d", str(relay.pid)], check=True,
                       capture_output=True)
    finally:
        relay.terminate()
        relay.wait(120)
        sink_proc.terminate()
        sink_proc.wait()
        log.close()
    per = totals(out_dir)
    messages = args.posts * args.recipients
    result: dict[str, Any] = {
        "mode": "live" if args.live else "paused", "posts": args.posts,
        "recipients": args.recipients, "out": str(out_dir),
        "instructions_per_message": round(sum(per.values()) / messages),
        "per_thread": {t: round(n / messages) for t, n in per.items() if n},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
