"""The relay as one object: outbox, providers, dispatcher and HTTP server, started and
stopped in order, and reloaded in place on SIGHUP.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterable
from typing import Any

import aiohttp
from aiohttp import web

from hapsms_relay import __version__, config, log
from hapsms_relay.budget import Budget
from hapsms_relay.config import Config
from hapsms_relay.dispatcher import Dispatcher
from hapsms_relay.door import Door, load_certificate, tls_context
from hapsms_relay.errors import ConfigError, StorageError
from hapsms_relay.guard import Guard
from hapsms_relay.metrics import Metrics
from hapsms_relay.outbox_sqlite import SQLiteOutbox
from hapsms_relay.providers import Provider
from hapsms_relay.webhook import Webhook

HOUSEKEEPING_EVERY = 30.0


class Relay:
    def __init__(self, cfg: Config, *, paused: bool = False) -> None:
        self.config = cfg
        self.metrics = Metrics()
        self.outbox = SQLiteOutbox(cfg.queue.path)
        # one budget: the dispatcher spends it, the webhook refuses when it is used up
        budget = Budget(cfg.limits, self.metrics)
        self.guard = Guard(cfg.limits, budget, self.metrics)
        self.dispatcher = Dispatcher(self.outbox, cfg, self.metrics, paused=paused, budget=budget)
        self.webhook = Webhook(cfg, self.outbox, self.metrics, self.dispatcher.notify, self.ready,
                               self.guard)
        self.tls = tls_context(cfg.server) if cfg.server.tls_cert else None
        self.session: aiohttp.ClientSession | None = None
        self.runner: web.ServerRunner | None = None
        self.address = ""
        self._housekeeping: asyncio.Task[None] | None = None
        self._started = False
        self._background: set[asyncio.Task[None]] = set()

    async def start(self, sock: socket.socket | None = None) -> None:
        """Open the outbox, the providers and the listener (``sock`` if systemd passed one)."""
        try:
            await self._start(sock)
        except BaseException:
            await self.stop()
            raise

    async def _start(self, sock: socket.socket | None) -> None:
        await self.outbox.open()
        await self.guard.load(self.outbox)  # limits survive restarts
        self.metrics.track_queue(lambda: self.outbox.undelivered)
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            headers={"User-Agent": f"hapsms-relay/{__version__}"},
        )
        await _open_providers(self.config.providers.values(), self.session)
        self.dispatcher.start()
        server = Door(self.webhook, self.config.server, self.metrics)
        self.runner = web.ServerRunner(
            server, handle_signals=False, shutdown_timeout=self.config.server.shutdown_timeout
        )
        await self.runner.setup()
        s = self.config.server
        site: web.BaseSite
        if sock is not None:
            site = web.SockSite(self.runner, sock, backlog=1024, ssl_context=self.tls)
        else:
            site = web.TCPSite(self.runner, s.host, s.port, backlog=1024, reuse_address=True,
                               ssl_context=self.tls)
        await site.start()
        self.address = _address(self.runner)
        self._housekeeping = asyncio.create_task(self._housekeep(), name="housekeeping")
        self._started = True
        log.info("listening", address=self.address, path=s.path, version=__version__,
                 providers=",".join(self.config.providers), undelivered=self.outbox.undelivered)

    async def stop(self) -> None:
        """Stop accepting, finish requests and (for a bounded time) deliveries in flight."""
        self.webhook.accepting = False
        if self.runner is not None:
            await self.runner.cleanup()  # closes the listener, waits for requests in flight
        await self.dispatcher.stop(self.config.server.shutdown_timeout)
        if self._housekeeping is not None:
            self._housekeeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeping
        await _close_providers(self.config.providers.values())
        if self.session is not None:
            await self.session.close()
        await self.outbox.close()
        if self._started:
            log.info("stopped", undelivered=self.outbox.undelivered)
        self._started = False

    async def reload(self, path: str) -> str | None:
        """Re-read the config and swap it in; on error keep the old one and return the error."""
        try:
            new = config.load(path)
        except ConfigError as exc:
            log.error("reload_failed", error=str(exc))
            return str(exc)
        old = self.config
        if (new.server.host, new.server.port) != (old.server.host, old.server.port):
            log.warning("reload_needs_restart", setting="server.listen",
                        running=old.server.listen, configured=new.server.listen)
        if new.queue.path != old.queue.path:
            log.warning("reload_needs_restart", setting="queue.path")
        if bool(new.server.tls_cert) != (self.tls is not None):
            log.warning("reload_needs_restart", setting="server.tls_cert")
        elif self.tls is not None:
            try:  # a renewed certificate: new connections get it
                load_certificate(self.tls, new.server)
            except OSError as exc:
                log.error("reload_failed", error=str(exc))
                return str(exc)
        assert self.session is not None
        try:
            await _open_providers(new.providers.values(), self.session)
        except Exception as exc:
            log.error("reload_failed", error=f"opening providers: {exc}")
            await _close_providers(new.providers.values())
            return str(exc)
        self.config = new
        self.webhook.set_config(new)
        self.dispatcher.set_config(new)
        log.LOGGER.setLevel(new.log_level.upper())
        # Old providers finish what they carry; close them once those deliveries are done.
        task = asyncio.create_task(self._retire(old))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        log.info("reloaded", providers=",".join(new.providers))
        return None

    async def _retire(self, old: Config) -> None:
        await self.dispatcher.drain_current()
        await _close_providers(old.providers.values())

    def ready(self) -> tuple[bool, dict[str, Any]]:
        ok = self._started and self.webhook.accepting
        return ok, {
            "accepting": self.webhook.accepting,
            "undelivered": self.outbox.undelivered,
            "providers": list(self.config.providers),
            "circuits": self.dispatcher.breakers.states(list(self.config.providers)),
        }

    async def _housekeep(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_EVERY)
            try:
                # delivered entries are the log the limits count on: keep them long enough
                keep = max(self.config.queue.keep_delivered, self.config.limits.retention)
                removed = await self.outbox.cleanup(time.time() - keep)
                await self.outbox.refresh_count()
                self.guard.prune(time.time())
            except StorageError as exc:
                log.error("housekeeping_failed", error=str(exc))
                continue
            if removed:
                log.debug("cleanup", removed=removed)


async def _open_providers(providers: Iterable[Provider], session: aiohttp.ClientSession) -> None:
    for p in providers:
        await p.open(session)


async def _close_providers(providers: Iterable[Provider]) -> None:
    for p in providers:
        try:
            await p.close()
        except Exception as exc:
            log.warning("provider_close_failed", provider=p.common.name, error=repr(exc))


def _address(runner: web.BaseRunner) -> str:
    for addr in runner.addresses:
        if isinstance(addr, tuple):
            host, port = addr[0], addr[1]
            return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return str(addr)
    return ""
