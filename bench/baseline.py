"""The stack's ceiling: a bare aiohttp low-level server on uvloop that parses the body with
orjson and answers 200, nothing else. ``ingest_rps`` is measured against this.

    taskset -c 0 python bench/baseline.py --port 9200
    taskset -c 1 wrk -t1 -c64 -d10s -s bench/wrk/type1.lua http://127.0.0.1:9200/sms/webhook
"""

from __future__ import annotations

import argparse
import asyncio

import orjson
import uvloop
from aiohttp import web

OK = b'{"ok":true,"ids":["1"]}'


async def handle(request: web.BaseRequest) -> web.Response:
    doc = orjson.loads(await request.read())
    return web.Response(body=OK if doc else b"{}", content_type="application/json")


async def serve(host: str, port: int) -> None:
    runner = web.ServerRunner(web.Server(handle, access_log=None), handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=1024, reuse_address=True).start()
    print(f"baseline listening on http://{host}:{port}/", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9200)
    args = p.parse_args()
    try:
        uvloop.run(serve(args.host, args.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
