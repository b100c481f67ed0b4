"""`make bench`: every stage in one run, server on CPU 0, load and sink on CPU 1, then the
table and the ``RESULT`` line. Ratios come from one run so a noisy machine cannot fake them.

    python bench/run.py            # the full run (about three minutes)
    python bench/run.py --smoke    # every stage for a second or two, no thresholds (CI)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PY = sys.executable
TOKEN = "bench-token-7d1e"
SERVER_CPU, LOAD_CPU = "0", "1"


@dataclass
class Plan:
    duration: float  # seconds measured per stage
    warmup: float
    connections: int
    backlog: int  # messages in the backlog stage
    backlog_window: float
    latency_rate: float
    latency_duration: float
    pipeline_cap: int  # queue.max_pending in the pipeline stage
    pipeline_depth: int  # the outbox depth the pipeline's offered load holds (messages)


FULL = Plan(10, 2, 64, 1_000_000, 15, 1000, 10, 2000, 500)
SMOKE = Plan(1.5, 0.5, 16, 20_000, 1.5, 1000, 1.5, 2000, 500)


# -- processes ---------------------------------------------------------------------------------

def pinned(cpu: str, argv: list[str]) -> list[str]:
    return ["taskset", "-c", cpu, *argv] if shutil.which("taskset") else argv


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - loopback only
        return json.loads(resp.read())


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bench: {proc.args} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):  # noqa: S310 - loopback only
                return
        except urllib.error.HTTPError:  # it answered: it is up
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"bench: {url} did not answer within {timeout}s")


@contextlib.contextmanager
def process(argv: list[str], ready_url: str, log: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    out = open(log, "ab") if log else subprocess.DEVNULL
    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        wait_http(ready_url, proc)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if log:
            out.close()  # type: ignore[union-attr]


class RSS:
    """Peak resident set of a process over a phase, sampled every 20 ms."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def now_kb(self) -> int:
        with open(f"/proc/{self.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def __enter__(self) -> RSS:
        self.peak_kb = self.now_kb()

        def sample() -> None:
            while not self._stop.wait(0.02):
                with contextlib.suppress(OSError):
                    self.peak_kb = max(self.peak_kb, self.now_kb())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()

    @property
    def mb(self) -> float:
        return self.peak_kb / 1024


# -- tools -------------------------------------------------------------------------------------

def wrk(url: str, script: str, plan: Plan, duration: float,
        env: dict[str, str] | None = None) -> dict[str, float]:
    """Run wrk on the load CPU; requests/s counting only 2xx answers, and the non-2xx count."""
    argv = pinned(LOAD_CPU, ["wrk", "-t1", f"-c{plan.connections}", f"-d{max(1, round(duration))}s",
                             "--timeout", "10s", "-s", str(BENCH / "wrk" / script), url])
    full_env = {**os.environ, "HAPSMS_TOKEN": TOKEN, **(env or {})}
    out = subprocess.run(argv, env=full_env, capture_output=True, text=True, check=True).stdout
    m = re.search(r"(\d+) requests in ([\d.]+)(ms|s|m)\b", out)
    assert m is not None, out
    total = int(m.group(1))
    secs = float(m.group(2)) * {"s": 1, "ms": 0.001, "m": 60}[m.group(3)]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    non2xx = int(bad.group(1)) if bad else 0
    return {"rps": (total - non2xx) / secs, "requests": total, "non2xx": non2xx,
            "socket_errors": errors.group(1) if errors else ""}  # type: ignore[dict-item]


def relay_config(work: Path, port: int, sink_port: int, outbox: Path, max_pending: int) -> Path:
    text = f"""
log_level = "info"

[server]
listen = "127.0.0.1:{port}"
tokens = ["{TOKEN}"]

[queue]
path = "{outbox}"
max_pending = {max_pending}
ttl = "1d"

[[providers]]
name = "sink"
type = "http"
url = "http://127.0.0.1:{sink_port}/send"
body = {{ to = "{{to}}", text = "{{message}}", ref = "{{id}}" }}
concurrency = 64
timeout = "5s"

[routes]
sms = ["sink"]
voice = ["sink"]
"""
    path = work / f"relay-{port}.toml"
    path.write_text(text)
    return path


def fresh(path: Path) -> Path:
    for suffix in ("", "-wal", "-shm", ".lock"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    return path


@contextlib.contextmanager
def relay(work: Path, sink_port: int, outbox: Path, *, paused: bool = False,
          max_pending: int = 1_000_000) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    port = free_port()
    cfg = relay_config(work, port, sink_port, outbox, max_pending)
    argv = [PY, "-m", "hapsms_relay", "serve", "--config", str(cfg)]
    if paused:
        argv.append("--pause-delivery")
    base = f"http://127.0.0.1:{port}"
    with process(pinned(SERVER_CPU, argv), base + "/healthz", work / "relay.log") as proc:
        yield proc, base


def undelivered(base: str) -> int:
    return int(get_json(base + "/readyz")["undelivered"])


class Offer:
    """The pipeline stage's offered load: wrk paced (``HAPSMS_RATE_FILE``, wrk/common.lua) at
    the rate the sink receives plus what brings the outbox back to ``depth`` messages within
    ``settle`` seconds, looked at every 0.1 s. The relay then delivers at what it can while
    refusing next to nothing: refused posts (``queue_full``) would cost it CPU for nothing
    delivered, and an outbox growing without end would measure the benchmark, not the relay.
    """

    def __init__(self, base: str, sink: str, rate_file: Path, depth: int, per_post: int,
                 settle: float = 0.5) -> None:
        self.base, self.sink, self.rate_file = base, sink, rate_file
        self.depth, self.per_post, self.settle = depth, per_post, settle
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._control, daemon=True)
        self.write(depth / settle / per_post)

    def write(self, posts_per_s: float) -> None:
        tmp = self.rate_file.with_suffix(".tmp")
        tmp.write_text(f"{max(posts_per_s, 10.0):.1f}\n")
        tmp.replace(self.rate_file)  # wrk never reads half a number

    def _control(self) -> None:
        seen: list[tuple[float, int]] = []  # (time, sink count): the last half second
        while not self._stop.wait(0.1):
            with contextlib.suppress(OSError, ValueError, KeyError):
                n, t = sink_count(self.sink)
                seen = [*seen, (t, n)][-6:]
                rate = (n - seen[0][1]) / (t - seen[0][0]) if t > seen[0][0] else 0.0
                msgs = rate + (self.depth - undelivered(self.base)) / self.settle
                self.write(msgs / self.per_post)

    def __enter__(self) -> Offer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def sink_count(sink: str) -> tuple[int, float]:
    return int(get_json(sink + "/stats")["count"]), time.monotonic()


# -- stages ------------------------------------------------------------------------------------

def run(plan: Plan, work: Path) -> dict[str, Any]:
    r: dict[str, Any] = {}
    work.mkdir(parents=True, exist_ok=True)
    (work / "relay.log").unlink(missing_ok=True)
    say = lambda *a: print("bench:", *a, file=sys.stderr, flush=True)  # noqa: E731

    say("1/6 baseline: bare aiohttp server + orjson")
    port = free_port()
    with process(pinned(SERVER_CPU, [PY, str(BENCH / "baseline.py"), "--port", str(port)]),
                 f"http://127.0.0.1:{port}/"):
        url = f"http://127.0.0.1:{port}/sms/webhook"
        wrk(url, "type1.lua", plan, plan.warmup)
        r["baseline"] = wrk(url, "type1.lua", plan, plan.duration)
        r["baseline_x10"] = wrk(url, "type1x10.lua", plan, plan.duration / 2)

    sink_port = free_port()
    sink = f"http://127.0.0.1:{sink_port}"
    with process(pinned(LOAD_CPU, [PY, str(BENCH / "sink.py"), "--port", str(sink_port)]),
                 sink + "/stats"):
        say("2/6 ingest: relay, delivery paused")
        with relay(work, sink_port, fresh(work / "ingest.db"), paused=True) as (proc, base):
            time.sleep(plan.warmup)
            with RSS(proc.pid) as idle:
                time.sleep(plan.warmup)
            r["rss_idle_mb"] = idle.mb
            url = base + "/sms/webhook"
            wrk(url, "type1.lua", plan, plan.warmup)
            with RSS(proc.pid) as load:
                r["ingest"] = wrk(url, "type1.lua", plan, plan.duration)
            r["rss_ingest_mb"] = load.mb
            r["ingest_x10"] = wrk(url, "type1x10.lua", plan, plan.duration / 2)
            r["ingest_voice"] = wrk(url, "type2.lua", plan, plan.duration / 2)

        say("3/6 client ceiling: bare aiohttp client -> sink")
        out = subprocess.run(
            pinned(SERVER_CPU, [PY, str(BENCH / "client.py"), "--url", sink + "/send",
                                "--duration", str(plan.duration), "--warmup", str(plan.warmup)]),
            capture_output=True, text=True, check=True).stdout
        r["client"] = json.loads(out)

        say("4/6 pipeline: wrk posting while the relay delivers to the sink")
        with relay(work, sink_port, fresh(work / "pipeline.db"),
                   max_pending=plan.pipeline_cap) as (proc, base):
            url = base + "/sms/webhook"
            r["pipeline"] = {}
            rate_file = work / "offered-rate"
            with RSS(proc.pid) as load, ThreadPoolExecutor(1) as pool:
                for script, per_post in (("type1.lua", 1), ("type1x10.lua", 10)):
                    offer = Offer(base, sink, rate_file, plan.pipeline_depth, per_post)
                    warmup = plan.warmup + 1  # the offered rate settles first
                    with offer:
                        # wrk runs past both ends of the window measured at the sink
                        posting = pool.submit(wrk, url, script, plan, warmup + plan.duration + 1,
                                              {"HAPSMS_RATE_FILE": str(rate_file)})
                        time.sleep(warmup)
                        depth0, (n0, t0) = undelivered(base), sink_count(sink)
                        time.sleep(plan.duration)
                        depth1, (n1, t1) = undelivered(base), sink_count(sink)
                        posted = posting.result()
                    r["pipeline"][script] = {
                        "rate": (n1 - n0) / (t1 - t0), "depth_start": depth0, "depth_end": depth1,
                        "posts": posted["requests"], "refused": posted["non2xx"],
                    }
                    deadline = time.monotonic() + 60
                    while undelivered(base) and time.monotonic() < deadline:
                        time.sleep(0.1)
            r["rss_pipeline_mb"] = load.mb

            say("5/6 latency: open-loop posts at a fixed rate")
            time.sleep(0.5)
            get_json_post(sink + "/reset")
            out = subprocess.run(
                pinned(LOAD_CPU, [PY, str(BENCH / "loadgen.py"), "--url", url, "--token", TOKEN,
                                  "--rate", str(plan.latency_rate),
                                  "--duration", str(plan.latency_duration), "--sink", sink]),
                capture_output=True, text=True, check=True).stdout
            r["latency"] = json.loads(out)

        say(f"6/6 backlog: {plan.backlog} pending messages, draining")
        db = work / "backlog.db"
        subprocess.run([PY, str(BENCH / "backlog.py"), str(db), "--count", str(plan.backlog)],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        with relay(work, sink_port, db) as (proc, base), RSS(proc.pid) as drain:
            time.sleep(plan.warmup)
            (n0, t0) = sink_count(sink)
            time.sleep(plan.backlog_window)
            (n1, t1) = sink_count(sink)
            r["backlog"] = {"rate": (n1 - n0) / (t1 - t0), "left": undelivered(base)}
        r["rss_backlog_mb"] = drain.mb
    return r


def get_json_post(url: str) -> Any:
    req = urllib.request.Request(url, data=b"", method="POST")  # noqa: S310 - loopback only
    with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310 - loopback only
        return json.loads(resp.read())


# -- report ------------------------------------------------------------------------------------

def efficiency(delivered: float, accept_rps: float, per_post: int, client: float) -> float:
    """Delivered messages/s over what a bare server and a bare client taking turns on one
    CPU could accept and forward: ``1 / (1 / (accept_rps * per_post) + 1 / client)``."""
    return delivered * (1 / (accept_rps * per_post) + 1 / client)


def report(r: dict[str, Any]) -> str:
    base = r["baseline"]["rps"]
    base10 = r["baseline_x10"]["rps"]
    ingest = r["ingest"]["rps"]
    pipe = r["pipeline"]["type1.lua"]
    pipe10 = r["pipeline"]["type1x10.lua"]
    ceiling = r["client"]["client_ceiling_per_s"]
    eff = efficiency(pipe["rate"], base, 1, ceiling)
    eff10 = efficiency(pipe10["rate"], base10, 10, ceiling)
    lat = r["latency"]
    rss_load = max(r["rss_ingest_mb"], r["rss_pipeline_mb"])

    def offered(p: dict[str, Any]) -> str:
        return (f"outbox {p['depth_start']} -> {p['depth_end']}, "
                f"{p['refused']:,} of {p['posts']:,} posts refused")

    rows = [
        ("baseline_rps", f"{base:,.0f}", "bare aiohttp + orjson, wrk type1"),
        ("baseline_msgs_per_s type1x10", f"{base10 * 10:,.0f}",
         f"{base10:,.0f} bodies/s of 10 recipients"),
        ("ingest_rps", f"{ingest:,.0f}", f"relay, delivery paused (non-2xx {r['ingest']['non2xx']})"),
        ("ingest_msgs_per_s type1x10", f"{r['ingest_x10']['rps'] * 10:,.0f}",
         f"{r['ingest_x10']['rps']:,.0f} bodies/s of 10 recipients"),
        ("ingest_rps type2", f"{r['ingest_voice']['rps']:,.0f}", "voice codes"),
        ("client_ceiling_per_s", f"{ceiling:,.0f}", "bare aiohttp client -> sink, one CPU"),
        ("delivered_per_s", f"{pipe['rate']:,.0f}", f"type1 bodies; {offered(pipe)}"),
        ("delivered_per_s type1x10", f"{pipe10['rate']:,.0f}", offered(pipe10)),
        ("pipeline_efficiency", f"{eff:.3f}",
         f"type1: {1e6 / pipe['rate']:.0f} us per message, the bare parts "
         f"{1e6 / base + 1e6 / ceiling:.0f}" if pipe["rate"] else "type1"),
        ("pipeline_efficiency type1x10", f"{eff10:.3f}",
         f"{1e6 / pipe10['rate']:.0f} us per message, the bare parts "
         f"{1e6 / base10 / 10 + 1e6 / ceiling:.0f}" if pipe10["rate"] else ""),
        ("latency p50 / p99 (ms)", f"{lat['post_p50_ms']:.1f} / {lat['post_p99_ms']:.1f}",
         f"post -> sink at {lat['offered_rate']:.0f} msg/s; max {lat['post_max_ms']:.1f}; "
         f"{lat['arrived']}/{lat['requests']} arrived"),
        ("ack latency p50 / p99 (ms)", f"{lat['ack_p50_ms']:.1f} / {lat['ack_p99_ms']:.1f}",
         "from the 200 to the sink"),
        ("rss idle (MB)", f"{r['rss_idle_mb']:.1f}", ""),
        ("rss full load (MB)", f"{rss_load:.1f}",
         f"ingest {r['rss_ingest_mb']:.1f}, pipeline {r['rss_pipeline_mb']:.1f}"),
        ("rss backlog draining (MB)", f"{r['rss_backlog_mb']:.1f}",
         f"draining at {r['backlog']['rate']:,.0f}/s, {r['backlog']['left']:,} left"),
    ]
    width = max(len(a) for a, _, _ in rows)
    lines = [f"{a:<{width}}  {b:>14}  {c}" for a, b, c in rows]
    lines.append(
        f"RESULT pipeline_efficiency={eff:.3f} pipeline_efficiency_x10={eff10:.3f} "
        f"ingest_ratio={ingest / base:.3f} p99_ms={lat['post_p99_ms']:.2f} "
        f"ack_p99_ms={lat['ack_p99_ms']:.2f} rss_load_mb={rss_load:.1f} "
        f"rss_backlog_mb={r['rss_backlog_mb']:.1f} baseline_rps={base:.0f} "
        f"baseline_x10_rps={base10:.0f} ingest_rps={ingest:.0f} "
        f"delivered_per_s={pipe['rate']:.0f} delivered_per_s_x10={pipe10['rate']:.0f} "
        f"client_ceiling_per_s={ceiling:.0f} refused={pipe['refused']} "
        f"refused_x10={pipe10['refused']}"
    )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="a second or two per stage (CI)")
    p.add_argument("--work", default=str(ROOT / "var" / "bench"), help="scratch directory (on disk)")
    p.add_argument("--json", help="also write the raw figures here")
    args = p.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("bench: wrk is missing; install Debian's package: apt-get install wrk")
    if shutil.which("taskset") is None:
        print("bench: taskset not found (util-linux); running unpinned", file=sys.stderr)
    results = run(SMOKE if args.smoke else FULL, Path(args.work))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(report(results))


if __name__ == "__main__":
    main()
