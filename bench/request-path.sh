#!/bin/bash
# Issue 17's request-path table (bench/reqpath.py): 4k random and 1M
# sequential rows through fio's nbd engine, for nbdcache with and without a
# cache, nbdkit file and qemu-nbd, on fresh sparse files, alternating, with
# server CPU, context switches and syscalls per request.
#
#   bench/request-path.sh                      # 3 rounds of 5 s rows (about 8 min)
#   ROUNDS=5 RUNTIME=10 bench/request-path.sh
#   SERVERS="cache nbdkit" bench/request-path.sh
#   SERVERS="cache cache:/tmp/old/nbdcache nbdkit" bench/request-path.sh   # A/B against another build
set -euo pipefail
cd "$(dirname "$0")/.."
for t in fio nbdkit qemu-nbd /usr/bin/python3; do command -v "$t" >/dev/null || { echo "missing $t (run make deps)"; exit 1; }; done
work=$(mktemp -d /tmp/nbdcache-reqpath-bin.XXXXXX)
trap 'rm -rf "$work"' EXIT
go build -o "$work/nbdcache" ./cmd/nbdcache
/usr/bin/python3 bench/reqpath.py "$work/nbdcache"
