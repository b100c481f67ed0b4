"""`make bench-cluster`: PostgreSQL and two relays on this machine, in one run beside a
single SQLite relay: ingest and delivered messages per second, p99 from post to the sink at
1,000 messages/s, and per-node RSS. Relays on CPU 0, wrk, the sink and the load generator
on CPU 1, PostgreSQL unpinned (a throwaway server: tests/pg_server.py).

    python bench/cluster.py            # the full run (about two minutes)
    python bench/cluster.py --smoke    # every stage for a second or two, no thresholds

Targets (docs/cluster.md): one relay on PostgreSQL ingests at least half as fast as the
SQLite relay of the same run; p99 at 1,000 messages/s within 10 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.run import (
    BENCH,
    FULL,
    LOAD_CPU,
    PY,
    ROOT,
    RSS,
    SERVER_CPU,
    SMOKE,
    TOKEN,
    Plan,
    free_port,
    fresh,
    get_json,
    get_json_post,
    pinned,
    process,
    relay_config,
    sink_count,
    wrk,
)
from tests.pg_server import PostgresServer


def pg_relay_config(work: Path, port: int, sink_port: int, url: str, node: str) -> Path:
    """The SQLite bench config with its outbox on PostgreSQL."""
    path = relay_config(work, port, sink_port, work / "unused.db", 1_000_000)
    text = path.read_text().replace(
        f'path = "{work / "unused.db"}"',
        f'backend = "postgres"\nurl = "{url}"\nnode = "{node}"')
    path.write_text(text)
    return path


@contextlib.contextmanager
def relay(config: Path, work: Path, *, paused: bool = False) -> Iterator[tuple[Any, str]]:
    port = int(config.read_text().split('listen = "127.0.0.1:', 1)[1].split('"', 1)[0])
    argv = [PY, "-m", "hapsms_relay", "serve", "--config", str(config)]
    if paused:
        argv.append("--pause-delivery")
    base = f"http://127.0.0.1:{port}"
    with process(pinned(SERVER_CPU, argv), base + "/healthz", work / "relay.log") as proc:
        yield proc, base


def run(plan: Plan, work: Path) -> dict[str, Any]:
    r: dict[str, Any] = {}
    work.mkdir(parents=True, exist_ok=True)
    (work / "relay.log").unlink(missing_ok=True)
    say = lambda *a: print("bench-cluster:", *a, file=sys.stderr, flush=True)  # noqa: E731

    server = PostgresServer()
    server.init()
    server.start()
    try:
        sink_port = free_port()
        sink = f"http://127.0.0.1:{sink_port}"
        with process(pinned(LOAD_CPU, [PY, str(BENCH / "sink.py"), "--port", str(sink_port)]),
                     sink + "/stats"):
            say("1/4 ingest: one SQLite relay, delivery paused")
            cfg = relay_config(work, free_port(), sink_port, fresh(work / "cluster-sqlite.db"),
                               1_000_000)
            with relay(cfg, work, paused=True) as (proc, base), RSS(proc.pid) as rss:
                url = base + "/sms/webhook"
                wrk(url, "type1.lua", plan, plan.warmup)
                r["sqlite_ingest"] = wrk(url, "type1.lua", plan, plan.duration)
            r["rss_sqlite_mb"] = rss.mb

            say("2/4 ingest: one relay on PostgreSQL, delivery paused")
            cfg = pg_relay_config(work, free_port(), sink_port, server.database(), "solo")
            with relay(cfg, work, paused=True) as (proc, base), RSS(proc.pid) as rss:
                url = base + "/sms/webhook"
                wrk(url, "type1.lua", plan, plan.warmup)
                r["pg_ingest"] = wrk(url, "type1.lua", plan, plan.duration)
            r["rss_pg_mb"] = rss.mb

            say("3/4 two relays on one database: wrk on each while both deliver to the sink")
            url = server.database()
            configs = [pg_relay_config(work, free_port(), sink_port, url, f"node{i}")
                       for i in range(2)]
            with relay(configs[0], work) as (p0, b0), relay(configs[1], work) as (p1, b1), \
                    RSS(p0.pid) as rss0, RSS(p1.pid) as rss1, ThreadPoolExecutor(2) as pool:
                half = Plan(**{**plan.__dict__, "connections": max(1, plan.connections // 2)})
                get_json_post(sink + "/reset")
                n0, t0 = sink_count(sink)
                posts = [pool.submit(wrk, b + "/sms/webhook", "type1.lua", half, plan.duration)
                         for b in (b0, b1)]
                ingest = [f.result() for f in posts]
                n1, t1 = sink_count(sink)
                r["cluster_ingest_rps"] = sum(i["rps"] for i in ingest)
                r["cluster_delivered_per_s"] = (n1 - n0) / (t1 - t0)
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline and any(
                        int(get_json(b + "/readyz")["undelivered"]) for b in (b0, b1)):
                    time.sleep(0.2)

                say("4/4 latency: 1,000 messages/s posted to one relay of two, post -> sink")
                get_json_post(sink + "/reset")
                out = subprocess.run(
                    pinned(LOAD_CPU, [PY, str(BENCH / "loadgen.py"), "--url", b0 + "/sms/webhook",
                                      "--token", TOKEN, "--rate", str(plan.latency_rate),
                                      "--duration", str(plan.latency_duration), "--sink", sink]),
                    capture_output=True, text=True, check=True, cwd=ROOT).stdout
                r["latency"] = json.loads(out)
            r["rss_node_mb"] = [rss0.mb, rss1.mb]
    finally:
        server.cleanup()
    return r


def report(r: dict[str, Any]) -> str:
    sq, pg = r["sqlite_ingest"]["rps"], r["pg_ingest"]["rps"]
    lat = r["latency"]
    rows = [
        ("sqlite ingest_rps", f"{sq:,.0f}", f"one SQLite relay (non-2xx {r['sqlite_ingest']['non2xx']})"),
        ("postgres ingest_rps", f"{pg:,.0f}",
         f"one relay on PostgreSQL (non-2xx {r['pg_ingest']['non2xx']})"),
        ("cluster ingest_rps", f"{r['cluster_ingest_rps']:,.0f}", "two relays, wrk on each, delivering"),
        ("cluster delivered_per_s", f"{r['cluster_delivered_per_s']:,.0f}", "at the sink, same window"),
        ("latency p50 / p99 (ms)", f"{lat['post_p50_ms']:.1f} / {lat['post_p99_ms']:.1f}",
         f"post -> sink at {lat['offered_rate']:.0f} msg/s; {lat['arrived']}/{lat['requests']} arrived"),
        ("rss (MB)", f"{max(r['rss_node_mb']):.1f}",
         f"per cluster node {r['rss_node_mb'][0]:.1f} / {r['rss_node_mb'][1]:.1f}; "
         f"solo PostgreSQL relay {r['rss_pg_mb']:.1f}; SQLite relay {r['rss_sqlite_mb']:.1f}"),
    ]
    width = max(len(a) for a, _, _ in rows)
    lines = [f"{a:<{width}}  {b:>14}  {c}" for a, b, c in rows]
    lines.append(f"RESULT pg_ingest_ratio={pg / sq:.3f} p99_ms={lat['post_p99_ms']:.2f} "
                 f"sqlite_ingest_rps={sq:.0f} pg_ingest_rps={pg:.0f} "
                 f"cluster_ingest_rps={r['cluster_ingest_rps']:.0f} "
                 f"cluster_delivered_per_s={r['cluster_delivered_per_s']:.0f} "
                 f"rss_node_mb={max(r['rss_node_mb']):.1f}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="a second or two per stage (CI)")
    p.add_argument("--work", default=str(ROOT / "var" / "bench"), help="scratch directory (on disk)")
    p.add_argument("--json", help="also write the raw figures here")
    args = p.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("bench-cluster: wrk is missing; install Debian's package: apt-get install wrk")
    results = run(SMOKE if args.smoke else FULL, Path(args.work))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(report(results))


if __name__ == "__main__":
    main()
