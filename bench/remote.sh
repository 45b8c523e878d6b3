#!/bin/bash
# Issue 21: a write-back cache in front of a remote NBD export. The remote
# is nbdkit's memory plugin on TCP behind its delay filter (DELAY per
# read, write and flush: a replicated store's network round trips). fio
# 4k random writes at QD32, alternating round by round:
#   remote:   fio straight at the remote (nbd://127.0.0.1:PORT)
#   nbdcache: fio at `nbdcache serve --backing nbd://... --cache` (write-back)
# Prints the medians, the ratio (goal: >= 10x), and the cache's average
# writeback write to the remote (sorted and merged: larger than 4k).
#
#   bench/remote.sh                       # 3 rounds of 10 s, 3 ms delay
#   ROUNDS=5 RUNTIME=20 DELAY=5ms bench/remote.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-10}
DELAY=${DELAY:-3ms}
SIZE_MB=${SIZE_MB:-256}
PY=/usr/bin/python3
for t in fio nbdkit $PY; do command -v "$t" >/dev/null || { echo "missing $t (run make deps)"; exit 1; }; done
work=$(mktemp -d /tmp/nbdcache-remote.XXXXXX)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"' EXIT
go build -o "$work/nbdcache" ./cmd/nbdcache
port=$($PY -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')
nbdkit -f -i 127.0.0.1 -p "$port" --filter=delay memory "${SIZE_MB}M" \
	delay-read="$DELAY" delay-write="$DELAY" delay-zero="$DELAY" delay-trim="$DELAY" delay-extents="$DELAY" \
	>"$work/k.log" 2>&1 & pids+=($!)
for _ in $(seq 200); do $PY -c "import socket;socket.create_connection(('127.0.0.1',$port)).close()" 2>/dev/null && break; sleep 0.05; done
remote="nbd://127.0.0.1:$port/"
truncate -s $((SIZE_MB * 2))M "$work/cache.img"
"$work/nbdcache" serve --cache "$work/cache.img" --backing "$remote" --format --sequential-cutoff 0 \
	--listen "unix:$work/c.sock" --control "unix:$work/ctl.sock" >"$work/c.log" 2>&1 & pids+=($!)
for _ in $(seq 600); do [ -S "$work/c.sock" ] && break; sleep 0.05; done

res="$work/res.tsv"
for round in $(seq "$ROUNDS"); do
	for t in remote nbdcache; do
		case $t in
		remote) uri=$remote ;;
		nbdcache) uri="nbd+unix:///?socket=$work/c.sock" ;;
		esac
		fio --name=x --ioengine=nbd --uri="$uri" --rw=randwrite --bs=4k --iodepth=32 --size="${SIZE_MB}M" \
			--runtime="$RUNTIME" --time_based --output-format=json --output="$work/o.json" >/dev/null 2>&1
		iops=$($PY -c "import json,sys;j=json.load(open(sys.argv[1]))['jobs'][0];print(round(j['write']['iops']))" "$work/o.json")
		printf '%s\t%s\n' "$t" "$iops" >>"$res"
		echo "round $round $t: $iops IOPS" >&2
	done
done
"$work/nbdcache" stats --json --control "unix:$work/ctl.sock" >"$work/stats.json"
$PY - "$res" "$ROUNDS" "$RUNTIME" "$DELAY" "$work/stats.json" <<'PYEOF'
import sys, statistics, collections, datetime, json
d = collections.defaultdict(list)
for l in open(sys.argv[1]):
    t, iops = l.split()
    d[t].append(float(iops))
m = {k: statistics.median(v) for k, v in d.items()}
st = json.load(open(sys.argv[5]))
print(f"\n4k randwrite QD32 over a remote with {sys.argv[4]} per request, {datetime.date.today()}, medians of {sys.argv[2]} alternating rounds of {sys.argv[3]} s")
print(f"{'remote':>9} {'nbdcache':>9} {'ratio':>7}")
print(f"{m['remote']:9.0f} {m['nbdcache']:9.0f} {m['nbdcache']/m['remote']:6.1f}x")
print(f"writeback to the remote: {st['backing_writes']} writes, average {st['backing_write_avg']} bytes; dirty now {st['dirty_bytes']>>20} MiB")
PYEOF
