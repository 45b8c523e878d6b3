#!/bin/bash
# Issue 18's sweep: a cache smaller than its working set. For each backing
# (a fast file, and the hdd model) and each ratio of working set to cache
# (0.25 .. 8), fio 4k randwrite at QD32 over the working set against
#   alone:  `nbdcache serve --backing` (no cache)
#   cached: `nbdcache serve --cache --backing`, measured after a fill
# alternating the two, round by round. Prints the median IOPS of each, their
# ratio, the cache's GC write amplification (bytes GC moved per byte the
# client wrote) and its bypass share, writes a CSV and draws a PNG.
#
#   bench/pressure.sh                          # 1 round, 10 s runs, 64 MiB cache
#   ROUNDS=3 RUNTIME=20 CACHE_MB=128 bench/pressure.sh
#   BACKINGS=fast RATIOS="1 8" bench/pressure.sh
#   OUT=docs/pressure bench/pressure.sh        # keep docs/pressure.{csv,png}
#
# The machine is shared and noisy: read the ratios, not the absolute numbers.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-1}
RUNTIME=${RUNTIME:-10}
FILL=${FILL:-10}
CACHE_MB=${CACHE_MB:-64}
RATIOS=${RATIOS:-0.25 0.5 1 2 4 8}
BACKINGS=${BACKINGS:-fast hdd}
PY=/usr/bin/python3
for t in fio $PY; do command -v "$t" >/dev/null || { echo "missing $t (run make deps)"; exit 1; }; done

work=$(mktemp -d /tmp/nbdcache-pressure.XXXXXX)
OUT=${OUT:-$work/pressure}
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
go build -o "$work/nbdcache" ./cmd/nbdcache

PID=
start() { # backing ratio_mb cached(0/1)
	local model=() cache=()
	[ "$1" = hdd ] && model=(--backing-model hdd)
	rm -f "$work"/*.sock "$work/back.img" "$work/cache.img"
	truncate -s "${2}M" "$work/back.img"
	if [ "$3" = 1 ]; then
		truncate -s "${CACHE_MB}M" "$work/cache.img"
		cache=(--cache "$work/cache.img" --format --sequential-cutoff 0 --control "unix:$work/ctl.sock")
	fi
	"$work/nbdcache" serve --backing "$work/back.img" "${model[@]}" "${cache[@]}" \
		--listen "unix:$work/s.sock" >"$work/serve.log" 2>&1 &
	PID=$!
	for _ in $(seq 400); do [ -S "$work/s.sock" ] && return; sleep 0.05; done
	echo "server did not start"; cat "$work/serve.log"; exit 1
}
stop() { kill "$PID"; wait "$PID" 2>/dev/null || true; }

fio_run() { # span_mb seconds -> iops on stdout
	fio --name=p --ioengine=nbd --uri="nbd+unix:///?socket=$work/s.sock" --rw=randwrite --bs=4k \
		--iodepth=32 --size="${1}M" --time_based --runtime="$2" --randrepeat=0 \
		--output-format=json --output="$work/fio.json" >/dev/null 2>&1
	$PY -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["jobs"][0]["write"]["iops"]))' "$work/fio.json"
}
stats() { "$work/nbdcache" stats --json --control "unix:$work/ctl.sock"; }

res="$work/res.tsv"
: >"$res"
for round in $(seq "$ROUNDS"); do
	for b in $BACKINGS; do
		for r in $RATIOS; do
			span=$($PY -c "print(max(1, int($r * $CACHE_MB)))")
			start "$b" "$span" 0
			alone=$(fio_run "$span" "$RUNTIME")
			stop
			start "$b" "$span" 1
			fio_run "$span" "$FILL" >/dev/null # fill the cache
			stats >"$work/s0.json"
			cached=$(fio_run "$span" "$RUNTIME")
			stats >"$work/s1.json"
			stop
			$PY - "$work/s0.json" "$work/s1.json" "$b" "$r" "$round" "$alone" "$cached" >>"$res" <<'PYEOF'
import json, sys
s0, s1 = (json.load(open(p)) for p in sys.argv[1:3])
d = lambda k: s1[k] - s0[k]
wa = d("gc_moved_bytes") / max(1, d("bytes_written"))
byp = d("bypasses") / max(1, d("requests"))
b, r, rnd, alone, cached = sys.argv[3:8]
print(f"{b}\t{r}\t{rnd}\t{alone}\t{cached}\t{wa:.3f}\t{byp:.3f}")
PYEOF
			echo "round $round $b ratio $r: $(tail -1 "$res" | cut -f4-)" >&2
		done
	done
done

$PY - "$res" "$OUT.csv" <<'PYEOF'
import sys, statistics
from collections import defaultdict
rows = [l.split("\t") for l in open(sys.argv[1]).read().split("\n") if l]
d = defaultdict(list)
for b, r, rnd, alone, cached, wa, byp in rows:
    d[(b, float(r))].append((float(alone), float(cached), float(wa), float(byp)))
print(f"{'backing':8} {'ratio':>6} {'alone IOPS':>11} {'cached IOPS':>12} {'cached/alone':>13} {'GC WA':>7} {'bypass':>7}")
with open(sys.argv[2], "w") as csv:
    csv.write("backing,ratio,alone_iops,cached_iops,gc_wa,bypass_share\n")
    for (b, r), v in sorted(d.items()):
        med = [statistics.median(x[i] for x in v) for i in range(4)]
        print(f"{b:8} {r:6g} {med[0]:11.0f} {med[1]:12.0f} {med[1] / max(1, med[0]):12.2f}x {med[2]:7.3f} {med[3]:7.3f}")
        csv.write(f"{b},{r},{med[0]:.0f},{med[1]:.0f},{med[2]:.3f},{med[3]:.3f}\n")
PYEOF
go run ./bench/plot -sweep -in "$OUT.csv" -out "$OUT.png" \
	-title "4k randwrite QD32, ${CACHE_MB} MiB cache: IOPS against working set / cache"
echo "wrote $OUT.csv and $OUT.png"
