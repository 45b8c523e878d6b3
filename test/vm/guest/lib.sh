# Helpers for the guest scripts; installed as /lib.sh and sourced. busybox sh.
# shellcheck shell=sh
# STORAGE: the storage flags of every nbdcache attach (default: the backing disk only).
# (commas stand for spaces: kernel command line words hold none)
STORAGE=$(echo "${NBDCACHE_STORAGE:---backing /dev/vdb}" | tr , ' ')
# ATTACH_FLAGS: extra attach flags for every start (timeouts and the like).
ATTACH_FLAGS=${ATTACH_FLAGS:-}
MNT=/mnt/n
mkdir -p $MNT

t() { cut -d' ' -f1 /proc/uptime; }
step() { echo "STEP $(t) $*"; }
fail() {
	echo "FAIL: $*"
	for f in /tmp/*.out /tmp/*.err; do [ -s "$f" ] && { echo "--- $f"; tail -n 30 "$f"; }; done
	echo "--- dmesg"; dmesg | tail -n 40
	exit 1
}

# wait_line FILE REGEX [TENTHS]: wait until FILE has a line matching REGEX.
wait_line() {
	local n=0
	while ! grep -q "$2" "$1" 2>/dev/null; do
		n=$((n + 1))
		[ $n -gt "${3:-600}" ] && return 1
		sleep 0.1
	done
}

# attach NAME [FLAGS...]: start `nbdcache attach` in the background (pid in
# $apid) and wait until it says it attached or reconnected.
attach() {
	local name=$1
	shift
	rm -f /tmp/$name.out /tmp/$name.err
	# shellcheck disable=SC2086
	${NBDCACHE:-nbdcache} attach $STORAGE $ATTACH_FLAGS "$@" >/tmp/$name.out 2>/tmp/$name.err &
	apid=$!
	wait_line /tmp/$name.out 'nbdcache: \(attached\|reconnected\)' 600 || fail "attach $name did not start"
	cat /tmp/$name.out
}

# finish PID NAME [WORD]: wait for an attach process; it must exit 0 and
# have printed "nbdcache: WORD" (default detached).
finish() {
	local rc=0
	wait "$1" || rc=$?
	cat /tmp/$2.out
	[ $rc = 0 ] || fail "attach $2 exited with $rc"
	grep -q "nbdcache: ${3:-detached}" /tmp/$2.out || fail "attach $2 did not say ${3:-detached}"
}

# write_files DIR N: N files of random sizes, each fsync'd; sums in /tmp/sums.
write_files() {
	local n=0
	while [ $n -lt "$2" ]; do
		dd if=/dev/urandom of="$1/f$n" bs=4k count=$((1 + n * 7 % 64)) conv=fsync 2>/dev/null || fail "writing $1/f$n"
		n=$((n + 1))
	done
	md5sum "$1"/f* >>/tmp/sums
}

# writer DIR: fsync-heavy writer until /tmp/stop exists. Each file is
# written from a copy in RAM with fsync; only after fsync returned is its
# sum recorded in /tmp/synced. Exits 1 on the first I/O error.
writer() {
	local i=0
	while [ ! -e /tmp/stop ]; do
		dd if=/dev/urandom of=/tmp/w.tmp bs=4k count=$((1 + i % 16)) 2>/dev/null
		dd if=/tmp/w.tmp of="$1/w$i" bs=4k conv=fsync 2>/dev/null || { echo "WRITER: I/O error on $1/w$i"; exit 1; }
		echo "$(md5sum </tmp/w.tmp | cut -d' ' -f1)  $1/w$i" >>/tmp/synced
		i=$((i + 1))
	done
	echo "WRITER: $i files fsync'd"
}

# cut_writer DIR: the power-cut writer (cut1.sh, kcut1.sh). Each file
# whose fsync, and the directory's, returned is announced on the console as
# "SYNCED <md5> <name>"; after CUT_AFTER of them (default 20) it prints
# CUT-NOW, and the host kills the VM. It never returns.
cut_writer() {
	local i=0
	while :; do
		dd if=/dev/urandom of=/tmp/w.tmp bs=4k count=$((1 + i % 16)) 2>/dev/null
		dd if=/tmp/w.tmp of="$1/w$i" bs=4k conv=fsync 2>/dev/null || fail "I/O error on w$i"
		sync -d "$1"
		echo "SYNCED $(md5sum </tmp/w.tmp | cut -d' ' -f1) w$i"
		i=$((i + 1))
		[ $i = "${CUT_AFTER:-20}" ] && echo "CUT-NOW"
	done
}

# synced_count: how many files the writer has fsync'd.
synced_count() { [ -f /tmp/synced ] && wc -l </tmp/synced || echo 0; }

# wait_synced N [TENTHS]: wait until the writer fsync'd N files.
wait_synced() {
	local n=0
	while [ "$(synced_count)" -lt "$1" ]; do
		n=$((n + 1))
		[ $n -gt "${2:-1200}" ] && fail "writer stuck at $(synced_count) files"
		sleep 0.1
	done
}

# verify SUMFILE: drop caches, then check every recorded sum.
verify() {
	sync
	echo 3 >/proc/sys/vm/drop_caches
	md5sum -c "$1" >/tmp/verify.log 2>&1 || { grep -v ': OK$' /tmp/verify.log | head; fail "files differ ($1)"; }
	echo "verified $(wc -l <"$1") files"
}

# check_ext4 SUMFILE WHEN [DEV]: ext4 on DEV (default /dev/nbd0,
# unmounted) passes e2fsck -f -n, and every file recorded in SUMFILE reads
# back intact.
check_ext4() {
	e2fsck -f -n "${3:-/dev/nbd0}" || fail "e2fsck found problems $2"
	mount -t ext4 -o ro "${3:-/dev/nbd0}" $MNT
	verify "$1"
	umount $MNT
}

# kcache_setup SYS NEW: brings up the write-back cache SYS (bcache,
# writecache or nbdcache; or nbdpass, nbdcache attach without a cache; or
# nbdkit and nbdnull, nbdkit's file and null plugins through nbd-client)
# with /dev/vda as the cache and /dev/vdb as the backing, made anew (NEW=1, on blank disks) or as the disks were left
# (NEW=0: after a power cut); sets DEV to its device, and SRVPID to the
# user-space server's process where there is one (issue 22's
# scenarios kcache, kcut1 and kcut2).
kcache_setup() {
	case $1 in
	bcache)
		modprobe bcache
		if [ "$2" = 1 ]; then
			make-bcache -b 128k -C /dev/vda -B /dev/vdb --writeback >/tmp/mk.out 2>&1 || fail "make-bcache: $(cat /tmp/mk.out)"
		fi
		echo /dev/vda >/sys/fs/bcache/register 2>/dev/null || true
		echo /dev/vdb >/sys/fs/bcache/register 2>/dev/null || true
		local n=0
		while [ ! -b /dev/bcache0 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
		[ -b /dev/bcache0 ] || fail "no /dev/bcache0"
		local b=/sys/block/bcache0/bcache
		n=0
		while ! grep -q '^clean\|^dirty' $b/state 2>/dev/null && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
		grep -q '^clean\|^dirty' $b/state || fail "bcache0 not attached to its cache set: $(cat $b/state)"
		echo writeback >$b/cache_mode
		echo 0 >$b/sequential_cutoff
		echo 0 >$b/writeback_delay
		for f in /sys/fs/bcache/*/congested_read_threshold_us /sys/fs/bcache/*/congested_write_threshold_us; do
			echo 0 >"$f"
		done
		DEV=/dev/bcache0
		;;
	writecache)
		modprobe dm-writecache
		dmsetup --noudevsync create wc --table "0 $(blockdev --getsz /dev/vdb) writecache s /dev/vdb /dev/vda 4096 0" || fail "dmsetup create"
		local n=0
		while [ ! -b /dev/dm-0 ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
		DEV=/dev/dm-0
		;;
	nbdcache)
		attach kc --sequential-cutoff 0 --control unix:/tmp/ctl.sock
		SRVPID=$apid
		DEV=/dev/nbd0
		;;
	floor | flooruring)
		# No cache: drainfloor plays one (kcache.sh), on the raw disks.
		# The shell holds the cache disk open, as a cache's process
		# would: the last close of a block device drops its page cache,
		# and the drain would then read every block from the disk.
		exec 9</dev/vda
		DEV=/dev/vda
		;;
	nbdpass)
		# No cache: /dev/nbd0 straight onto /dev/vdb. What the kernel's
		# nbd driver and a user-space server cost before any caching.
		STORAGE="--backing /dev/vdb" attach kc --control unix:/tmp/ctl.sock
		SRVPID=$apid
		DEV=/dev/nbd0
		;;
	nbdkit | nbdnull)
		# No cache, and not nbdcache: nbdkit (C, 16 threads) serves
		# /dev/vdb with its file plugin (nbdkit), or serves a disk that
		# keeps nothing (nbdnull: the null plugin), and nbd-client hands
		# its socket to the kernel, with 2 connections as attach does.
		# nbdnull is the floor of the NBD round trip: the kernel's nbd
		# driver and a server that does no work with the data.
		local plugin=file args=file=/dev/vdb
		[ "$1" = nbdnull ] && plugin=null args=size=1G
		modprobe nbd
		# (-P: nbdkit writes its pid file once it listens)
		nbdkit -f -U /tmp/nk.sock -P /tmp/nk.pid -t 16 /nbdkit/nbdkit-$plugin-plugin.so $args >/tmp/nk.err 2>&1 &
		SRVPID=$!
		local n=0
		while [ ! -s /tmp/nk.pid ] && [ $n -lt 100 ]; do sleep 0.1; n=$((n + 1)); done
		[ -s /tmp/nk.pid ] || fail "nbdkit did not start: $(cat /tmp/nk.err)"
		nbd-client -u /tmp/nk.sock /dev/nbd0 -b 4096 -C 2 -N "" >/tmp/nc.out 2>&1 || fail "nbd-client: $(cat /tmp/nc.out)"
		DEV=/dev/nbd0
		;;
	*) fail "unknown cache $1" ;;
	esac
}

# kcache_dirty SYS: what the cache SYS still holds that the backing lacks
# (0 when drained): bcache's dirty_data, dm-writecache's blocks in use,
# nbdcache's dirty_bytes.
kcache_dirty() {
	case $1 in
	bcache) sed 's/\.[0-9]*//; s/[kMG]$//' /sys/block/bcache0/bcache/dirty_data ;;
	writecache)
		# 0 LEN writecache ERR TOTAL FREE WRITEBACK ...: blocks in use
		dmsetup status wc | awk '{print $5 - $6 + $7}'
		;;
	nbdcache) nbdcache stats --json --control unix:/tmp/ctl.sock | sed -n 's/.*"dirty_bytes": *\([0-9]*\).*/\1/p' | head -n 1 ;;
	nbdpass | nbdkit | nbdnull | floor | flooruring) echo 0 ;;
	esac
}

