#!/usr/bin/env bash
# make test-systemd: boot a Debian guest with systemd as PID 1 (systemd-nspawn), `make
# install` this checkout inside it, and run tests/guest/checks.py there against the real
# systemd. Needs root, debootstrap and systemd-container (the Makefile installs them).
#
# The host may have no systemd or D-Bus of its own: hence --register=no --keep-unit, and
# commands run in the guest through nsenter into its PID 1's namespaces (machinectl and
# systemd-run -M need a host systemd). The guest shares the host's network namespace, so
# pip inside it reaches the package index as the host does, trusting the host's CA bundle.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
checkout=$(cd "$here/../.." && pwd)
CACHE=${GUEST_CACHE:-/var/cache/hapsms-relay-test}
export GUEST_CACHE=$CACHE
if [ "$(id -u)" != 0 ]; then
  echo "make test-systemd: run as root (systemd-nspawn boots the guest)" >&2
  exit 1
fi
t0=$(date +%s)
root=$("$here/build.sh")
work=$(mktemp -d /var/tmp/hapsms-guest.XXXXXX)
nspawn=""
cleanup() {
  if [ -n "$nspawn" ] && kill -0 "$nspawn" 2>/dev/null; then
    kill "$nspawn" 2>/dev/null || true  # nspawn powers the guest off on SIGTERM
    for _ in $(seq 100); do kill -0 "$nspawn" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$nspawn" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# A copy per run: the cached rootfs stays pristine.
cp -a --reflink=auto "$root" "$work/root"
mkdir "$work/root/src"
tar -C "$checkout" --exclude=./.git --exclude=./.venv --exclude=./var --exclude=./build \
  --exclude='*.egg-info' --exclude=__pycache__ --exclude=.mypy_cache --exclude=.ruff_cache \
  --exclude=.pytest_cache -cf - . | tar -C "$work/root/src" -xf -
install -m 0644 "${HOST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}" "$work/root/etc/ssl/host-ca.pem"
mkdir -p "$CACHE/pip"  # pip's download cache, shared between runs

# A free loopback port (the guest shares the host's network), and test drop-ins: the socket
# there; a short watchdog so that its check takes seconds; kill on any filtered syscall.
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p "$work/root/etc/systemd/system/hapsms-relay.socket.d" \
         "$work/root/etc/systemd/system/hapsms-relay.service.d"
printf '[Socket]\nListenStream=\nListenStream=127.0.0.1:%s\n' "$port" \
  > "$work/root/etc/systemd/system/hapsms-relay.socket.d/test.conf"
printf '[Service]\nSystemCallErrorNumber=kill\nWatchdogSec=4s\nTimeoutAbortSec=5s\n' \
  > "$work/root/etc/systemd/system/hapsms-relay.service.d/test.conf"

systemd-nspawn --quiet --register=no --keep-unit --boot -D "$work/root" \
  --bind="$CACHE/pip:/root/.cache/pip" > "$work/console.log" 2>&1 &
nspawn=$!
# The guest's PID 1 is the child of systemd-nspawn that runs systemd (nspawn forks an
# intermediate child first, which exits).
leader=""
for _ in $(seq 300); do
  for child in $(pgrep -P "$nspawn" || true); do
    if [ "$(cat "/proc/$child/comm" 2>/dev/null)" = systemd ]; then leader=$child; fi
  done
  [ -n "$leader" ] && break
  sleep 0.1
done
[ -n "$leader" ] || { echo "guest: systemd-nspawn did not start" >&2; cat "$work/console.log" >&2; exit 1; }

guest() {
  nsenter --target "$leader" --mount --uts --ipc --net --pid --cgroup -- \
    env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
    LANG=C.UTF-8 SSL_CERT_FILE=/etc/ssl/host-ca.pem PIP_CERT=/etc/ssl/host-ca.pem \
    PIP_DISABLE_PIP_VERSION_CHECK=1 ${PIP_INDEX_URL:+PIP_INDEX_URL=$PIP_INDEX_URL} "$@"
}
booted=""
for _ in $(seq 300); do
  state=$(guest systemctl is-system-running 2>/dev/null || true)
  case "$state" in running|degraded) booted=$state; break;; esac
  sleep 0.2
done
[ -n "$booted" ] || { echo "guest: did not boot ($state)" >&2; tail -30 "$work/console.log" >&2; exit 1; }
echo "guest: booted ($booted) in $(( $(date +%s) - t0 )) s since the start"
if [ "$booted" = degraded ]; then guest systemctl --failed --no-legend >&2 || true; fi

guest make -C /src install
guest systemctl enable --now hapsms-relay.socket
set +e
guest python3 /src/tests/guest/checks.py "$port"
status=$?
set -e
echo "make test-systemd: $(( $(date +%s) - t0 )) s in all"
exit $status
