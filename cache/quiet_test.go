package cache

import (
	"bytes"
	"errors"
	"testing"
	"testing/synctest"
	"time"

	"github.com/nbdcache/nbdcache/storage"
)

// TestQuietCommit: once writes stop for QuietCommit, the background loop
// commits the journal, so a power cut right after the quiet spell keeps
// every write acknowledged before it, and the FLUSH that follows has
// nothing to sync. Writes closer together than QuietCommit get no commit
// between them, and a client writing just slower than that gets at most one
// every quietCommitGap. With QuietCommit off the same cut loses the
// writes: the test's own check that the cut can lose them.
func TestQuietCommit(t *testing.T) {
	for _, tc := range []struct {
		name  string
		quiet time.Duration
	}{{"on", 0}, {"off", -1}} {
		t.Run(tc.name, func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) { quietCommitCase(t, tc.quiet) })
		})
	}
}

func quietCommitCase(t *testing.T, quiet time.Duration) {
	cdev, bdev := quietDevs(t)
	c := openHooked(t, devPair{cdev, bdev}, Options{QuietCommit: quiet, SequentialCutoff: -1}, testHooks{})
	defer c.Close() // a failure's too: the bubble must end (a second Close does nothing)
	on := quiet >= 0
	write := func(i int) {
		t.Helper()
		if err := c.WriteAt(payload(int64(i)*4096, 4096, uint64(i+1)), int64(i)*4096, 0); err != nil {
			t.Fatal(err)
		}
	}
	quiets := func() int64 { return c.Stats().QuietCommits }

	// 40 writes 5 ms apart: never quiet for 10 ms.
	for i := range 40 {
		write(i)
		time.Sleep(5 * time.Millisecond)
		synctest.Wait()
	}
	if n := quiets(); n != 0 {
		t.Fatalf("%d quiet commits while a write came every 5 ms", n)
	}
	// Quiet: one commit, and the FLUSH after it syncs nothing.
	time.Sleep(20 * time.Millisecond)
	synctest.Wait()
	want := int64(0)
	if on {
		want = 1
	}
	if n := quiets(); n != want {
		t.Fatalf("%d quiet commits after 20 ms without writes, want %d", n, want)
	}
	commits := c.Stats().Commits
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	if n := c.Stats().Commits - commits; on && n != 0 {
		t.Fatalf("the FLUSH after a quiet commit committed %d times, want none", n)
	}

	// A write every 15 ms for 1.5 s: a quiet spell before each, but at
	// most one commit every quietCommitGap.
	base := quiets()
	for i := range 100 {
		write(40 + i)
		time.Sleep(15 * time.Millisecond)
		synctest.Wait()
	}
	if n := quiets() - base; on && (n < 10 || n > 16) {
		t.Fatalf("%d quiet commits over 1.5 s of a write every 15 ms, want 10 to 16 (one per %v)", n, quietCommitGap)
	}

	// The last writes, then a quiet spell, then the power fails.
	for i := range 8 {
		write(200 + i)
	}
	time.Sleep(quietCommitGap + 20*time.Millisecond)
	synctest.Wait()
	lost := lostInCut(t, c, cdev, bdev, 200, 8)
	switch {
	case on && lost > 0:
		t.Fatalf("a power cut after a quiet spell lost %d of 8 acknowledged writes", lost)
	case !on && lost == 0:
		t.Fatal("with quiet commits off, the power cut kept every unflushed write: the cut cannot show a loss")
	}
}

