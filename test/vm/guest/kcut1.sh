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
cut_writer $MNT/d
