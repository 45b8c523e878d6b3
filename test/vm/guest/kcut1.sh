# Power cut of a write-back cache, part 1 (issue 22; bench/kernel-caches.sh
# CUTS=N, DRAIN_CUTS=N): like cut1.sh, on the cache KCACHE (bcache,
# writecache or nbdcache, see kcache_setup): ext4 on it, an fsync-heavy
# writer announcing each file whose fsync returned as "SYNCED <md5> <name>",
# and the VM killed after CUT_AFTER of them (default 20).
#
# With KCUT_DRAIN=1 the cut falls in a full drain instead: first 4096
# random 4 KiB writes into a 64 MiB file (fsync'd, announced as "bulk"),
# then the drain starts (kcache_drain) and "CUT-NOW" is printed at once,
# while the writer goes on. "DIRTY <n>" lines, every 0.1 s, show how much
# the cache still held that the backing lacked (kcache_dirty): the last
# one before the kill says whether the cut fell in the drain.
set -e
. /lib.sh
step "set up $KCACHE, mkfs.ext4, mount"
kcache_setup "${KCACHE:?}" 1
mkfs.ext4 -q -F $DEV
mount -t ext4 $DEV $MNT
mkdir $MNT/d
sync -f $MNT
if [ -n "${KCUT_DRAIN:-}" ]; then
	step "dirty the cache: 4096 random 4k writes into a 64 MiB file"
	fio --name=bulk --filename=$MNT/d/bulk --size=64m --io_size=16m --rw=randwrite --bs=4k --direct=1 \
		--ioengine=libaio --iodepth=16 --randrepeat=0 --randseed="${SEED:-1}" --end_fsync=1 \
		--output=/tmp/bulk.out || fail "fio"
	sync -f $MNT
	echo "SYNCED $(md5sum <$MNT/d/bulk | cut -d' ' -f1) bulk"
	step "drain, cut in it"
	echo "DIRTY $(kcache_dirty $KCACHE)"
	kcache_drain $KCACHE &
	(while :; do echo "DIRTY $(kcache_dirty $KCACHE)"; sleep 0.1; done) &
	echo "CUT-NOW"
	CUT_AFTER=-1 # the writer goes on until the kill
fi
cut_writer $MNT/d
