#!/usr/bin/python3
"""Issue 17's request-path table: what a request costs each server.

Servers, each on fresh sparse files made the same way (truncate), started
anew for every round, alternating within the round:
  cache:   nbdcache serve --cache --backing (write-back, sequential cutoff 0)
  nocache: nbdcache serve --backing
  nbdkit:  nbdkit file
  qemu-nbd qemu-nbd -t -e 8 (raw, writeback page cache, threads)

Rows, run in this order on each server (fio's nbd engine, 4 KiB unless said):
  randwrite QD32 on 1 and on 4 connections, QD1 randwrite,
  1M sequential write (over the whole span, round and round), then on that data:
  randread QD32 on 1 and 4 connections, QD1 randread, 1M sequential read.

The cache file is twice the span. At the cache's 4k write rates it wraps in
about 2 s, and its write rows then run with the span's data live in half the
cache: ratio 0.5 of bench/pressure.sh (issue 18), with its cleaning and
checkpoints. Before that they write blocks the new file never had. The README
("What the cache's write rows measure") separates the two.

For each row and server: IOPS (median over rounds), p50/p99 latency for
QD1 rows, and per request the server's CPU time (/proc/PID/stat), context
switches and syscalls (perf stat on the server, when perf works). Ratios are
against nbdkit. Quote ratios, not absolute numbers: the machine is shared.

  bench/request-path.sh                      # 3 rounds of 5 s rows
  ROUNDS=5 RUNTIME=10 bench/request-path.sh
  SERVERS="cache cache:/tmp/old/nbdcache nbdkit" bench/request-path.sh   # A/B
"""
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROUNDS = int(os.environ.get("ROUNDS", "3"))
RUNTIME = int(os.environ.get("RUNTIME", "5"))
SPAN_MB = int(os.environ.get("SPAN_MB", "256"))
SERVERS = os.environ.get("SERVERS", "cache nocache nbdkit qemu-nbd").split()
BIN = sys.argv[1]

ROWS = [
    # name, rw, bs, qd, jobs
    ("randwrite QD32", "randwrite", "4k", 32, 1),
    ("randwrite QD32 x4 conns", "randwrite", "4k", 32, 4),
    ("randwrite QD1", "randwrite", "4k", 1, 1),
    ("write 1M QD8", "write", "1M", 8, 1),
    ("randread QD32", "randread", "4k", 32, 1),
    ("randread QD32 x4 conns", "randread", "4k", 32, 4),
    ("randread QD1", "randread", "4k", 1, 1),
    ("read 1M QD8", "read", "1M", 8, 1),
]

HAVE_PERF = shutil.which("perf") is not None and subprocess.run(
    ["perf", "stat", "-e", "raw_syscalls:sys_enter", "true"], capture_output=True).returncode == 0


def start(kind, work):
    # "cache:BINARY" or "nocache:BINARY" runs another build (A/B runs).
    kind, _, binary = kind.partition(":")
    binary = binary or BIN
    sock = os.path.join(work, "s.sock")
    back = os.path.join(work, "back.img")
    with open(back, "w") as f:
        f.truncate(SPAN_MB << 20)
    if kind == "cache":
        cache = os.path.join(work, "cache.img")
        with open(cache, "w") as f:
            f.truncate(2 * SPAN_MB << 20)
        cmd = [binary, "serve", "--cache", cache, "--backing", back, "--format",
               "--sequential-cutoff", "0", "--listen", "unix:" + sock]
    elif kind == "nocache":
        cmd = [binary, "serve", "--backing", back, "--listen", "unix:" + sock]
    elif kind == "nbdkit":
        cmd = ["nbdkit", "-f", "-U", sock, "file", back]
    elif kind == "qemu-nbd":
        cmd = ["qemu-nbd", "-f", "raw", "-t", "-e", "8", "-k", sock, back]
    else:
        raise SystemExit("unknown server " + kind)
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "server.log"), "w"))
    for _ in range(400):
        if os.path.exists(sock):
            return p, "nbd+unix:///?socket=" + sock
        time.sleep(0.05)
    raise SystemExit(kind + " did not start")


def ticks(pid):
    with open("/proc/%d/stat" % pid) as f:
        fs = f.read().rsplit(")", 1)[1].split()
    return int(fs[11]) + int(fs[12])  # utime + stime


