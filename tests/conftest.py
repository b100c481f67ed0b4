"""Shared fixtures: uvloop as in production, fake provider APIs, relays on real sockets."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvloop

from hapsms_relay import log
from tests.backends import pg_server, pg_url, postgres_backend, sqlite_backend  # noqa: F401 - fixtures
from tests.fakes import FakeAPI
from tests.helpers import RunningRelay, leaked, start_relay


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """Every async test runs on uvloop, as the relay does in production."""
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(autouse=True)
def _relay_logging(capsys: pytest.CaptureFixture[str]) -> Iterator[None]:
    """The relay logs to stdout as in production, at debug level; after each test its whole
    log is checked: no secret of the suite and no unmasked phone number in any line."""
    log.setup("debug")  # to whatever sys.stdout is when a line is written: pytest's capture
    yield
    out = capsys.readouterr().out
    leaks = [line for line in out.splitlines() if leaked(line)]
    assert not leaks, f"secret or unmasked number in the relay's log: {leaks[:3]}"


@pytest.fixture
async def fake_api() -> AsyncIterator[FakeAPI]:
    api = FakeAPI()
    await api.start()
    yield api
    await api.stop()


@pytest.fixture
async def second_api() -> AsyncIterator[FakeAPI]:
    """Another fake API, for failover between two providers."""
    api = FakeAPI()
    await api.start()
    yield api
    await api.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


@pytest.fixture
async def relay_factory() -> AsyncIterator[Callable[..., Awaitable[RunningRelay]]]:
    started: list[RunningRelay] = []

    async def factory(doc: dict[str, Any], **kwargs: Any) -> RunningRelay:
        r = await start_relay(doc, **kwargs)
        started.append(r)
        return r

    yield factory
    for r in started:
        await r.stop()


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    return tmp_path
