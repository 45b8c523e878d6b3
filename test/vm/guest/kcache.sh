# kcache: one write-back cache on the same two disks, the same burst, first
# FLUSH and full drain (issue 22; bench/kernel-caches.sh drives it):
#   KCACHE=bcache      Linux bcache (make-bcache -b 128k, writeback mode)
#   KCACHE=writecache  dm-writecache (4 KiB blocks, SSD mode)
#   KCACHE=nbdcache    nbdcache attach --cache /dev/vda --backing /dev/vdb
#   KCACHE=floor       no cache: drainfloor writes the burst into /dev/vda as
#                      a log, then drains it (the least a user-space drain
#                      does: a pread a block, a pwrite a run, one fsync)
#   KCACHE=flooruring  the same drain through io_uring, in batches of 64,
#                      the backing written with O_DIRECT
#   KCACHE=nbdpass     nbdcache attach --backing /dev/vdb, no cache: the NBD
#                      round trip's share of nbdcache's costs
#   KCACHE=nbdkit      nbdkit's file plugin on /dev/vdb through nbd-client: a C
#                      server's round trip, no cache
#   KCACHE=nbdnull     nbdkit's null plugin (keeps nothing): the round trip's floor
#   KCACHE=nbdcache-b  as nbdcache, with the binary nbdcache-b (an A/B build)
# /dev/vda is the cache, /dev/vdb the backing. The burst is fio with
# libaio and O_DIRECT: KCACHE_IOS random 4 KiB writes (default 8000) over
# the first KCACHE_SPAN MiB (default 128) at QD16, seeded by SEED, the
# same for every cache. Prints one line:
#   KCACHE sys=NAME burst_cpu_cs=.. burst_srv_usr_cs=.. burst_srv_sys_cs=.. burst_ms=.. flush_us=.. flush2_us=.. drain_ms=..
#          drain_cpu_cs=.. drain2_ms=.. back_wreq=.. back_wkib=.. cache_wreq=.. dirty_left=..
# with CPU in centiseconds of guest CPU (all CPUs; burst_srv_*: the
# user-space server's own user and system time, 0 for the kernel's), and write counters of
# /sys/block/*/stat from just before the burst to the end of the drain.
set -e
. /lib.sh
SYS=${KCACHE:?KCACHE=bcache|writecache|nbdcache|nbdcache-b|nbdpass|nbdkit|nbdnull|floor|flooruring}
NAME=$SYS
if [ "$SYS" = nbdcache-b ]; then
	export NBDCACHE=nbdcache-b SYS=nbdcache
fi
SPAN=${KCACHE_SPAN:-128}
IOS=${KCACHE_IOS:-8000}

busy() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; }
# srv_cpu: the server process's user and system CPU (all its threads), in
# centiseconds; "0 0" where the cache has no user-space server.
srv_cpu() {
	if [ -n "${SRVPID:-}" ]; then awk '{print $14, $15}' /proc/$SRVPID/stat; else echo 0 0; fi
}
ms() { awk '{printf "%d\n", $1 * 1000}' /proc/uptime; }
stat_field() { awk -v f="$2" '{print $f}' /sys/block/"$1"/stat; }

step "set up $SYS"
# KCACHE_PROF: a CPU profile of nbdcache's whole run (burst, FLUSHes and
# drain), printed in base64 between CPUPROF lines once it has stopped.
case "$SYS" in nbdcache | nbdpass) [ -z "${KCACHE_PROF:-}" ] || ATTACH_FLAGS="$ATTACH_FLAGS --cpuprofile /tmp/cpu.prof" ;; esac
kcache_setup "$SYS" 1

b_wreq=$(stat_field vdb 5)
b_wsect=$(stat_field vdb 7)
c_wreq=$(stat_field vda 5)
cpu0=$(busy)
srv0=$(srv_cpu) || fail "the server is gone"
t0=$(ms)
step "burst: $IOS random 4k writes over $SPAN MiB, QD16"
if [ "$SYS" = floor ] || [ "$SYS" = flooruring ]; then
	drainfloor fill -span "$SPAN" -ios "$IOS" -seed "${SEED:-1}" &
else
	fio --name=burst --filename=$DEV --direct=1 --ioengine=libaio --rw=randwrite --bs=4k --iodepth=16 \
		--size=${SPAN}m --io_size=$((IOS * 4))k --norandommap --randrepeat=0 --randseed="${SEED:-1}" \
		--output=/tmp/fio.out &
