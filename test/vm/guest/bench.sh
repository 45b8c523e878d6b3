# Speed ratio: fio on /dev/nbd0 served by nbdcache, then by nbd-server
# with nbd-client, on the same disk and with the same number of
# connections. Under TCG only the ratio means anything.
# Prints "BENCH <job> nbdcache=<KiB/s> peer=<KiB/s>". The queue settings
# attach writes (max_sectors_kb) stay on /dev/nbd0 for the peer run too.
set -e
. /lib.sh
CONNS=${BENCH_CONNECTIONS:-2}
RUNTIME=${BENCH_RUNTIME:-5}
# Rounds alternate the two servers, so that a busy host hits both alike;
# the figures are sums over the rounds.
ROUNDS=${BENCH_ROUNDS:-3}

# run_jobs LABEL: the four jobs on /dev/nbd0; results in /tmp/bench.LABEL
run_jobs() {
	local label=$1
	echo "$label: max_sectors_kb=$(cat /sys/block/nbd0/queue/max_sectors_kb) read_ahead_kb=$(cat /sys/block/nbd0/queue/read_ahead_kb) scheduler=$(cat /sys/block/nbd0/queue/scheduler) blocksize=$(cat /sys/block/nbd0/queue/logical_block_size)"
	for job in "seq-write-1M write 1M 4" "seq-read-1M read 1M 4" "rand-write-4k randwrite 4k 16" "rand-read-4k randread 4k 16"; do
		# shellcheck disable=SC2086
		set -- $job
		out=$(fio --name=$1 --filename=/dev/nbd0 --direct=1 --ioengine=libaio --rw=$2 --bs=$3 \
			--iodepth=$4 --size=256m --runtime=$RUNTIME --time_based --minimal)
		case $2 in
		*write) bw=$(echo "$out" | awk -F';' '{print $48}') ;;
		*) bw=$(echo "$out" | awk -F';' '{print $7}') ;;
		esac
		echo "$1 $bw" >>/tmp/bench.$label
		echo "$label $1 ${bw} KiB/s"
	done
}

step "prefill /dev/vdb (reads of holes are not a fair test)"
dd if=/dev/urandom of=/tmp/r bs=1M count=16 2>/dev/null
i=0; while [ $i -lt 16 ]; do dd if=/tmp/r of=/dev/vdb bs=1M seek=$((i * 16)) conv=notrunc,fsync 2>/dev/null; i=$((i + 1)); done

mkdir -p /etc/nbd-server
cat >/etc/nbd-server/config <<CFG
[generic]
user = root
group = root
listenaddr = 127.0.0.1
port = 10809
[disk]
exportname = /dev/vdb
flush = true
fua = true
trim = true
multifile = false
CFG
nbd-server -C /etc/nbd-server/config
n=0
while ! grep -q ':2A39 00000000:0000 0A' /proc/net/tcp && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done

: >/tmp/bench.nbdcache
: >/tmp/bench.peer
r=0
while [ $r -lt "$ROUNDS" ]; do
	r=$((r + 1))
	step "round $r: nbdcache"
	attach b1 --connections $CONNS
	run_jobs nbdcache
	nbdcache detach /dev/nbd0
	finish $apid b1
	step "round $r: nbd-server + nbd-client"
	nbd-client -N disk -C $CONNS 127.0.0.1 10809 /dev/nbd0 >/dev/null
	run_jobs peer
	nbd-client -d /dev/nbd0 >/dev/null
done

sum() { awk -v j="$2" '$1 == j {s += $2} END {print s + 0}' /tmp/bench.$1; }
for job in seq-write-1M seq-read-1M rand-write-4k rand-read-4k; do
	echo "BENCH $job nbdcache=$(sum nbdcache $job) peer=$(sum peer $job)"
done
echo "BENCH-SCENARIO-OK"
