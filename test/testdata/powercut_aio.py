#!/usr/bin/python3
# Many writes in flight, each acknowledgement recorded exactly, for power
# cuts that land in the middle of client I/O.
#
#   powercut_aio.py write URI SEED BLOCKS LOG [fua]
#       writes every 4 KiB block of the first BLOCKS once, in a seeded random
#       order, 16 requests in flight (with FUA if asked), until done or the
#       connection drops; then writes LOG: "issued N" and one line per
#       acknowledged write index
#   powercut_aio.py verify URI SEED BLOCKS LOG INITIAL [GARBAGE]
#       every acknowledged write reads back exactly; every sector of a write
#       issued but not acknowledged holds its new or its old data (INITIAL),
#       or garbage if it is one of the comma-separated byte offsets GARBAGE
#       (sectors the backing itself tore under a write that passed through
#       to it: what a raw disk does, which no cache can prevent); every
#       block never written holds its old data
#
# Acknowledged writes must be durable: run against `serve --sync always`, or
# with fua. Each sector carries (magic, block, write index), so a misplaced
# or torn sector is caught. Exit 0 when verified.
import random
import struct
import sys

import nbd

BS = 4096
MAGIC = 0x61696F7772697465
mode, uri, seed, nblocks, log = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
order = list(range(nblocks))
random.Random(seed).shuffle(order)


def data(i):
    sector = struct.pack("<QQQ", MAGIC, order[i], i) + bytes(512 - 24)
    return sector * (BS // 512)


h = nbd.NBD()
h.connect_uri(uri)

if mode == "write":
    flags = nbd.CMD_FLAG_FUA if len(sys.argv) > 6 and sys.argv[6] == "fua" else 0
    acked, issued = [], 0

    def done(i, err):
        if err.value == 0:
            acked.append(i)
        return 1

    try:
        while issued < nblocks or h.aio_in_flight() > 0:
            while issued < nblocks and h.aio_in_flight() < 16:
                i = issued
                h.aio_pwrite(data(i), order[i] * BS, completion=lambda err, i=i: done(i, err), flags=flags)
                issued += 1
            h.poll(-1)
    except nbd.Error as e:
        print("writer stopped: %s" % e.string)
    with open(log, "w") as f:
        f.write("issued %d\n" % issued)
        for i in acked:
            f.write("%d\n" % i)
    print("issued %d writes, %d acknowledged" % (issued, len(acked)))
    sys.exit(0)

lines = open(log).read().split("\n")
issued = int(lines[0].split()[1])
acked = set(int(x) for x in lines[1:] if x)
initial = open(sys.argv[6], "rb")
torn = set(int(x) for x in sys.argv[7].split(",") if x) if len(sys.argv) > 7 else set()
problems = 0


def problem(msg):
    global problems
    problems += 1
    if problems <= 10:
        print(msg)


def what(sector):
    if sector == bytes(512):
        return "zeroes"
    magic, b, i = struct.unpack("<QQQ", sector[:24])
    if magic == MAGIC:
        return "write %d (block %d)" % (i, b)
    return "garbage " + sector[:16].hex()


for i in range(nblocks):
    b = order[i]
    got = h.pread(BS, b * BS)
    initial.seek(b * BS)
    old = initial.read(BS)
    new = data(i)
    if i in acked:
        if got != new:
            problem("block %d: acknowledged write %d lost" % (b, i))
    elif i < issued:
        for k in range(0, BS, 512):
            if got[k:k + 512] not in (new[k:k + 512], old[k:k + 512]) and b * BS + k not in torn:
                problem("block %d sector %d: neither write %d (in flight) nor the old data: %s" % (b, k // 512, i, what(got[k:k + 512])))
    elif got != old:
        problem("block %d: never written, yet changed" % b)
print("verified %d blocks: %d writes issued, %d acknowledged, %d problems" % (nblocks, issued, len(acked), problems))
sys.exit(1 if problems else 0)
