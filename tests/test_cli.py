"""The command line, run as a subprocess: check-config, send, queue, version, --help, and
their exit codes (0 ok, 1 failure, 2 usage, 75 temporary failure, 78 config error)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from hapsms_relay.outbox import State
from tests.fakes import FakeAPI, Hang, Reply
from tests.helpers import (
    API_KEY,
    PG_PASSWORD,
    SMS_BODY,
    base_config,
    eventually,
    http_provider,
    write_config,
)
from tests.process import run_cli

HELP = [["--help"], ["serve", "--help"], ["check-config", "--help"], ["send", "--help"],
        ["queue", "--help"], ["queue", "stats", "--help"], ["queue", "list", "--help"],
        ["queue", "retry", "--help"], ["queue", "purge", "--help"], ["version", "--help"]]


@pytest.mark.parametrize("args", HELP, ids=[" ".join(a) for a in HELP])
async def test_every_verb_has_help(args: list[str]) -> None:
    """``--help`` of every verb prints usage and exits 0."""
    code, out, _ = await run_cli(*args)
    assert code == 0 and out.startswith("usage: hapsms-relay")


async def test_version() -> None:
    """``version`` prints the package version and exits 0."""
    from hapsms_relay import __version__

    assert await run_cli("version") == (0, f"hapsms-relay {__version__}\n", "")


async def test_usage_error_exits_2() -> None:
    """An unknown verb or a missing argument is a usage error: exit 2."""
    assert (await run_cli("frobnicate"))[0] == 2
    assert (await run_cli("send", "--to", "13800138000"))[0] == 2


async def test_check_config_ok_shows_no_secret(tmp_path: Path) -> None:
    """A valid config: exit 0, a summary naming providers and routes, no secret shown."""
    doc = base_config(tmp_path)
    doc["providers"].append(http_provider("api", "http://127.0.0.1:9",
                                          headers={"X-Key": API_KEY}))
    doc["routes"] = {"sms": ["api", "dev"]}
    code, out, err = await run_cli("check-config", "--config", str(write_config(tmp_path, doc)))
    assert code == 0, err
    assert "ok" in out.splitlines()[0] and "provider api: http" in out and "api > dev" in out


async def test_check_config_error_exits_78_naming_the_key(tmp_path: Path) -> None:
    """An invalid config: exit 78 and the key named on stderr; $HAPSMS_RELAY_CONFIG is read."""
    path = write_config(tmp_path, base_config(tmp_path, queue={"ttl": "forever"}))
    code, out, err = await run_cli("check-config", env={"HAPSMS_RELAY_CONFIG": str(path)})
    assert code == 78 and out == ""
    assert "queue.ttl: " in err and str(path) in err
    code, _, err = await run_cli("check-config", "--config", str(tmp_path / "missing.toml"))
    assert code == 78 and "does not exist" in err


@pytest.mark.parametrize(("reply", "expected", "said"), [
    (Reply(200, {"ok": True}), 0, "api: sent (sms to +8613800138000)"),
    (Reply(400, "bad number"), 1, "api: PermanentError: api http_400: bad number"),
    (Reply(503, "maintenance"), 75, "api: TransientError: api http_503: maintenance"),
], ids=["sent", "permanent", "transient"])
async def test_send(reply: Reply, expected: int, said: str, tmp_path: Path,
                    fake_api: FakeAPI) -> None:
    """``send`` goes through the route and prints the provider's answer; the exit status
    says sent (0), refused for good (1) or try again (75)."""
    fake_api.script.append(reply)
    doc = base_config(tmp_path, providers=[http_provider("api", fake_api.url)],
                      routes={"sms": ["api"]})
    code, out, err = await run_cli("send", "--to", "13800138000", "--message", "hi",
                                   "--signature", "【Acme】",
                                   "--config", str(write_config(tmp_path, doc)))
    assert code == expected, err
    assert said in out
    assert [r.json()["text"] for r in fake_api.requests] == ["【Acme】hi"]


async def test_send_voice_code_and_bad_number(tmp_path: Path, fake_api: FakeAPI) -> None:
    """``send --code`` sends the fallback text through a provider without voice; a bad number
    or code is a usage error (2) and sends nothing."""
    doc = base_config(tmp_path, providers=[http_provider("api", fake_api.url)],
                      routes={"sms": ["api"]})
    config = str(write_config(tmp_path, doc))
    code, out, _ = await run_cli("send", "--to", "+8613800138000", "--code", "4321", "--config", config)
    assert code == 0 and "sent (sms" in out
    assert fake_api.requests[0].json()["text"] == "Your verification code is 4321"
    assert (await run_cli("send", "--to", "12", "--message", "x", "--config", config))[0] == 2
    assert (await run_cli("send", "--to", "13800138000", "--code", "12", "--config", config))[0] == 2
    assert len(fake_api.requests) == 1


@pytest.fixture(params=["sqlite", "postgres"])
def queue_on(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The [queue] settings of a relay on each backend (PostgreSQL: a new database, the URL
    with a password that must never show)."""
    if request.param == "sqlite":
        return {}
    url = request.getfixturevalue("pg_url").replace("postgresql://hapsms@",
                                                      f"postgresql://hapsms:{PG_PASSWORD}@")
    return {"backend": "postgres", "url": url, "node": "cli-test"}


