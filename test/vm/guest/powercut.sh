# Power cut of the server: kill -9 while fio (fsync after every write,
# verify=crc32c) and an fsync-heavy writer run on ext4; restart with
# --reconnect; the writers finish without an I/O error, fsck is clean,
# and every fsync'd file is intact.
set -e
. /lib.sh
# Requests the dead server had read but not answered are resent by the
# kernel when their timeout expires: a short one keeps the test short.
ATTACH_FLAGS="--timeout 10s $ATTACH_FLAGS"

step "attach, mkfs.ext4, mount"
attach p1 --connections 2
mkfs.ext4 -q -F /dev/nbd0
mount -t ext4 /dev/nbd0 $MNT
rm -f /tmp/synced /tmp/stop

step "start fio (fsync=1, verify) and the writer"
fio --name=fsync --filename=$MNT/fio.dat --rw=write --bs=16k --size=8m --fsync=1 \
	--verify=crc32c --verify_fatal=1 --output=/tmp/fio.log &
fpid=$!
writer $MNT >/tmp/writer.log 2>&1 &
wpid=$!
wait_synced 15

step "kill -9 the server ($apid) after $(synced_count) fsync'd files"
kill -0 $fpid 2>/dev/null || fail "fio finished before the kill: make it write more"
kill -9 $apid
wait $apid || true
before=$(synced_count)

step "restart with --reconnect"
attach p2 --device /dev/nbd0 --reconnect --connections 2
wait_synced $((before + 15))
step "writer went on: $(synced_count) files"
touch /tmp/stop
wait $wpid || { cat /tmp/writer.log; fail "writer failed"; }
cat /tmp/writer.log
wait $fpid || { cat /tmp/fio.log; fail "fio failed"; }
grep -E 'err=' /tmp/fio.log | head -2

step "umount, fsck, check every fsync'd file"
umount $MNT
check_ext4 /tmp/synced "after the restart"
no_io_errors
nbdcache detach /dev/nbd0
finish $apid p2
echo "POWERCUT-SCENARIO-OK"
