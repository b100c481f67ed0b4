"""The relay as one object: outbox, providers, dispatcher and HTTP server, started and
stopped in order, and reloaded in place on SIGHUP; ``serve()`` runs it under systemd.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import os
import signal
import socket
from collections.abc import Iterable
from typing import Any

import aiohttp
from aiohttp import web

from hapsms_relay import __version__, config, log, storage, systemd
from hapsms_relay.budget import Budget, SharedBudget
from hapsms_relay.clock import SYSTEM, Clock
from hapsms_relay.config import Config
from hapsms_relay.dispatcher import Dispatcher
from hapsms_relay.door import Door, load_certificate, tls_context
from hapsms_relay.errors import ConfigError, StorageError
from hapsms_relay.guard import Admitter, Guard, SharedGuard
from hapsms_relay.metrics import Metrics
from hapsms_relay.outbox import CheckingQueue, Cluster, Node, Outbox
from hapsms_relay.providers import Provider
from hapsms_relay.webhook import Webhook

# Expired windows and answers are forgotten every second, a chunk at a time with the event
# loop free between chunks: one pass over a 30 s pile stalled requests for ~65 ms.
PRUNE_EVERY = 1.0
PRUNE_CHUNK = 2000
# Requests still in progress once server.shutdown_timeout has passed get this much longer.
CUT_AFTER = 1.0
# Net allocations of tracked objects between young-generation collections (CPython's
# default is 700). A message's objects live for a few event-loop turns: at 700 a collection
# every few messages walked the same in-flight objects again and again and promoted them to
# the older generations, whose collections walked them once more. That was 5.5% of the
# relay's instructions per delivered message (bench/icount.py --live: 1,312,961 at 700,
# 1,240,140 at 5,000, 1,236,569 at 100,000). Cyclic garbage waits that much longer at most.
GC_YOUNG = 5000


async def serve(cfg: Config, path: str, *, paused: bool = False) -> bool:
    """What ``hapsms-relay serve`` runs: the relay until SIGTERM or SIGINT, reloading on
    SIGHUP, reporting to systemd. False if it could not start (logged as ``start_failed``)."""
    notifier = systemd.Notifier.from_environment()
    relay = Relay(cfg, paused=paused)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reloads = _Reloads(relay, notifier, path)
    # Unwound in reverse: the relay stops while the watchdog still pings and the signal
    # handlers still hold; the notify socket closes last.
    async with contextlib.AsyncExitStack() as stack:
        stack.callback(notifier.close)
        for sig, handler in ((signal.SIGTERM, stop.set), (signal.SIGINT, stop.set),
                             (signal.SIGHUP, reloads.request)):
            loop.add_signal_handler(sig, handler)
            stack.callback(loop.remove_signal_handler, sig)
        keep_alive = asyncio.create_task(notifier.keep_alive(relay.status), name="sd_notify")
        stack.push_async_callback(_cancel, keep_alive)
        stack.push_async_callback(reloads.finish)
        try:
            await relay.start(systemd.listen_socket())
        except (StorageError, OSError) as exc:
            log.error("start_failed", error=str(exc))
            notifier.notify(STATUS=f"start failed: {exc}")
            return False
        stack.push_async_callback(relay.stop)  # waits for a reload in progress
        # What start-up built (modules, phonenumbers' metadata, config) lives as long as the
        # process: keep it out of every collection. A full collection of it took ~9 ms, a
        # latency spike for every request waiting meanwhile.
        gc.freeze()
        gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])
        # The outbox is open and the listener accepts: only now may systemd route traffic here.
        notifier.ready(relay.status())
        reloads.running = True
        await stop.wait()
        log.info("stopping")
        reloads.running = False
        notifier.stopping(f"stopping: {relay.dispatcher.inflight} deliveries in flight")
    return True


class _Reloads:
    """SIGHUP: reload the config, told to systemd with RELOADING=1 and READY=1."""

    def __init__(self, relay: Relay, notifier: systemd.Notifier, path: str) -> None:
        self.relay = relay
        self.notifier = notifier
        self.path = path
        self.running = False  # READY=1 sent and no STOPPING=1 yet: when reloads make sense
        self._tasks: set[asyncio.Task[None]] = set()

    def request(self) -> None:
        if not self.running:
            reason = "not running (starting or stopping)"
            log.warning("reload_ignored", reason=reason)
            systemd.write_reload_outcome(
                systemd.ReloadOutcome(os.getpid(), systemd.monotonic_usec(), reason))
            return
        task = asyncio.create_task(self._reload())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reload(self) -> None:
        started = self.notifier.reloading()
        error = await self.relay.reload(self.path)
        if self.running:
            self.notifier.ready(self.relay.status())
        # for `hapsms-relay reload` (ExecReload=): a reload that failed fails the job
        systemd.write_reload_outcome(systemd.ReloadOutcome(os.getpid(), started, error or ""))

    async def finish(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)


class Relay:
    def __init__(
        self, cfg: Config, *, paused: bool = False, outbox: Outbox | None = None,
        clock: Clock = SYSTEM,
    ) -> None:
        """``outbox``: storage other than the configured one (tests inject faults);
        ``clock``: where every part of the relay reads the time (tests move a ManualClock)."""
        self.config = cfg
        self.clock = clock
        self.metrics = Metrics()
        self.metrics.info.info({"node": cfg.queue.node, "version": __version__})
        self.outbox: Outbox = outbox or storage.outbox(cfg.queue, clock)
        self.owner = storage.owner(cfg.queue.node)
        # one budget: the dispatcher spends it, the webhook refuses when it is used up. A
        # storage several relays share keeps the budgets' counts and decides duplicates,
        # windows and max_pending itself (guard.py).
        self.guard: Admitter
        if isinstance(self.outbox, CheckingQueue):
            self.budget: Budget = SharedBudget(cfg.limits, self.metrics, self.outbox, clock)
            self.guard = SharedGuard(cfg.limits, self.budget, self.metrics, self.outbox, clock)
        else:
            self.budget = Budget(cfg.limits, self.metrics, clock)
            self.guard = Guard(cfg.limits, self.budget, self.metrics, clock)
        self.dispatcher = Dispatcher(self.outbox, cfg, self.metrics, paused=paused, budget=self.budget,
                                     clock=clock, owner=self.owner)
        self.webhook = Webhook(cfg, self.outbox, self.metrics, self.dispatcher.notify, self.ready,
                               self.guard, clock)
        self.tls = tls_context(cfg.server) if cfg.server.tls_cert else None
        self.session: aiohttp.ClientSession | None = None
        self.runner: web.ServerRunner | None = None
        self.door: Door | None = None
        self.address = ""
        self._stack = contextlib.AsyncExitStack()  # what start() opened, for stop() to close
        self._started = False
        self._background: set[asyncio.Task[None]] = set()
        self._reload_lock = asyncio.Lock()
        self._inherited_socket = False
        self.reload_error = ""
        self.restart_needed: tuple[str, ...] = ()

    async def start(self, sock: socket.socket | None = None) -> None:
        """Open the outbox, the providers and the listener (``sock`` if systemd passed one).

        Each step registers its undoing as it succeeds, so a start that fails half-way
        closes exactly what it had opened, in reverse order, and ``stop()`` does the same.
        """
        async with contextlib.AsyncExitStack() as stack:
            await self._open(stack, sock)
            self._stack = stack.pop_all()

    async def _open(self, stack: contextlib.AsyncExitStack, sock: socket.socket | None) -> None:
        await self.outbox.open()
        stack.push_async_callback(self._close_outbox)
        await self.guard.load(self.outbox)  # limits survive restarts
        self.metrics.track_queue(lambda: self.outbox.undelivered, self._oldest_age)
        self.session = await stack.enter_async_context(aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            headers={"User-Agent": f"hapsms-relay/{__version__}"},
        ))
        # the providers in force when stopping (a reload may have swapped them), whichever
        # of them had opened
        stack.push_async_callback(lambda: _close_providers(self.config.providers.values()))
        await _open_providers(self.config.providers.values(), self.session)
        self.dispatcher.start()
        stack.push_async_callback(self._stop_delivery)
        housekeeping = asyncio.create_task(self._housekeep(), name="housekeeping")
        stack.push_async_callback(_cancel, housekeeping)
        if isinstance(self.outbox, Cluster):  # cluster status lists this relay while it runs
            heartbeat = asyncio.create_task(self._heartbeat(self.outbox), name="heartbeat")
            stack.push_async_callback(self._leave, self.outbox, heartbeat)
        if isinstance(self.budget, SharedBudget):  # what other relays spent, for the webhook
            watch = asyncio.create_task(self.budget.watch(), name="budget_watch")
            stack.push_async_callback(_cancel, watch)
        self.door = door = Door(self.webhook, self.config.server, self.metrics)
        # Door.drain() closes the connections; aiohttp's own shutdown (pre_shutdown ignores
        # what clients send after it began) only meets requests that outlived the drain.
        self.runner = web.ServerRunner(door, handle_signals=False, shutdown_timeout=CUT_AFTER)
        await self.runner.setup()
        stack.push_async_callback(self._close_http, self.runner, door)
        s = self.config.server
        site: web.BaseSite
        self._inherited_socket = sock is not None
        if sock is not None:
            site = web.SockSite(self.runner, sock, backlog=1024, ssl_context=self.tls)
        else:
            site = web.TCPSite(self.runner, s.host, s.port, backlog=1024, reuse_address=True,
                               ssl_context=self.tls)
        await site.start()
        self.address = _address(self.runner)
        self._started = True
        log.info("listening", address=self.address, path=s.path, version=__version__,
                 providers=",".join(self.config.providers), undelivered=self.outbox.undelivered,
                 inherited_socket="yes" if sock is not None else None)

    async def stop(self) -> None:
        """Stop accepting, finish requests and (for a bounded time) deliveries in flight,
        then close what ``start`` opened, in reverse order. Safe to call more than once."""
        async with self._reload_lock:  # a reload in progress finishes first
            await self._stack.aclose()

    async def _close_http(self, runner: web.ServerRunner, door: Door) -> None:
        self.webhook.accepting = False  # /readyz and the status line say so; posts are served
        for site in list(runner.sites):
            await site.stop()  # under socket activation systemd keeps the socket listening
        await door.drain(self.config.server.shutdown_timeout)
        await runner.cleanup()  # requests still running past the drain are cut short

    async def _heartbeat(self, cluster: Cluster) -> None:
        started = self.clock.time()
        while True:
            node = Node(self.owner, self.config.queue.node, __version__,
                        config.digest(self.config), started, self.clock.time(),
                        self.dispatcher.inflight)
            try:
                await cluster.heartbeat(node)
            except StorageError as exc:
                log.debug("heartbeat_failed", error=str(exc))
            await self.clock.sleep(self.config.queue.lease / 3)

    async def _leave(self, cluster: Cluster, heartbeat: asyncio.Task[None]) -> None:
        await _cancel(heartbeat)
        with contextlib.suppress(StorageError):
            await cluster.leave(self.owner)

    async def _stop_delivery(self) -> None:
        await self.dispatcher.stop(self.config.server.shutdown_timeout)
        if self._background:  # providers retired by a reload: their deliveries are over now
            await asyncio.gather(*self._background)

    async def _close_outbox(self) -> None:
        await self.outbox.close()
        if self._started:
            log.info("stopped", undelivered=self.outbox.undelivered)
        self._started = False

    async def reload(self, path: str) -> str | None:
        """Re-read the config and swap it in whole; on error keep the old one and return the error.

        Settings only a restart can change keep their running values and are reported as
        needing a restart (log and ``status()``), so nothing is ever half-applied.
        """
        async with self._reload_lock:
            if not self._started:
                return self._reload_failed("the relay has not started yet")
            try:
                new = config.load(path)
            except ConfigError as exc:
                return self._reload_failed(str(exc))
            new, restart_needed = self._keep_restart_only(new)
            if self.tls is not None:
                try:  # a renewed certificate: new connections get it
                    load_certificate(self.tls, new.server)
                except OSError as exc:
                    return self._reload_failed(f"server.tls_cert: {exc}")
            assert self.session is not None
            try:
                await _open_providers(new.providers.values(), self.session)
            except Exception as exc:
                await _close_providers(new.providers.values())
                return self._reload_failed(f"opening providers: {exc}")
            old = self.config
            # One step with no await in it: each request and each delivery round sees the old
            # config or the new one. Connections stay open; deliveries in flight keep the
            # providers they started with, which are closed once those deliveries are done.
            self.config = new
            self.webhook.set_config(new)
            if self.door is not None:
                self.door.set_config(new.server)
            self.dispatcher.set_config(new)
            log.LOGGER.setLevel(new.log_level.upper())
            self.reload_error = ""
            self.restart_needed = restart_needed
            task = asyncio.create_task(self._retire(old))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            log.info("reloaded", providers=",".join(new.providers), tokens=len(new.server.tokens))
            return None

    def _reload_failed(self, error: str) -> str:
        log.error("reload_failed", error=error, keeping=self.config.source or "the running config")
        self.reload_error = error
        return error

    def _keep_restart_only(self, new: Config) -> tuple[Config, tuple[str, ...]]:
        """``new`` with the running values of what only a restart changes, and their names."""
        run = self.config
        pending: list[tuple[str, object, object]] = []
        # Under socket activation the socket unit decides where the relay listens.
        if not self._inherited_socket and new.server.listen != run.server.listen:
            pending.append(("server.listen", run.server.listen, new.server.listen))
        if new.server.shutdown_timeout != run.server.shutdown_timeout:
            pending.append(("server.shutdown_timeout", run.server.shutdown_timeout,
                            new.server.shutdown_timeout))
        for key in ("backend", "path", "url", "node", "lease"):
            if getattr(new.queue, key) != getattr(run.queue, key):
                pending.append((f"queue.{key}", getattr(run.queue, key), getattr(new.queue, key)))
        # Turning TLS on or off changes the listener itself; a new certificate does not.
        tls_change = bool(new.server.tls_cert) != (self.tls is not None)
        if tls_change:
            pending.append(("server.tls_cert", run.server.tls_cert or "none",
                            new.server.tls_cert or "none"))
        for setting, running, configured in pending:
            log.warning("reload_needs_restart", setting=setting, running=running,
                        configured=configured)
        server = dataclasses.replace(new.server, host=run.server.host, port=run.server.port,
                                     shutdown_timeout=run.server.shutdown_timeout)
        if tls_change:
            server = dataclasses.replace(server, tls_cert=run.server.tls_cert,
                                         tls_key=run.server.tls_key)
        queue = dataclasses.replace(new.queue, backend=run.queue.backend, path=run.queue.path,
                                    url=run.queue.url, node=run.queue.node, lease=run.queue.lease)
        return (dataclasses.replace(new, server=server, queue=queue),
                tuple(name for name, _, _ in pending))

    async def _retire(self, old: Config) -> None:
        await self.dispatcher.drain_current()
        await _close_providers(old.providers.values())

    def status(self) -> str:
        """One line for systemd's STATUS= (``systemctl status``): state, queue, last error."""
        if not self._started:
            return "starting"
        a = self.dispatcher.activity
        state = "accepting" if self.webhook.accepting else "stopping"
        if self.dispatcher.paused:
            state += " (delivery paused)"
        parts = [state, f"queue {self.outbox.undelivered} ({a.dead} dead)", f"sent {a.sent}"]
        if a.last_error:
            parts.append(f"last error: {a.last_error} {_ago(self.clock.time() - a.last_error_at)} ago")
        if self.reload_error:
            parts.append(f"reload failed, old config in force: {self.reload_error}")
        if self.restart_needed:
            parts.append(f"restart needed for {', '.join(self.restart_needed)}")
        return "; ".join(parts)

    def ready(self) -> tuple[bool, dict[str, Any]]:
        writable = self.outbox.writable
        ok = self._started and self.webhook.accepting and writable
        return ok, {
            "node": self.config.queue.node,
            "accepting": self.webhook.accepting,
            "storage": "ok" if writable else "failing",
            "undelivered": self.outbox.undelivered,
            "providers": list(self.config.providers),
            "circuits": self.dispatcher.breakers.states(list(self.config.providers)),
        }

    def _oldest_age(self) -> float:
        """Seconds the oldest undelivered entry has waited, by this relay's clock (0: none).
        At every scrape: the outbox only keeps when it was accepted (``refresh``)."""
        oldest = self.outbox.oldest_undelivered
        return 0.0 if oldest is None else max(self.clock.time() - oldest, 0.0)

    async def _prune(self) -> None:
        while True:
            # a full chunk: more may have expired, go on as soon as the loop is free
            full = self.guard.prune(self.clock.time(), PRUNE_CHUNK) >= PRUNE_CHUNK
            await self.clock.sleep(0 if full else PRUNE_EVERY)

    async def _housekeep(self) -> None:
        prune = asyncio.create_task(self._prune(), name="prune")
        try:
            await self._housekeep_storage()
        finally:
            await _cancel(prune)

    async def _housekeep_storage(self) -> None:
        while True:
            await self.clock.sleep(self.config.queue.housekeeping)
            try:
                # delivered entries are the log the limits count on: keep them long enough
                keep = max(self.config.queue.keep_delivered, self.config.limits.retention)
                removed = await self.outbox.cleanup(self.clock.time() - keep)
                await self.outbox.refresh()
            except StorageError as exc:
                log.error("housekeeping_failed", error=str(exc))
                continue
            if removed:
                log.debug("cleanup", removed=removed)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _open_providers(providers: Iterable[Provider], session: aiohttp.ClientSession) -> None:
    for p in providers:
        await p.open(session)


async def _close_providers(providers: Iterable[Provider]) -> None:
    for p in providers:
        try:
            await p.close()
        except Exception as exc:
            log.warning("provider_close_failed", provider=p.common.name, error=repr(exc))


def _ago(seconds: float) -> str:
    s = max(int(seconds), 0)
    if s < 120:
        return f"{s}s"
    return f"{s // 60}m" if s < 7200 else f"{s // 3600}h"


def _address(runner: web.BaseRunner) -> str:
    for addr in runner.addresses:
        if isinstance(addr, tuple):
            host, port = addr[0], addr[1]
            return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return str(addr)
    return ""
