# Real power cut, part 1: the VM is killed (qemu SIGKILL: the guest's page
# cache and everything unsynced in it is gone) while an fsync-heavy writer
# runs on ext4 on /dev/nbd0. Each file whose fsync (and the directory's)
# returned is announced on the console as "SYNCED <md5> <name>"; the host
# collects them for part 2 (cut2.sh).
set -e
. /lib.sh
step "attach, mkfs.ext4, mount"
attach c1 --connections 2
mkfs.ext4 -q -F /dev/nbd0
mount -t ext4 /dev/nbd0 $MNT
mkdir $MNT/d
sync -f $MNT
cut_writer $MNT/d
