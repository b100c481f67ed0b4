"""docs/operations.md against the code: the alerting rules, the troubleshooting table and the
log events name what the relay really exports and logs; the documented backup restores."""

from __future__ import annotations

import asyncio
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp

from hapsms_relay.metrics import Metrics
from tests import docs
from tests.helpers import SMS_BODY, base_config, eventually, outbox_rows

OPS = docs.page("docs/operations.md")
SOURCE = "\n".join(p.read_text() for p in (docs.ROOT / "hapsms_relay").rglob("*.py"))


def exported() -> set[str]:
    """Every series name /metrics can carry (a counter's ``_total``, a histogram's parts)."""
    names = set()
    for family in Metrics().registry.collect():
        names.add(family.name)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names.update(family.name + s for s in ("_bucket", "_sum", "_count"))
    return names


def events() -> set[str]:
    """The events the relay logs: the first argument of every log call."""
    return set(re.findall(r"\blog\.(?:debug|info|warning|error)\(\s*\"([a-z_]+)\"", SOURCE))


def _alert_rules() -> str:
    (rules,) = re.findall(r"```yaml\n(.*?)```", docs.section(OPS, "Alerting"), re.S)
    return rules


def test_alerting_rules_name_exported_metrics() -> None:
    """Every metric an alerting rule uses is one the relay exports (or Prometheus' own `up`),
    and the table and the rules name the same alerts."""
    rules = _alert_rules()
    exprs = re.findall(r"expr: (?:>\n((?:\s{10}.*\n)+)|(.*))", rules)
    assert len(exprs) >= 7
    used = {m for folded, line in exprs for m in re.findall(r"\b(hapsms_relay_[a-z_]+)", folded + line)}
    assert sorted(used - exported()) == []
    assert {"hapsms_relay_queue_depth", "hapsms_relay_messages_dead_total",
            "hapsms_relay_circuit_state", "hapsms_relay_budget_remaining",
            "hapsms_relay_auth_failures_total"} <= used
    others = {w for folded, line in exprs for w in re.findall(r"\b([a-z_]+)\{", folded + line)}
    assert others - used <= {"up"}
    table = re.findall(r"\| `(Hapsms[A-Za-z]+)` \|", docs.section(OPS, "Alerting"))
    named = re.findall(r"- alert: (\w+)", rules)
    assert len(named) == len(set(named))
    assert set(table) <= set(named) and set(named) - set(table) <= {"HapsmsRelayDown"}


def test_troubleshooting_table_names_real_events_metrics_and_answers() -> None:
    """Each `log x` of the troubleshooting table is an event the code logs, each `metric x`
    a metric it exports, each `answer NNN code` an error code with that status in
    docs/webhook.md, each `reason x` a string the code writes."""
    table = docs.section(OPS, "Troubleshooting")
    shows = [row.split(" | ")[1] for row in table.splitlines()[2:] if row.startswith("| ")]
    assert len(shows) >= 10
    logged, metrics = events(), exported()
    statuses = dict((c, s) for s, c in re.findall(r"^\| (\d{3}) \| `([a-z_]+)` \|",
                                                  docs.page("docs/webhook.md"), re.M))
    for cell in shows:
        for event in re.findall(r"\blog `([a-z_]+)`", cell):
            assert event in logged, event
        for metric in re.findall(r"\bmetric `([a-z_]+)`", cell):
            assert metric in metrics, metric
        for status, code in re.findall(r"\banswer `(\d{3}) ([a-z_]+)`", cell):
            assert statuses.get(code) == status, code
        for reason in re.findall(r"\breason `([a-z_]+)`", cell):
            assert f'"{reason}"' in SOURCE, reason
    named = " ".join(shows)
    for symptom in ("dead", "circuit_open", "reload_failed", "auth_failed"):
        assert f"log `{symptom}`" in named


def test_logs_section_names_every_event() -> None:
    """Every event the relay logs is named in the Logs section."""
    section = docs.section(OPS, "Logs")
    assert sorted(e for e in events() if f"`{e}`" not in section) == []


def _backup_command() -> list[str]:
    """The documented VACUUM INTO command, as argv, with the relay's Python as this one."""
    section = docs.section(OPS, "Backup and restore")
    block = next(b for b in re.findall(r"```sh\n(.*?)```", section, re.S) if "VACUUM INTO" in b)
    argv = shlex.split(block.replace("\\\n", " ").replace("$(date +%Y%m%d-%H%M)", "X"))
    assert argv[:2] == ["/opt/hapsms-relay/bin/python", "-c"] and len(argv) == 5
    return argv


async def test_documented_backup_of_a_live_outbox_restores(
    tmp_path: Path, relay_factory: Any, session: aiohttp.ClientSession
) -> None:
    """The documented VACUUM INTO, run on the outbox of a relay that keeps accepting posts,
    copies every message committed before it, those still only in the WAL included (a copy
    of outbox.db alone misses them); a relay started on the restored copy delivers them."""
    live = tmp_path / "live"
    live.mkdir()
    doc = base_config(live, queue={"housekeeping": "1h"})  # no checkpoint meanwhile
    relay = await relay_factory(doc, paused=True)
    before = [(await relay.post(session, SMS_BODY))[1]["ids"][0] for _ in range(20)]
    wal = live / "outbox.db-wal"
    assert wal.stat().st_size > 0  # the 20 are in the WAL, not yet in outbox.db

    backup = tmp_path / "backup.db"
    _, _, script, source, _ = _backup_command()
    argv = [sys.executable, "-c", script, str(live / "outbox.db"), str(backup)]
    posting = asyncio.gather(*(relay.post(session, SMS_BODY) for _ in range(20)))
    done, answers = await asyncio.gather(
        asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True), posting)
    assert done.returncode == 0, done.stderr
    assert source == "/var/lib/hapsms-relay/outbox.db"
    during = [a["ids"][0] for status, a in answers if status == 200]
    assert len(during) == 20

    naive = tmp_path / "naive.db"
    shutil.copyfile(live / "outbox.db", naive)
    naive_ids = {r.id for r in await outbox_rows(naive)}
    assert not {int(i) for i in before} <= naive_ids  # what the WAL-safe copy is for

    # Restore as documented: the copy in place of outbox.db, no WAL of the old file beside it.
    restored = tmp_path / "restored"
    restored.mkdir()
    shutil.copyfile(backup, restored / "outbox.db")
    ids = {r.id for r in await outbox_rows(restored / "outbox.db")}
    assert {int(i) for i in before} <= ids <= {int(i) for i in before + during}
    again = await relay_factory(base_config(restored))
    await eventually(lambda: len((restored / "sent.jsonl").read_text().splitlines()) == len(ids)
                     if (restored / "sent.jsonl").exists() else False,
                     what="every restored message delivered")
    await again.stop()
