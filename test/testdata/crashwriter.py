#!/usr/bin/python3
# A seeded writer and verifier for crash tests of the real server.
#
#   crashwriter.py write URI SEED BLOCKS LOG   writes until the server dies;
#                                              after each FLUSH returns, appends
#                                              "D <i>" to LOG: writes 0..i are
#                                              durable; at the end "A <i>":
#                                              writes 0..i were acknowledged
#   crashwriter.py verify URI SEED BLOCKS LOG INITIAL [power|kill]
#                                              checks every block: it holds its
#                                              last durable write (after a
#                                              kill: its last acknowledged
#                                              write), or a later
#                                              write to that block, or (never
#                                              durably written) its content in
#                                              the INITIAL image or any write
#                                              to that block
# Every 4 KiB block written holds (magic, block, write index) in each 512-byte
# sector, so a read tells exactly which write it came from, and a torn or
# misplaced block is caught. Exit 0 when verified; prints the first problems.
import random
import struct
import sys

import nbd

BS = 4096
MAGIC = 0x6E6264636163
mode, uri, seed, nblocks, log = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]


def sequence(n):
    rng = random.Random(seed)
    for i in range(n):
        yield i, rng.randrange(nblocks), rng.random()


def block_data(block, i):
    sector = struct.pack("<QQQ", MAGIC, block, i) + bytes(512 - 24)
    return sector * (BS // 512)


h = nbd.NBD()
h.connect_uri(uri)

if mode == "write":
    with open(log, "a", buffering=1) as f:
        acked = -1
        try:
            for i, block, r in sequence(1 << 40):
                flags = nbd.CMD_FLAG_FUA if r < 0.02 else 0
                h.pwrite(block_data(block, i), block * BS, flags)
                acked = i
                if flags:
                    f.write("F %d\n" % i)  # this one write is durable
                if r > 0.97:
                    h.flush()
                    f.write("D %d\n" % i)
        finally:
            # The server died (or we were stopped): writes 0..acked were
            # acknowledged, and a process kill must not lose any of them.
            f.write("A %d\n" % acked)
    sys.exit(0)

# verify
initial = open(sys.argv[6], "rb")
crash = sys.argv[7] if len(sys.argv) > 7 else "power"
durable, fua, acked = -1, set(), None
for line in open(log):
    kind, i = line.split()
    if kind == "D":
        durable = max(durable, int(i))
    elif kind == "A":
        acked = int(i)
    else:
        fua.add(int(i))
# A process kill loses nothing acknowledged (the operating system outlives
# the process); a power cut loses what no FLUSH or FUA covered.
if crash == "kill":
    if acked is None:
        sys.exit("no A line in the log: the writer did not see the server die")
    durable = max(durable, acked)
if acked is not None:
    # Only the write in flight (acked + 1) may have landed beyond it.
    last_issued = acked + 1
else:
    # Writes after the last log line may have landed too; a flush comes on
    # average every 33 writes, so 2000 more is a safe bound.
    last_issued = max([durable] + list(fua)) + 2000
writes = {}
for i, block, _ in sequence(last_issued + 1):
    writes.setdefault(block, []).append(i)
problems = 0
checked = 0
for block in range(nblocks):
    ws = writes.get(block, [])
    must = [i for i in ws if i <= durable or i in fua]
    d = max(must) if must else None
    data = h.pread(BS, block * BS)
    initial.seek(block * BS)
    before = initial.read(BS)
    for k in range(0, BS, 512):
        s = data[k:k + 512]
        if s == before[k:k + 512] and d is None:
            continue
        if s == bytes(512):
            ok = False
            got = "zeroes"
        else:
            magic, b, i = struct.unpack("<QQQ", s[:24])
            ok = magic == MAGIC and b == block and i in ws and (d is None or i >= d) and s[24:] == bytes(512 - 24)
            got = "write %d (block %d)" % (i, b) if magic == MAGIC else "garbage"
        if not ok:
            problems += 1
            if problems <= 10:
                print("block %d: holds %s; last durable write %s" % (block, got, d))
    checked += 1
print("verified %d blocks after a %s, durable up to write %d, %d FUA writes, %d problems" % (checked, crash, durable, len(fua), problems))
sys.exit(1 if problems else 0)
