"""The client ceiling: a bare aiohttp client on uvloop posting provider-shaped JSON to the
sink as fast as it can. Pinned to one CPU it is the most the relay's delivery side can hope for.

    taskset -c 0 python bench/client.py --url http://127.0.0.1:9100/send --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import time

import aiohttp
import orjson
import uvloop

TEXT = "【明道云】您的验证码是123456，感谢您的使用！"


async def run(url: str, concurrency: int, duration: float, warmup: float) -> dict[str, float]:
    done = 0
    errors = 0
    stop_at = time.monotonic() + warmup + duration
    window: list[float] = []

    async def worker(session: aiohttp.ClientSession, n: int) -> None:
        nonlocal done, errors
        i = 0
        while time.monotonic() < stop_at:
            i += 1
            body = orjson.dumps({"to": f"+86139{n:04d}{i % 10000:04d}", "text": TEXT,
                                 "ref": str(n * 10**9 + i)})
            async with session.post(url, data=body,
                                    headers={"Content-Type": "application/json"}) as resp:
                await resp.text()
                if resp.status == 200:
                    done += 1
                else:
                    errors += 1

    async def sample() -> None:
        await asyncio.sleep(warmup)
        window.append(time.monotonic())
        window.append(done)
        await asyncio.sleep(duration)
        window.append(time.monotonic())
        window.append(done)

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(sample(), *(worker(session, n) for n in range(concurrency)))
    t0, n0, t1, n1 = window
    return {"client_ceiling_per_s": (n1 - n0) / (t1 - t0), "errors": errors}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:9100/send")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=1.0)
    args = p.parse_args()
    result = uvloop.run(run(args.url, args.concurrency, args.duration, args.warmup))
    print(orjson.dumps(result).decode())


if __name__ == "__main__":
    main()
