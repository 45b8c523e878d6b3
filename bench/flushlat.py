#!/usr/bin/python3
# FLUSH latency after random dirty writes: ROUNDS times, write COUNT random
# 4 KiB blocks (64 in flight) over SPAN bytes, then time one FLUSH.
# Usage: flushlat.py URI COUNT SPAN ROUNDS SEED. Prints one latency (ms) a line.
import random
import sys
import time

import nbd

uri, count, span, rounds, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
rng = random.Random(seed)
h = nbd.NBD()
h.connect_uri(uri)
buf = bytes(rng.getrandbits(8) for _ in range(4096))
for _ in range(rounds):
    issued = 0
    while issued < count:
        while h.aio_in_flight() < 64 and issued < count:
            h.aio_pwrite(buf, rng.randrange(span // 4096) * 4096)
            issued += 1
        h.poll(-1)
        while h.aio_peek_command_completed():
            h.aio_command_completed(h.aio_peek_command_completed())
    while h.aio_in_flight() > 0:
        h.poll(-1)
    t0 = time.monotonic()
    h.flush()
    print("%.3f" % ((time.monotonic() - t0) * 1000), flush=True)
h.shutdown()
