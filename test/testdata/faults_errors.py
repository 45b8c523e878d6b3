#!/usr/bin/python3
# Injected errors at the export, seen by a real client (libnbd).
#
#   faults_errors.py URI CTLSOCK
#
# For every errno NBD carries and every kind of request, it installs a fault
# on [1 MiB, 2 MiB) through the control socket (POST /v1/fault/error), and
# checks that a request inside fails with exactly that errno, a request
# outside succeeds, and the connection keeps serving. Then --after/--times
# and --probability. Failed writes, trims and zeroes must touch nothing:
# the first 8 MiB keep their pattern throughout. Exit 0 when all hold.
import sys

import nbd

import ctlsock

uri, ctl = sys.argv[1], sys.argv[2]
MIB = 1 << 20
BS = 4096


def control(path, **q):
    status, body = ctlsock.post(ctl, path, **q)
    if status != 200:
        sys.exit("%s %s: %d %s" % (path, q, status, body))


failures = 0


def fail(msg):
    global failures
    failures += 1
    print("FAIL:", msg)


h = nbd.NBD()
h.connect_uri(uri)
pattern = bytes((i * 7 + 3) % 251 for i in range(8 * MIB))
h.pwrite(pattern, 0)
h.flush()

ops = {
    "read": lambda off: h.pread(BS, off),
    # Writes inside the pattern rewrite it: only a failed write that
    # landed (0xFF) would change it.
    "write": lambda off: h.pwrite(pattern[off:off + BS] if off < len(pattern) else bytes(BS), off),
    "bad write": lambda off: h.pwrite(b"\xff" * BS, off),
    "flush": lambda off: h.flush(),
    "trim": lambda off: h.trim(BS, off),
    "zero": lambda off: h.zero(BS, off),
}
errnos = ["EIO", "EPERM", "ENOSPC", "EINVAL", "ENOMEM", "EOVERFLOW", "ENOTSUP", "ESHUTDOWN"]
cases = 0
for errno in errnos:
    for op, call in ops.items():
        if op == "bad write":
            continue
        if op == "flush":
            control("/v1/fault/error", target="export", op=op, errno=errno)
        else:
            control("/v1/fault/error", target="export", op=op, errno=errno, offset=MIB, length=MIB)
        cases += 1
        try:
            (ops["bad write"] if op == "write" else call)(MIB + 8 * BS)
            fail("%s inside the range with %s injected succeeded" % (op, errno))
        except nbd.Error as e:
            if e.errno != errno:
                fail("%s with %s injected failed with %s (%s)" % (op, errno, e.errno, e.string))
        if op != "flush":
            # Outside the range: succeeds. Trims and zeroes go to a
            # scratch area past the pattern.
            off = 4 * MIB if op in ("read", "write") else 16 * MIB
            try:
                call(off)
            except nbd.Error as e:
                fail("%s outside the range with %s injected failed: %s" % (op, errno, e.string))
        # Other kinds pass.
        other = "read" if op != "read" else "write"
        try:
            ops[other](MIB + 8 * BS)
        except nbd.Error as e:
            fail("%s while %s faults: %s" % (other, op, e.string))
        control("/v1/fault/error", target="export", clear=1)
        try:
            call(MIB + 8 * BS if op in ("read", "write", "flush") else 16 * MIB)
        except nbd.Error as e:
            fail("%s after clear: %s" % (op, e.string))

# --after 3 --times 2: three reads pass, two fail, the rest pass.
control("/v1/fault/error", target="export", op="read", errno="EIO", offset=MIB, length=MIB, after=3, times=2)
got = []
for i in range(8):
    try:
        h.pread(BS, MIB)
        got.append("ok")
    except nbd.Error as e:
        got.append(e.errno)
if got != ["ok"] * 3 + ["EIO"] * 2 + ["ok"] * 3:
    fail("after=3 times=2 gave %s" % got)
control("/v1/fault/error", target="export", clear=1)

# --probability 0.5 over 400 reads.
control("/v1/fault/error", target="export", op="read", errno="EIO", probability=0.5)
n = 0
for i in range(400):
    try:
        h.pread(512, 0)
    except nbd.Error:
        n += 1
if not 120 <= n <= 280:
    fail("probability 0.5 failed %d of 400 reads" % n)
control("/v1/fault/error", target="export", clear=1)

# Nothing was touched: the pattern is intact, on this connection and a new one.
if h.pread(8 * MIB, 0) != pattern:
    fail("the pattern changed")
h2 = nbd.NBD()
h2.connect_uri(uri)
if h2.pread(8 * MIB, 0) != pattern:
    fail("the pattern changed (new connection)")
print("%d errno/op cases, after/times, probability (%d of 400 failed): %d failures" % (cases, n, failures))
sys.exit(1 if failures else 0)