// TestFlushCoversAcknowledgedWrites: a FLUSH must make durable what was
// acknowledged before it, not the records the cache appended since for
// its own work (a promotion's insert here; the flusher's clean marks in
// the VM benchmark): with every acknowledged write durable it syncs
// nothing. A write acknowledged after that, or a write that went around
// the cache, still gets its commit or backing flush, and survives a cut.
func TestFlushCoversAcknowledgedWrites(t *testing.T) {
	cdev, bdev := quietDevs(t)
	// No background work: every commit here is the FLUSH's own.
	c, err := openStill(cdev, bdev, Options{BackingID: testBackingID, SequentialCutoff: -1, PromoteAll: true})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := bdev.WriteAt(payload(1<<20, 8192, 9), 1<<20, 0); err != nil {
		t.Fatal(err)
	}
	// flush FLUSHes and checks how many commits (negative: any) and
	// backing flushes it made.
	flush := func(what string, commits, bflushes int64) {
		t.Helper()
		c0, b0 := c.Stats().Commits, c.Stats().BackingFlushes
		if err := c.Flush(); err != nil {
			t.Fatal(err)
		}
		if c1, b1 := c.Stats().Commits-c0, c.Stats().BackingFlushes-b0; (commits >= 0 && c1 != commits) || b1 != bflushes {
			t.Fatalf("a FLUSH %s made %d commits and %d backing flushes, want %d and %d", what, c1, b1, commits, bflushes)
		}
	}
	if err := c.WriteAt(payload(0, 8192, 1), 0, 0); err != nil {
		t.Fatal(err)
	}
	flush("after a write", 1, 0)
	flush("with nothing new", 0, 0)
	// A read miss promoted: an insert record of the cache's own.
	records := c.Stats().JournalRecords
	got := make([]byte, 8192)
	if err := c.ReadAt(got, 1<<20); err != nil {
		t.Fatal(err)
	}
	if c.Stats().JournalRecords == records {
		t.Fatal("the read appended no record: the test shows nothing")
	}
	flush("after a promotion only", 0, 0)
	if err := c.WriteAt(payload(8192, 4096, 2), 8192, 0); err != nil {
		t.Fatal(err)
	}
	flush("after a write following the promotion", 1, 0)
	if err := c.SetMode(t.Context(), Writearound); err != nil {
		t.Fatal(err)
	}
	bypasses := c.Stats().Bypasses
	if err := c.WriteAt(payload(16384, 4096, 3), 16384, 0); err != nil {
		t.Fatal(err)
	}
	if c.Stats().Bypasses == bypasses {
		t.Fatal("the write-around write did not go to the backing")
	}
	flush("after a write around the cache", 1, 1) // the commit: SetMode's record
	if err := c.WriteAt(payload(20480, 4096, 4), 20480, 0); err != nil {
		t.Fatal(err)
	}
	flush("after a second write around", -1, 1)
	devs, _ := storage.PowerCutAll(storage.LoseUnsynced, nil, cdev, bdev)
	c2, err := openStill(devs[0], devs[1], Options{BackingID: testBackingID})
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	for _, w := range []struct {
		off, n int64
		id     uint64
	}{{0, 8192, 1}, {8192, 4096, 2}, {16384, 4096, 3}, {20480, 4096, 4}} {
		got := make([]byte, w.n)
		if err := c2.ReadAt(got, w.off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, payload(w.off, w.n, w.id)) {
			t.Fatalf("write %d lost in the cut after its FLUSH", w.id)
		}
	}
}

// TestQuietCommitNotStarvedByOwnRecords: after the client's last write, a
// stream of reads that promote (records of the cache's own, one every
// 5 ms) must not keep the quiet commit from coming: no write was
// acknowledged for far longer than QuietCommit.
func TestQuietCommitNotStarvedByOwnRecords(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cdev, bdev := quietDevs(t)
		if err := bdev.WriteAt(payload(4<<20, 1<<20, 9), 4<<20, 0); err != nil {
			t.Fatal(err)
		}
		if err := bdev.Flush(); err != nil {
			t.Fatal(err)
		}
		c := openHooked(t, devPair{cdev, bdev}, Options{SequentialCutoff: -1, PromoteAll: true}, testHooks{})
		defer c.Close()
		for i := range 8 {
			if err := c.WriteAt(payload(int64(i)*4096, 4096, uint64(i+1)), int64(i)*4096, 0); err != nil {
				t.Fatal(err)
			}
		}
		// 300 ms without a write: only reads, each a promotion.
		got := make([]byte, 4096)
		for i := range 60 {
			off := int64(4<<20) + int64(i)*8192 // not adjacent: no readahead stream
			recs := c.Stats().JournalRecords
			if err := c.ReadAt(got, off); err != nil {
				t.Fatal(err)
			}
			if i == 0 && c.Stats().JournalRecords == recs {
				t.Fatal("the read appended no record: the test shows nothing")
			}
			time.Sleep(5 * time.Millisecond)
			synctest.Wait()
		}
		n := c.Stats().QuietCommits
		lost := lostInCut(t, c, cdev, bdev, 0, 8)
		if n == 0 || lost > 0 {
			t.Fatalf("300 ms after the last acknowledged write (reads promoting every 5 ms): %d quiet commits, and a power cut lost %d of 8 writes", n, lost)
		}
	})
}

// TestQuietCommitCoversWritesAround: in write-around mode every write goes
// to the backing; a quiet spell must leave them as durable as cached ones
// (--quiet-commit's promise: a power cut after it loses nothing
// acknowledged before it, and the FLUSH after it has nothing to do).
func TestQuietCommitCoversWritesAround(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cdev, bdev := quietDevs(t)
		c := openHooked(t, devPair{cdev, bdev}, Options{SequentialCutoff: -1, Mode: Writearound}, testHooks{})
		defer c.Close()
		for i := range 8 {
			if err := c.WriteAt(payload(int64(i)*4096, 4096, uint64(i+1)), int64(i)*4096, 0); err != nil {
				t.Fatal(err)
			}
		}
		time.Sleep(quietCommitGap + 50*time.Millisecond)
		synctest.Wait()
		noWait := c.FlushNoWait()
		lost := lostInCut(t, c, cdev, bdev, 0, 8)
		if !noWait || lost > 0 {
			t.Fatalf("after a quiet spell: FlushNoWait %v (a FLUSH would still flush the backing), and a power cut lost %d of 8 writes around the cache", noWait, lost)
		}
	})
}

