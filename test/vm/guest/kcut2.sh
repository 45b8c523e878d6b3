# Power cut of a write-back cache, part 2: on the disks the killed VM left,
# bring the cache KCACHE up again as they are (it recovers), mount (the
# ext4 journal replays), umount; fsck must be clean and every file
# announced SYNCED in part 1 (listed on /dev/vdc) must read back intact.
set -e
. /lib.sh
step "bring $KCACHE up after the power cut"
kcache_setup "${KCACHE:?}" 0
step "mount (journal replay), umount, fsck"
mount -t ext4 $DEV $MNT
umount $MNT
tr -d '\000' </dev/vdc | awk -v d=$MNT/d '$1 == "SYNCED" {print $2 "  " d "/" $3}' >/tmp/synced
[ -s /tmp/synced ] || fail "no SYNCED list on /dev/vdc"
step "fsck, check every file fsync'd before the cut"
check_ext4 /tmp/synced "after the power cut" $DEV
echo "KCUT-OK $(wc -l </tmp/synced) files"