fi
fpid=$!
# KCACHE_DEBUG: a burst still running after 15 s is a stall (seen on
# 2026-12-06: the first writes unanswered until the kernel's 30 s
# timeout): dump the server's goroutines (SIGQUIT) and fail. One sleep in
# the background, not a polling loop: the stall was never seen while a
# loop forked every 0.1 s beside the burst.
if [ -n "${KCACHE_DEBUG:-}" ]; then
	(
		sleep 15
		kill -0 $fpid 2>/dev/null || exit 0
		touch /tmp/stalled
		echo "STALL: fio still running after 15 s; in flight: $(cat /sys/block/nbd0/inflight 2>/dev/null)"
		mount -t debugfs none /sys/kernel/debug 2>/dev/null
		echo "NBD-TASKS: $(cat /sys/kernel/debug/nbd/nbd0/tasks 2>&1 | tr '\n' ';')"
		echo w >/proc/sysrq-trigger # the kernel's blocked tasks, on the console
		[ -n "${apid:-}" ] && kill -QUIT $apid && sleep 2 && echo "GOROUTINES-BEGIN" && cat /tmp/kc.err && echo "GOROUTINES-END"
	) &
	wdog=$!
fi
wait $fpid || fail "the burst"
if [ -n "${wdog:-}" ]; then
	kill $wdog 2>/dev/null || wait $wdog
	[ ! -e /tmp/stalled ] || fail "the burst stalled"
fi
t1=$(ms)
cpu1=$(busy)
srv1=$(srv_cpu) || fail "the server is gone"
# shellcheck disable=SC2086
srv_burst=$(echo $srv0 $srv1 | awk '{print "burst_srv_usr_cs=" $3 - $1 " burst_srv_sys_cs=" $4 - $2}')
step "first FLUSH"
debug() {
	[ -n "${KCACHE_DEBUG:-}" ] || return 0
	echo "DEBUG $1: vda $(cat /sys/block/vda/stat) vdb $(cat /sys/block/vdb/stat) $(grep -E '^(Dirty|Writeback):' /proc/meminfo | tr -s ' \n' ' ')"
	[ "$SYS" = nbdcache ] && nbdcache stats --json --control unix:/tmp/ctl.sock
	return 0
}
debug "before the FLUSH"
flush_us=$(fsynctime $DEV) || fail "fsync $DEV"
debug "after the FLUSH"
# A second FLUSH right away: what one costs with nothing new to write.
flush2_us=$(fsynctime $DEV) || fail "fsync $DEV"
step "drain"
cpu2=$(busy)
t2=$(ms)
kcache_drain "$SYS"
n=0 # nbdcache's drain returned when done; the kernel's are polled
while [ "$SYS" != nbdcache ] && [ "$(kcache_dirty $SYS)" != 0 ] && [ $n -lt 3000 ]; do sleep 0.01; n=$((n + 1)); done
t3=$(ms)
cpu3=$(busy)
left=$(kcache_dirty $SYS)
# The same drain again, with nothing dirty: what the command itself costs
# (for nbdcache, starting `nbdcache flush --drain`; for the kernel's, a
# sysfs write or a dm message, and one look at the dirty count).
t4=$(ms)
kcache_drain "$SYS"
while [ "$SYS" != nbdcache ] && [ "$(kcache_dirty $SYS)" != 0 ]; do sleep 0.01; done
t5=$(ms)
case "$SYS" in floor | flooruring) drainfloor verify -span "$SPAN" -ios "$IOS" -seed "${SEED:-1}" || fail "the floor's drain left the backing wrong" ;; esac
echo "KCACHE sys=$NAME burst_cpu_cs=$((cpu1 - cpu0)) $srv_burst burst_ms=$((t1 - t0)) flush_us=$flush_us flush2_us=$flush2_us drain_ms=$((t3 - t2)) drain_cpu_cs=$((cpu3 - cpu2)) drain2_ms=$((t5 - t4)) back_wreq=$(($(stat_field vdb 5) - b_wreq)) back_wkib=$((($(stat_field vdb 7) - b_wsect) / 2)) cache_wreq=$(($(stat_field vda 5) - c_wreq)) dirty_left=$left"
if [ -n "${KCACHE_PROF:-}" ] && [ -n "${apid:-}" ]; then
	kill -TERM $apid
	wait $apid || fail "attach exited with $?"
	echo "CPUPROF-BEGIN"
	base64 /tmp/cpu.prof
	echo "CPUPROF-END"
fi
echo "KCACHE-SCENARIO-OK"
