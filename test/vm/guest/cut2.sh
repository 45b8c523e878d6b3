# Real power cut, part 2: on the disks the killed VM left, attach again
# (the cache, if any, recovers), mount (the ext4 journal replays),
# umount, fsck must be clean, and every file announced SYNCED in part 1
# (listed on /dev/vdc) must read back intact.
set -e
. /lib.sh
step "attach after the power cut"
attach c2 --connections 2
step "mount (journal replay), umount, fsck"
mount -t ext4 /dev/nbd0 $MNT
umount $MNT
tr -d '\000' </dev/vdc | awk -v d=$MNT/d '$1 == "SYNCED" {print $2 "  " d "/" $3}' >/tmp/synced
[ -s /tmp/synced ] || fail "no SYNCED list on /dev/vdc"
step "fsck, check every file fsync'd before the cut"
check_ext4 /tmp/synced "after the power cut"
nbdcache detach /dev/nbd0
finish $apid c2
no_io_errors
echo "CUT-SCENARIO-OK"
