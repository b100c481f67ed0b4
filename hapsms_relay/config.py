"""The configuration: TOML parsed once into frozen dataclasses, validated up front.

Every error names its key (``providers[2].auth_token: required``) and nothing is read from
the file after ``load()`` returns. Providers validate their own tables through the registry.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import socket
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import phonenumbers

from hapsms_relay import breaker, limits
from hapsms_relay.breaker import BreakerConfig
from hapsms_relay.errors import ConfigError
from hapsms_relay.limits import LimitsConfig
from hapsms_relay.providers import REGISTRY, Provider
from hapsms_relay.providers.base import DEFAULT_SIGNATURE_FORMAT, Common, check_template
from hapsms_relay.rate import Rate, parse_rate
from hapsms_relay.secret import Secret
from hapsms_relay.table import REQUIRED, Table

DEFAULT_PATH = "/etc/hapsms-relay/config.toml"
ENV_VAR = "HAPSMS_RELAY_CONFIG"


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    path: str = "/sms/webhook"
    tokens: tuple[Secret, ...] = ()
    admin_tokens: tuple[Secret, ...] = ()  # GET /messages/{id}; off without one
    token_header: str = "Authorization"  # noqa: S105 - a header name, not a secret
    allow_unauthenticated: bool = False
    max_body_bytes: int = 65536
    max_recipients: int = 1000
    max_message_chars: int = 2000
    shutdown_timeout: float = 10.0
    # the front door (see door.py)
    tls_cert: str = ""
    tls_key: str = ""
    allow_ips: tuple[str, ...] = ()  # CIDRs; empty: any address
    header_timeout: float = 10.0
    body_timeout: float = 10.0
    max_connections: int = 1024
    max_connections_per_client: int = 256

    @property
    def listen(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class QueueConfig:
    backend: str = "sqlite"  # a key of storage.BACKENDS
    path: str = "/var/lib/hapsms-relay/outbox.db"  # sqlite
    url: Secret | None = None  # postgres: a libpq connection string (may hold a password)
    node: str = ""  # this relay's name among those sharing the storage; "": the host name
    lease: float = 30.0  # how long a claim lasts unless its owner renews it
    ttl: float = 900.0
    retry_base: float = 1.0
    retry_max: float = 60.0
    max_pending: int = 1_000_000
    workers: int = 64
    keep_delivered: float = 86400.0
    housekeeping: float = 30.0  # seconds between rounds of cleanup (delivered entries, keys)


@dataclass(frozen=True)
class Rule:
    prefix: str
    sms: tuple[str, ...]
    voice: tuple[str, ...]


@dataclass(frozen=True)
class RoutesConfig:
    sms: tuple[str, ...]
    voice: tuple[str, ...]
    strategy: str = "failover"
    rules: tuple[Rule, ...] = ()
    voice_fallback_text: str = "Your verification code is {code}"

    def route(self, kind: str, number: str) -> tuple[str, ...]:
        """The providers for a message, in order: the first matching rule, else the default."""
        for rule in self.rules:
            if number.startswith(rule.prefix):
                return rule.voice if kind == "voice" else rule.sms
        return self.voice if kind == "voice" else self.sms


@dataclass(frozen=True)
class Config:
    server: ServerConfig
    queue: QueueConfig
    default_region: str
    providers: Mapping[str, Provider]
    routes: RoutesConfig
    log_level: str = "info"
    source: str = field(default="", compare=False)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    breaker: BreakerConfig = field(default_factory=BreakerConfig)


def digest(cfg: Config) -> str:
    """A short digest of the settings relays sharing an outbox must agree on (``cluster
    status`` compares them): queue, limits, breaker, routes, the providers' names and types.
    Secrets are in it as their source only, never their value; sets sorted, so the digest
    is the same in every process."""
    import hashlib
    import json

    def plain(v: object) -> object:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, Secret):
            return v.source
        if isinstance(v, frozenset | set):
            return sorted(map(str, v))
        if isinstance(v, Mapping):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        return v if isinstance(v, str | int | float | bool) or v is None else repr(v)

    q = dataclasses.replace(cfg.queue, node="", path="")
    shared = [plain(q), plain(cfg.limits), plain(cfg.breaker), plain(cfg.routes),
              cfg.default_region, [(n, p.common.type) for n, p in cfg.providers.items()]]
    text = json.dumps(shared, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def config_path(cli_value: str | None) -> str:
    """``--config``, else ``$HAPSMS_RELAY_CONFIG``, else the packaged default path."""
    return cli_value or os.environ.get(ENV_VAR) or DEFAULT_PATH


def load(path: str) -> Config:
    """Read and validate the config file; raise ``ConfigError`` naming the bad key."""
    return parse(_read(path), source=path)


def load_queue(path: str) -> tuple[QueueConfig, str]:
    """Only ``[queue]`` and the default region of the config file: what the ``queue``
    commands need. Nothing else is read, so they work without the service's secrets (on an
    install those exist only as its credentials)."""
    root = Table(_read(path))
    return _queue(root.table("queue", {})), _region(root.table("numbers", {}))


def _region(numbers: Table) -> str:
    region = numbers.string("default_region", "CN").upper()
    if region not in phonenumbers.SUPPORTED_REGIONS:
        raise numbers.error("default_region", f"unknown region {region!r}; use an ISO code like CN")
    numbers.done()
    return region


def _read(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError("", f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"{path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError("", f"{path} is not UTF-8 text") from None


def parse(data: Mapping[str, object], source: str = "") -> Config:
    """Validate an already-decoded TOML document."""
    root = Table(data)
    server = _server(root.table("server", {}))
    queue = _queue(root.table("queue", {}))
    region = _region(root.table("numbers", {}))
    providers = _providers(root.tables("providers"))
    routes = _routes(root.table("routes", {}), providers)
    log_level = root.choice("log_level", ("debug", "info", "warning", "error"), "info")
    lim = limits.parse(root.table("limits", {}), providers)
    brk = breaker.parse(root.table("breaker", {}))
    root.done()
    return Config(server, queue, region, providers, routes, log_level, source, lim, brk)


def _server(t: Table) -> ServerConfig:
    listen = t.string("listen", "127.0.0.1:8080")
    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) < 65536:
        raise t.error("listen", f"expected HOST:PORT such as \"127.0.0.1:8080\"; got {listen!r}")
    host = host.strip("[]") or "0.0.0.0"  # noqa: S104 - ":8080" explicitly asks for all
    path = t.string("path", "/sms/webhook")
    if not path.startswith("/") or path in ("/healthz", "/readyz", "/metrics") or \
            path.startswith(("/receipts/", "/messages/")):
        raise t.error("path", "must start with '/' and not be /healthz, /readyz, /metrics, "
                      "/receipts/... or /messages/...")
    tokens = tuple(t.secret_list("tokens", []))
    admin = tuple(t.secret_list("admin_tokens", []))
    webhook_tokens = {s.reveal() for s in tokens}
    for i, token in enumerate(admin):
        if token.reveal() in webhook_tokens:
            raise ConfigError(f"{t.path('admin_tokens')}[{i}]", "must differ from every one of "
                              "tokens: HAP's token must not open the status lookup")
    allow_unauth = t.boolean("allow_unauthenticated", False)
    if not tokens and not allow_unauth:
        raise t.error(
            "tokens", "no token configured; set tokens, or allow_unauthenticated = true to run "
            "an open webhook on purpose"
        )
    cfg = ServerConfig(
        host=host, port=int(port_text), path=path, tokens=tokens, admin_tokens=admin,
        token_header=t.string("token_header", "Authorization"),
        allow_unauthenticated=allow_unauth,
        max_body_bytes=t.integer("max_body_bytes", 65536, min=256, max=64 * 1024 * 1024),
        max_recipients=t.integer("max_recipients", 1000, min=1, max=100_000),
        max_message_chars=t.integer("max_message_chars", 2000, min=1, max=100_000),
        shutdown_timeout=t.duration("shutdown_timeout", "10s"),
        **_door(t),
    )
    t.done()
    return cfg


def _door(t: Table) -> dict[str, Any]:
    """TLS, allowed addresses, read deadlines and connection limits of ``[server]``."""
    cert = t.string("tls_cert", "", nonempty=False)
    key = t.string("tls_key", "", nonempty=False)
    if bool(cert) != bool(key):
        raise t.error("tls_key" if cert else "tls_cert", "set tls_cert and tls_key together")
    allow = t.str_list("allow_ips", [])
    for i, cidr in enumerate(allow):
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise ConfigError(f"{t.path('allow_ips')}[{i}]",
                              f"expected an address or CIDR such as \"10.0.0.0/8\"; got {cidr!r}"
                              ) from None
    return {
        "tls_cert": cert, "tls_key": key, "allow_ips": tuple(allow),
        "header_timeout": t.duration("header_timeout", "10s"),
        "body_timeout": t.duration("body_timeout", "10s"),
        "max_connections": t.integer("max_connections", 1024, min=1),
        "max_connections_per_client": t.integer("max_connections_per_client", 256, min=1),
    }


def _queue(t: Table) -> QueueConfig:
    from hapsms_relay.storage import BACKENDS  # the names only: no backend is imported

    state_dir = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    default = str(Path(state_dir) / "outbox.db") if state_dir else QueueConfig.path
    backend = t.choice("backend", tuple(BACKENDS), "sqlite")
    url = t.optional_secret("url")
    if backend == "postgres" and url is None:
        raise t.error("url", "required with backend = \"postgres\" (a libpq connection "
                      "string such as \"postgresql://relay@db1,db2/hapsms?"
                      "target_session_attrs=read-write\")")
    if backend != "postgres" and url is not None:
        raise t.error("url", f"only used with backend = \"postgres\" (backend is {backend!r})")
    if backend == "postgres" and t.has("path"):
        raise t.error("path", "only used with backend = \"sqlite\"")
    cfg = QueueConfig(
        backend=backend,
        url=url,
        node=t.string("node", socket.gethostname() or "relay"),
        lease=t.duration("lease", "30s"),
        path=t.string("path", default),
        ttl=t.duration("ttl", "15m"),
        retry_base=t.duration("retry_base", "1s"),
        retry_max=t.duration("retry_max", "60s"),
        max_pending=t.integer("max_pending", 1_000_000, min=1),
        workers=t.integer("workers", 64, min=1, max=10_000),
        keep_delivered=t.duration("keep_delivered", "24h"),
        housekeeping=t.duration("housekeeping", "30s"),
    )
    if cfg.retry_max < cfg.retry_base:
        raise t.error("retry_max", "must not be less than retry_base")
    if cfg.lease < 1:
        raise t.error("lease", "must be at least 1s (it is renewed every third of it)")
    t.done()
    return cfg


def _providers(tables: list[Table]) -> dict[str, Provider]:
    providers: dict[str, Provider] = {}
    for t in tables:
        name = t.string("name")
        if name in providers:
            raise t.error("name", f"duplicate provider name {name!r}")
        kind = t.string("type")
        factory = REGISTRY.get(kind)
        if factory is None:
            raise t.error("type", f"unknown provider type {kind!r}; known: {', '.join(REGISTRY)}")
        common = Common(
            name=name, type=kind,
            concurrency=t.integer("concurrency", 16, min=1, max=10_000),
            timeout=t.duration("timeout", "10s"),
            signature_format=check_template(
                t.string("signature_format", DEFAULT_SIGNATURE_FORMAT), t.path("signature_format"),
                ("signature", "message"),
            ),
            rate=_rate(t),
        )
        providers[name] = factory(common, t)
        t.done()
    return providers


def _rate(t: Table) -> Rate | None:
    """A provider's ``rate``: API calls per second, minute or hour; unset, no limit."""
    text = t.string("rate", "", nonempty=False)
    if not text:
        return None
    rate = parse_rate(text)
    if rate is None:
        raise t.error("rate", f'expected calls per second, minute or hour such as "10/s" or '
                              f'"600/m"; got {text!r}')
    return rate


