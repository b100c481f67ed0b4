#!/usr/bin/env bash
# Build (once) the Debian guest `make test-systemd` boots: bookworm minbase with systemd,
# dbus, python3-venv and make, from Debian's archive. The rootfs is cached outside the
# checkout, under a name keyed by what it contains (this script, suite, mirror, packages),
# so a change to any of them builds a new one and an unchanged one is reused between runs.
# Prints the rootfs path on stdout.
set -euo pipefail

SUITE=${GUEST_SUITE:-bookworm}
MIRROR=${GUEST_MIRROR:-http://deb.debian.org/debian}
CACHE=${GUEST_CACHE:-/var/cache/hapsms-relay-test}
# systemd-sysv: /sbin/init; dbus: systemctl's bus; python3-venv and make: `make install`;
# ca-certificates: pip's TLS; curl: the checks' posts; procps: pgrep/ps for the checks.
PACKAGES=systemd,systemd-sysv,dbus,python3-venv,make,ca-certificates,curl,procps

key=$( { cat "$0"; echo "$SUITE $MIRROR $PACKAGES"; } | sha256sum | cut -c1-16)
root="$CACHE/rootfs-$SUITE-$key"
if [ -e "$root/.complete" ]; then
  echo "guest: cached rootfs $root" >&2
  echo "$root"
  exit 0
fi

mkdir -p "$CACHE"
tmp=$(mktemp -d "$CACHE/build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
echo "guest: debootstrap $SUITE (minbase + $PACKAGES) from $MIRROR into $tmp" >&2
start=$(date +%s)
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$tmp/root" "$MIRROR" >&2
# Lean: no package lists or downloaded .debs in the cache.
rm -rf "$tmp"/root/var/cache/apt/archives/*.deb "$tmp"/root/var/lib/apt/lists/*
echo "hapsms-guest" > "$tmp/root/etc/hostname"
# Boot to a shell-less target quickly: nothing asks for a login on the console.
ln -sf /lib/systemd/system/multi-user.target "$tmp/root/etc/systemd/system/default.target"
systemctl --root="$tmp/root" mask console-getty.service getty@.service systemd-networkd.service \
  systemd-resolved.service systemd-timesyncd.service apt-daily.timer apt-daily-upgrade.timer \
  >/dev/null 2>&1 || true
touch "$tmp/root/.complete"
# Older rootfs of this suite are of no further use.
for old in "$CACHE"/rootfs-"$SUITE"-*; do
  [ "$old" != "$root" ] && [ -d "$old" ] && rm -rf "$old"
done
mv "$tmp/root" "$root"
echo "guest: built in $(( $(date +%s) - start )) s, $(du -sh "$root" | cut -f1)" >&2
echo "$root"
