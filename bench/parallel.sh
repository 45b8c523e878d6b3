#!/bin/bash
# Issue 18's parallel load: the shape of libnbd's parallel load test (8
# connections, 16 KiB random reads and writes, half each, many requests in
# flight), run by fio's nbd engine (numjobs=8: a connection each) over a
# fast file, against
#   alone:  `nbdcache serve --backing` (no cache)
#   cached: `nbdcache serve --cache --backing`, the cache a quarter of the
#           span, measured after a fill with the same load
# alternating the two, round by round. Prints the median IOPS of each and
# their ratio; the claim is that the cache is no slower than none.
#
#   bench/parallel.sh                       # 3 rounds, 10 s runs, 64 MiB span
#   ROUNDS=5 RUNTIME=20 SPAN_MB=256 bench/parallel.sh
#
# The machine is shared and noisy: read the ratio, not the absolute numbers.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-10}
FILL=${FILL:-10}
SPAN_MB=${SPAN_MB:-64}
CACHE_MB=$((SPAN_MB / 4))
PY=/usr/bin/python3
for t in fio $PY; do command -v "$t" >/dev/null || { echo "missing $t (run make deps)"; exit 1; }; done

work=$(mktemp -d /tmp/nbdcache-parallel.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
go build -o "$work/nbdcache" ./cmd/nbdcache

PID=
start() { # cached(0/1)
	local cache=()
	rm -f "$work"/*.sock "$work/back.img" "$work/cache.img"
	truncate -s "${SPAN_MB}M" "$work/back.img"
	if [ "$1" = 1 ]; then
		truncate -s "$((CACHE_MB + 2))M" "$work/cache.img" # room for the journal and checkpoints
		cache=(--cache "$work/cache.img" --format --control "unix:$work/ctl.sock")
	fi
	"$work/nbdcache" serve --backing "$work/back.img" "${cache[@]}" \
		--listen "unix:$work/s.sock" >"$work/serve.log" 2>&1 &
	PID=$!
	for _ in $(seq 400); do [ -S "$work/s.sock" ] && return; sleep 0.05; done
	echo "server did not start"; cat "$work/serve.log"; exit 1
}
stop() { kill "$PID"; wait "$PID" 2>/dev/null || true; }

fio_run() { # seconds -> total IOPS (reads + writes) on stdout
	fio --name=p --ioengine=nbd --uri="nbd+unix:///?socket=$work/s.sock" --rw=randrw --rwmixread=50 \
		--bs=16k --iodepth=16 --numjobs=8 --group_reporting --size="${SPAN_MB}M" \
		--time_based --runtime="$1" --randrepeat=0 \
		--output-format=json --output="$work/fio.json" >/dev/null 2>&1
	$PY -c 'import json,sys; j=json.load(open(sys.argv[1]))["jobs"][0]; print(round(j["read"]["iops"]+j["write"]["iops"]))' "$work/fio.json"
}

res="$work/res.tsv"
: >"$res"
for round in $(seq "$ROUNDS"); do
	start 0
	alone=$(fio_run "$RUNTIME")
	stop
	start 1
	fio_run "$FILL" >/dev/null
	cached=$(fio_run "$RUNTIME")
	"$work/nbdcache" stats --json --control "unix:$work/ctl.sock" >"$work/st.json"
	stop
	echo -e "$alone\t$cached" >>"$res"
	echo "round $round: alone $alone, cached $cached IOPS ($($PY -c 'import json,sys; s=json.load(open(sys.argv[1])); print("hit ratio %.2f, bypasses %d (%d thrashing), GC cleaned %d MiB" % (s["hit_ratio"], s["bypasses"], s["thrash_bypasses"], s["gc_cleaned_bytes"]>>20))' "$work/st.json"))" >&2
done
$PY - "$res" "$SPAN_MB" "$CACHE_MB" <<'PYEOF'
import sys, statistics
rows = [[float(x) for x in l.split("\t")] for l in open(sys.argv[1]).read().split("\n") if l]
a = statistics.median(r[0] for r in rows)
c = statistics.median(r[1] for r in rows)
print(f"8 connections, 16 KiB randrw 50/50, QD16 each, {sys.argv[2]} MiB span, {sys.argv[3]} MiB cache, {len(rows)} rounds")
print(f"alone {a:.0f} IOPS, cached {c:.0f} IOPS (medians): cached/alone {c / a:.2f}x")
PYEOF
