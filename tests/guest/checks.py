"""The checks `make test-systemd` runs inside the booted guest, as root, against the real
systemd (PID 1), after `make install` from the checkout. Standard library only.

Usage: python3 checks.py PORT. Prints one line per check ("ok ..." / "FAIL ..." / "skip ...")
and exits 1 if any failed.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

UNIT = "hapsms-relay.service"
SOCKET = "hapsms-relay.socket"
CONFIG = Path("/etc/hapsms-relay/config.toml")
SENT = Path("/var/lib/hapsms-relay/sent.jsonl")
TOKEN = Path("/etc/hapsms-relay/credentials/webhook-token").read_text().strip()
RELOAD_TOKEN = "reload-token-5b7e"
NUMBER = "13800138000"
MAX_EXPOSURE = 1.5
PORT = int(sys.argv[1])
failures: list[str] = []


def say(status: str, what: str) -> None:
    print(f"{status} {what}", flush=True)
    if status == "FAIL":
        failures.append(what)


def check(ok: bool, what: str, detail: str = "") -> bool:
    say("ok" if ok else "FAIL", what + ("" if ok or not detail else f": {detail}"))
    return ok


def run(*args: str, check_rc: bool = False) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if check_rc and done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} exited {done.returncode}: {done.stderr}")
    return done


def show(prop: str, unit: str = UNIT) -> str:
    return run("systemctl", "show", "-P", prop, unit).stdout.strip()


def until(predicate: Callable[[], bool], timeout: float, what: str) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            say("FAIL", f"timed out after {timeout:g}s waiting for {what}")
            return False
        time.sleep(0.1)
    return True


def post(token: str = TOKEN, key: str | None = None, number: str = NUMBER,
         conn: http.client.HTTPConnection | None = None) -> tuple[int, dict[str, object]]:
    own = conn is None
    c = conn or http.client.HTTPConnection("127.0.0.1", PORT, timeout=60)
    body = json.dumps({"Type": 1, "Data": {"Mobiles": [number], "Message": "您的验证码是123456",
                                           "Signature": "明道云"}})
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    if key:
        headers["Idempotency-Key"] = key
    try:
        c.request("POST", "/sms/webhook", body, headers)
        r = c.getresponse()
        return r.status, json.loads(r.read() or b"{}")
    finally:
        if own:
            c.close()


def delivered() -> Counter[str]:
    lines = SENT.read_bytes().splitlines() if SENT.exists() else []
    return Counter(json.loads(line)["id"] for line in lines)


def journal(*args: str) -> str:
    return run("journalctl", "--no-pager", "-o", "cat", "-u", UNIT, *args).stdout


def reload_ok() -> bool:
    return run("systemctl", "reload", UNIT).returncode == 0


def results_success(step: str) -> None:
    check(show("Result") == "success", f"syscall filter (kill on filtered call): {step} "
          f"ends with Result=success", f"Result={show('Result')}")


# -- the checks -------------------------------------------------------------------------------

def socket_activation() -> None:
    check("/etc/systemd/system/hapsms-relay.service.d/test.conf" in show("DropInPaths"),
          "the drop-in that kills on any filtered syscall is in force")
    check(show("ActiveState") == "inactive", "the service is not running before the first post")
    status, answer = post()
    check(status == 200, "socket activation: the first POST starts the service, 200", str(answer))
    ids = [str(i) for i in answer.get("ids", [])]  # type: ignore[union-attr]
    until(lambda: set(ids) <= set(delivered()), 15, "the first message delivered")
    check(bool(ids) and set(ids) <= set(delivered()), "socket activation: the message is delivered")


def status_and_journal() -> None:
    until(lambda: "delivered" in run("systemctl", "status", UNIT).stdout, 10, "a status line")
    out = run("systemctl", "status", "--no-pager", UNIT).stdout
    check(re.search(r"Status: \"accepting; queue \d+", out) is not None,
          "systemctl status shows the STATUS line", out[-300:])
    everything, warnings = journal(), journal("-p", "warning")
    check("listening address=" in everything and "listening" not in warnings,
          "journalctl -p warning leaves out info lines (syslog priority prefixes honoured)")
    bad = [line for line in warnings.splitlines()
           if re.match(r"(listening|delivered|reloaded|stopping|stopped) ", line)]
    check(not bad, "journalctl -p warning shows only warnings and worse", str(bad[:3]))
    check(NUMBER not in everything and "delivered" in everything,
          "numbers are masked in the journal")


def reloads() -> None:
    original = CONFIG.read_text()
    with_token = original.replace('tokens = [{ credential = "webhook-token" }]',
                                  f'tokens = [{{ credential = "webhook-token" }}, "{RELOAD_TOKEN}"]')
    check(with_token != original, "the example config has the token line the check edits")
    check(post(RELOAD_TOKEN)[0] == 401, "before the reload the new token is refused")
    CONFIG.write_text(with_token)
    check(reload_ok(), "systemctl reload with a good config exits 0")
    check(post(RELOAD_TOKEN)[0] == 200, "after the reload the new token is accepted")
    CONFIG.write_text(with_token + "\n[bogus]\nkey = 1\n")
    done = run("systemctl", "reload", UNIT)
    check(done.returncode != 0, "systemctl reload with a broken config exits non-zero",
          f"exit {done.returncode}")
    check(post(RELOAD_TOKEN)[0] == 200 and post()[0] == 200,
          "after the failed reload the running config is in force")
    status = run("systemctl", "status", "--no-pager", "-n", "20", UNIT).stdout
    check("reload failed" in status and "bogus" in status,
          "systemctl status shows the reload error", status[-400:])
    check("reload failed, the running config stays: bogus" in journal(),
          "the journal has the reload error")
    CONFIG.write_text(with_token)
    check(reload_ok() and "reload failed" not in show("StatusText"),
          "a good config reloads again and clears the error")
    results_success("reload")


class Load:
    """Kept-alive and new-connection clients posting back to back, each post with its own
    Idempotency-Key, sent again (same key) when the connection closed before any answer."""

    RETRY = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
             ConnectionRefusedError)

    def __init__(self, kept_alive: int = 4, fresh: int = 4) -> None:
        self.statuses: Counter[int] = Counter()
        self.acked: dict[str, list[str]] = {}
        self.retried = 0
        self.closing = 0
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.client, args=(i, i < kept_alive))
                        for i in range(kept_alive + fresh)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(120)

    def client(self, i: int, keep_alive: bool) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=60) if keep_alive else None
        n = 0
        while not self.stop.is_set():
            key = f"load-{i}-{n}"
            for _ in range(10):
                try:
                    status, answer = post(key=key, number=f"1390{i:03d}{n % 10000:04d}", conn=conn)
                    break
                except self.RETRY:
                    with self.lock:
                        self.retried += 1
                    if conn is not None:
                        conn.close()
            else:
                status, answer = 0, {}
            with self.lock:
                self.statuses[status] += 1
                self.acked[key] = [str(x) for x in answer.get("ids", [])]  # type: ignore[union-attr]
            n += 1

    def count(self) -> int:
        with self.lock:
            return len(self.acked)


def restarts_under_load(restarts: int = 2) -> None:
    with Load() as load:
        until(lambda: load.count() >= 200, 30, "posts flowing")
        for _ in range(restarts):
            done = run("systemctl", "restart", UNIT)
            check(done.returncode == 0, "systemctl restart under load", done.stderr)
            results_success("restart")
            count = load.count()
            until(lambda c=count: load.count() >= c + 200, 30, "posts after the restart")  # type: ignore[misc]
    ids = [i for a in load.acked.values() for i in a]
    print(f"  load: {len(load.acked)} posts ({load.statuses}), {restarts} restarts, "
          f"{load.retried} sent again after a connection closed before any answer byte")
    check(set(load.statuses) == {200}, "restarts under kept-alive and new-connection load: "
          "every post answered 200", str(load.statuses))
    until(lambda: set(ids) <= set(delivered()), 60, "every accepted message delivered")
    got = delivered()
    check(set(ids) <= set(got), "every accepted message delivered")
    twice = [i for i in ids if got[i] > 1]
    check(not twice, "no message delivered twice", str(twice[:5]))


def queue_commands() -> None:
    for args in (["queue", "stats"], ["queue", "list"], ["queue", "list", "--dead"],
                 ["queue", "retry", "--all-dead"]):
        done = run("hapsms-relay", *args)
        check(done.returncode == 0, f"hapsms-relay {' '.join(args)} (as root, as the README "
              "writes it)", (done.stderr or done.stdout)[-300:])
    check(post()[0] == 200, "the service still accepts posts after the queue commands")
    run("systemctl", "stop", UNIT, check_rc=True)
    results_success("stop")
    done = run("hapsms-relay", "queue", "stats")
    check(done.returncode == 0, "hapsms-relay queue stats with the service stopped", done.stderr)
    state = Path("/var/lib/private/hapsms-relay")
    owners = {f.name: f.stat().st_uid for f in state.iterdir()}
    check(0 not in owners.values(), "no file of the outbox owned by root", str(owners))
    check(post()[0] == 200, "the next post starts the service again and gets 200")
    results_success("start")


def watchdog() -> None:
    pid = show("MainPID")
    restarts = int(show("NRestarts") or 0)
    os.kill(int(pid), 19)  # SIGSTOP: the event loop no longer pings
    check(until(lambda: int(show("NRestarts") or 0) > restarts and show("MainPID") not in
                ("0", pid) and show("ActiveState") == "active", 60, "the watchdog restart"),
          "the watchdog: a stopped (SIGSTOP) main process is restarted by systemd")
    check("Watchdog timeout" in journal("-n", "100"),
          "systemd logged the watchdog timeout")
    check(post()[0] == 200, "the next post after the watchdog restart gets 200")


def security() -> None:
    out = run("systemd-analyze", "security", "--no-pager", UNIT).stdout
    m = re.search(r"Overall exposure level for hapsms-relay\.service: (\d+\.\d+)", out)
    check(m is not None and float(m.group(1)) <= MAX_EXPOSURE,
          f"systemd-analyze security inside the guest: {m.group(1) if m else '?'} <= "
          f"{MAX_EXPOSURE}", out[-300:])


def cgroup_limits() -> None:
    fs = run("stat", "-fc", "%T", "/sys/fs/cgroup").stdout.strip()
    if fs != "cgroup2fs":
        say("skip", f"TasksMax=/MemoryMax= enforcement: /sys/fs/cgroup is {fs} (cgroup v1 or "
            "hybrid), where the guest's systemd cannot apply them; not checked")
        return
    pids = Path("/sys/fs/cgroup/system.slice") / UNIT / "pids.max"
    check(pids.exists() and pids.read_text().strip() == show("TasksMax"),
          "TasksMax= is the service cgroup's pids.max")


def main() -> int:
    print(f"systemd {run('systemctl', '--version').stdout.split()[1]} as PID 1; relay on "
          f"127.0.0.1:{PORT}", flush=True)
    steps = [socket_activation, status_and_journal, reloads, restarts_under_load,
             queue_commands, security, cgroup_limits, watchdog]
    for step in steps:
        start = time.monotonic()
        try:
            step()
        except Exception as exc:
            say("FAIL", f"{step.__name__} crashed: {exc!r}")
        print(f"  ({step.__name__}: {time.monotonic() - start:.1f}s)", flush=True)
    run("systemctl", "stop", UNIT, SOCKET)
    warnings = journal("-p", "warning")
    if warnings.strip():
        print("  journal, warnings and worse:\n    " + "\n    ".join(warnings.splitlines()[-15:]))
    print(f"{len(failures)} check(s) failed" if failures else "all checks passed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
