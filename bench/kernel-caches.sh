#!/bin/bash
# Issue 22: nbdcache attach side by side with the kernel's own write-back
# caches, Linux bcache and dm-writecache, in the test VM (test/vm: a Debian
# kernel under TCG), on the same two fresh sparse disks (cache /dev/vda
# 256 MiB, backing /dev/vdb 1 GiB, qemu cache=unsafe) with the same guest
# workload (test/vm/guest/kcache.sh): a burst of random 4 KiB O_DIRECT
# writes at QD16, the first FLUSH after it, then a full drain. One VM boot
# per cache per round, alternating, medians over the rounds, ratios to
# bcache. TCG exaggerates the cost of user space: the CPU ratios are upper
# bounds of the gap.
#
#   bench/kernel-caches.sh                        # 3 rounds, sparse burst (8000 writes over 128 MiB)
#   ROUNDS=8 bench/kernel-caches.sh
#   SPAN_MB=8 bench/kernel-caches.sh              # the dense variant: the same writes over 8 MiB
#   SYSTEMS="bcache nbdcache" bench/kernel-caches.sh
#   SYSTEMS="bcache nbdcache nbdpass" ...        # nbdpass: attach with no cache, the NBD round trip's share
#   SYSTEMS="bcache nbdpass nbdkit nbdnull" ...  # nbdkit: its file plugin on /dev/vdb via nbd-client;
#                                                 # nbdnull: its null plugin, the round trip's floor
#   SYSTEMS="bcache nbdcache floor" ...          # floor: the least a user-space drain does (test/vm/drainfloor)
#   SYSTEMS="bcache floor flooruring" ...        # flooruring: the same through io_uring, O_DIRECT backing writes
#   NBDCACHE_FLAGS="--direct" bench/kernel-caches.sh   # more flags for nbdcache attach
#   NBDCACHE_B=/tmp/old SYSTEMS="bcache nbdcache nbdcache-b" ...  # A/B: nbdcache-b runs the binary /tmp/old
#                                                 # (go build -o /tmp/old ./cmd/nbdcache at another commit)
#   CLOCK=hpet bench/kernel-caches.sh             # the guest's clock as the kernel picks it (see below)
#   KEEP=/tmp/kc KCACHE_PROF=1 SYSTEMS=nbdcache bench/kernel-caches.sh  # and nbdcache's CPU profile of each round (go tool pprof)
#   KEEP=/tmp/kc KCACHE_DEBUG=1 bench/kernel-caches.sh  # keep the consoles; nbdcache stats around the FLUSH;
#                                                 # a burst stalled 15 s fails with the server's goroutines
#   CUTS=3 bench/kernel-caches.sh                 # also 3 power cuts of each cache (kcut1.sh, kcut2.sh)
#   DRAIN_CUTS=3 ROUNDS=0 bench/kernel-caches.sh  # only 3 power cuts of each in the middle of a full drain
#
# The guest's clock: under TCG the kernel finds the TSCs unsynchronized
# and falls back to the HPET, where a clock read costs 4.2 us (a system
# call 1.0 us), against 0.3 us on the TSC (tsc=reliable) and tens of
# nanoseconds on real hardware or KVM. The Go runtime reads the clock at
# every scheduling decision, so the HPET taxes a Go server far more than
# the kernel's caches. CLOCK=tsc (the default) boots with tsc=reliable;
# CLOCK=hpet as the kernel picks, as every run before 2026-12-07 did.
#
# A power cut: ext4 on the cache, an fsync-heavy writer, qemu killed 1 s
# after its 20th fsync'd file; then a second boot brings the cache up on
# the disks as they were left, replays the journal, and e2fsck and every
# fsync'd file must be intact. A cut in the drain (DRAIN_CUTS) first
# dirties the cache with 4096 random writes into one file, starts the
# drain and kills qemu 0.2-1.5 s later, the writer still going; the summary
# says how many cuts fell in the drain (the cache still dirty at the last
# look, every 0.1 s).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
SPAN_MB=${SPAN_MB:-128}
IOS=${IOS:-8000}
SYSTEMS=${SYSTEMS:-"bcache writecache nbdcache"}
NBDCACHE_FLAGS=${NBDCACHE_FLAGS:-}
CUTS=${CUTS:-0}
DRAIN_CUTS=${DRAIN_CUTS:-0}
CLOCK=${CLOCK:-tsc}
case "$CLOCK" in
tsc) kargs="tsc=reliable" ;;
hpet) kargs="" ;;
*) echo "CLOCK=$CLOCK: want tsc or hpet" >&2; exit 2 ;;
esac
storage="--cache /dev/vda --backing /dev/vdb --format $NBDCACHE_FLAGS"
storage=$(echo $storage | tr ' ' ,) # kernel command line words hold no spaces
plugins=/usr/lib/x86_64-linux-gnu/nbdkit/plugins
for t in qemu-system-x86_64 busybox fio make-bcache dmsetup mkfs.ext4 e2fsck nbdkit nbd-client /usr/bin/python3; do
	command -v "$t" >/dev/null || { echo "missing $t (run make deps)"; exit 1; }
