# Upgrade: replace the server under a mounted xfs while an fsync-heavy
# writer runs. The old server hands over (SIGUSR2: finish, flush, leave
# the device attached); the new binary takes over with --reconnect. No
# I/O error, no lost data.
set -e
. /lib.sh
# Requests the old server had not read when it stopped are resent by the
# kernel when their timeout expires: a short one keeps the test short.
ATTACH_FLAGS="--timeout 10s $ATTACH_FLAGS"

step "hide modules.dep and gzip nbd.ko: attach must load it anyway"
[ ! -e /sys/module/nbd ] || fail "nbd already loaded"
modprobe xfs # mount's module autoload needs modules.dep
rm -f /lib/modules/*/modules.dep
gzip /lib/modules/*/kernel/drivers/block/nbd.ko
ls /lib/modules/*/kernel/drivers/block/

step "attach, mkfs.xfs, mount, start the writer"
attach u1 --connections 2
[ -e /sys/module/nbd ] || fail "nbd not loaded"
mkfs.xfs -q -f /dev/nbd0
mount -t xfs /dev/nbd0 $MNT
rm -f /tmp/synced /tmp/stop
writer $MNT >/tmp/writer.log 2>&1 &
wpid=$!
wait_synced 15

step "hand over: SIGUSR2 to the old server ($apid) at $(synced_count) files"
kill -USR2 $apid
finish $apid u1 released
before=$(synced_count)

step "start the new binary with --reconnect"
cp /usr/bin/nbdcache /usr/bin/nbdcache-new
NBDCACHE=nbdcache-new attach u2 --device /dev/nbd0 --reconnect --connections 2
wait_synced $((before + 15))
touch /tmp/stop
wait $wpid || { cat /tmp/writer.log; fail "writer failed"; }
cat /tmp/writer.log
no_io_errors

step "umount, xfs_repair -n, check every fsync'd file"
umount $MNT
xfs_repair -n /dev/nbd0 >/tmp/repair.log 2>&1 || { cat /tmp/repair.log; fail "xfs_repair found problems"; }
mount -t xfs -o ro /dev/nbd0 $MNT
verify /tmp/synced
umount $MNT
nbdcache detach /dev/nbd0
finish $apid u2
echo "UPGRADE-SCENARIO-OK"
