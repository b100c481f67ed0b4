"""An open-loop load generator: HAP Type 1 posts at a fixed rate, each sent on schedule
whether or not earlier ones were answered (what wrk2 does; Debian's wrk cannot). With
``--sink`` it then reads the sink's arrival times and prints latency percentiles.

    taskset -c 1 python bench/loadgen.py --url http://127.0.0.1:8080/sms/webhook \\
        --token dev-token --rate 1000 --duration 10 --sink http://127.0.0.1:9100

Latency is measured from the scheduled send time (so a stalled relay cannot hide queued
requests: no coordinated omission) and, separately, from the moment the 200 arrived.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import time
from typing import Any

import aiohttp
import orjson
import uvloop

MESSAGE = "您的验证码是123456，感谢您的使用！"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


async def run(url: str, token: str, rate: float, duration: float, sink: str | None,
              settle: float) -> dict[str, Any]:
    sent: dict[int, tuple[float, float]] = {}  # id -> (scheduled, acknowledged)
    failures: dict[str, int] = {}
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    seq = int(time.time()) % 10_000_000

    async def post(session: aiohttp.ClientSession, scheduled: float, n: int) -> None:
        body = orjson.dumps({"Type": 1, "Data": {"Mobiles": [f"139{n % 100_000_000:08d}"],
                                                "Message": MESSAGE, "Signature": "明道云"}})
        try:
            async with session.post(url, data=body, headers=headers) as resp:
                answer = await resp.read()
                acked = time.time()
                if resp.status != 200:
                    failures[str(resp.status)] = failures.get(str(resp.status), 0) + 1
                    return
        except (aiohttp.ClientError, OSError) as exc:
            failures[type(exc).__name__] = failures.get(type(exc).__name__, 0) + 1
            return
        for i in orjson.loads(answer)["ids"]:
            sent[int(i)] = (scheduled, acked)

    total = int(rate * duration)
    tasks: set[asyncio.Task[None]] = set()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        # An instrument: a collection here delays the posts scheduled meanwhile, and the
        # delay would be counted as the relay's latency. No collection runs while posting
        # (a bounded run: rate x duration posts).
        gc.freeze()
        gc.disable()
        start = time.time() + 0.05
        for k in range(total):
            scheduled = start + k / rate
            delay = scheduled - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(post(session, scheduled, seq + k))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        lag = time.time() - (start + (total - 1) / rate)
        if tasks:
            await asyncio.wait(tasks, timeout=30)
        gc.enable()
        result: dict[str, Any] = {"requests": total, "acknowledged": len(sent),
                                  "failures": failures, "offered_rate": rate,
                                  "generator_lag_ms": round(lag * 1000, 1)}
        if sink is None:
            return result
        deadline = time.time() + settle
        arrivals: dict[int, float] = {}
        while time.time() < deadline:
            async with session.get(sink.rstrip("/") + "/arrivals") as resp:
                arrivals = {int(r): t for r, t in orjson.loads(await resp.read())}
            if all(i in arrivals for i in sent):
                break
            await asyncio.sleep(0.5)
    from_post = [(arrivals[i] - s) * 1000 for i, (s, _) in sent.items() if i in arrivals]
    from_ack = [(arrivals[i] - a) * 1000 for i, (_, a) in sent.items() if i in arrivals]
    result.update({
        "arrived": len(from_post),
        "post_p50_ms": percentile(from_post, 50), "post_p99_ms": percentile(from_post, 99),
        "post_max_ms": max(from_post, default=float("nan")),
        "ack_p50_ms": percentile(from_ack, 50), "ack_p99_ms": percentile(from_ack, 99),
    })
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8080/sms/webhook")
    p.add_argument("--token", default=os.environ.get("HAPSMS_TOKEN", "dev-token"))
    p.add_argument("--rate", type=float, default=1000.0, help="posts per second")
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--sink", help="the sink's base URL, to compute latencies")
    p.add_argument("--settle", type=float, default=30.0,
                   help="seconds to wait for the last messages to reach the sink")
    args = p.parse_args()
    result = uvloop.run(run(args.url, args.token, args.rate, args.duration, args.sink, args.settle))
    print(orjson.dumps(result).decode())


if __name__ == "__main__":
    main()
