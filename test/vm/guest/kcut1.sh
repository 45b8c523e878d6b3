# Power cut of a write-back cache, part 1 (issue 22; bench/kernel-caches.sh
# CUTS=N): like cut1.sh, on the cache KCACHE (bcache, writecache or
# nbdcache, see kcache_setup): ext4 on it, an fsync-heavy writer announcing
# each file whose fsync returned as "SYNCED <md5> <name>", and the VM
# killed after CUT_AFTER of them (default 20).
set -e
. /lib.sh
step "set up $KCACHE, mkfs.ext4, mount"
kcache_setup "${KCACHE:?}" 1
mkfs.ext4 -q -F $DEV
mount -t ext4 $DEV $MNT
mkdir $MNT/d
sync -f $MNT
i=0
while :; do
	dd if=/dev/urandom of=/tmp/w.tmp bs=4k count=$((1 + i % 16)) 2>/dev/null
	dd if=/tmp/w.tmp of=$MNT/d/w$i bs=4k conv=fsync 2>/dev/null || fail "I/O error on w$i"
	sync -d $MNT/d
	echo "SYNCED $(md5sum </tmp/w.tmp | cut -d' ' -f1) w$i"
	i=$((i + 1))
	[ $i = "${CUT_AFTER:-20}" ] && echo "CUT-NOW"
done