// TestQuietCommitAfterBatch: the NBD server acknowledges its small WRITEs
// through WriteBatch (ackAll); a quiet spell after a batch commits it too.
func TestQuietCommitAfterBatch(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cdev, bdev := quietDevs(t)
		c := openHooked(t, devPair{cdev, bdev}, Options{SequentialCutoff: -1}, testHooks{})
		defer c.Close()
		var ws []BatchWrite
		for i := range 8 {
			ws = append(ws, BatchWrite{P: payload(int64(i)*8192, 4096, uint64(i+1)), Off: int64(i) * 8192})
		}
		c.WriteBatch(ws)
		for i := range ws {
			if ws[i].Err != nil {
				t.Fatal(ws[i].Err)
			}
		}
		time.Sleep(20 * time.Millisecond)
		synctest.Wait()
		if n := c.Stats().QuietCommits; n != 1 {
			t.Fatalf("%d quiet commits 20 ms after a batch, want 1", n)
		}
		if !c.FlushNoWait() {
			t.Fatal("a FLUSH after the quiet commit still has work")
		}
	})
}

// TestQuietCommitBelowAMillisecond: a quiet spell shorter than 1 ms is
// refused (the loop would look at the journal about as often as writes
// come), with ErrBadOption.
func TestQuietCommitBelowAMillisecond(t *testing.T) {
	d := formatMem(t, 4<<20, 8<<20, FormatOptions{BucketSize: 64 << 10})
	_, err := open(d.cache, d.back, Options{BackingID: testBackingID, QuietCommit: 500 * time.Microsecond}, testHooks{})
	if !errors.Is(err, ErrBadOption) {
		t.Fatalf("QuietCommit 500µs: %v, want ErrBadOption", err)
	}
}

// quietDevs formats a cache on two Crash devices (4 MiB cache, 8 MiB
// backing, 64 KiB buckets, a 64-block journal).
func quietDevs(t *testing.T) (cdev, bdev *storage.Crash) {
	t.Helper()
	cdev, bdev = storage.NewCrash(4<<20), storage.NewCrash(8<<20)
	if err := Format(cdev, bdev, FormatOptions{BackingID: testBackingID, BucketSize: 64 << 10, JournalSize: 64 * metaBlock}); err != nil {
		t.Fatal(err)
	}
	return cdev, bdev
}

// lostInCut cuts the power of c's devices (LoseUnsynced), closes c, opens
// the cache again on what they kept and counts how many of the n 4 KiB
// writes from slot first on (write i: payload id i+1 at i*4096) do not read
// back.
func lostInCut(t *testing.T, c *Cache, cdev, bdev *storage.Crash, first, n int) (lost int) {
	t.Helper()
	devs, _ := storage.PowerCutAll(storage.LoseUnsynced, nil, cdev, bdev)
	c.Close()
	c2, err := openStill(devs[0], devs[1], Options{BackingID: testBackingID})
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	got := make([]byte, 4096)
	for i := first; i < first+n; i++ {
		off := int64(i) * 4096
		if err := c2.ReadAt(got, off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, payload(off, 4096, uint64(i+1))) {
			lost++
		}
	}
	return lost
}

// TestQuietCommitWaitsForWritesAround: writes that go around a thrashing
// cache append no journal record, but they are writes: while they come
// closer together than QuietCommit there is no quiet commit (each would
// flush the backing under a load that never paused), and once they stop
// there is one, and a power cut after it loses none of them.
func TestQuietCommitWaitsForWritesAround(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		cdev, bdev := quietDevs(t)
		c := openHooked(t, devPair{cdev, bdev}, Options{SequentialCutoff: -1}, testHooks{alwaysThrash: true})
		defer c.Close()
		for i := range 60 { // 300 ms, a write every 5 ms
			if err := c.WriteAt(payload(int64(i)*4096, 4096, uint64(i+1)), int64(i)*4096, 0); err != nil {
				t.Fatal(err)
			}
			time.Sleep(5 * time.Millisecond)
			synctest.Wait()
		}
		if c.Stats().Bypasses < 60 {
			t.Fatalf("%d of 60 writes went around the cache: the test shows nothing", c.Stats().Bypasses)
		}
		if n := c.Stats().QuietCommits; n != 0 {
			t.Fatalf("%d quiet commits while a write went around the cache every 5 ms", n)
		}
		time.Sleep(quietCommitGap + 50*time.Millisecond)
		synctest.Wait()
		n := c.Stats().QuietCommits
		lost := lostInCut(t, c, cdev, bdev, 0, 60)
		if n != 1 || lost > 0 {
			t.Fatalf("after the writes stopped: %d quiet commits (want 1), and a power cut lost %d of 60 writes", n, lost)
		}
	})
}
