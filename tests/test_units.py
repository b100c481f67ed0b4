"""The shipped systemd units pass systemd's own checks, and ``make install`` puts every file
where those units look for it."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNITS = ROOT / "systemd"
SERVICE = "hapsms-relay.service"
SOCKET = "hapsms-relay.socket"
DEFAULT_PREFIX = "/opt/hapsms-relay"
MAX_EXPOSURE = 1.5

ANALYZE = shutil.which("systemd-analyze")
pytestmark = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run([ANALYZE, *args], capture_output=True, text=True, check=False)


def exec_start(unit_text: str) -> str:
    (line,) = [x for x in unit_text.splitlines() if x.startswith("ExecStart=")]
    return line.removeprefix("ExecStart=").split()[0]


def verify(units_dir: Path, prefix: str, real_prefix: Path, staged: Path) -> None:
    """``systemd-analyze verify`` on copies of the units whose ExecStart points at the same
    console script under ``real_prefix`` (verify checks that the binary exists and is
    executable, and the real prefix is not installed on this machine); nothing else
    changes. It must succeed and print nothing."""
    staged.mkdir()
    service = (units_dir / SERVICE).read_text()
    binary = exec_start(service)
    assert binary == f"{prefix}/bin/hapsms-relay"
    assert (real_prefix / "bin/hapsms-relay").is_file()
    for command in ("ExecStart", "ExecReload"):
        service = service.replace(f"{command}={prefix}/", f"{command}={real_prefix}/", 1)
    (staged / SERVICE).write_text(service)
    shutil.copy(units_dir / SOCKET, staged / SOCKET)
    done = analyze("verify", "--man=no", str(staged / SERVICE), str(staged / SOCKET))
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_shipped_units_verify_clean(tmp_path: Path) -> None:
    """systemd-analyze verify reports nothing on the shipped service and socket."""
    # This venv's console script is what `make install` creates in PREFIX/bin.
    verify(UNITS, DEFAULT_PREFIX, Path(sys.prefix), tmp_path / "units")


def test_service_exposure_at_most_1_5() -> None:
    """systemd-analyze security --offline=yes rates the shipped service 1.5 or less."""
    done = analyze("security", "--offline=yes", "--no-pager", str(UNITS / SERVICE))
    assert done.returncode == 0, done.stderr
    m = re.search(r"Overall exposure level for hapsms-relay\.service: (\d+\.\d+)", done.stdout)
    assert m is not None, done.stdout[-500:]
    assert float(m.group(1)) <= MAX_EXPOSURE, done.stdout


def test_units_pair_up() -> None:
    """The socket holds port 8080 without Accept, and the service is a notify service with
    a watchdog and SIGHUP reload that needs the socket."""
    sock = (UNITS / SOCKET).read_text()
    service = (UNITS / SERVICE).read_text()
    assert re.search(r"^ListenStream=8080$", sock, re.M)
    assert re.search(r"^Accept=no$", sock, re.M)
    for setting in ("Type=notify", "ExecReload=/opt/hapsms-relay/bin/hapsms-relay reload $MAINPID",
                    "RuntimeDirectory=hapsms-relay", "Requires=hapsms-relay.socket",
                    "Restart=on-failure", "StateDirectory=hapsms-relay",
                    "ConfigurationDirectory=hapsms-relay", "MemoryDenyWriteExecute=yes"):
        assert re.search(rf"^{re.escape(setting)}$", service, re.M), setting
    assert re.search(r"^WatchdogSec=\d+s$", service, re.M)
    assert "serve --config /etc/hapsms-relay/config.toml" in service


@pytest.fixture
def own_tmp() -> Iterator[Path]:
    """A temporary directory outside pytest's basetemp: pytest runs of other checkouts on the
    same machine prune old basetemps, and this test runs long enough to lose one."""
    with tempfile.TemporaryDirectory(prefix="hapsms-install-") as d:
        yield Path(d)


def test_make_install_destdir_lays_out_what_the_units_expect(own_tmp: Path) -> None:
    """make install DESTDIR=... PREFIX=...: a working venv in PREFIX whose console script is
    the service's ExecStart, the units (verify-clean), the docs they name, the example
    config and a private token; a second install keeps an edited config; make uninstall
    keeps config and token."""
    dest, prefix = own_tmp / "root", "/srv/hapsms"
    make = ["make", "-C", str(ROOT), f"DESTDIR={dest}", f"PREFIX={prefix}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "MFLAGS"))}
    done = subprocess.run([*make, "install"], capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stdout + done.stderr

    units = dest / "etc/systemd/system"
    service = (units / SERVICE).read_text()
    assert exec_start(service) == f"{prefix}/bin/hapsms-relay"
    assert DEFAULT_PREFIX not in service + (units / SOCKET).read_text()
    staged = dest / prefix.lstrip("/")
    script = staged / "bin/hapsms-relay"
    assert script.stat().st_mode & stat.S_IXUSR
    # The script's interpreter is PREFIX's python (not the staging path), present in the venv.
    interpreter = script.read_text().splitlines()[0].removeprefix("#!")
    assert interpreter.startswith(f"{prefix}/bin/python")
    assert (dest / interpreter.lstrip("/")).exists()
    version = subprocess.run([str(staged / "bin/python3"), str(script), "version"],
                             capture_output=True, text=True, check=True)
    assert version.stdout.startswith("hapsms-relay ")
    verify(units, prefix, staged, own_tmp / "verify")
    # What the units' Documentation= points at is installed: the front page and docs/.
    for unit in (SERVICE, SOCKET):
        (line,) = [ln for ln in (units / unit).read_text().splitlines()
                   if ln.startswith("Documentation=")]
        for uri in line.removeprefix("Documentation=").split():
            assert (dest / uri.removeprefix("file:///")).is_file(), uri
    assert (staged / "docs/providers/twilio.md").is_file()
    # The README's commands name plain `hapsms-relay`: it is on root's PATH.
    assert os.readlink(dest / "usr/local/bin/hapsms-relay") == f"{prefix}/bin/hapsms-relay"

    conf = dest / "etc/hapsms-relay"
    assert (conf / "config.toml").read_text() == (UNITS / "config.example.toml").read_text()
    token = conf / "credentials/webhook-token"
    assert stat.S_IMODE((conf / "credentials").stat().st_mode) == 0o700
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert len(token.read_text().strip()) >= 32
    # The unit loads the token from where make install wrote it.
    assert "LoadCredential=webhook-token:/etc/hapsms-relay/credentials/webhook-token" in service

    (conf / "config.toml").write_text("# edited\n")
    first_token = token.read_text()
    done = subprocess.run([*make, "install"], capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (conf / "config.toml").read_text() == "# edited\n"
    assert token.read_text() == first_token

    done = subprocess.run([*make, "uninstall"], capture_output=True, text=True, env=env, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert not staged.exists() and not (units / SERVICE).exists() and not (units / SOCKET).exists()
    assert not (dest / "usr/local/bin/hapsms-relay").is_symlink()
    assert (conf / "config.toml").exists() and token.read_text() == first_token