def _names(t: Table, key: str, providers: Mapping[str, Provider], default: object) -> tuple[str, ...]:
    names = t.str_list(key, REQUIRED if default is None else default)
    if not names:
        raise t.error(key, "must name at least one provider")
    for n in names:
        if n not in providers:
            known = ", ".join(providers) or "none configured"
            raise t.error(key, f"unknown provider {n!r} (providers: {known})")
    return tuple(names)


def _routes(t: Table, providers: Mapping[str, Provider]) -> RoutesConfig:
    if not providers:
        raise ConfigError("providers", "at least one [[providers]] table is required")
    sms = _names(t, "sms", providers, [next(iter(providers))] if len(providers) == 1 else None)
    voice = _names(t, "voice", providers, list(sms))
    strategy = t.choice("strategy", ("failover", "random"), "failover")
    rules = []
    for r in t.tables("rules", []):
        prefix = r.string("prefix")
        if not prefix.startswith("+") or not prefix[1:].isdigit():
            raise r.error("prefix", f"expected an E.164 prefix such as \"+1\"; got {prefix!r}")
        rsms = _names(r, "sms", providers, list(sms))
        rules.append(Rule(prefix, rsms, _names(r, "voice", providers, list(voice))))
        r.done()
    fallback = check_template(
        t.string("voice_fallback_text", RoutesConfig.voice_fallback_text), t.path("voice_fallback_text"),
        ("code",),
    )
    t.done()
    return RoutesConfig(sms, voice, strategy, tuple(rules), fallback)