done
[ -e $plugins/nbdkit-null-plugin.so ] || { echo "missing $plugins/nbdkit-null-plugin.so (run make deps)"; exit 1; }
work=$(mktemp -d /tmp/nbdcache-kcache.XXXXXX)
trap 'rm -rf "$work"' EXIT
CGO_ENABLED=0 go build -trimpath -o "$work/nbdcache" ./cmd/nbdcache
CGO_ENABLED=0 go build -trimpath -o "$work/fsynctime" ./test/vm/fsynctime
CGO_ENABLED=0 go build -trimpath -o "$work/drainfloor" ./test/vm/drainfloor
extra=()
if [ -n "${NBDCACHE_B:-}" ]; then
	[ -x "$NBDCACHE_B" ] || { echo "NBDCACHE_B=$NBDCACHE_B: not an executable" >&2; exit 2; }
	cp "$NBDCACHE_B" "$work/nbdcache-b"
	extra=(-b "$work/nbdcache-b")
elif [[ " $SYSTEMS " == *" nbdcache-b "* ]]; then
	echo "system nbdcache-b needs NBDCACHE_B=FILE, an nbdcache binary" >&2
	exit 2
fi
printf 'exec sh /scenarios/${SCENARIO:-kcache}.sh\n' >"$work/test.sh"
./test/vm/build-initramfs.sh -o "$work/initrd.gz" -s "$work/test.sh" -f test/vm/guest/lib.sh:/lib.sh \
	-f test/vm/guest/kcache.sh:/scenarios/kcache.sh -f test/vm/guest/kcut1.sh:/scenarios/kcut1.sh \
	-f test/vm/guest/kcut2.sh:/scenarios/kcut2.sh \
	-b "$work/nbdcache" -b "$work/fsynctime" -b "$work/drainfloor" "${extra[@]}" -b fio -b make-bcache -b dmsetup -b mkfs.ext4 -b e2fsck \
	-b nbdkit -b nbd-client -f $plugins/nbdkit-file-plugin.so:/nbdkit/nbdkit-file-plugin.so -f $plugins/nbdkit-null-plugin.so:/nbdkit/nbdkit-null-plugin.so \
	-m bcache -m dm-writecache >"$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
# vm ARGS...: run-vm.sh, booted once more if the boot hung before /init
# (status 123: nothing ran in the guest, the disks are as they were).
vm() {
	local rc=0
	./test/vm/run-vm.sh "$@" 2>/dev/null || rc=$?
	if [ "$rc" = 123 ]; then
		echo "the VM's boot hung before /init; booting again" >&2
		rc=0
		./test/vm/run-vm.sh "$@" 2>/dev/null || rc=$?
	fi
	return "$rc"
}
: >"$work/results"
for round in $(seq "$ROUNDS"); do
	seed=$((RANDOM * 32768 + RANDOM))
	for sys in $SYSTEMS; do
		rm -f "$work/vda.img" "$work/vdb.img"
		truncate -s 256M "$work/vda.img"
		truncate -s 1G "$work/vdb.img"
		rc=0
		vm -q -m 2048 -t 600 -i "$work/initrd.gz" -l "$work/console.log" \
			-A "$kargs KCACHE=$sys ${KCACHE_DEBUG:+KCACHE_DEBUG=1} ${KCACHE_PROF:+KCACHE_PROF=1} SEED=$seed KCACHE_SPAN=$SPAN_MB KCACHE_IOS=$IOS NBDCACHE_STORAGE=$storage" \
			-d "$work/vda.img" -d "$work/vdb.img" || rc=$?
		[ -n "${KEEP:-}" ] && mkdir -p "$KEEP" && cp "$work/console.log" "$KEEP/$sys-$round.log"
		if [ -n "${KCACHE_PROF:-}" ] && grep -q '^CPUPROF-END' "$work/console.log"; then
			sed -n '/^CPUPROF-BEGIN/,/^CPUPROF-END/p' "$work/console.log" | sed '1d;$d' | tr -d '\r' | base64 -d >"${KEEP:-.}/$sys-$round.prof"
		fi
		line=$(grep -a '^KCACHE sys=' "$work/console.log" | tail -n 1 || true)
		if [ "$rc" != 0 ] || [ -z "$line" ]; then
			echo "round $round $sys: guest exit status $rc; console tail:" >&2
			tail -n 40 "$work/console.log" >&2
			exit 1
		fi
		echo "round $round (seed $seed) $line" >&2
		echo "$line" >>"$work/results"
	done
