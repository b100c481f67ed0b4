"""What the request-signing cloud APIs (Tencent TC3, Alibaba ACS3) share: endpoint settings,
the ``Host`` that gets signed, and the SHA-256 primitives both signatures are built from.
"""

from __future__ import annotations

import hashlib
import hmac

from yarl import URL

from hapsms_relay.table import Table


def read_endpoint(t: Table, name: str, default: str) -> URL:
    """An ``endpoint`` setting: the vendor's base URL, or a regional one, a gateway, a fake."""
    text = t.string(name, default)
    if not text.startswith(("http://", "https://")):
        raise t.error(name, f"must start with http:// or https://; got {text!r}")
    url = URL(text)
    if not url.host:
        raise t.error(name, f"has no host: {text!r}")
    if url.query_string or url.fragment:
        raise t.error(name, "must not have a query or a fragment")
    return url.with_path(url.path or "/")


def host_header(url: URL) -> str:
    """The ``Host`` a request to ``url`` carries; signed, so it is sent explicitly as well."""
    host = url.raw_host or ""
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    return host if url.is_default_port() else f"{host}:{url.port}"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hmac_sha256(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode("utf-8"), hashlib.sha256).digest()
