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
e2fsck -f -n /dev/nbd0 || fail "e2fsck found problems after the power cut"
step "check every file fsync'd before the cut"
tr -d '\000' </dev/vdc | awk -v d=$MNT/d '$1 == "SYNCED" {print $2 "  " d "/" $3}' >/tmp/synced
[ -s /tmp/synced ] || fail "no SYNCED list on /dev/vdc"
mount -t ext4 -o ro /dev/nbd0 $MNT
verify /tmp/synced
umount $MNT
nbdcache detach /dev/nbd0
finish $apid c2
no_io_errors
echo "CUT-SCENARIO-OK"
