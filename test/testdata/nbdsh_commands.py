#!/usr/bin/python3
# Drives every NBD command and every error through libnbd (python3-libnbd).
# Usage: nbdsh_commands.py URI READONLY_URI. Prints ALL OK at the end.
import errno
import sys

import nbd

MIB = 1 << 20
uri, ro_uri = sys.argv[1], sys.argv[2]


def expect_err(what, want, fn, *args, **kw):
    try:
        fn(*args, **kw)
    except nbd.Error as e:
        if e.errnum != want:
            raise AssertionError("%s: errno %s, want %s (%s)" % (what, e.errnum, want, e))
        print("ok  %-28s -> %s" % (what, errno.errorcode[want]))
        return
    raise AssertionError("%s: no error, want %s" % (what, errno.errorcode[want]))


def still_usable(h):
    assert h.pread(512, 0) is not None


h = nbd.NBD()
h.set_strict_mode(0)  # let requests through that libnbd would refuse itself
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(uri)
size = h.get_size()
assert size == 64 * MIB, size
for cap in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero",
            "can_multi_conn", "can_cache", "can_df"):
    assert getattr(h, cap)(), cap
assert not h.is_read_only()
assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)

# Every command.
h.pwrite(b"\x5a" * 4096, MIB, nbd.CMD_FLAG_FUA)
assert h.pread(4096, MIB) == b"\x5a" * 4096
h.pwrite(b"\x11" * 65536, 2 * MIB)
h.flush()
h.zero(65536, 2 * MIB, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(65536, 2 * MIB) == bytes(65536)
h.pwrite(b"\x22" * 65536, 3 * MIB)
h.zero(65536, 3 * MIB, nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(65536, 3 * MIB) == bytes(65536)
h.pwrite(b"\x33" * 65536, 4 * MIB)
h.trim(65536, 4 * MIB, nbd.CMD_FLAG_FUA)
assert h.pread(65536, 4 * MIB) == bytes(65536)
h.cache(65536, 0)
h.pread(4096, 0, nbd.CMD_FLAG_DF)
print("ok  read/write/fua/flush/zero/trim/cache")

# BLOCK_STATUS: the trimmed range is a hole that reads as zeroes; the
# written range is data.
extents = []


def collect(metacontext, offset, entries, err):
    assert metacontext == nbd.CONTEXT_BASE_ALLOCATION
    extents.extend(zip(entries[0::2], entries[1::2]))


h.block_status(65536, 4 * MIB, collect)
assert sum(l for l, _ in extents) >= 65536 and extents[0][1] == (nbd.STATE_HOLE | nbd.STATE_ZERO), extents
extents.clear()
h.block_status(4096, MIB, collect)
assert extents[0][1] == 0, extents
extents.clear()
h.block_status(64 * MIB, 0, collect, nbd.CMD_FLAG_REQ_ONE)
assert len(extents) == 1, extents
print("ok  block_status")

# Every error. After each, the connection still works.
expect_err("read past the end", errno.EINVAL, h.pread, 1024, size - 512)
expect_err("write past the end", errno.ENOSPC, h.pwrite, b"x" * 1024, size - 512)
expect_err("trim past the end", errno.EINVAL, h.trim, 1024, size - 512)
expect_err("zero past the end", errno.ENOSPC, h.zero, 1024, size - 512)
expect_err("cache past the end", errno.EINVAL, h.cache, 1024, size)
expect_err("block_status past the end", errno.EINVAL, h.block_status, 1024, size, collect)
expect_err("read with an unknown flag", errno.EINVAL, h.pread, 512, 0, 1 << 9)
expect_err("write with NO_HOLE", errno.EINVAL, h.pwrite, b"x" * 512, 0, nbd.CMD_FLAG_NO_HOLE)
expect_err("read over 32 MiB", errno.EINVAL, h.pread, 33 * MIB, 0)
expect_err("read over 32 MiB, DF", errno.EOVERFLOW, h.pread, 33 * MIB, 0, nbd.CMD_FLAG_DF)
expect_err("write over 32 MiB", errno.EINVAL, h.pwrite, b"\x01" * (33 * MIB), 0)
still_usable(h)
assert h.pread(4096, MIB) == b"\x5a" * 4096, "a rejected request touched data"
assert h.pread(512, 0) == bytes(512), "the oversize write touched data"

ro = nbd.NBD()
ro.set_strict_mode(0)
ro.connect_uri(ro_uri)
assert ro.is_read_only()
expect_err("write on read-only", errno.EPERM, ro.pwrite, b"x" * 512, 0)
expect_err("trim on read-only", errno.EPERM, ro.trim, 512, 0)
expect_err("zero on read-only", errno.EPERM, ro.zero, 512, 0)
still_usable(ro)
ro.shutdown()

# Option haggling as libnbd does it: LIST names the export, INFO reports
# its size, and ABORT ends the negotiation cleanly.
o = nbd.NBD()
o.set_opt_mode(True)
o.connect_uri(uri)
names = []
o.opt_list(lambda name, desc: names.append(name))
assert names, "LIST named no export"
o.opt_info()
assert o.get_size() == size, o.get_size()
o.opt_abort()
assert o.aio_is_closed(), "ABORT left the connection open"
print("ok  opt list/info/abort")

# 64 requests in flight, completing out of order: a 32 MiB read is sent
# first, then 63 small ones that finish before it.
big = nbd.Buffer(32 * MIB)
out_of_order = False
for attempt in range(5):
    cookies = [h.aio_pread(big, 0)]
    bufs = []
    for i in range(63):
        b = nbd.Buffer(4096)
        bufs.append(b)
        cookies.append(h.aio_pread(b, MIB if i % 2 == 0 else 0))
    order = []
    while len(order) < 64:
        c = h.aio_peek_command_completed()
        if c == 0:
            h.poll(-1)
            continue
        assert h.aio_command_completed(c)
        order.append(c)
    assert sorted(order) == sorted(cookies)
    for i, b in enumerate(bufs):
        want = b"\x5a" * 4096 if i % 2 == 0 else bytes(4096)
        assert b.to_bytearray() == want, "aio read %d returned wrong data" % i
    if order[0] != cookies[0]:
        out_of_order = True
        break
assert out_of_order, "replies never came out of order"
print("ok  64 in flight, out of order (attempt %d)" % (attempt + 1))

# Pipelined writes, then verify.
cookies = []
for i in range(64):
    cookies.append(h.aio_pwrite(bytes([i]) * 4096, 8 * MIB + i * 4096))
while h.aio_in_flight() > 0:
    h.poll(-1)
for c in cookies:
    h.aio_command_completed(c)
h.flush()
for i in range(64):
    assert h.pread(4096, 8 * MIB + i * 4096) == bytes([i]) * 4096, i
print("ok  64 pipelined writes")

h.shutdown()
print("ALL OK")
