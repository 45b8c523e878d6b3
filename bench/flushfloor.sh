#!/bin/bash
# Issue 18's floor over a fast file backing: what fio 4k randwrite QD32
# gets from `nbdcache serve --backing FILE` (no cache) when something else
# makes the backing file durable (fdatasync) at a given interval, as a
# writeback cache must before it may drop dirty data; and the same server
# in writearound mode (every write bypasses the cache). Alternates the
# cells round by round and prints medians and the ratio to the backing
# alone with no sync at all.
#
#   bench/flushfloor.sh                 # 1 round, 10 s runs, 64 MiB span
#   ROUNDS=3 SPAN_MB=256 bench/flushfloor.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-1}
RUNTIME=${RUNTIME:-10}
SPAN_MB=${SPAN_MB:-64}
INTERVALS=${INTERVALS:-none 1 0.1 0}
PY=/usr/bin/python3
for t in fio $PY sync; do command -v "$t" >/dev/null || { echo "missing $t (run make deps)"; exit 1; }; done
work=$(mktemp -d /tmp/nbdcache-floor.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
go build -o "$work/nbdcache" ./cmd/nbdcache

run() { # interval|writearound -> iops
	rm -f "$work"/*.sock "$work"/*.img
	truncate -s "${SPAN_MB}M" "$work/back.img"
	local extra=()
	if [ "$1" = writearound ]; then
		truncate -s 64M "$work/cache.img"
		extra=(--cache "$work/cache.img" --format --mode writearound)
	fi
	"$work/nbdcache" serve --backing "$work/back.img" "${extra[@]}" --listen "unix:$work/s.sock" >"$work/serve.log" 2>&1 &
	local pid=$! syncer=
	for _ in $(seq 400); do [ -S "$work/s.sock" ] && break; sleep 0.05; done
	if [ "$1" != none ] && [ "$1" != writearound ]; then
		(while :; do sync --data "$work/back.img"; [ "$1" = 0 ] || sleep "$1"; done) &
		syncer=$!
	fi
	fio --name=p --ioengine=nbd --uri="nbd+unix:///?socket=$work/s.sock" --rw=randwrite --bs=4k \
		--iodepth=32 --size="${SPAN_MB}M" --time_based --runtime="$RUNTIME" --randrepeat=0 \
		--output-format=json --output="$work/fio.json" >/dev/null 2>&1
	[ -n "$syncer" ] && { kill "$syncer"; wait "$syncer" 2>/dev/null || true; }
	kill "$pid"; wait "$pid" 2>/dev/null || true
	$PY -c 'import json,sys; print(round(json.load(open(sys.argv[1]))["jobs"][0]["write"]["iops"]))' "$work/fio.json"
}

res="$work/res.tsv"
for r in $(seq "$ROUNDS"); do
	for cell in $INTERVALS writearound; do
		iops=$(run "$cell")
		echo "round $r $cell: $iops"
		printf '%s\t%s\n' "$cell" "$iops" >>"$res"
	done
done
$PY - "$res" <<'PY'
import sys, statistics
rows = [l.split('\t') for l in open(sys.argv[1]).read().split('\n') if l]
cells = []
for c, _ in rows:
    if c not in cells: cells.append(c)
med = {c: round(statistics.median(int(i) for cc, i in rows if cc == c)) for c in cells}
base = med.get('none')
name = {'none': 'backing alone, never synced', 'writearound': 'writearound (every write bypasses)', '0': 'backing alone, fdatasync back to back'}
print(f"{'cell':<44} {'IOPS':>9} {'ratio':>7}")
for c in cells:
    label = name.get(c, f'backing alone, fdatasync every {c} s')
    print(f"{label:<44} {med[c]:>9} {med[c]/base if base else 0:>6.2f}x")
PY
