#!/usr/bin/python3
# Injected errors on the cache device and the backing device, behind a
# write-back cache, seen by a real client (libnbd).
#
#   faults_devices.py URI CTLSOCK
#
# The server runs `--faults` with a cache. Each case installs one device
# fault through the control socket, checks that the request that meets it
# fails with exactly the errno asked for, that requests the fault does not
# reach pass, and that a failed request touched nothing. Then it clears the
# fault and checks the request passes. Exit 0 when all hold.
import errno as errnos
import json
import os
import sys

import nbd

import ctlsock

uri, ctl = sys.argv[1], sys.argv[2]
MIB = 1 << 20
BS = 4096
failures = 0


def fail(msg):
    global failures
    failures += 1
    print("FAIL:", msg)


def control(endpoint, **q):
    status, body = ctlsock.post(ctl, endpoint, **q)
    if status != 200:
        sys.exit("%s %s: %d %s" % (endpoint, q, status, body))
    return body


def fault(**q):
    control("/v1/fault/error", **q)


def clear():
    control("/v1/fault/error", clear=1)


def expect_errno(what, errno, call):
    try:
        call()
        fail("%s succeeded, want %s" % (what, errno))
    except nbd.Error as e:
        if e.errno != errno:
            fail("%s failed with %s (%s), want %s" % (what, e.errno, e.string, errno))


def expect_ok(what, call):
    try:
        return call()
    except nbd.Error as e:
        fail("%s: %s" % (what, e.string))


def expect_data(what, off, want):
    got = expect_ok("read " + what, lambda: h.pread(len(want), off))
    if got is not None and got != want:
        fail("%s: holds %s..., want %s..." % (what, got[:4].hex(), want[:4].hex()))


def connect():
    c = nbd.NBD()
    c.connect_uri(uri)
    return c


h = connect()
# 8 MiB of pattern, written back and cached clean.
pattern = bytes((i * 7 + 3) % 251 for i in range(8 * MIB))
h.pwrite(pattern, 0)
h.flush()
control("/v1/drain")
P = lambda off, n=BS: pattern[off:off + n]  # noqa: E731
cases = 0

# Backing, read: a miss inside the range fails with the errno; hits
# (clean data in the cache) and misses outside pass. --after 2 --times 1:
# the third read miss in the range fails, the others pass.
fault(target="backing", op="read", errno="ENOMEM", offset=40 * MIB, length=MIB)
expect_errno("read miss in a failing backing range", "ENOMEM", lambda: h.pread(BS, 40 * MIB))
expect_ok("read miss outside the range", lambda: h.pread(BS, 48 * MIB))
expect_data("clean cached data over a failing backing", MIB, P(MIB))
clear()
fault(target="backing", op="read", errno="EIO", offset=40 * MIB, length=MIB, after=2, times=1)
got = []
for i in range(5):
    try:
        h.pread(BS, 40 * MIB + (i + 8) * 64 * 1024)
        got.append("ok")
    except nbd.Error as e:
        got.append(e.errno)
if got != ["ok", "ok", "EIO", "ok", "ok"]:
    fail("backing read --after 2 --times 1 gave %s" % got)
clear()
cases += 2

# Backing, write, in writethrough mode: the write fails and the old data
# stays, in the cache and on the backing.
control("/v1/mode", mode="writethrough")
fault(target="backing", op="write", errno="ENOSPC", offset=MIB, length=MIB)
expect_errno("writethrough write in a failing backing range", "ENOSPC", lambda: h.pwrite(b"\xff" * BS, MIB + 8 * BS))
expect_data("after the failed write", MIB + 8 * BS, P(MIB + 8 * BS))
expect_ok("writethrough write outside the range", lambda: h.pwrite(P(4 * MIB), 4 * MIB))
clear()
expect_ok("writethrough write after clear", lambda: h.pwrite(P(MIB + 8 * BS), MIB + 8 * BS))
control("/v1/mode", mode="writeback")
cases += 1

