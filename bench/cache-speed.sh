#!/bin/bash
# Issue 2's speed rows: 4k random writes at QD32, and hot 4k random reads,
# three ways side by side, alternating round by round:
#   file:     fio writing/reading the cache file directly (io_uring, buffered)
#   nbdcache: through `nbdcache serve --cache` in write-back mode (fio's nbd engine)
#   nbdkit:   nbdkit's file plugin on the same kind of file
#   null:     nbdkit's null plugin, which stores nothing: for writes, a
#             rough bound on what an NBD server reaches through fio's nbd
#             engine here (nbdkit's own per-request cost stays in it, so a
#             faster server can beat it, as nbdcache's hot reads do)
# Prints medians and the ratios nbdcache/file and nbdcache/nbdkit.
#
#   bench/cache-speed.sh                 # 3 rounds of 10 s
#   ROUNDS=5 RUNTIME=20 bench/cache-speed.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-10}
SIZE_MB=${SIZE_MB:-256}
PY=/usr/bin/python3
for t in fio nbdkit $PY; do command -v "$t" >/dev/null || { echo "missing $t (run make deps)"; exit 1; }; done
work=$(mktemp -d /tmp/nbdcache-cspeed.XXXXXX)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"' EXIT
go build -o "$work/nbdcache" ./cmd/nbdcache
truncate -s "${SIZE_MB}M" "$work/direct.img" "$work/kit.img" "$work/backing.img"
truncate -s $((SIZE_MB * 2))M "$work/cache.img"
"$work/nbdcache" serve --cache "$work/cache.img" --backing "$work/backing.img" --format --sequential-cutoff 0 \
	--listen "unix:$work/c.sock" >"$work/c.log" 2>&1 & pids+=($!)
nbdkit -f -U "$work/k.sock" file "$work/kit.img" >"$work/k.log" 2>&1 & pids+=($!)
nbdkit -f -U "$work/n.sock" null "${SIZE_MB}M" >"$work/n.log" 2>&1 & pids+=($!)
for _ in $(seq 600); do [ -S "$work/c.sock" ] && [ -S "$work/k.sock" ] && [ -S "$work/n.sock" ] && break; sleep 0.05; done
# Warm every target so that reads are hot (in the cache, in the page cache).
for u in "nbd+unix:///?socket=$work/c.sock" "nbd+unix:///?socket=$work/k.sock"; do
	fio --name=warm --ioengine=nbd --uri="$u" --rw=write --bs=1M --iodepth=8 --size="${SIZE_MB}M" --output=/dev/null >/dev/null 2>&1
done
fio --name=warm --filename="$work/direct.img" --ioengine=io_uring --rw=write --bs=1M --iodepth=8 --size="${SIZE_MB}M" --output=/dev/null >/dev/null 2>&1

res="$work/res.tsv"
for round in $(seq "$ROUNDS"); do
	for rw in randwrite randread; do
		for t in file nbdcache nbdkit null; do
			case $t in
			file) tgt=(--filename="$work/direct.img" --ioengine=io_uring) ;;
			nbdcache) tgt=(--ioengine=nbd --uri="nbd+unix:///?socket=$work/c.sock") ;;
			nbdkit) tgt=(--ioengine=nbd --uri="nbd+unix:///?socket=$work/k.sock") ;;
			null) tgt=(--ioengine=nbd --uri="nbd+unix:///?socket=$work/n.sock") ;;
			esac
			# Every run starts with no dirty pages anywhere: the kernel's
			# writeback of the run before would otherwise slow whichever
			# target comes next (seen: nbdkit 27k IOPS on a fresh image
			# while an earlier run's 262 MB were being written back,
			# 84-103k once they were not).
			sync
			fio --name=x "${tgt[@]}" --rw=$rw --bs=4k --iodepth=32 --size="${SIZE_MB}M" --runtime="$RUNTIME" \
				--time_based --output-format=json --output="$work/o.json" >/dev/null 2>&1
			iops=$($PY -c "import json,sys;j=json.load(open(sys.argv[1]))['jobs'][0];print(round(j['read']['iops']+j['write']['iops']))" "$work/o.json")
			printf '%s\t%s\t%s\n' "$rw" "$t" "$iops" >>"$res"
			echo "round $round $rw $t: $iops IOPS" >&2
		done
	done
done
$PY - "$res" "$ROUNDS" "$RUNTIME" <<'PYEOF'
import sys, statistics, collections, datetime
d = collections.defaultdict(list)
for l in open(sys.argv[1]):
    rw, t, iops = l.split()
    d[rw, t].append(float(iops))
m = {k: statistics.median(v) for k, v in d.items()}
print(f"\n4k QD32, {datetime.date.today()}, medians of {sys.argv[2]} alternating rounds of {sys.argv[3]} s")
print(f"{'workload':12} {'file':>9} {'nbdcache':>9} {'nbdkit':>9} {'null':>9} {'vs file':>8} {'vs nbdkit':>9} {'null/file':>9}")
for rw in ("randwrite", "randread"):
    f, c, k, n = (m[rw, t] for t in ("file", "nbdcache", "nbdkit", "null"))
    print(f"{rw:12} {f:9.0f} {c:9.0f} {k:9.0f} {n:9.0f} {c/f:7.2f}x {c/k:8.2f}x {n/f:8.2f}x")
PYEOF
