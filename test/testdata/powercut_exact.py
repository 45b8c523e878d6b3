#!/usr/bin/python3
# The unflushed model, exactly: everything flushed or written with FUA reads
# back, and every write, zero and trim not yet flushed is gone.
#
#   powercut_exact.py URI CTLSOCK SEED [synced]
#
# With "synced" (a layer that syncs writes by itself: the writethrough
# cache), an unflushed block may also hold its newest data.
#
# Writes A (flushed), C (FUA), then, unflushed: B (new data, some over A),
# Z (write-zeroes over A), T (trim over A), D (over C). Then it cuts the
# power itself through the control socket (POST /v1/fault/power-cut, model
# unflushed), within milliseconds of the last write, reconnects, and
# compares the whole device with what was durable: C over A over the
# initial contents. Prints the cut report's JSON first. Exit 0 when exact.
import json
import random
import sys

import nbd

import ctlsock

BS = 4096
uri, ctl, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
synced = len(sys.argv) > 4 and sys.argv[4] == "synced"
rng = random.Random(seed)


def block(tag, b):
    return bytes([tag]) * 8 + b.to_bytes(8, "little") + bytes([tag]) * (BS - 16)


def read_all(h, size):
    return b"".join(h.pread(min(4 << 20, size - off), off) for off in range(0, size, 4 << 20))


h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size()
nblocks = size // BS
initial = read_all(h, size)
blocks = rng.sample(range(nblocks), 200)
A, C, rest = blocks[:64], blocks[64:80], blocks[80:]
B = rest[:32] + A[:16]
Z, T, D = A[16:24], A[24:32], C[:8]
expect = {}
newest = {}  # block: what it holds now, if an unflushed request changed it
for b in A:
    h.pwrite(block(0xA1, b), b * BS)
    expect[b] = block(0xA1, b)
h.flush()
for b in C:
    h.pwrite(block(0xC3, b), b * BS, nbd.CMD_FLAG_FUA)
    expect[b] = block(0xC3, b)
for b in B:
    h.pwrite(block(0xB2, b), b * BS)
    newest[b] = [block(0xB2, b)]
for b in Z:
    h.zero(BS, b * BS)
    newest[b] = [bytes(BS)]
for b in T:
    h.trim(BS, b * BS)
    newest[b] = [bytes(BS), expect[b]]
for b in D:
    h.pwrite(block(0xD4, b), b * BS)
    newest[b] = [block(0xD4, b)]
# Nothing after the flush and the FUA writes is durable. Cut now.
status, report = ctlsock.post(ctl, "/v1/fault/power-cut", model="unflushed", seed=seed)
print(report.strip())
if status != 200:
    sys.exit("power cut failed: %d" % status)
rep = json.loads(report)
if rep.get("error") or (rep.get("check") and not rep["check"]["ok"]):
    sys.exit("power cut or recovery failed")
if sum(d["dropped"] + d["partly_dropped"] for d in rep["devices"]) == 0:
    sys.exit("the cut dropped nothing: the test did not test anything")

try:
    h.pread(512, 0)
    sys.exit("the old connection survived the power cut")
except nbd.Error:
    pass
h = nbd.NBD()
h.connect_uri(uri)
wrong = 0
img = read_all(h, size)
for b in range(nblocks):
    got = img[b * BS:(b + 1) * BS]
    want = expect.get(b, initial[b * BS:(b + 1) * BS])
    if got != want and not (synced and got in newest.get(b, [])):
        wrong += 1
        if wrong <= 10:
            print("block %d: holds %s, want %s" % (b, got[:1].hex(), want[:1].hex()))
print("exact: %d blocks compared, %d wrong (A %d flushed, C %d FUA; B %d, Z %d, T %d, D %d unflushed)" % (
    nblocks, wrong, len(A), len(C), len(B), len(Z), len(T), len(D)))
sys.exit(1 if wrong else 0)
