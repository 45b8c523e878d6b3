# Attach and use: 2 connections; fio verify=crc32c on /dev/nbd0; ext4 and
# xfs: mount, write and fsync files, umount, clean fsck, detach,
# re-attach and check every file.
set -e
. /lib.sh

step "attach, 2 connections, queue depth 64"
attach a1 --connections 2 --queue-depth 64 --control unix:/tmp/a1.ctl
queue_report
# The kernel took both connections, and the flags the server offers:
# FLUSH (write_cache), FUA, TRIM (discard) and WRITE_ZEROES.
nbdcache stats --control unix:/tmp/a1.ctl --json >/tmp/stats.json || fail "stats"
grep -q '"active_connections": 2,' /tmp/stats.json || { cat /tmp/stats.json; fail "the server does not serve 2 connections"; }
[ "$(cat /sys/block/nbd0/queue/write_cache)" = "write back" ] || fail "no SEND_FLUSH: write_cache is $(cat /sys/block/nbd0/queue/write_cache)"
[ "$(cat /sys/block/nbd0/queue/fua)" = 1 ] || fail "no SEND_FUA"
[ "$(cat /sys/block/nbd0/queue/discard_max_bytes)" -gt 0 ] || fail "no SEND_TRIM: discard_max_bytes is 0"
# This kernel (6.1) does not pass WRITE_ZEROES on (write_zeroes_max_bytes
# stays 0), so read the flags the kernel holds from debugfs: HAS_FLAGS,
# SEND_FLUSH, SEND_FUA, SEND_TRIM, SEND_WRITE_ZEROES, CAN_MULTI_CONN.
mount -t debugfs none /sys/kernel/debug 2>/dev/null || true
hex=$(sed -n 's/^Hex: //p' /sys/kernel/debug/nbd/nbd0/flags)
echo "kernel's flags: $hex"
[ -n "$hex" ] && [ $((hex & 0x16d)) = $((0x16d)) ] || fail "the kernel's flags $hex lack some of 0x16d"
[ "$(cat /sys/block/nbd0/queue/max_sectors_kb)" = 1024 ] || fail "max_sectors_kb not applied"
[ "$(cat /sys/block/nbd0/queue/nr_requests)" = 64 ] || fail "nr_requests not applied"
grep -q 'nbdcache:/dev/vdb' /sys/block/nbd0/backend || fail "backend identifier not set"
# The shape: a cache is an SSD; the backing alone is what /dev/vdb says.
# Block sizes: 512, the smallest request both handle natively.
case "$STORAGE" in
*--cache*) want_rot=0 ;;
*) want_rot=$(cat /sys/block/vdb/queue/rotational) ;;
esac
[ "$(cat /sys/block/nbd0/queue/rotational)" = "$want_rot" ] || fail "rotational is not $want_rot"
[ "$(cat /sys/block/nbd0/queue/logical_block_size)" = 512 ] || fail "logical_block_size is not 512"

step "fio verify=crc32c on /dev/nbd0"
fio --name=verify --filename=/dev/nbd0 --direct=1 --ioengine=libaio --iodepth=16 \
	--rw=randwrite --bsrange=4k-64k --size=48m --verify=crc32c --verify_fatal=1 \
	--do_verify=1 --randseed=${SEED:-1} --output=/tmp/fio.log || { cat /tmp/fio.log; fail "fio verify"; }
grep -E 'err=|IOPS' /tmp/fio.log | head -4

for fs in ext4 xfs; do
	step "$fs: mkfs, mount, write and fsync files"
	case $fs in
	ext4) mkfs.ext4 -q -F /dev/nbd0 ;;
	xfs) mkfs.xfs -q -f /dev/nbd0 ;;
	esac
	mount -t $fs /dev/nbd0 $MNT
	rm -f /tmp/sums
	write_files $MNT 40
	umount $MNT
	step "$fs: fsck"
	case $fs in
	ext4) e2fsck -f -n /dev/nbd0 || fail "e2fsck found problems" ;;
	xfs) xfs_repair -n /dev/nbd0 >/tmp/repair.log 2>&1 || { cat /tmp/repair.log; fail "xfs_repair found problems"; } ;;
	esac
	step "$fs: detach"
	nbdcache detach /dev/nbd0
	finish $apid a1
	gone
	step "$fs: re-attach, check every file"
	attach a1 --connections 2
	mount -t $fs -o ro /dev/nbd0 $MNT
	verify /tmp/sums
	umount $MNT
	if [ $fs = ext4 ]; then
		nbdcache detach /dev/nbd0
		finish $apid a1
		attach a1 --connections 2
	fi
done

step "stop with SIGTERM"
kill -TERM $apid
finish $apid a1
gone

step "the backing alone after the clean stop (which drains the cache): check every file"
saved=$STORAGE
STORAGE="--backing /dev/vdb"
attach a3 --connections 1
mount -t xfs -o ro /dev/nbd0 $MNT
verify /tmp/sums
umount $MNT
nbdcache detach /dev/nbd0
finish $apid a3
STORAGE=$saved

step "the ioctl path: attach --ioctl, check every file, detach"
attach a2 --ioctl --connections 2
grep -q ioctl /tmp/a2.out || fail "not attached with ioctls"
mount -t xfs -o ro /dev/nbd0 $MNT
verify /tmp/sums
umount $MNT
out=$(nbdcache detach --ioctl /dev/nbd0)
echo "$out"
case "$out" in *"disconnected /dev/nbd0 (ioctl)"*) ;; *) fail "detach --ioctl did not use the ioctl" ;; esac
finish $apid a2
gone
no_io_errors

step "the shape flags: --kernel-block-size 4096 --max-request 256K --scheduler none"
attach a4 --connections 1 --kernel-block-size 4096 --max-request 256K --scheduler none
queue_report
[ "$(cat /sys/block/nbd0/queue/logical_block_size)" = 4096 ] || fail "logical_block_size is not 4096"
[ "$(cat /sys/block/nbd0/queue/max_sectors_kb)" = 256 ] || fail "max_sectors_kb is not 256"
grep -q '\[none\]' /sys/block/nbd0/queue/scheduler || fail "scheduler is not none: $(cat /sys/block/nbd0/queue/scheduler)"
nbdcache detach /dev/nbd0
finish $apid a4
gone

# Last, as the writer sees I/O errors once the device is gone.
case "$STORAGE" in
*--cache*)
	step "detach while O_DIRECT writes are in flight"
	stop_under_writes d1 'nbdcache detach /dev/nbd0'
	step "SIGTERM while O_DIRECT writes are in flight"
	stop_under_writes d2 'kill -TERM $apid'
	;;
esac
echo "ATTACH-SCENARIO-OK"
