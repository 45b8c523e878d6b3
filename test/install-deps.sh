#!/bin/sh
# Installs the Debian packages that the test suite drives, when missing.
# Runs `apt-get update` once, only if something has to be installed.
set -eu
pkgs="fio nbdkit qemu-utils libnbd-bin python3-libnbd nbd-client nbd-server qemu-system-x86 busybox-static e2fsprogs xfsprogs util-linux systemd bcache-tools dmsetup bash-completion"
missing=""
for p in $pkgs; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
echo "installing:$missing"
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
# shellcheck disable=SC2086
$sudo apt-get install -y -qq --no-install-recommends $missing
