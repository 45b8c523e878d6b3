#!/bin/bash
# The writeback experiment (issue 5): fio 4k randwrite QD32 against a slow
# backing (the hdd model), three ways, in one run:
#   (a) direct:  nbdcache serve --backing-model hdd, no cache
#   (b) nbdcache: the same behind nbdcache's write-back cache
#   (c) nbdkit:  nbdkit's cache filter (write-back, 4 KiB blocks: its best
#                case here) in front of (a), through nbdkit's nbd plugin
#   (c0)         the same as it comes: its default 64 KiB blocks, so each
#                4 KiB write first reads 64 KiB from the model
# then the drain of what (b) left dirty, timed against writing the same
# number of blocks randomly to the model, FLUSH latency after 2000 random
# dirty writes, and (d) the latency of a paced read/write load while the
# flusher writes back and with nothing dirty. Prints a table; writes series.csv and writeback.png
# (IOPS, dirty bytes and writeback rate over time during (b)) to OUT.
#
#   bench/writeback-experiment.sh                # 30 s per run
#   RUNTIME=10 OUT=/tmp/wb bench/writeback-experiment.sh
set -euo pipefail
cd "$(dirname "$0")/.."
RUNTIME=${RUNTIME:-30}
SPAN_MB=${SPAN_MB:-256}      # the region fio writes
OUT=${OUT:-bench/out}
PY=/usr/bin/python3
for t in fio nbdkit $PY; do command -v "$t" >/dev/null || { echo "missing $t (run make deps)"; exit 1; }; done
mkdir -p "$OUT"
work=$(mktemp -d /tmp/nbdcache-wb.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
bin="$work/nbdcache"
go build -o "$bin" ./cmd/nbdcache

# wait_serving LOG: wait for nbdcache to say it serves.
wait_serving() { for _ in $(seq 600); do grep -q "serving export" "$1" 2>/dev/null && return; sleep 0.05; done; cat "$1"; exit 1; }
wait_sock() { for _ in $(seq 600); do [ -S "$1" ] && return; sleep 0.05; done; echo "no socket $1"; exit 1; }

fio_randwrite() { # URI OUTJSON
	fio --name=wb --ioengine=nbd --uri="$1" --rw=randwrite --bs=4k --iodepth=32 --size="${SPAN_MB}M" \
		--runtime="$RUNTIME" --time_based --randrepeat=1 --randseed=7 --output-format=json --output="$2" >/dev/null 2>&1
}
iops_of() { $PY -c "import json,sys;print(round(json.load(open(sys.argv[1]))['jobs'][0]['write']['iops']))" "$1"; }
# fio's own CPU per request, in microseconds: what the client alone costs.
client_us() { $PY -c "import json,sys;j=json.load(open(sys.argv[1]))['jobs'][0];print(f\"{(j['usr_cpu']+j['sys_cpu'])/100*j['job_runtime']*1e3/max(j['write']['total_ios'],1):.1f}\")" "$1"; }

truncate -s 1G "$work/a.img" "$work/b.img"
truncate -s 1G "$work/cache.img"

echo "(a) direct to the hdd model..." >&2
"$bin" serve --backing "$work/a.img" --backing-model hdd --listen "unix:$work/a.sock" >"$work/a.log" 2>&1 & pids+=($!)
wait_serving "$work/a.log"
fio_randwrite "nbd+unix:///?socket=$work/a.sock" "$work/a.json"
A=$(iops_of "$work/a.json")

echo "(b) nbdcache write-back over the hdd model..." >&2
"$bin" serve --backing "$work/b.img" --backing-model hdd --cache "$work/cache.img" --format \
	--listen "unix:$work/b.sock" --control "unix:$work/b.ctl" >"$work/b.log" 2>&1 & pids+=($!)
bpid=$!
wait_serving "$work/b.log"
"$bin" stats --json --watch 1s --control "unix:$work/b.ctl" >"$work/stats.ndjson" 2>/dev/null & spid=$!
fio_randwrite "nbd+unix:///?socket=$work/b.sock" "$work/b.json"
B=$(iops_of "$work/b.json")
DIRTY=$("$bin" stats --json --control "unix:$work/b.ctl" | $PY -c "import json,sys;print(json.load(sys.stdin)['dirty_bytes'])")
t0=$(date +%s.%N)
"$bin" flush --drain --control "unix:$work/b.ctl" >/dev/null
t1=$(date +%s.%N)
sleep 1
kill $spid 2>/dev/null || true
DRAIN=$($PY -c "print(f'{$t1-$t0:.2f}')")
FLUSH_MS=$($PY bench/flushlat.py "nbd+unix:///?socket=$work/b.sock" 2000 $((SPAN_MB << 20)) 5 1 | sort -n | sed -n 3p)

# (d) foreground latency while writeback runs: a paced 4k random read/write
# load on the cached span, in alternating states. Each round dirties the
# span again with 3 s of (b)'s load, runs the paced load while the flusher
# writes back, drains, and runs it again with nothing dirty.
stat_of() { "$bin" stats --json --control "unix:$work/b.ctl" | $PY -c "import json,sys;print(json.load(sys.stdin)[sys.argv[1]])" "$1"; }
FG_RUNTIME=$((RUNTIME < 10 ? RUNTIME : 10))
fio_paced() { # OUTJSON
	fio --name=fg --ioengine=nbd --uri="nbd+unix:///?socket=$work/b.sock" --rw=randrw --bs=4k --iodepth=4 \
		--size="${SPAN_MB}M" --rate_iops=500,500 --runtime="$FG_RUNTIME" --time_based --randseed=11 \
		--output-format=json --output="$1" >/dev/null 2>&1
}
echo "(d) paced foreground load while writeback runs and with nothing dirty, 3 rounds..." >&2
WB_MIB=0
for r in 1 2 3; do
	RUNTIME=3 fio_randwrite "nbd+unix:///?socket=$work/b.sock" "$work/d-fill.json"
	wb0=$(stat_of writeback_bytes)
	fio_paced "$work/d-wb-$r.json"
	WB_MIB=$(($(stat_of writeback_bytes) - wb0 + WB_MIB))
	"$bin" flush --drain --control "unix:$work/b.ctl" >/dev/null
	fio_paced "$work/d-idle-$r.json"
done
WB_MIBS=$($PY -c "print(f'{$WB_MIB/2**20/3/$FG_RUNTIME:.1f}')")
kill $bpid; wait $bpid 2>/dev/null || true

# nbdkit_cache NAME [FILTER ARGS]: fio through nbdkit's write-back cache
# filter, which proxies to its own (a)-style server; fio's JSON in NAME.json.
nbdkit_cache() {
	local n=$1
	shift
	truncate -s 1G "$work/$n.img"
	"$bin" serve --backing "$work/$n.img" --backing-model hdd --listen "unix:$work/$n-up.sock" >"$work/$n-up.log" 2>&1 & pids+=($!)
	local upid=$!
	wait_serving "$work/$n-up.log"
	nbdkit -f -U "$work/$n.sock" --filter=cache nbd socket="$work/$n-up.sock" cache=writeback "$@" >"$work/$n.log" 2>&1 & pids+=($!)
	local kpid=$!
	wait_sock "$work/$n.sock"
	fio_randwrite "nbd+unix:///?socket=$work/$n.sock" "$work/$n.json"
	kill $kpid $upid
	wait $kpid $upid 2>/dev/null || true
}
echo "(c) nbdkit cache filter (write-back, 4 KiB blocks) over the hdd model..." >&2
nbdkit_cache c cache-min-block-size=4096
C=$(iops_of "$work/c.json")
echo "(c0) nbdkit cache filter as it comes (write-back, its default 64 KiB blocks)..." >&2
nbdkit_cache c0
C0=$(iops_of "$work/c0.json")

CB=$(client_us "$work/b.json")
CC=$(client_us "$work/c.json")
NCPU=$(nproc)

# The time to write the drained blocks randomly to the model: at (a)'s rate.
BLOCKS=$((DIRTY / 4096))
RANDOM_S=$($PY -c "print(f'{$BLOCKS/max($A,1):.1f}')")

$PY - "$work/stats.ndjson" "$OUT/series.csv" <<'PYEOF'
import json, sys
objs, dec, buf = [], json.JSONDecoder(), open(sys.argv[1]).read()
i = 0
while True:
    while i < len(buf) and buf[i].isspace():
        i += 1
    if i >= len(buf):
        break
    try:
        o, i = dec.raw_decode(buf, i)
    except ValueError:
        break
    objs.append(o)
with open(sys.argv[2], "w") as f:
    f.write("t_seconds,iops,dirty_mib,writeback_mib_s\n")
    for a, b in zip(objs, objs[1:]):
        dt = max(b["uptime_seconds"] - a["uptime_seconds"], 1e-3)
        f.write("%.1f,%.0f,%.2f,%.2f\n" % (b["uptime_seconds"], (b["bytes_written"] - a["bytes_written"]) / 4096 / dt,
                b["dirty_bytes"] / 2**20, (b["writeback_bytes"] - a["writeback_bytes"]) / 2**20 / dt))
PYEOF
go run ./bench/plot -in "$OUT/series.csv" -out "$OUT/writeback.png"

cat <<EOT

writeback experiment, $(date +%F), fio 4k randwrite QD32, ${RUNTIME} s over ${SPAN_MB} MiB, backing = hdd model
| run | IOPS | ratio |
|---|---|---|
| (a) direct to the hdd model | $A | 1.0x |
| (b) nbdcache write-back | $B | $($PY -c "print(f'{$B/max($A,1):.1f}x of (a), {$B/max($C,1):.2f}x of (c)')") |
| (c) nbdkit cache filter, write-back, 4 KiB blocks | $C | $($PY -c "print(f'{$C/max($A,1):.1f}x of (a)')") |
| (c0) the same with its default 64 KiB blocks | $C0 | $($PY -c "print(f'{$C0/max($A,1):.1f}x of (a); (b) is {$B/max($C0,1):.0f}x of it')") |

drain of (b): $BLOCKS dirty 4 KiB blocks in ${DRAIN} s; writing them randomly to the model at (a)'s rate: ${RANDOM_S} s (ratio $($PY -c "print(f'{$DRAIN/max($RANDOM_S,1e-9):.3f}')"))
fio's own CPU per request: ${CB} us in (b), ${CC} us in (c). On ${NCPU} CPUs, 2x (c) = $((2 * C)) IOPS would leave a server $($PY -c "print(f'{$NCPU*1e6/max(2*$C,1)-$CB:.2f}')") us of CPU per request
FLUSH after 2000 random dirty 4 KiB writes (median of 5): ${FLUSH_MS} ms

(d) foreground 4k randrw, 500+500 IOPS at QD4, ${FG_RUNTIME} s a round on cached data, median of 3 rounds; writeback meanwhile: ${WB_MIBS} MiB/s
| op | p50 / p99 µs, writeback running | p50 / p99 µs, nothing dirty | ratio |
|---|---|---|---|
$($PY - "$work" <<'PYEOF'
import json, statistics, sys
def pct(state, op, p):
    return statistics.median(json.load(open(f"{sys.argv[1]}/d-{state}-{r}.json"))["jobs"][0][op]["clat_ns"]["percentile"][p] / 1e3 for r in (1, 2, 3))
for op in ("read", "write"):
    w50, w99, i50, i99 = (pct(s, op, p) for s in ("wb", "idle") for p in ("50.000000", "99.000000"))
    print(f"| {op} | {w50:.0f} / {w99:.0f} | {i50:.0f} / {i99:.0f} | {w50/i50:.2f}x / {w99/i99:.2f}x |")
PYEOF
)
plot: $OUT/writeback.png, series: $OUT/series.csv
EOT
