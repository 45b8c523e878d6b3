# Fault mode on /dev/nbdX: ext4 on the write-back cache, served by
# `nbdcache attach --faults`. Each round runs an fsync-heavy writer and,
# at a point drawn from the seed, cuts the power with `ctl power-cut
# --off` under one loss model: the devices lose what a power failure
# loses, and the disk stays dark (every request fails with EIO, so ext4
# and the writer stop). Then umount, drop what the kernel cached of the
# old disk, `ctl power-on` (recovery runs), mount (ext4 replays its
# journal), umount, and e2fsck must be clean; every file whose fsync
# returned before any cut must read back intact.
# FAULTCUT_MOUNT=nobarrier is the negative control: ext4 then sends no
# FLUSH or FUA, so fsync makes nothing durable, and the cuts must be seen
# to lose fsync'd files (or break the filesystem).
set -e
. /lib.sh
# Requests in flight at a cut get no answer; the kernel resends them (and
# they fail) when their timeout expires: 5 s instead of the kernel's 30.
ATTACH_FLAGS="--timeout 5s $ATTACH_FLAGS"
CTL=unix:/tmp/f.ctl
seed=$(( ${SEED:-1} % 1000000 ))

step "attach --faults, mkfs.ext4"
attach f1 --connections 2 --faults --control $CTL
mkfs.ext4 -q -F /dev/nbd0
rm -f /tmp/sums
round=0
for model in unflushed random torn; do
	round=$((round + 1))
	step "round $round ($model): mount, writer"
	mount -t ext4 ${FAULTCUT_MOUNT:+-o $FAULTCUT_MOUNT} /dev/nbd0 $MNT
	mkdir $MNT/r$round
	sync -f $MNT
	rm -f /tmp/round
	(
		i=0
		while :; do
			dd if=/dev/urandom of=/tmp/w.tmp bs=4k count=$((1 + i % 16)) 2>/dev/null
			dd if=/tmp/w.tmp of=$MNT/r$round/w$i bs=4k conv=fsync 2>/dev/null || exit 0
			sync -d $MNT/r$round || exit 0
			echo "$(md5sum </tmp/w.tmp | cut -d' ' -f1)  $MNT/r$round/w$i" >>/tmp/round
			i=$((i + 1))
		done
	) &
	wpid=$!
	n=$(( (seed + round * 7) % 12 + 6 ))
	wait_line /tmp/round "/w$((n - 1))\$" 1200 || fail "the writer did not reach $n files"
	step "round $round: power-cut --model $model --off after $n or more fsync'd files"
	nbdcache ctl --control $CTL power-cut --model $model --seed $((seed + round)) --off >/tmp/cut.log || { cat /tmp/cut.log; fail "power-cut"; }
	cat /tmp/cut.log
	grep -q 'the power stays off' /tmp/cut.log || fail "the power did not stay off"
	wait $wpid
	cat /tmp/round >>/tmp/sums
	echo "round $round: $(wc -l </tmp/round) files fsync'd before the cut"
	step "round $round: umount while the power is off, power-on"
	umount $MNT || fail "umount after the cut"
	blockdev --flushbufs /dev/nbd0 || true
	echo 3 >/proc/sys/vm/drop_caches
	nbdcache ctl --control $CTL power-on >/tmp/on.log || { cat /tmp/on.log; fail "power-on"; }
	cat /tmp/on.log
	grep -q 'check: *clean' /tmp/on.log || fail "the cache was not clean after the cut"
	step "round $round: mount (journal replay), umount, fsck, every fsync'd file"
	mount -t ext4 /dev/nbd0 $MNT || fail "mount after power-on"
	umount $MNT
	check_ext4 /tmp/sums "after the $model cut"
done
step "detach"
nbdcache detach /dev/nbd0
finish $apid f1
echo "FAULTCUT-SCENARIO-OK"
