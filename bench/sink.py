"""A loopback stand-in for an SMS HTTP API: answers every POST at once, counts requests and
records when each arrived, so a benchmark can read rates and latencies at the provider side.

    python bench/sink.py --port 9100     # point an `http` provider at http://127.0.0.1:9100/send

Control endpoints: ``GET /stats`` (count, first and last arrival), ``GET /arrivals``
(``[[ref, time], ...]`` for bodies carrying ``"ref"``), ``POST /reset``. Times are
``time.time()``, comparable across processes of one machine.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time
from array import array

import orjson
import uvloop
from aiohttp import web

OK = b'{"ok":true,"status":"0","message_id":"sink"}'
JSON = "application/json"


class Sink:
    """The request handler: every request but the control paths is a message sent."""

    def __init__(self, record: bool = True) -> None:
        self.record = record
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.first = 0.0
        self.last = 0.0
        # arrays, not lists of tuples: a million arrivals stay at 16 MB
        self.refs = array("q")
        self.times = array("d")

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        if path == "/stats":
            return web.Response(body=orjson.dumps(
                {"count": self.count, "first": self.first, "last": self.last}), content_type=JSON)
        if path == "/arrivals":
            pairs = list(zip(self.refs, self.times, strict=True))
            return web.Response(body=orjson.dumps(pairs), content_type=JSON)
        if path == "/reset":
            self.reset()
            return web.Response(body=b'{"ok":true}', content_type=JSON)
        now = time.time()
        body = await request.read()
        self.count += 1
        if not self.first:
            self.first = now
        self.last = now
        if self.record and body:
            try:
                ref = orjson.loads(body).get("ref")
            except (orjson.JSONDecodeError, AttributeError):
                ref = None
            if ref is not None:
                self.refs.append(int(ref))
                self.times.append(now)
        return web.Response(body=OK, content_type=JSON)


async def serve(host: str, port: int, record: bool) -> None:
    server = web.Server(Sink(record), access_log=None)
    runner = web.ServerRunner(server, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=1024, reuse_address=True).start()
    # An instrument: its own collections would show as the relay's latency (an arrival is
    # timed when its handler runs). What start-up built stays out of every collection, and
    # young collections come as rarely as the relay's (hapsms_relay/relay.py, GC_YOUNG).
    gc.freeze()
    gc.set_threshold(5000, *gc.get_threshold()[1:])
    print(f"sink listening on http://{host}:{port}/send", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9100)
    p.add_argument("--no-record", action="store_true", help="count only, keep no arrival times")
    args = p.parse_args()
    try:
        uvloop.run(serve(args.host, args.port, not args.no_record))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