# kcache_drain SYS: start writing everything dirty back at full speed
# (bcache: writeback_percent 0; dm-writecache: the cleaner message;
# nbdcache: flush --drain, which returns when it is done). Callers poll
# kcache_dirty for the end.
kcache_drain() {
	case $1 in
	bcache) echo 0 >/sys/block/bcache0/bcache/writeback_percent ;;
	writecache) dmsetup message wc 0 cleaner ;;
	nbdcache) nbdcache flush --drain --control unix:/tmp/ctl.sock >/tmp/drain.out 2>&1 || fail "drain: $(cat /tmp/drain.out)" ;;
	nbdpass | nbdkit | nbdnull) ;;
	floor) drainfloor drain -span "$SPAN" -ios "$IOS" -seed "${SEED:-1}" || fail "drainfloor drain" ;;
	flooruring) drainfloor drain -span "$SPAN" -ios "$IOS" -seed "${SEED:-1}" -uring 64 -direct || fail "drainfloor drain" ;;
	esac
}

# no_io_errors: the kernel logged no I/O error on nbd. ("Dead connection,
# failed to find a fallback" is not one: the request then waits for a
# reconnect.)
no_io_errors() {
	if dmesg | grep -E 'I/O error.*nbd|nbd.*(I/O error|Connection timed out$)' >/tmp/ioerr; then
		cat /tmp/ioerr
		fail "the kernel saw I/O errors"
	fi
}

