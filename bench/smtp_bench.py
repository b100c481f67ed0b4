"""Messages per second through the ``smtp`` provider's connection pool to a local aiosmtpd.

The server runs in a child process pinned to its own CPU (``--server-cpu``), so the figure is
the relay side's; the client's own CPU time per message is reported too, which gives what one
core can push when the server is not the limit. ``--server-cpu same`` runs both on one CPU.
Run with ``make bench-smtp`` (which pins the client with taskset).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from typing import Any

import aiohttp
import uvloop

from hapsms_relay.providers.base import Common, Message
from hapsms_relay.providers.smtp import SmtpProvider
from hapsms_relay.table import Table

TEXT = "您的验证码是123456，感谢您的使用！"


class CountingHandler:
    """Accept every mail; the bench only needs the server to answer like a real one."""

    def __init__(self) -> None:
        self.mails = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.mails += 1
        return "250 OK queued"


def serve() -> None:
    """Child process: aiosmtpd on 127.0.0.1:0; print the port, serve until stdin closes."""
    from aiosmtpd.smtp import SMTP

    async def main() -> None:
        loop = asyncio.get_running_loop()
        handler = CountingHandler()
        server = await loop.create_server(
            lambda: SMTP(handler, hostname="bench.local", loop=loop), "127.0.0.1", 0
        )
        print(server.sockets[0].getsockname()[1], flush=True)
        await loop.run_in_executor(None, sys.stdin.read)  # until the parent closes stdin
        server.close()

    uvloop.run(main())


async def run(port: int, total: int, concurrency: int) -> dict[str, float]:
    table = Table({"host": "127.0.0.1", "port": port, "tls": "none", "allow_plaintext": True,
                   "from": "sms@bench.local", "to": "{digits}@sms.bench.local"})
    provider = SmtpProvider.from_config(Common("bench", "smtp", concurrency, 10.0), table)
    table.done()
    sem = asyncio.Semaphore(concurrency)  # what the dispatcher does per provider

    async def one(i: int) -> None:
        m = Message(i, "sms", f"+86138{i:08d}", "CN", f"138{i:08d}", TEXT, "明道云")
        async with sem:
            (outcome,) = await provider.send([m])
        if outcome is not None:
            raise SystemExit(f"message {i} failed: {outcome.reason()}")

    async with aiohttp.ClientSession() as session:
        await provider.open(session)
        await asyncio.gather(*(one(-i - 1) for i in range(concurrency)))  # warm the pool
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(total)))
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        opened = provider.pool.opened
        await provider.close()
    return {"wall": wall, "cpu": cpu, "opened": opened}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--server-cpu", default="1",
                        help="CPU for the aiosmtpd child process, or 'same' for the client's")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve()
        return
    client_cpus = sorted(os.sched_getaffinity(0))
    server_cpus = client_cpus if args.server_cpu == "same" else [int(args.server_cpu)]
    child = subprocess.Popen(
        ["taskset", "-c", ",".join(map(str, server_cpus)), sys.executable, __file__, "--serve"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        r = uvloop.run(run(port, args.messages, args.concurrency))
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(10)
    n = args.messages
    print(f"smtp bench: {n} messages, concurrency {args.concurrency}, client on CPU "
          f"{','.join(map(str, client_cpus))}, aiosmtpd on CPU {','.join(map(str, server_cpus))}")
    print(f"  throughput      {n / r['wall']:8.0f} messages/s  ({r['wall']:.2f} s wall)")
    print(f"  client CPU      {r['cpu'] / n * 1e6:8.0f} us/message  "
          f"(one core could drive {n / r['cpu']:.0f} messages/s if the server kept up)")
    print(f"  connections     {r['opened']:8.0f} opened for {n + args.concurrency} messages")


if __name__ == "__main__":
    main()