done
# cut SYS I KIND: one power cut (KIND "" or "drain"); counts intact cuts in
# ok, and cuts that fell in the drain (the last DIRTY line above 0) in mid.
cut() {
	local sys=$1 i=$2 kind=$3 rc=0 args="SCENARIO=kcut1 KCACHE=$sys NBDCACHE_STORAGE=$storage" delay=1
	# in the drain: killed 0.2-1.5 s after it began, a different moment each cut
	[ "$kind" = drain ] && args="$args KCUT_DRAIN=1 SEED=$((RANDOM * 32768 + RANDOM))" && delay=$((2 + RANDOM % 14)) && delay=$((delay / 10)).$((delay % 10))
	rm -f "$work/vda.img" "$work/vdb.img"
	truncate -s 256M "$work/vda.img"
	truncate -s 1G "$work/vdb.img"
	vm -q -m 2048 -t 300 -i "$work/initrd.gz" -l "$work/cut1.log" -K CUT-NOW -D $delay \
		-A "$kargs $args" -d "$work/vda.img" -d "$work/vdb.img" || rc=$?
	grep -a '^SYNCED ' "$work/cut1.log" >"$work/synced.txt" || true
	local need=20
	[ "$kind" = drain ] && need=1
	if [ "$rc" != 137 ] || [ "$(wc -l <"$work/synced.txt")" -lt $need ]; then
		echo "power cut $i of $sys${kind:+ in the $kind}: part 1 exit status $rc, $(wc -l <"$work/synced.txt") files fsync'd; console tail:" >&2
		tail -n 30 "$work/cut1.log" >&2
		exit 1
	fi
	local dirty
	dirty=$(grep -a '^DIRTY ' "$work/cut1.log" | awk 'NR == 1 {f = $2} {l = $2} END {if (NR) print "dirty " f " when the drain began, " l " at the last look"}') || true # none outside a drain
	[ "$kind" = drain ] && [ "$(grep -a '^DIRTY ' "$work/cut1.log" | tail -n 1 | awk '{print $2}')" != 0 ] && mid=$((mid + 1))
	rm -f "$work/list.img"
	truncate -s 1M "$work/list.img"
	dd if="$work/synced.txt" of="$work/list.img" conv=notrunc status=none
	rc=0
	vm -q -m 2048 -t 300 -i "$work/initrd.gz" -l "$work/cut2.log" \
		-A "$kargs SCENARIO=kcut2 KCACHE=$sys NBDCACHE_STORAGE=$storage" -d "$work/vda.img" -d "$work/vdb.img" -d "$work/list.img" || rc=$?
	[ -n "${KEEP:-}" ] && mkdir -p "$KEEP" && cp "$work/cut1.log" "$KEEP/$sys-$kind-cut$i-1.log" && cp "$work/cut2.log" "$KEEP/$sys-$kind-cut$i-2.log"
	if [ "$rc" = 0 ] && grep -aq '^KCUT-OK' "$work/cut2.log"; then
		ok=$((ok + 1))
		echo "power cut $i of $sys${kind:+ in the $kind, $delay s after it began}: $(grep -a '^KCUT-OK' "$work/cut2.log")${dirty:+; $dirty}" >&2
	else
		echo "power cut $i of $sys${kind:+ in the $kind}: LOST DATA or failed (exit status $rc); console tail:" >&2
		tail -n 30 "$work/cut2.log" >&2
	fi
}
cuts=""
for sys in $SYSTEMS; do
	case $sys in floor | flooruring | nbdkit | nbdnull | nbdcache-b) continue ;; esac # no cache to cut (nbdcache-b: cut nbdcache itself)
	ok=0 mid=0
	for i in $(seq "$CUTS"); do cut "$sys" "$i" ""; done
	[ "$CUTS" = 0 ] || cuts="$cuts $sys=$ok/$CUTS"
	ok=0 mid=0
	for i in $(seq "$DRAIN_CUTS"); do cut "$sys" "$i" drain; done
	[ "$DRAIN_CUTS" = 0 ] || cuts="$cuts $sys-in-the-drain=$ok/$DRAIN_CUTS($mid-fell-in-it)"
