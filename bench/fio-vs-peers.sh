#!/bin/bash
# Runs the same fio jobs against `nbdcache serve` and `nbdkit file` on the
# same kind of file, alternating the two servers round by round, and prints
# the median of each and their ratio, plus server CPU time per request.
#
#   bench/fio-vs-peers.sh            # 3 rounds of 10 s per job
#   ROUNDS=5 RUNTIME=20 bench/fio-vs-peers.sh
#
# The machine is shared and noisy: read the ratios, not the absolute numbers.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
RUNTIME=${RUNTIME:-10}
SIZE_MB=${SIZE_MB:-512}
PY=/usr/bin/python3
for t in fio nbdkit $PY; do command -v "$t" >/dev/null || { echo "missing $t (run make deps)"; exit 1; }; done

work=$(mktemp -d /tmp/nbdcache-bench.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
go build -o "$work/nbdcache" ./cmd/nbdcache

# The same kind of file for each server: fully written, so reads see data.
for s in nbdcache nbdkit; do
	dd if=/dev/urandom of="$work/$s.img" bs=1M count="$SIZE_MB" status=none
done

start_server() { # name -> sets PID, URI
	local sock="$work/$1.sock"
	rm -f "$sock"
	case $1 in
	nbdcache) "$work/nbdcache" serve --backing "$work/nbdcache.img" --listen "unix:$sock" >"$work/$1.log" 2>&1 & ;;
	nbdkit) nbdkit -f -U "$sock" file "$work/nbdkit.img" >"$work/$1.log" 2>&1 & ;;
	esac
	PID=$!
	URI="nbd+unix:///?socket=$sock"
	for _ in $(seq 200); do [ -S "$sock" ] && return; sleep 0.05; done
	echo "$1 did not start"; cat "$work/$1.log"; exit 1
}

cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }

# page_cache NAME RW: reads start from a file wholly in the page cache;
# writes from one wholly out of it. The files are written with 1 MiB
# dd's, so the page cache holds them in large folios, and there ext4
# walks every buffer head of a folio for each 4 KiB write under the
# inode lock (40+ us a write on this kernel): both servers then run at
# 20-45k IOPS and the rows measure that, not the servers. Out of the page
# cache, each 4 KiB write gets a folio of its own.
page_cache() {
	case $2 in
	*write) dd of="$work/$1.img" oflag=nocache conv=notrunc,fdatasync count=0 status=none ;;
	*) cat "$work/$1.img" >/dev/null ;;
	esac
}

# name rw bs iodepth numjobs
JOBS=(
	"4k-randread-qd32-1conn randread 4k 32 1"
	"4k-randwrite-qd32-1conn randwrite 4k 32 1"
	"4k-randread-qd32-4conn randread 4k 32 4"
	"4k-randwrite-qd32-4conn randwrite 4k 32 4"
	"1M-seqread-qd8 read 1M 8 1"
	"1M-seqwrite-qd8 write 1M 8 1"
)
TCK=$(getconf CLK_TCK)
results="$work/results.tsv"
for round in $(seq "$ROUNDS"); do
	for job in "${JOBS[@]}"; do
		read -r name rw bs qd nj <<<"$job"
		order="nbdcache nbdkit"
		[ $((round % 2)) -eq 0 ] && order="nbdkit nbdcache"
		for srv in $order; do
			page_cache "$srv" "$rw"
			start_server "$srv"
			c0=$(cpu_ticks "$PID")
			# The client's CPU time (user and system) as well: it bounds
			# what any server can reach through fio's nbd engine.
			TIMEFORMAT='%U %S'
			{ time fio --name="$name" --ioengine=nbd --uri="$URI" --rw="$rw" --bs="$bs" --iodepth="$qd" \
				--numjobs="$nj" --size="${SIZE_MB}M" --runtime="$RUNTIME" --time_based --group_reporting \
				--output-format=json --output="$work/out.json" >/dev/null 2>&1; } 2>"$work/time.txt"
			c1=$(cpu_ticks "$PID")
			kill "$PID"; wait "$PID" 2>/dev/null || true
			$PY - "$work/out.json" "$srv" "$name" "$round" "$((c1 - c0))" "$TCK" "$(cat "$work/time.txt")" >>"$results" <<'PYEOF'
import json, sys
path, srv, name, rnd, ticks, tck, client = sys.argv[1:]
j = json.load(open(path))["jobs"][0]
ios = j["read"]["total_ios"] + j["write"]["total_ios"]
iops = j["read"]["iops"] + j["write"]["iops"]
bw = (j["read"]["bw_bytes"] + j["write"]["bw_bytes"]) / 1e6
cpu_us = int(ticks) / int(tck) * 1e6 / max(ios, 1)
client_us = sum(map(float, client.split())) * 1e6 / max(ios, 1)
print(f"{srv}\t{name}\t{rnd}\t{iops:.0f}\t{bw:.1f}\t{cpu_us:.2f}\t{client_us:.2f}")
PYEOF
			echo "round $round $srv $name: $(tail -1 "$results" | cut -f4-)" >&2
		done
	done
done

$PY - "$results" "$ROUNDS" "$RUNTIME" <<'PYEOF'
import sys, statistics, collections, datetime
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
d = collections.defaultdict(lambda: collections.defaultdict(list))
for srv, name, rnd, iops, bw, cpu, client in rows:
    d[name][srv].append((float(iops), float(bw), float(cpu), float(client)))
print(f"\nnbdcache vs nbdkit file, {datetime.date.today()}, medians of {sys.argv[2]} alternating rounds of {sys.argv[3]} s")
print("client: fio's own CPU per request (with nbdcache); ceiling: the most IOPS a server could")
print("see if fio had one core per connection to itself and the server cost nothing, over nbdkit's")
print(f"{'job':26} {'nbdcache':>12} {'nbdkit':>12} {'ratio':>7} {'cpu/req us':>16} {'cpu ratio':>9} {'client us':>9} {'ceiling':>8}")
for name, s in d.items():
    a = [statistics.median(x) for x in zip(*s["nbdcache"])]
    b = [statistics.median(x) for x in zip(*s["nbdkit"])]
    unit = "MB/s" if name.startswith("1M") else "IOPS"
    i = 1 if unit == "MB/s" else 0
    nconn = 4 if "4conn" in name else 1
    ceiling = "" if unit == "MB/s" else f"{min(nconn, 2) * 1e6 / a[3] / b[0]:.2f}x"
    print(f"{name:26} {a[i]:>8.0f} {unit:4}{b[i]:>8.0f} {unit:4}{a[i]/b[i]:>6.2f}x {a[2]:>7.1f} / {b[2]:<7.1f}{a[2]/b[2]:>8.2f}x {a[3]:>9.1f} {ceiling:>8}")
PYEOF
