"""Reload in place (what SIGHUP does): whole configs swapped without dropping deliveries in
flight, and settings that need a restart reported rather than half-applied."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from tests.fakes import FakeAPI, Recorded, Reply
from tests.helpers import SMS_BODY, TOKEN, base_config, eventually, write_config


def _http(name: str, api: FakeAPI) -> dict[str, object]:
    return {"name": name, "type": "http", "url": api.url + "/send", "body": {"to": "{to}"}}


async def test_delivery_in_flight_keeps_its_providers_across_reload(
    tmp_path: Path, relay_factory, session: aiohttp.ClientSession, fake_api: FakeAPI,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A delivery round started before a reload fails over through the old route's providers,
    which stay open until it is done; new messages use the new route."""
    gate = asyncio.Event()

    async def held_then_503(_: Recorded) -> Reply:
        await gate.wait()
        return Reply(503)

    first = FakeAPI(respond=held_then_503)
    await first.start()
    try:
        old = base_config(tmp_path, providers=[_http("first", first), _http("second", fake_api)],
                          routes={"sms": ["first", "second"]})
        relay = await relay_factory(old)
        assert (await relay.post(session, SMS_BODY))[0] == 200
        await eventually(lambda: len(first.requests) == 1, what="the held request")

        new = base_config(tmp_path, providers=[_http("second", fake_api)],
                          routes={"sms": ["second"]})
        assert await relay.relay.reload(str(write_config(tmp_path, new))) is None
        gate.set()  # the old "first" answers 503: the round moves on to the old "second"
        await eventually(lambda: relay.relay.dispatcher.activity.sent == 1, what="delivery")
        assert len(fake_api.accepted) == 1
        assert relay.relay.dispatcher.activity.dead == 0
        assert "internal_error" not in caplog.text

        assert (await relay.post(session, SMS_BODY))[0] == 200
        await eventually(lambda: len(fake_api.accepted) == 2, what="a delivery on the new route")
        assert len(first.requests) == 1
    finally:
        gate.set()
        await first.stop()


async def test_reload_applies_limits_at_once(
    tmp_path: Path, relay_factory, session: aiohttp.ClientSession
) -> None:
    """server.max_recipients and max_message_chars change for the next request."""
    relay = await relay_factory(base_config(tmp_path))
    body = {"Type": 1, "Data": {"Mobiles": ["13800138000", "13800138001"], "Message": "hello"}}
    assert (await relay.post(session, body))[0] == 200
    doc = base_config(tmp_path, server={"max_recipients": 1, "max_message_chars": 3})
    assert await relay.relay.reload(str(write_config(tmp_path, doc))) is None
    status, answer = await relay.post(session, body)
    assert (status, answer["error"]) == (400, "too_many_recipients")


async def test_restart_only_settings_keep_running_values_and_are_reported(
    tmp_path: Path, relay_factory, session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A new queue.path or shutdown_timeout is logged and shown as needing a restart, the
    running values stay, and the rest of the new config (a new token) is applied."""
    relay = await relay_factory(base_config(tmp_path))
    running = relay.relay.config
    doc = base_config(tmp_path, server={"tokens": ["other-token"], "shutdown_timeout": "3s"},
                      queue={"path": str(tmp_path / "elsewhere.db")})
    assert await relay.relay.reload(str(write_config(tmp_path, doc))) is None
    cfg = relay.relay.config
    assert cfg.queue.path == running.queue.path
    assert cfg.server.shutdown_timeout == running.server.shutdown_timeout
    assert [t.reveal() for t in cfg.server.tokens] == ["other-token"]
    assert (await relay.post(session, SMS_BODY))[0] == 401
    assert relay.relay.status().endswith(
        "restart needed for server.shutdown_timeout, queue.path")
    assert "reload_needs_restart setting=queue.path" in caplog.text
    assert "reload_needs_restart setting=server.listen" not in caplog.text  # the socket was passed in

    # Back to the running values: nothing is pending any more.
    assert await relay.relay.reload(str(write_config(tmp_path, base_config(tmp_path)))) is None
    assert "restart needed" not in relay.relay.status()


async def test_invalid_reload_keeps_config_and_reports_until_fixed(
    tmp_path: Path, relay_factory, session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A config naming an unknown provider is refused with the key in the error; the old
    token still works; the status line says so until a good config is loaded."""
    relay = await relay_factory(base_config(tmp_path))
    bad = base_config(tmp_path, server={"tokens": ["other-token"]}, routes={"sms": ["nope"]})
    error = await relay.relay.reload(str(write_config(tmp_path, bad)))
    assert error is not None and error.startswith("routes.sms: unknown provider 'nope'")
    assert (await relay.post(session, SMS_BODY))[0] == 200  # TOKEN, the old config's
    assert f"reload failed, old config in force: {error}" in relay.relay.status()
    assert "reload_failed" in caplog.text

    assert await relay.relay.reload(str(write_config(tmp_path, base_config(tmp_path)))) is None
    assert "reload failed" not in relay.relay.status()
    assert TOKEN == relay.relay.config.server.tokens[0].reveal()


async def test_reload_secret_error_does_not_leak_secret(
    tmp_path: Path, relay_factory, caplog: pytest.LogCaptureFixture
) -> None:
    """A refused reload reports the key, never another secret of the new config."""
    relay = await relay_factory(base_config(tmp_path))
    bad = base_config(tmp_path, server={"tokens": ["s3cr3t-value-9", {"env": "HAPSMS_NOT_SET_X"}]})
    error = await relay.relay.reload(str(write_config(tmp_path, bad)))
    assert error is not None and error.startswith("server.tokens[1]")
    assert "s3cr3t-value-9" not in caplog.text + relay.relay.status()
