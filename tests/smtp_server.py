"""A real SMTP server for tests: aiosmtpd on 127.0.0.1 in its own thread and event loop.

It records the mail it accepts and counts connections; a ``script`` of replies (or ``Drop``)
makes it fail RCPT or DATA. It can be stopped and started again on the same port, and it
runs apart from the test's loop, as a remote server would.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import socket
import ssl
import threading
from collections import deque
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any, Literal

import trustme
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session


@dataclass(frozen=True)
class Received:
    """One mail the server accepted."""

    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    tls: bool
    login: str | None

    def message(self) -> EmailMessage:
        msg = email.message_from_bytes(self.content, policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        return msg


@dataclass(frozen=True)
class Drop:
    """Close the connection after the mail data arrived, before answering it."""


@dataclass(frozen=True)
class Hold:
    """Answer the mail data only once the test calls ``SMTPServer.release()``."""


Action = str | Drop | Hold  # a reply line such as "451 4.3.0 Try again later", Drop or Hold


@dataclass
class Handler:
    """aiosmtpd's handler hooks: replies from the scripts, the rest recorded."""

    rcpt_script: deque[str] = field(default_factory=deque)
    data_script: deque[Action] = field(default_factory=deque)
    noop_script: deque[str] = field(default_factory=deque)
    received: list[Received] = field(default_factory=list)
    drops: int = 0
    noops: int = 0
    quits: int = 0
    held: int = 0
    released: asyncio.Event | None = None  # created on the server's loop

    async def handle_NOOP(
        self, server: SMTP, session: Session, envelope: Envelope, arg: str
    ) -> str:
        self.noops += 1
        return self.noop_script.popleft() if self.noop_script else "250 OK"

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.quits += 1
        return "221 Bye"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if self.rcpt_script:
            return self.rcpt_script.popleft()
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        action = self.data_script.popleft() if self.data_script else None
        if isinstance(action, Drop):
            self.drops += 1
            assert server.transport is not None
            server.transport.abort()
            return "250 never sent"
        if isinstance(action, Hold):
            assert self.released is not None
            self.held += 1
            await self.released.wait()
            action = None
        if action is not None:
            return action
        login = session.auth_data if isinstance(session.auth_data, str) else None
        assert isinstance(envelope.content, bytes) and envelope.mail_from is not None
        self.received.append(Received(envelope.mail_from, list(envelope.rcpt_tos), envelope.content,
                                      _encrypted(server), login))
        return "250 OK queued"


def _encrypted(server: SMTP) -> bool:
    """Whether this connection is TLS (implicit, or upgraded by STARTTLS)."""
    assert server.transport is not None
    return server.transport.get_extra_info("ssl_object") is not None


class SMTPServer:
    """aiosmtpd listening on 127.0.0.1 with ``tls`` none, starttls (offered) or implicit."""

    def __init__(
        self, *, tls: Literal["none", "starttls", "implicit"] = "none",
        cert: trustme.LeafCert | None = None, users: dict[str, str] | None = None,
        exclude_auth: tuple[str, ...] = (),
    ) -> None:
        self.handler = Handler()
        self.tls = tls
        self.users = users
        self.exclude_auth = exclude_auth
        self.connections = 0
        self.auth_attempts: list[tuple[str, str, bool]] = []  # (mechanism, login, ok)
        self._tls_context: ssl.SSLContext | None = None
        if tls != "none":
            assert cert is not None
            self._tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            cert.configure_cert(self._tls_context)
        self.port = 0  # chosen by the system on the first start, kept for restarts
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._protocols: list[SMTP] = []

    @property
    def received(self) -> list[Received]:
        return self.handler.received

    def start(self) -> None:
        ready = threading.Event()
        errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(ready, errors), daemon=True)
        self._thread.start()
        ready.wait(10)
        if errors:
            raise errors[0]

    def stop(self) -> None:
        """Close the listener and every connection, as a server going down does."""
        if self._loop is None or self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop = self._thread = None

    def release(self) -> None:
        """Let the mail held by ``Hold`` be answered."""
        assert self._loop is not None and self.handler.released is not None
        self._loop.call_soon_threadsafe(self.handler.released.set)

    def _run(self, ready: threading.Event, errors: list[BaseException]) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            server = loop.run_until_complete(loop.create_server(
                lambda: self._protocol(loop), "127.0.0.1", self.port,
                ssl=self._tls_context if self.tls == "implicit" else None, reuse_address=True,
            ))
        except BaseException as exc:
            errors.append(exc)
            ready.set()
            loop.close()
            return
        self.port = server.sockets[0].getsockname()[1]
        self.handler.released = asyncio.Event()
        self._loop = loop
        ready.set()
        try:
            loop.run_forever()
        finally:
            server.close()
            for p in self._protocols:
                for t in (p.transport, p._original_transport):
                    if t is not None:
                        t.abort()
            self._protocols.clear()
            loop.run_until_complete(server.wait_closed())
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def _protocol(self, loop: asyncio.AbstractEventLoop) -> SMTP:
        self.connections += 1
        kwargs: dict[str, Any] = {}
        if self.users is not None:
            kwargs.update(authenticator=self._authenticate, auth_require_tls=False,
                          auth_exclude_mechanism=self.exclude_auth)
        if self.tls == "starttls":
            kwargs.update(tls_context=self._tls_context, require_starttls=True)
        p = SMTP(self.handler, hostname="smtp.test", loop=loop, **kwargs)
        self._protocols.append(p)
        return p

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        assert self.users is not None and isinstance(data, LoginPassword)
        login = data.login.decode()
        ok = self.users.get(login) == data.password.decode()
        self.auth_attempts.append((mechanism, login, ok))
        # handled=False: aiosmtpd then answers 235 or 535 itself
        return AuthResult(success=ok, handled=False, auth_data=login)

    def reserve_port(self) -> int:
        """Pick the port before the first start (a server that is down when the relay starts)."""
        with contextlib.closing(socket.socket()) as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        return self.port

    def __enter__(self) -> SMTPServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

