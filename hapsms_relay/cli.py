"""The ``hapsms-relay`` command: serve, check-config, send, queue, reload, version.

Exit codes: 0 success; 1 failure (delivery refused, storage error); 2 usage; 75 temporary
failure (``send`` failed transiently: try again); 78 configuration error.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from collections.abc import Sequence

import aiohttp
import orjson

from hapsms_relay import __version__, config, history, log, storage
from hapsms_relay.config import Config, QueueConfig, RoutesConfig
from hapsms_relay.dispatcher import make_message
from hapsms_relay.errors import ConfigError, PermanentError, StorageError, TransientError
from hapsms_relay.kinds import KIND_SMS, KIND_VOICE, kind_name
from hapsms_relay.numbers import InvalidNumber, normalise
from hapsms_relay.outbox import Entry, State
from hapsms_relay.providers import Sent
from hapsms_relay.table import parse_duration
from hapsms_relay.webhook import strip_signature

EX_OK, EX_FAIL, EX_USAGE, EX_TEMPFAIL, EX_CONFIG = 0, 1, 2, 75, 78


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", metavar="PATH",
        help=f"config file (default: ${config.ENV_VAR} or {config.DEFAULT_PATH})",
    )
    p = argparse.ArgumentParser(
        prog="hapsms-relay", description="Webhook target for HAP's SMS self-integration.",
        parents=[common],
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", parents=[common], help="run the relay (what systemd runs)")
    serve.add_argument("--pause-delivery", action="store_true",
                       help="accept and store, but deliver nothing (benchmarks, maintenance)")
    sub.add_parser("check-config", parents=[common], help="validate the config and summarise it")
    send = sub.add_parser("send", parents=[common],
                          help="send one message now through the configured route")
    send.add_argument("--to", required=True, metavar="NUMBER")
    what = send.add_mutually_exclusive_group(required=True)
    what.add_argument("--message", metavar="TEXT", help="an SMS text")
    what.add_argument("--code", metavar="DIGITS", help="a voice verification code")
    send.add_argument("--signature", default="", help="the SMS signature, as HAP sends it")
    queue = sub.add_parser("queue", parents=[common], help="inspect and manage the outbox")
    qsub = queue.add_subparsers(dest="queue_command", required=True, metavar="ACTION")
    qsub.add_parser("stats", parents=[common], help="counts by state")
    ql = qsub.add_parser("list", parents=[common], help="the newest entries")
    ql.add_argument("--dead", action="store_true", help="only dead entries, with reasons")
    ql.add_argument("--limit", type=int, default=50)
    ql.add_argument("--json", action="store_true", help="one JSON object per line")
    qs = qsub.add_parser("show", parents=[common], help="one entry's whole history")
    qs.add_argument("id", type=int, help="the entry id (as HAP's answer gave it)")
    qs.add_argument("--show-numbers", action="store_true", help="do not mask the number")
    qs.add_argument("--json", action="store_true", help="one JSON object")
    qf = qsub.add_parser("find", parents=[common], help="the entries for one number, newest first")
    qf.add_argument("--to", required=True, metavar="NUMBER", help="as the user gave it")
    qf.add_argument("--since", default="24h", metavar="DURATION", help="how far back (24h)")
    qf.add_argument("--limit", type=int, default=50)
    qf.add_argument("--show-numbers", action="store_true", help="do not mask the number")
    qf.add_argument("--json", action="store_true", help="one JSON object per line")
    qr = qsub.add_parser("retry", parents=[common], help="send dead entries again")
    target = qr.add_mutually_exclusive_group(required=True)
    target.add_argument("id", nargs="?", type=int, help="the entry id")
    target.add_argument("--all-dead", action="store_true")
    qp = qsub.add_parser("purge", parents=[common], help="delete dead entries")
    qp.add_argument("--dead", action="store_true", required=True)
    qi = qsub.add_parser("import-sqlite", parents=[common],
                         help="copy a SQLite outbox's undelivered and dead entries and live "
                         "dedup keys into this config's PostgreSQL outbox (idempotent)")
    qi.add_argument("sqlite_path", metavar="PATH", help="the SQLite outbox file (its relay stopped)")
    cluster = sub.add_parser("cluster", parents=[common], help="the relays sharing the outbox")
    csub = cluster.add_subparsers(dest="cluster_command", required=True, metavar="ACTION")
    csub.add_parser("status", parents=[common],
                    help="relays alive: version, last heartbeat, in flight, config agreement")
    reload = sub.add_parser(
        "reload", help="reload a running relay's config and report whether it worked "
        "(what the unit's ExecReload= runs)")
    reload.add_argument("pid", type=int, help="the relay's process id ($MAINPID)")
    reload.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS")
    sub.add_parser("version", help="print the version")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "version":
        print(f"hapsms-relay {__version__}")
        return EX_OK
    if args.command == "reload":  # the running relay reads its own config
        return reload(args.pid, args.timeout)
    path = config.config_path(args.config)
    try:
        if args.command == "queue" and args.queue_command != "import-sqlite":
            # the outbox only: none of the service's secrets needed (operations.md, step 6)
            queue, region = config.load_queue(path)
            return asyncio.run(queue_command(queue, region, args))
        cfg = config.load(path)
        if args.command == "serve":
            return serve(cfg, path, paused=args.pause_delivery)
        if args.command == "check-config":
            return check_config(cfg)
        if args.command == "send":
            return asyncio.run(send(cfg, args.to, args.message, args.code, args.signature))
        if args.command == "cluster":
            return asyncio.run(cluster_status(cfg))
        return asyncio.run(import_sqlite(cfg, args.sqlite_path))  # queue import-sqlite
    except ConfigError as exc:
        print(f"hapsms-relay: config error in {path}: {exc}", file=sys.stderr)
        return EX_CONFIG
    except StorageError as exc:
        print(f"hapsms-relay: {exc}", file=sys.stderr)
        return EX_FAIL
    except KeyboardInterrupt:
        return EX_FAIL


# -- serve -----------------------------------------------------------------------------------

def serve(cfg: Config, path: str, *, paused: bool = False) -> int:
    import uvloop

    from hapsms_relay import relay

    log.setup(cfg.log_level)
    return EX_OK if uvloop.run(relay.serve(cfg, path, paused=paused)) else EX_FAIL


# -- reload ----------------------------------------------------------------------------------

def reload(pid: int, timeout: float) -> int:
    """SIGHUP to the relay, then wait for the outcome of the reload that followed it: 0 when
    the new config is in force, 1 (with the error on stderr) when the old one stays."""
    from hapsms_relay import systemd

    directory = systemd.runtime_directory()
    if directory is None:
        print("hapsms-relay: reload needs $RUNTIME_DIRECTORY (systemd RuntimeDirectory=), "
              "where the relay reports the outcome", file=sys.stderr)
        return EX_USAGE
    sent = systemd.monotonic_usec()
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        print(f"hapsms-relay: cannot signal process {pid}: {exc.strerror}", file=sys.stderr)
        return EX_FAIL
    deadline = time.monotonic() + timeout
    while True:
        outcome = systemd.read_reload_outcome(directory)
        if outcome is not None and outcome.pid == pid and outcome.started >= sent:
            break
        if time.monotonic() > deadline:
            print(f"hapsms-relay: no reload outcome from process {pid} within {timeout:g}s",
                  file=sys.stderr)
            return EX_FAIL
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            print(f"hapsms-relay: process {pid} exited during the reload", file=sys.stderr)
            return EX_FAIL
        time.sleep(0.05)
    if outcome.error:
        print(f"hapsms-relay: reload failed, the running config stays: {outcome.error}",
              file=sys.stderr)
        return EX_FAIL
    return EX_OK


# -- check-config ----------------------------------------------------------------------------

def check_config(cfg: Config) -> int:
    s, q, r = cfg.server, cfg.queue, cfg.routes
    print(f"config {cfg.source}: ok")
    print(f"  listen {s.listen}  path {s.path}  tokens {len(s.tokens)}"
          + ("  (unauthenticated!)" if not s.tokens else ""))
    where = q.path if q.url is None else f"postgres, url {q.url.source} (node {q.node})"
    print(f"  outbox {where}  ttl {q.ttl:g}s  retry {q.retry_base:g}s..{q.retry_max:g}s")
    mainland = mainland_providers(r)
    warnings = []
    for name, p in cfg.providers.items():
        print(f"  provider {name}: {p.common.type}  concurrency {p.common.concurrency}"
              f"  rate {p.common.rate or 'unlimited'}"
              f"  voice {'yes' if p.supports_voice else 'no (SMS fallback)'}")
        for note in p.notes():
            print(f"    {note}")
        warnings += p.config_warnings(mainland=name in mainland)
    print(f"  routes ({r.strategy}): sms {' > '.join(r.sms)}; voice {' > '.join(r.voice)}")
    for rule in r.rules:
        print(f"    {rule.prefix}: sms {' > '.join(rule.sms)}; voice {' > '.join(rule.voice)}")
    for w in warnings:
        print(f"warning: {w}")
    return EX_OK


def mainland_providers(routes: RoutesConfig) -> set[str]:
    """The providers some route may hand a +86 number: those of the rules whose prefix
    covers some +86 numbers, and of the defaults unless a rule takes every +86 number first."""
    names: set[str] = set()
    for rule in routes.rules:
        if rule.prefix.startswith("+86") or "+86".startswith(rule.prefix):
            names.update(rule.sms, rule.voice)
            if "+86".startswith(rule.prefix):  # every +86 number stops here
                return names
    return names | set(routes.sms) | set(routes.voice)


# -- send ------------------------------------------------------------------------------------

async def send(cfg: Config, to: str, message: str | None, code: str | None, signature: str) -> int:
    log.setup(cfg.log_level, stream=sys.stderr)
    try:
        n = normalise(to, cfg.default_region)
    except InvalidNumber:
        print(f"hapsms-relay: {to!r} is not a valid phone number", file=sys.stderr)
        return EX_USAGE
    if code is not None and not (code.isdigit() and 4 <= len(code) <= 10):
        print("hapsms-relay: --code must be 4 to 10 digits", file=sys.stderr)
        return EX_USAGE
    kind = KIND_VOICE if code is not None else KIND_SMS
    now = time.time()
    entry = Entry(0, 0, kind, n.e164, n.region, n.national, message or "",
                  strip_signature(signature), code or "", now, now + cfg.queue.ttl, 1)
    route = cfg.routes.route(kind_name(kind), n.e164)
    result = EX_FAIL
    async with aiohttp.ClientSession() as session:
        for name in route:
            provider = cfg.providers[name]
            await provider.open(session)
            try:
                msg = make_message(entry, provider, cfg.routes.voice_fallback_text)
                (outcome,) = await provider.send([msg])
            finally:
                await provider.close()
            if isinstance(outcome, Sent):
                ref = f", id {' '.join(outcome.ids)}" if outcome.ids else ""
                print(f"{name}: sent ({msg.kind} to {n.e164}{ref})")
                return EX_OK
            print(f"{name}: {type(outcome).__name__}: {outcome.reason()}")
            if isinstance(outcome, PermanentError):
                return EX_FAIL
            result = EX_TEMPFAIL if isinstance(outcome, TransientError) else result
    return result


# -- queue -----------------------------------------------------------------------------------

async def queue_command(queue: QueueConfig, region: str, args: argparse.Namespace) -> int:
    outbox = storage.outbox(queue, admin=True)
    await outbox.open()
    try:
        action = args.queue_command
        if action == "stats":
            st = await outbox.stats()
            oldest = f"{time.time() - st.oldest_pending:.0f}s" if st.oldest_pending else "-"
            print(f"pending {st.pending}\ninflight {st.inflight}\nsent {st.sent}\n"
                  f"dead {st.dead}\ndelivered {st.delivered}\nundelivered {st.undelivered}\n"
                  f"oldest_pending_age {oldest}")
        elif action == "list":
            rows = await outbox.list(State.DEAD if args.dead else None, args.limit)
            for r in rows:
                _print_record(history.row_record(r), args.json)
        elif action == "show":
            detail = await outbox.show(args.id)
            if detail is None:
                print(f"hapsms-relay: no entry with id {args.id}", file=sys.stderr)
                return EX_FAIL
            record = history.detail_record(detail, show_numbers=args.show_numbers)
            if args.json:
                print(orjson.dumps(record).decode())
            else:
                events = record.pop("history")
                _print_record(record, False)
                for e in events:
                    print("  " + "  ".join(f"{k}={v}" for k, v in e.items()))
        elif action == "find":
            try:
                number = normalise(args.to, region).e164
                since = time.time() - parse_duration(args.since)
            except InvalidNumber:
                print(f"hapsms-relay: {args.to!r} is not a valid phone number", file=sys.stderr)
                return EX_USAGE
            except ValueError as exc:
                print(f"hapsms-relay: --since: {exc}", file=sys.stderr)
                return EX_USAGE
            for r in await outbox.find(number, since, args.limit):
                _print_record(history.row_record(r, show_numbers=args.show_numbers), args.json)
        elif action == "retry":
            n = await outbox.requeue(None if args.all_dead else [args.id], queue.ttl)
            print(f"requeued {n}")
            if n == 0 and not args.all_dead:
                print(f"hapsms-relay: no dead entry with id {args.id}", file=sys.stderr)
                return EX_FAIL
        elif action == "purge":
            print(f"purged {await outbox.purge_dead()}")
    finally:
        await outbox.close()
    return EX_OK


def _print_record(record: dict[str, object], as_json: bool) -> None:
    if as_json:
        print(orjson.dumps(record).decode())
    else:
        print("  ".join(f"{k}={v}" for k, v in record.items() if v not in ("", None, [])))


# -- cluster ---------------------------------------------------------------------------------

async def cluster_status(cfg: Config) -> int:
    """One line per relay alive on the shared outbox; exit 1 if their configs differ."""
    from hapsms_relay.outbox import Cluster

    outbox = storage.outbox(cfg.queue, admin=True)
    if not isinstance(outbox, Cluster):
        print(f"hapsms-relay: queue.backend = {cfg.queue.backend!r} is one relay's own outbox; "
              "cluster status needs a shared one (postgres)", file=sys.stderr)
        return EX_FAIL
    await outbox.open()
    try:
        nodes = await outbox.nodes()
    finally:
        await outbox.close()
    now = time.time()
    alive = [n for n in nodes if now - n.heartbeat <= 3 * cfg.queue.lease]
    mine = config.digest(cfg)
    print(f"{len(alive)} relays alive" + (f" ({len(nodes) - len(alive)} silent)"
                                          if len(nodes) > len(alive) else ""))
    for n in alive:
        agrees = "same config" if n.digest == mine else "CONFIG DIFFERS"
        print(f"  {n.node}  {n.owner}  version {n.version}  heartbeat {now - n.heartbeat:.0f}s ago"
              f"  in flight {n.inflight}  config {n.digest} ({agrees})")
    if len({n.digest for n in alive} | {mine}) > 1:
        print("hapsms-relay: the relays' configs differ (queue, limits, breaker, routes or "
              "providers); make them agree", file=sys.stderr)
        return EX_FAIL
    return EX_OK


async def import_sqlite(cfg: Config, path: str) -> int:
    """``queue import-sqlite``: a single relay's outbox into the cluster's database."""
    from hapsms_relay.outbox_postgres import PostgresOutbox
    from hapsms_relay.outbox_sqlite import export

    outbox = storage.outbox(cfg.queue)  # creates the schema in an empty database
    if not isinstance(outbox, PostgresOutbox):
        print("hapsms-relay: queue import-sqlite copies into PostgreSQL: run it with the "
              "cluster's config (queue.backend = \"postgres\")", file=sys.stderr)
        return EX_USAGE
    entries, keys = export(path, time.time())
    await outbox.open()
    try:
        added, answers = await outbox.import_entries(entries, keys)
    finally:
        await outbox.close()
    print(f"imported {added} entries ({len(entries) - added} there already) and {answers} "
          f"dedup keys from {path}")
    return EX_OK