async def test_queue_commands_on_a_running_relay(
    tmp_path: Path, relay_factory: Any, session: aiohttp.ClientSession, fake_api: FakeAPI,
    queue_on: dict[str, Any],
) -> None:
    """queue stats / list [--dead] [--json] / show ID [--json] / find --to / retry ID /
    retry --all-dead / purge --dead work on the outbox of a running relay, SQLite or
    PostgreSQL, which then delivers what was retried; no command shows the URL's password."""
    fake_api.script.extend([Reply(400, "no such number"), Reply(200)])
    doc = base_config(tmp_path, providers=[http_provider("api", fake_api.url)],
                      routes={"sms": ["api"]}, queue=queue_on)
    if queue_on:
        doc["queue"].pop("path")
    config = str(write_config(tmp_path, doc))
    relay = await relay_factory(doc)
    outputs: list[str] = []

    async def cli(*args: str) -> tuple[int, str, str]:
        code, out, err = await run_cli("queue", *args, "--config", config)
        outputs.append(out + err)
        return code, out, err

    async def states() -> list[State]:  # what queue list sees, oldest first
        return [r.state for r in (await relay.relay.outbox.list(None, 100))[::-1]]

    _, dead = await relay.post(session, SMS_BODY)
    await eventually(lambda: len(fake_api.requests) == 1, what="the first refused")
    _, good = await relay.post(session, SMS_BODY)

    async def states_are(*wanted: State) -> bool:
        return await states() == list(wanted)

    await eventually(lambda: states_are(State.DEAD, State.SENT), what="one dead, one sent")

    code, out, _ = await cli("stats")
    assert code == 0
    assert out.splitlines() == ["pending 0", "inflight 0", "sent 1", "dead 1", "delivered 0",
                                "undelivered 0", "oldest_pending_age -"]

    code, out, _ = await cli("list", "--json")
    records = [orjson.loads(line) for line in out.splitlines()]
    assert [(r["id"], r["state"]) for r in records] == [(good["ids"][0], "sent"),
                                                        (dead["ids"][0], "dead")]
    assert all(r["to"] == "+86*******8000" for r in records)
    code, out, _ = await cli("list", "--dead")
    assert code == 0 and len(out.splitlines()) == 1
    assert "error=api http_400: no such number" in out.replace('"', "")

    code, out, _ = await cli("show", dead["ids"][0], "--json")
    record = orjson.loads(out)
    assert code == 0 and (record["id"], record["state"]) == (dead["ids"][0], "dead")
    assert record["to"] == "+86*******8000"
    assert [e["event"] for e in record["history"]] == ["dead"]
    code, out, _ = await cli("show", good["ids"][0], "--show-numbers")
    assert code == 0 and "to=+8613800138000" in out and "state=sent" in out
    assert "event=sent" in out
    code, _, err = await cli("show", "999")
    assert code == 1 and "no entry with id 999" in err

    code, out, _ = await cli("find", "--to", "138 0013 8000", "--json")
    assert code == 0
    assert [orjson.loads(line)["id"] for line in out.splitlines()] == [good["ids"][0],
                                                                       dead["ids"][0]]
    code, out, _ = await cli("find", "--to", "+8613900139000", "--since", "1h")
    assert (code, out) == (0, "")

    assert (await cli("retry", "999"))[0] == 1  # no such entry
    code, out, _ = await cli("retry", dead["ids"][0])
    assert (code, out) == (0, "requeued 1\n")
    await eventually(lambda: len(fake_api.accepted) == 2, what="the retried entry delivered")

    fake_api.script.append(Reply(403, "blocked"))
    await relay.post(session, SMS_BODY)

    async def any_dead() -> bool:
        return State.DEAD in await states()

    await eventually(any_dead, what="another dead entry")
    code, out, _ = await cli("retry", "--all-dead")
    assert (code, out) == (0, "requeued 1\n")
    await eventually(lambda: len(fake_api.accepted) == 3, what="the retried entry delivered")

    fake_api.script.append(Reply(403, "blocked"))
    await relay.post(session, SMS_BODY)
    await eventually(any_dead, what="dead again")
    assert await cli("purge", "--dead") == (0, "purged 1\n", "")
    assert set(await states()) == {State.SENT}
    code, out, _ = await cli("stats")
    assert code == 0 and out.startswith("pending 0\ninflight 0\nsent 3\ndead 0\n")
    assert not any(PG_PASSWORD in o for o in outputs)


async def test_queue_stats_leaves_deliveries_in_flight_alone(
    tmp_path: Path, relay_factory: Any, session: aiohttp.ClientSession, fake_api: FakeAPI,
    queue_on: dict[str, Any],
) -> None:
    """Opening the outbox from the CLI while the relay delivers does not make its entries in
    flight due again (they would be sent twice), on either backend."""
    fake_api.script.append(Hang(5))
    doc = base_config(tmp_path, providers=[http_provider("api", fake_api.url)],
                      routes={"sms": ["api"]}, queue=queue_on)
    if queue_on:
        doc["queue"].pop("path")
    config = str(write_config(tmp_path, doc))
    relay = await relay_factory(doc)
    await relay.post(session, SMS_BODY)
    await eventually(lambda: len(fake_api.requests) == 1, what="a delivery in flight")
    code, out, _ = await run_cli("queue", "stats", "--config", config)
    assert code == 0 and "inflight 1" in out
    assert [r.state for r in await relay.relay.outbox.list(None, 10)] == [State.INFLIGHT]


async def test_queue_without_outbox_fails_without_creating_one(tmp_path: Path) -> None:
    """``queue stats`` before the relay ever ran: exit 1, and no outbox file is created."""
    config = str(write_config(tmp_path, base_config(tmp_path)))
    code, _, err = await run_cli("queue", "stats", "--config", config)
    assert code == 1 and "no outbox" in err
    assert not (tmp_path / "outbox.db").exists()
