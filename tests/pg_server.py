"""A throwaway PostgreSQL server for the tests: Debian's postgresql package (``make test``
installs it), ``initdb`` and ``pg_ctl`` on a temp dir, a Unix socket only, fsync left on.

PostgreSQL refuses to run as root, and the tests run as root in CI: the server then runs as
``nobody`` (its directory handed over to it), the tests connect over the socket.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg

_BINDIRS = "/usr/lib/postgresql/*/bin"
_counter = itertools.count()


def bindir() -> Path:
    """The newest installed server's bin directory."""
    def version(initdb: str) -> int:
        name = Path(initdb).parent.parent.name
        return int(name) if name.isdigit() else 0

    found = sorted(glob.glob(f"{_BINDIRS}/initdb"), key=version)
    if not found:
        raise RuntimeError("PostgreSQL is not installed: `make test` installs Debian's "
                           "postgresql package (apt-get install postgresql)")
    return Path(found[-1]).parent


class PostgresServer:
    """``start``, ``stop``, ``restart`` (``-m immediate``: a crash as far as clients see),
    a new database from ``database()``, an emptied one of this process's from
    ``empty_database()``."""

    def __init__(self, directory: Path | None = None) -> None:
        """A new server in a temp dir, or (``directory``) the one already running there."""
        self.bin = bindir()
        self.dir = directory or Path(tempfile.mkdtemp(prefix="hapsms-pg-"))
        self.data = self.dir / "data"
        self.socket_dir = self.dir
        self.user = "hapsms"
        self._as: dict[str, Any] = {}
        self._own: tuple[int, int, str] | None = None  # (pid, its lock, database)
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.chown(self.dir, nobody.pw_uid, nobody.pw_gid)
            self._as = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}

    def _run(self, *args: str, check: bool = True,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.bin / args[0]), *args[1:]], capture_output=True,
                              text=True, timeout=120, check=check, cwd=self.dir,
                              env={**os.environ, **(env or {})}, **self._as)

    def init(self, settings: str = "") -> None:
        """initdb, and the server's settings (``settings``: more lines of postgresql.conf)."""
        self._run("initdb", "-D", str(self.data), "-U", self.user, "--auth=trust",
                  "-E", "UTF8", "--locale=C.UTF-8", "--no-instructions")
        with open(self.data / "postgresql.conf", "a", encoding="utf-8") as fh:
            fh.write(
                "listen_addresses = ''\n"
                f"unix_socket_directories = '{self.socket_dir}'\n"
                "fsync = on\nsynchronous_commit = on\n"
                "max_connections = 200\nshared_buffers = 32MB\n"
                "log_min_messages = warning\n" + settings
            )

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "server.log"), "-w",
                  "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def restart(self, mode: str = "immediate") -> None:
        self.stop(mode)
        self.start()

    def sql(self, statement: str, database: str = "postgres") -> str:
        """Run one statement as the superuser (writable even where sessions default to
        read-only); its output."""
        done = self._run("psql", "-h", str(self.socket_dir), "-U", self.user, "-d", database,
                         "-v", "ON_ERROR_STOP=1", "-AtXqc", statement,
                         env={"PGOPTIONS": "-c default_transaction_read_only=off"})
        return done.stdout.strip()

    @staticmethod
    def new_name() -> str:
        """A database name no other database of this server has (the process, a count)."""
        return f"t{os.getpid()}_{next(_counter)}"

    def database(self) -> str:
        """A new, empty database; its libpq URL."""
        name = self.new_name()
        self.sql(f"CREATE DATABASE {name}")
        return self.url(name)

    def empty_database(self) -> str:
        """A database as empty as a new one, its libpq URL: this process's own, emptied.

        ``CREATE DATABASE`` and its ``DROP`` cost about 0.6 s a test here (both fsync); a
        process instead keeps one database (``poolN``, held by a lock on a file beside the
        server that the kernel lets go when the process ends, however it ends, so a child of
        a fork or a killed run's database is taken again rather than leaked), and empties it
        for each test in about 30 ms: its settings reset, its sessions ended, its ``public``
        schema dropped with everything in it and created again."""
        if self._own is None or self._own[0] != os.getpid():
            self._own = self._claim()
        name = self._own[2]
        with psycopg.connect(self.url("postgres"), autocommit=True) as admin:
            admin.execute(f"ALTER DATABASE {name} RESET ALL")
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))
        with psycopg.connect(self.url(name), autocommit=True) as db:
            db.execute("DROP SCHEMA public CASCADE")
            db.execute("CREATE SCHEMA public")
        return self.url(name)

    def _claim(self) -> tuple[int, int, str]:
        n = 0
        while True:
            lock = os.open(self.dir / f"pool{n}.lock", os.O_RDWR | os.O_CREAT)  # (held for life)
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(lock)
                n += 1
                continue
            name = f"pool{n}"
            if self.sql(f"SELECT count(*) FROM pg_database WHERE datname = '{name}'") == "0":
                self.sql(f"CREATE DATABASE {name}")
            return os.getpid(), lock, name

    @staticmethod
    def name(url: str) -> str:
        """The database a URL of ``database()`` names."""
        return urlsplit(url).path.lstrip("/")

    def url(self, name: str) -> str:
        return f"postgresql://{self.user}@/{name}?host={self.socket_dir}"

    def cleanup(self) -> None:
        self.stop("immediate")
        with contextlib.suppress(OSError):
            shutil.rmtree(self.dir)