done
/usr/bin/python3 - "$work/results" "$ROUNDS" "$SPAN_MB" "$IOS" "$cuts" "$CLOCK" <<'PY'
import statistics, sys, time
rows = {}
for line in open(sys.argv[1]):
    kv = dict(f.split("=", 1) for f in line.split()[1:])
    rows.setdefault(kv.pop("sys"), []).append({k: float(v) for k, v in kv.items()})
for rs in rows.values():  # results of builds before drain2_ms
    for r in rs:
        r.setdefault("drain2_ms", float("nan"))
        r.setdefault("burst_srv_usr_cs", float("nan"))
        r.setdefault("burst_srv_sys_cs", float("nan"))
systems = list(rows)
if not systems:  # ROUNDS=0: power cuts only
    print("\npower cuts with every fsynced file intact:" + sys.argv[5])
    sys.exit(0)
def med(s, k):
    return statistics.median(r[k] for r in rows[s])
print("\n%s rounds, %s random 4 KiB writes over %s MiB at QD16, VM under TCG, clock %s, %s" % (sys.argv[2], sys.argv[4], sys.argv[3], sys.argv[6], time.strftime("%Y-%m-%d")))
ratios = [(a, b) for a, b in [("nbdcache", "bcache"), ("nbdcache-b", "bcache"), ("nbdcache", "nbdcache-b"), ("floor", "bcache"), ("flooruring", "bcache"), ("nbdcache", "floor"), ("nbdpass", "bcache"), ("nbdkit", "bcache"), ("nbdnull", "bcache"), ("nbdcache", "nbdnull")] if a in rows and b in rows]
print("| | " + " | ".join(systems + ["%s / %s" % r for r in ratios]) + " |")
print("|---" * (len(systems) + len(ratios) + 1) + "|")
for key, name, scale, fmt in [
    ("back_wreq", "backing write requests", 1, "%.0f"),
    ("back_wkib", "backing KiB written", 1, "%.0f"),
    ("cache_wreq", "cache-disk write requests", 1, "%.0f"),
    ("burst_ms", "burst time (ms)", 1, "%.0f"),
    ("burst_cpu_cs", "burst guest CPU-seconds", 0.01, "%.2f"),
    ("burst_srv_usr_cs", "of which the server's user time", 0.01, "%.2f"),
    ("burst_srv_sys_cs", "of which the server's system time", 0.01, "%.2f"),
    ("flush_us", "first FLUSH after the burst (ms)", 0.001, "%.1f"),
    ("flush2_us", "a second FLUSH at once (ms)", 0.001, "%.1f"),
    ("drain_ms", "drain time (s)", 0.001, "%.2f"),
    ("drain_cpu_cs", "drain guest CPU-seconds", 0.01, "%.2f"),
    ("drain2_ms", "the drain command again, nothing dirty (ms)", 1, "%.0f"),
    ("dirty_left", "dirty left after the drain", 1, "%.0f"),
]:
    cells = [fmt % (med(s, key) * scale) for s in systems]
    cells += ["%.2fx" % (med(a, key) / med(b, key)) if med(b, key) else "-" for a, b in ratios]
    print("| %s | %s |" % (name, " | ".join(cells)))
avg = {s: med(s, "back_wkib") / med(s, "back_wreq") if med(s, "back_wreq") else 0 for s in systems}
if sys.argv[5].strip():
    got = dict(kv.split("=") for kv in sys.argv[5].split())
    if any(s in got for s in systems):
        print("| power cuts with every fsynced file intact | " + " | ".join(got.get(s, "-") for s in systems) + " |" * len(ratios) + " |")
    if any(s + "-in-the-drain" in got for s in systems):
        print("| power cuts in a drain, every fsynced file intact (cuts that fell in it) | " + " | ".join(got.get(s + "-in-the-drain", "-").replace("(", " (").replace("-fell-in-it", "") for s in systems) + " |" * len(ratios) + " |")
print("| average backing write (KiB) | " + " | ".join(["%.1f" % avg[s] for s in systems] + ["%.2fx" % (avg[a] / avg[b]) if avg[b] else "-" for a, b in ratios]) + " |")
PY