def run_row(row, uri, pid, work):
    name, rw, bs, qd, jobs = row
    out = os.path.join(work, "o.json")
    args = ["fio", "--name=x", "--ioengine=nbd", "--uri=" + uri, "--rw=" + rw, "--bs=" + bs,
            "--iodepth=%d" % qd, "--numjobs=%d" % jobs, "--group_reporting",
            "--size=%dM" % SPAN_MB, "--runtime=%d" % RUNTIME, "--time_based",
            "--output-format=json", "--output=" + out]
    perf = None
    if HAVE_PERF:
        perf = subprocess.Popen(["perf", "stat", "-x,", "-e", "context-switches,raw_syscalls:sys_enter",
                                 "-p", str(pid), "-o", os.path.join(work, "perf.csv")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.2)
    t0 = ticks(pid)
    subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    t1 = ticks(pid)
    per = {}
    if perf:
        perf.send_signal(signal.SIGINT)
        perf.wait()
        for line in open(os.path.join(work, "perf.csv")):
            f = line.strip().split(",")
            if len(f) > 2 and f[0].isdigit():
                per[f[2]] = int(f[0])
    j = json.load(open(out))["jobs"][0]
    k = "write" if "write" in rw else "read"
    n = j[k]["total_ios"]
    r = {"iops": j[k]["iops"], "cpu": (t1 - t0) / os.sysconf("SC_CLK_TCK") / n * 1e6}
    if qd == 1:
        p = j[k]["clat_ns"]["percentile"]
        r["p50"], r["p99"] = p["50.000000"] / 1e3, p["99.000000"] / 1e3
    if per:
        r["cs"] = per.get("context-switches", 0) / n
        r["sys"] = per.get("raw_syscalls:sys_enter", 0) / n
    return r


def main():
    res = {}  # (row, server) -> list of dicts
    for rnd in range(1, ROUNDS + 1):
        for kind in SERVERS:
            work = tempfile.mkdtemp(prefix="nbdcache-reqpath.")
            p, uri = start(kind, work)
            try:
                for row in ROWS:
                    subprocess.run(["sync"])
                    r = run_row(row, uri, p.pid, work)
                    res.setdefault((row[0], kind), []).append(r)
                    print("round %d %-24s %-8s %8.0f IOPS %6.2f us CPU/req" % (rnd, row[0], kind, r["iops"], r["cpu"]),
                          file=sys.stderr)
            finally:
                p.terminate()
                p.wait()
                shutil.rmtree(work)

    def med(row, kind, key):
        v = [r[key] for r in res.get((row, kind), []) if key in r]
        return statistics.median(v) if v else None

    print("\n%d rounds of %d s rows, %d MiB span, %s" % (ROUNDS, RUNTIME, SPAN_MB, time.strftime("%Y-%m-%d")))
    print("Each cell: median IOPS (QD1 rows: p50/p99 us) | server CPU us/req | ctx switches/req | syscalls/req; ratio to nbdkit in []")
    head = "| row | " + " | ".join(SERVERS) + " |"
    print(head)
    print("|---" * (len(SERVERS) + 1) + "|")
    for row in ROWS:
        cells = []
        base = med(row[0], "nbdkit", "iops")
        for kind in SERVERS:
            iops = med(row[0], kind, "iops")
            if iops is None:
                cells.append("-")
                continue
            c = "%.0f" % iops
            if base and kind != "nbdkit":
                c += " [%.2fx]" % (iops / base)
            if row[3] == 1:
                c = "%.1f/%.1f us" % (med(row[0], kind, "p50"), med(row[0], kind, "p99"))
                b50 = med(row[0], "nbdkit", "p50")
                if b50 and kind != "nbdkit":
                    c += " [%.2fx]" % (med(row[0], kind, "p50") / b50)
            c += " | %.1f" % med(row[0], kind, "cpu")
            if med(row[0], kind, "cs") is not None:
                c += " | %.2f | %.2f" % (med(row[0], kind, "cs"), med(row[0], kind, "sys"))
            cells.append(c)
        print("| %s | %s |" % (row[0], " | ".join(cells)))


main()
