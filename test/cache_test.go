package test

import (
	"bufio"
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

var (
	crashSeed   = flag.Int64("crash-seed", 0, "seed of TestKill9Recovery (0: from the clock)")
	crashRounds = flag.Int("crash-rounds", 4, "rounds of TestKill9Recovery")
)

// cacheFiles makes a backing and a cache file.
func cacheFiles(t *testing.T, backingSize, cacheSize int64) (backing, cache string) {
	return sparseFile(t, "backing.img", backingSize), sparseFile(t, "cache.img", cacheSize)
}

// nbdcache runs a subcommand of the binary and returns its combined output
// and exit status.
func nbdcache(t *testing.T, args ...string) (string, int) {
	t.Helper()
	out, err := exec.Command(binary, args...).CombinedOutput()
	if ee, ok := err.(*exec.ExitError); ok {
		return string(out), ee.ExitCode()
	}
	if err != nil {
		t.Fatal(err)
	}
	return string(out), 0
}

// mustCheck requires the deep check (clean extents equal the backing) to
// pass.
func mustCheck(t *testing.T, cache, backing string) {
	t.Helper()
	if out, code := nbdcache(t, "check", "--deep", "--cache", cache, "--backing", backing); code != 0 {
		t.Fatalf("check failed (exit %d):\n%s", code, out)
	}
}

// TestCheckDeep: data written to the backing behind the cache's back (the
// cache holds a clean copy of the range) passes the metadata check but
// not check --deep, which names the clean extent and exits 1.
func TestCheckDeep(t *testing.T) {
	qemuIO := tool(t, "qemu-io")
	backing, cache := cacheFiles(t, 32*mib, 16*mib)
	s := startServe(t, "--backing", backing, "--cache", cache, "--format", "--mode", "writethrough")
	run(t, qemuIO, "-f", "raw", "-c", "write -P 0x55 1M 64k", s.uri)
	s.stop()
	mustCheck(t, cache, backing)
	f, err := os.OpenFile(backing, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(bytes.Repeat([]byte{0xaa}, 512), 1*mib+4096); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if out, code := nbdcache(t, "check", "--cache", cache, "--backing", backing); code != 0 {
		t.Fatalf("check without --deep (exit %d), want 0: it reads no data:\n%s", code, out)
	}
	out, code := nbdcache(t, "check", "--deep", "--cache", cache, "--backing", backing)
	if code != 1 || !strings.Contains(out, "differs from the backing") {
		t.Fatalf("check --deep (exit %d), want 1 naming the clean extent:\n%s", code, out)
	}
}

// TestCacheWithClients runs the real clients through a write-back cache
// with a small cache (so that GC, eviction and writeback run), then drains
// it and checks that the backing file alone holds the image.
func TestCacheWithClients(t *testing.T) {
	qemuImg := tool(t, "qemu-img")
	fio := tool(t, "fio")
	backing, cache := cacheFiles(t, 64*mib, 24*mib)
	ctl := "unix:" + filepath.Join(t.TempDir(), "ctl.sock")
	s := startServe(t, "--backing", backing, "--cache", cache, "--format", "--control", ctl)
	src, data := randomFile(t, "src.img", 64*mib, 3)
	run(t, qemuImg, "convert", "-n", "-f", "raw", "-O", "raw", src, s.uri)
	run(t, qemuImg, "compare", "-f", "raw", "-F", "raw", src, s.uri)
	// fio with verify on a region, over 4 connections.
	out := filepath.Join(t.TempDir(), "fio.txt")
	run(t, fio, "--name=verify", "--ioengine=nbd", "--uri="+s.uri, "--rw=randwrite", "--bs=4k",
		"--iodepth=16", "--numjobs=4", "--size=8M", "--offset_increment=8M", "--verify=crc32c",
		"--do_verify=1", "--verify_fatal=1", "--verify_state_save=0", "--output="+out)
	// The fio region now holds fio's data; the rest still the image.
	want := append([]byte(nil), data...)
	dev := filepath.Join(t.TempDir(), "dev.img")
	run(t, tool(t, "nbdcopy"), s.uri, dev)
	got, _ := os.ReadFile(dev)
	if !bytes.Equal(got[32*mib:], want[32*mib:]) {
		t.Fatal("the image outside the fio region changed")
	}
	copy(want, got[:32*mib])

	if out, code := nbdcache(t, "flush", "--drain", "--control", ctl); code != 0 || !strings.Contains(out, "drained") {
		t.Fatalf("flush --drain (exit %d):\n%s", code, out)
	}
	st, code := nbdcache(t, "stats", "--json", "--control", ctl)
	if code != 0 || !strings.Contains(st, `"dirty_bytes": 0,`) {
		t.Fatalf("stats after the drain (exit %d):\n%s", code, st)
	}
	checkStatsNames(t, st)
	b, _ := os.ReadFile(backing)
	if !bytes.Equal(b, want) {
		t.Fatal("after flush --drain the backing file alone differs from what clients read")
	}
	s.stop()
	mustCheck(t, cache, backing)
}

// TestCheckIsHonest: check calls a freshly formatted cache clean, with no
// line that says "corrupt" about its empty journal or its unused
// checkpoint slot; a damaged superblock copy is a warning (the other copy
// is whole), and a damaged checkpoint with nothing to fall back on makes
// check exit 1.
func TestCheckIsHonest(t *testing.T) {
	backing, cache := cacheFiles(t, 32*mib, 16*mib)
	if out, code := nbdcache(t, "format", "--cache", cache, "--backing", backing); code != 0 {
		t.Fatalf("format: %s", out)
	}
	out, code := nbdcache(t, "check", "--cache", cache, "--backing", backing)
	if code != 0 || !strings.HasSuffix(out, "ok\n") || !strings.Contains(out, "1 unused") ||
		strings.Contains(strings.ToLower(out), "corrupt") || strings.Contains(out, "warning") || strings.Contains(out, "PROBLEM") {
		t.Fatalf("check of a fresh cache (exit %d):\n%s", code, out)
	}
	flip := func(off int64) {
		f, err := os.OpenFile(cache, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		b := make([]byte, 1)
		if _, err := f.ReadAt(b, off); err != nil {
			t.Fatal(err)
		}
		b[0] ^= 0x10
		if _, err := f.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
	}
	flip(40) // superblock copy A's backing id
	out, code = nbdcache(t, "check", "--cache", cache, "--backing", backing)
	if code != 0 || !strings.Contains(out, "warning: superblock copy at 0 is invalid") {
		t.Fatalf("check with one superblock copy damaged (exit %d), want 0 and a warning:\n%s", code, out)
	}
	flip(40)
	flip(8192 + 9) // checkpoint slot 0, the only one
	out, code = nbdcache(t, "check", "--cache", cache, "--backing", backing)
	if code != 1 || !strings.Contains(out, "PROBLEM: cache: metadata corrupt: no valid checkpoint") {
		t.Fatalf("check with the only checkpoint damaged (exit %d), want 1:\n%s", code, out)
	}
}

// TestCacheBinding: a cache refuses another backing, even of the same
// size (exit 3); format refuses to drop dirty data without --force.
func TestCacheBinding(t *testing.T) {
	backing, cache := cacheFiles(t, 32*mib, 16*mib)
	other := sparseFile(t, "other.img", 32*mib)
	if out, code := nbdcache(t, "format", "--cache", cache, "--backing", backing); code != 0 {
		t.Fatalf("format: %s", out)
	}
	sock := "unix:" + filepath.Join(t.TempDir(), "s")
	out, code := nbdcache(t, "serve", "--cache", cache, "--backing", other, "--listen", sock)
	if code != exitWrongBacking || !strings.Contains(out, "has no id") {
		t.Fatalf("serving with a backing that has no id: exit %d:\n%s", code, out)
	}
	if out, code := nbdcache(t, "check", "--cache", cache, "--backing", other); code != exitWrongBacking || !strings.Contains(out, "has no id") {
		t.Fatalf("check with a backing that has no id: exit %d, want %d:\n%s", code, exitWrongBacking, out)
	}
	// Give the other backing an identity of its own, with a cache of its own.
	if out, code := nbdcache(t, "format", "--cache", sparseFile(t, "cache2.img", 16*mib), "--backing", other); code != 0 {
		t.Fatalf("format: %s", out)
	}
	out, code = nbdcache(t, "serve", "--cache", cache, "--backing", other, "--listen", sock)
	if code != exitWrongBacking || !strings.Contains(out, "wrong backing") {
		t.Fatalf("serving with another backing: exit %d:\n%s", code, out)
	}
	if out, code := nbdcache(t, "check", "--cache", cache, "--backing", other); code != exitWrongBacking {
		t.Fatalf("check with another backing: exit %d, want %d:\n%s", code, exitWrongBacking, out)
	}

	// Leave dirty data: write, flush, kill -9.
	s := startServe(t, "--cache", cache, "--backing", backing)
	run(t, tool(t, "qemu-io"), "-f", "raw", "-c", "write -P 0x42 0 1M", "-c", "flush", s.uri)
	s.kill()
	out, code = nbdcache(t, "format", "--cache", cache, "--backing", backing)
	if code == 0 || !strings.Contains(out, "dirty") {
		t.Fatalf("format over dirty data without --force: exit %d:\n%s", code, out)
	}
	s = startServe(t, "--cache", cache, "--backing", backing)
	run(t, tool(t, "qemu-io"), "-f", "raw", "-c", "read -P 0x42 0 1M", s.uri)
	s.stop()
	if out, code := nbdcache(t, "format", "--force", "--cache", cache, "--backing", backing); code != 0 {
		t.Fatalf("format --force: %s", out)
	}
}

// TestKill9Recovery kills the real server with SIGKILL during a seeded
// write/flush/FUA workload, runs check, restarts it, and verifies that
// every acknowledged write reads back (or the one write in flight): a
// process kill loses nothing acknowledged, flushed or not, because the
// operating system outlives the process.
// Replay a failure with -crash-seed=N.
func TestKill9Recovery(t *testing.T) {
	py := python3(t)
	seed := *crashSeed
	if seed == 0 {
		seed = time.Now().UnixNano()
	}
	t.Logf("seed %d (replay with go test ./test -run Kill9 -crash-seed=%d)", seed, seed)
	rng := rand.New(rand.NewSource(seed))
	// Even rounds use a small cache, where GC and writeback run (and
	// commit often); odd rounds a large one, where writeback stays below
	// its target, so acknowledged writes wait in the journal's open block.
	type pair struct{ backing, cache string }
	pairs := make([]pair, 2)
	for i, size := range []int64{8 * mib, 256 * mib} {
		pairs[i] = pair{sparseFile(t, "backing.img", 32*mib), sparseFile(t, "cache.img", size)}
	}
	const blocks = 8192 // 32 MiB of 4 KiB blocks
	script := filepath.Join("testdata", "crashwriter.py")
	for round := range *crashRounds {
		rseed := rng.Int63()
		log := filepath.Join(t.TempDir(), "log")
		backing, cache := pairs[round%2].backing, pairs[round%2].cache
		args := []string{"--cache", cache, "--backing", backing}
		if round < 2 {
			args = append(args, "--format")
		}
		s := startServe(t, args...)
		initial := filepath.Join(t.TempDir(), "initial.img")
		run(t, tool(t, "nbdcopy"), s.uri, initial)
		w, _ := start(t, py, script, "write", s.uri, fmt.Sprint(rseed), fmt.Sprint(blocks), log)
		time.Sleep(time.Duration(300+rng.Intn(1500)) * time.Millisecond) // the moment of the crash
		s.kill()
		w.Wait()
		mustCheck(t, cache, backing)
		s = startServe(t, args[:4]...)
		out := run(t, py, script, "verify", s.uri, fmt.Sprint(rseed), fmt.Sprint(blocks), log, initial, "kill")
		t.Logf("round %d (seed %d): %s", round, rseed, strings.TrimSpace(out))
		s.stop()
		mustCheck(t, cache, backing)
	}
}

// checkStatsNames: the stats --json names users and scripts rely on are
// all there, and those this workload must have moved did move (64 MiB
// through a 24 MiB cache: misses, hits, GC or eviction, writeback,
// commits and checkpoints).
func checkStatsNames(t *testing.T, js string) {
	t.Helper()
	var st map[string]any
	if err := json.Unmarshal([]byte(js), &st); err != nil {
		t.Fatalf("stats --json: %v\n%s", err, js)
	}
	for _, name := range []string{"mode", "connections", "active_connections", "requests", "request_errors",
		"bytes_read", "bytes_written", "client_flushes", "hits", "misses", "partial_hits", "hit_ratio",
		"ram_hits", "bypasses", "thrash_bypasses", "promotions", "dirty_bytes", "cached_bytes", "capacity_bytes", "occupancy",
		"extents", "gc_runs", "gc_moved_bytes", "evicted_bytes", "journal_commits", "journal_publishes",
		"checkpoints", "cache_errors", "failed", "writeback_bytes", "writeback_rate", "writeback_target",
		"collisions", "collided_bytes", "backing_writes", "backing_write_avg", "backing_flushes", "writeback_state", "uptime_seconds"} {
		if _, ok := st[name]; !ok {
			t.Errorf("stats --json has no %q", name)
		}
	}
	num := func(name string) float64 { v, _ := st[name].(float64); return v }
	if st["mode"] != "writeback" {
		t.Errorf("mode %v, want writeback", st["mode"])
	}
	for _, name := range []string{"requests", "bytes_written", "bytes_read", "writeback_bytes", "backing_writes", "backing_flushes",
		"capacity_bytes", "journal_commits", "journal_publishes", "checkpoints", "connections"} {
		if num(name) <= 0 {
			t.Errorf("stats %s = %v after 64 MiB through a 24 MiB cache, want > 0", name, st[name])
		}
	}
	if num("hits")+num("partial_hits") <= 0 || num("misses") <= 0 {
		t.Errorf("hits %v, partial %v, misses %v: want both hits and misses", st["hits"], st["partial_hits"], st["misses"])
	}
	if num("gc_runs")+num("evicted_bytes") <= 0 {
		t.Errorf("neither GC (%v runs) nor eviction (%v bytes) ran in a cache a third of the data", st["gc_runs"], st["evicted_bytes"])
	}
	if o := num("occupancy"); o <= 0 || o > 1 {
		t.Errorf("occupancy %v, want in (0, 1]", o)
	}
}

// TestCachePolicyThroughCLI drives the policy flags through the real
// binary: --mode writearound at start, `nbdcache mode` while serving
// (writeback, then writethrough, which drains), --sequential-cutoff and
// --ram-cache, each judged by the bytes in the backing file and by stats.
func TestCachePolicyThroughCLI(t *testing.T) {
	qemuIO := tool(t, "qemu-io")
	backing, cache := cacheFiles(t, 64*mib, 32*mib)
	ctl := "unix:" + filepath.Join(t.TempDir(), "ctl.sock")
	s := startServe(t, "--backing", backing, "--cache", cache, "--format", "--control", ctl,
		"--mode", "writearound", "--sequential-cutoff", "1M", "--ram-cache", "8M")
	stats := func() map[string]any {
		t.Helper()
		out, code := nbdcache(t, "stats", "--json", "--control", ctl)
		var st map[string]any
		if code != 0 || json.Unmarshal([]byte(out), &st) != nil {
			t.Fatalf("stats (exit %d):\n%s", code, out)
		}
		return st
	}
	num := func(st map[string]any, name string) int64 { v, _ := st[name].(float64); return int64(v) }
	inBacking := func(off, n int64, b byte) bool {
		f, err := os.ReadFile(backing)
		if err != nil {
			t.Fatal(err)
		}
		return bytes.Equal(f[off:off+n], bytes.Repeat([]byte{b}, int(n)))
	}
	setMode := func(m string) {
		t.Helper()
		if out, code := nbdcache(t, "mode", "--control", ctl, m); code != 0 || !strings.Contains(out, "mode is now "+m) {
			t.Fatalf("mode %s (exit %d):\n%s", m, code, out)
		}
		if st := stats(); st["mode"] != m {
			t.Fatalf("stats say mode %v after `mode %s`", st["mode"], m)
		}
	}

	// writearound: the write goes to the backing, nothing is dirty.
	run(t, qemuIO, "-f", "raw", "-c", "write -P 0x11 0 64k", s.uri)
	if st := stats(); st["mode"] != "writearound" || num(st, "dirty_bytes") != 0 || !inBacking(0, 64<<10, 0x11) {
		t.Fatalf("writearound: mode %v, %d dirty bytes, backing holds the write: %v", st["mode"], num(st, "dirty_bytes"), inBacking(0, 64<<10, 0x11))
	}

	// writeback while serving: the write goes into the cache as dirty
	// data (which the flusher, seeing the export idle, may already be
	// writing back), not around it.
	setMode("writeback")
	st := stats()
	wb, bypasses := num(st, "writeback_bytes"), num(st, "bypasses")
	run(t, qemuIO, "-f", "raw", "-c", "write -P 0x22 1M 64k", s.uri)
	st = stats()
	if num(st, "bypasses") != bypasses || num(st, "dirty_bytes")+num(st, "writeback_bytes")-wb < 64<<10 {
		t.Fatalf("writeback: %d dirty bytes, %d written back, %d bypasses: the write did not go into the cache",
			num(st, "dirty_bytes"), num(st, "writeback_bytes")-wb, num(st, "bypasses")-bypasses)
	}

	// A sequential stream of 4 MiB in 64 KiB writes: past the 1 MiB
	// cutoff it bypasses the cache.
	bypasses = num(stats(), "bypasses")
	args := []string{"-f", "raw"}
	for off := 8 * mib; off < 12*mib; off += 64 << 10 {
		args = append(args, "-c", fmt.Sprintf("write -P 0x33 %d 64k", off))
	}
	run(t, qemuIO, append(args, s.uri)...)
	st = stats()
	if b := num(st, "bypasses") - bypasses; b < 32 {
		t.Errorf("a 4 MiB sequential stream with a 1 MiB cutoff: %d writes bypassed, want at least 32 of 64", b)
	}
	if d := num(st, "dirty_bytes"); d > 64<<10+2*mib {
		t.Errorf("%d bytes dirty: the stream past the cutoff was cached", d)
	}
	if !inBacking(11*mib, mib, 0x33) {
		t.Error("the end of the sequential stream is not in the backing file")
	}

	// The RAM tier: the same 64 KiB read again is served from RAM. The
	// tier (ristretto) applies its sets in the background, so a read right
	// after the first may still miss it: up to 10 runs of three reads.
	hits := int64(0)
	for i := 0; i < 10 && hits == 0; i++ {
		run(t, qemuIO, "-f", "raw", "-c", "read -P 0x22 1M 64k", "-c", "read -P 0x22 1M 64k", "-c", "read -P 0x22 1M 64k", s.uri)
		hits = num(stats(), "ram_hits")
	}
	if hits == 0 {
		t.Error("--ram-cache 8M: no RAM hits after reading the same 64 KiB 30 times")
	}

	// writethrough while serving: switching drains.
	setMode("writethrough")
	if st := stats(); num(st, "dirty_bytes") != 0 || !inBacking(mib, 64<<10, 0x22) {
		t.Fatalf("after `mode writethrough`: %d dirty bytes; backing holds the writeback data: %v", num(st, "dirty_bytes"), inBacking(mib, 64<<10, 0x22))
	}
	run(t, qemuIO, "-f", "raw", "-c", "write -P 0x44 2M 64k", s.uri)
	if !inBacking(2*mib, 64<<10, 0x44) {
		t.Error("writethrough: the write is not in the backing file")
	}
	s.stop()
	mustCheck(t, cache, backing)
}

// TestDrainInterruptedByStop: a server stopped (SIGTERM) during
// `flush --drain` tells the client so: the drain command fails with
// "the server stopped during the drain" and says how much was written
// back, instead of an "unexpected EOF"; the server still exits cleanly.
// The backing's writes are delayed (fault mode) so that the drain is
// still running when the server stops.
func TestDrainInterruptedByStop(t *testing.T) {
	f := startFaults(t, 64*mib, 16*mib)
	for i := range 8 {
		run(t, tool(t, "qemu-io"), "-f", "raw", "-c", fmt.Sprintf("write -P 0x%x %d 256k", 0x40+i, i*mib), f.uri)
	}
	if out, code := nbdcache(t, "ctl", "--control", f.ctl, "delay", "--target", "backing", "--op", "write", "--latency", "3s"); code != 0 {
		t.Fatalf("ctl delay: %d\n%s", code, out)
	}
	drain := exec.Command(binary, "flush", "--drain", "--control", f.ctl)
	var stderr bytes.Buffer
	drain.Stderr = &stderr
	out, err := drain.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := drain.Start(); err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(out)
	if !sc.Scan() || !strings.HasPrefix(sc.Text(), "drain: ") {
		t.Fatalf("no progress from flush --drain: %q %s", sc.Text(), stderr.String())
	}
	f.stop()
	io.Copy(io.Discard, out)
	err = drain.Wait()
	if err == nil || !strings.Contains(stderr.String(), "the server stopped during the drain") ||
		!strings.Contains(stderr.String(), "stays dirty, and safe, in the cache") {
		t.Fatalf("flush --drain when the server stopped: %v\n%s", err, stderr.String())
	}
}