# gone: /dev/nbd0 is disconnected: no server task, size 0.
gone() {
	[ ! -e /sys/block/nbd0/pid ] || fail "/dev/nbd0 still has a server task after the detach"
	[ "$(cat /sys/block/nbd0/size)" = 0 ] || fail "/dev/nbd0 still has size $(cat /sys/block/nbd0/size) after the detach"
}

queue_report() {
	for f in size queue/logical_block_size queue/max_sectors_kb queue/rotational queue/nr_requests backend; do
		printf '%s=%s ' "$f" "$(cat /sys/block/nbd0/$f 2>/dev/null)"
	done
	echo
}

# stop_under_writes NAME 'STOP': attach NAME, then write 64 KiB blocks
# of /tmp/rand (16 MiB) with O_DIRECT, block p at position p, round and
# round, logging each position once its write was acknowledged. After
# 100 acknowledgements eval STOP (a detach, or a kill of $apid; the server must
# finish what is in flight, flush and drain), wait for the writer to
# hit the disconnect and the server to finish; then /dev/vdb itself
# must hold every acknowledged block. Needs the cache storage.
stop_under_writes() {
	local name=$1 stop=$2
	[ -f /tmp/rand ] || dd if=/dev/urandom of=/tmp/rand bs=1M count=16 2>/dev/null
	rm -f /tmp/acked
	attach $name --connections 2
	(
		i=0
		while :; do
			p=$((i % 256))
			dd if=/tmp/rand of=/dev/nbd0 bs=64k skip=$p seek=$p count=1 oflag=direct conv=notrunc 2>/dev/null || exit 0
			echo $p >>/tmp/acked
			i=$((i + 1))
		done
	) &
	local wpid=$!
	wait_line /tmp/acked '^99$' 600 || fail "the writer did not start"
	eval "$stop"
	wait $wpid
	finish $apid $name
	local n=0 bad=0
	for p in $(sort -un /tmp/acked); do
		a=$(dd if=/tmp/rand bs=64k skip=$p count=1 2>/dev/null | md5sum)
		b=$(dd if=/dev/vdb bs=64k skip=$p count=1 iflag=direct 2>/dev/null | md5sum)
		[ "$a" = "$b" ] || { echo "block $p differs on /dev/vdb"; bad=$((bad + 1)); }
		n=$((n + 1))
	done
	[ $bad = 0 ] || fail "$bad of $n acknowledged blocks are not on the backing"
	echo "all $n acknowledged blocks ($(wc -l </tmp/acked) writes) are on /dev/vdb"
}