# Backing, trim and zero (both reach the backing): they fail, and the
# data they would have dropped still reads back.
for op, errno, call, off in (("trim", "EPERM", h.trim, 2 * MIB), ("zero", "EOVERFLOW", h.zero, 2 * MIB + 64 * BS)):
    fault(target="backing", op=op, errno=errno, offset=2 * MIB, length=MIB)
    expect_errno("%s in a failing backing range" % op, errno, lambda: call(BS, off))
    expect_data("after the failed " + op, off, P(off))
    expect_ok("%s outside the range" % op, lambda: call(BS, 16 * MIB))
    clear()
    expect_ok("%s after clear" % op, lambda: call(BS, off))
    expect_data("after the %s" % op, off, bytes(BS))
    h.pwrite(P(off), off)
    cases += 1
control("/v1/drain")

# Backing, write and flush, for writeback: the data stays dirty in the
# cache and a drain fails with the errno; after clear the drain succeeds.
for i, (op, errno) in enumerate((("write", "EIO"), ("flush", "ENOSPC"))):
    # The fault first: background writeback may start at once.
    fault(target="backing", op=op, errno=errno)
    h.pwrite(b"\xab" * BS, 20 * MIB + i * BS)
    h.flush()
    # The drain answers with progress lines; the last carries any error.
    status, body = ctlsock.post(ctl, "/v1/drain")
    last = json.loads(body.strip().splitlines()[-1]) if status == 200 else {"error": body}
    if not last.get("error"):
        fail("drain with a failing backing %s succeeded: %s" % (op, body.strip()))
    elif os.strerror(getattr(errnos, errno)).lower() not in last["error"].lower():
        fail("drain with a failing backing %s: %r does not name %s" % (op, last["error"], errno))
    expect_data("dirty data while its writeback fails", 20 * MIB + i * BS, b"\xab" * BS)
    clear()
    control("/v1/drain")
    cases += 1

# Cache, read: dirty data exists nowhere else, so its read fails with the
# errno; clean data falls back to the backing.
h.pwrite(b"\xcd" * BS, 22 * MIB)
fault(target="cache", op="read", errno="EIO")
expect_errno("read of dirty data on a failing cache device", "EIO", lambda: h.pread(BS, 22 * MIB))
expect_data("clean data on a failing cache device", MIB, P(MIB))
clear()
expect_data("dirty data after clear", 22 * MIB, b"\xcd" * BS)
control("/v1/drain")
cases += 1

# Cache, write (nothing dirty, so only the client's write meets it): the
# write fails with the errno and the old data stays.
fault(target="cache", op="write", errno="ENOSPC")
expect_errno("write on a failing cache device", "ENOSPC", lambda: h.pwrite(b"\xee" * BS, 3 * MIB))
expect_data("after the failed cache write", 3 * MIB, P(3 * MIB))
clear()
expect_ok("write after clear", lambda: h.pwrite(P(3 * MIB), 3 * MIB))
expect_ok("flush after clear", h.flush)
cases += 1

# Cache, flush: the FLUSH fails with the errno. After a failed sync the
# cache cannot know what its device kept, so it refuses writes (with the
# same errno) until the next start; reads go on. A power cycle (model
# keep: nothing lost on the devices) brings it back.
fault(target="cache", op="flush", errno="EIO")
h.pwrite(b"\x77" * BS, 24 * MIB)
expect_errno("flush on a failing cache device", "EIO", h.flush)
clear()
expect_errno("a write after a failed cache sync", "EIO", lambda: h.pwrite(b"\x78" * BS, 25 * MIB))
expect_data("a read after a failed cache sync", MIB, P(MIB))
control("/v1/fault/power-cut", model="keep")
h = connect()
expect_ok("write after the power cycle", lambda: h.pwrite(b"\x79" * BS, 25 * MIB))
expect_ok("flush after the power cycle", h.flush)
expect_data("the write after the power cycle", 25 * MIB, b"\x79" * BS)
cases += 1

# Nothing outside the faults changed: the pattern, the drained write.
expect_data("the pattern", 0, pattern)
expect_data("the drained writes", 20 * MIB, b"\xab" * 2 * BS)
print("%d device fault cases: %d failures" % (cases, failures))
sys.exit(1 if failures else 0)
