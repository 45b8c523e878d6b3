package cache

import (
	"sync"
	"sync/atomic"
	"testing"

	"github.com/nbdcache/nbdcache/storage"
)

// Deterministic cases of a clean extent that outlives a power cut over
// backing data it does not equal (found by TestPowerCutConcurrent). In
// both, a durable clean extent A is overwritten in the cache by a dirty
// write B whose insert record is published but not synced; then the
// backing is written and flushed over the range (by writeback, or by a
// zero of a bucket or more of dirty data); then the power fails. The
// journal loses B's insert, so A comes back clean, over backing bytes
// that are not A's: a read serves A, and after an eviction the other
// bytes. No value read breaks the durability contract (B was never
// flushed), but the clean extent is stale.

// staleCleanSetup writes A over [0, n), makes it clean and durable, then
// writes B over it (dirty, not flushed).
func staleCleanSetup(t *testing.T, n int64, brk breakMode) (c *Cache, cdev, bdev *storage.Crash, opts Options) {
	t.Helper()
	cdev, bdev = storage.NewCrash(1<<20), storage.NewCrash(1<<20)
	if err := Format(cdev, bdev, FormatOptions{BackingID: testBackingID, BucketSize: 32 << 10, JournalSize: 32 * metaBlock}); err != nil {
		t.Fatal(err)
	}
	opts = Options{BackingID: testBackingID, SequentialCutoff: -1}
	c, err := open(cdev, bdev, opts, testHooks{brk: brk, noBackground: true})
	if err != nil {
		t.Fatal(err)
	}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(c.WriteAt(payload(0, n, 1), 0, 0))
	must(c.Flush())
	_, _, err = writebackStep(c, 0, 1<<20)
	must(err)
	must(c.commit())                        // A (write 1) clean, durably (a FLUSH need not sync a clean mark)
	must(c.WriteAt(payload(0, n, 2), 0, 0)) // B (write 2) dirty, published only
	return c, cdev, bdev, opts
}

// checkNoStaleClean cuts the power (LoseUnsynced), reopens and compares
// every clean extent with the backing; it returns how many differ.
func checkNoStaleClean(t *testing.T, c *Cache, cdev, bdev *storage.Crash, opts Options) (stale int) {
	t.Helper()
	devs, _ := storage.PowerCutAll(storage.LoseUnsynced, nil, cdev, bdev)
	c.Close()
	return checkStaleAfter(t, devs, opts)
}

// checkStaleAfter runs the deep check on the cut devices (recovery
// without writing) and counts the clean extents that differ from the
// backing.
func checkStaleAfter(t *testing.T, devs []*storage.Crash, _ Options) (stale int) {
	t.Helper()
	rep, err := CheckDeep(devs[0], devs[1])
	for _, p := range rep.Problems {
		t.Logf("after the cut: %s", p)
	}
	if err != nil && rep.StaleClean == 0 {
		t.Fatal(err)
	}
	return int(rep.StaleClean)
}

// expectStale requires no stale clean extent with the fix and at least
// one with it broken.
func expectStale(t *testing.T, brk breakMode, stale int) {
	t.Helper()
	switch {
	case brk == breakNone && stale > 0:
		t.Fatalf("%d clean extents differ from the backing after the cut", stale)
	case brk != breakNone && stale == 0:
		t.Fatal("with the rule broken, the stale clean extent went unnoticed")
	}
}

// staleCleanCase runs one case with the fix and with it broken
// (breakNoCleanGone): the first must leave no stale clean extent, the
// second must.
func staleCleanCase(t *testing.T, n int64, op func(*Cache) error) {
	for _, brk := range []breakMode{breakNone, breakNoCleanGone} {
		c, cdev, bdev, opts := staleCleanSetup(t, n, brk)
		if err := op(c); err != nil {
			t.Fatal(err)
		}
		expectStale(t, brk, checkNoStaleClean(t, c, cdev, bdev, opts))
	}
}

// TestWritebackOfUndurableInsert: writeback writes B to the backing and
// flushes it before B's insert is durable.
func TestWritebackOfUndurableInsert(t *testing.T) {
	staleCleanCase(t, 4096, func(c *Cache) error {
		_, _, err := writebackStep(c, 0, 1<<20)
		return err
	})
}

// TestZeroDirtyOverUndurableInsert: a zero of a bucket or more of dirty
// data (zeroDirty) zeroes and flushes the backing before B's insert is
// durable; the zero is acknowledged (published), not flushed.
func TestZeroDirtyOverUndurableInsert(t *testing.T) {
	staleCleanCase(t, 64<<10, func(c *Cache) error { return c.Zero(0, 64<<10, 0) })
}

// evictedCleanAtZero opens a write-around cache on crash devices in which
// a clean extent A over [0, 4096), durable, has just been evicted: the
// deletion is published, not synced.
func evictedCleanAtZero(t *testing.T, brk breakMode) (*Cache, *storage.Crash, *storage.Crash, Options) {
	t.Helper()
	cdev, bdev := storage.NewCrash(1<<20), storage.NewCrash(1<<20)
	if err := Format(cdev, bdev, FormatOptions{BackingID: testBackingID, BucketSize: 32 << 10, JournalSize: 32 * metaBlock}); err != nil {
		t.Fatal(err)
	}
	opts := Options{BackingID: testBackingID, Mode: Writearound, SequentialCutoff: -1, PromoteAll: true}
	c, err := open(cdev, bdev, opts, testHooks{brk: brk, noBackground: true})
	if err != nil {
		t.Fatal(err)
	}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(c.WriteAt(payload(0, 4096, 1), 0, 0)) // to the backing
	must(c.ReadAt(make([]byte, 4096), 0))      // promoted: A, clean
	must(c.commitBacking())                    // durable (a FLUSH need not sync a promotion)
	e := cleanExtentAt(t, c, 0)
	if !c.gcEvict(gcPiece{off: e.Off, n: e.Len, loc: e.Loc, ver: e.Ver}) {
		t.Fatal("evict failed")
	}
	return c, cdev, bdev, opts
}

// TestDirectWriteAfterUndurableEviction: a clean extent A, durable, is
// evicted (the deletion published, not synced); a write-around write then
// finds nothing cached over its range, so it deleted nothing and, by the
// old rule, committed nothing before writing the backing; the cut brought
// A back over it.
func TestDirectWriteAfterUndurableEviction(t *testing.T) {
	for _, brk := range []breakMode{breakNone, breakNoCleanGone} {
		c, cdev, bdev, opts := evictedCleanAtZero(t, brk)
		if err := c.WriteAt(payload(0, 4096, 2), 0, 0); err != nil { // write-around
			t.Fatal(err)
		}
		if err := bdev.Flush(); err != nil { // the disk writes its cache out on its own
			t.Fatal(err)
		}
		expectStale(t, brk, checkNoStaleClean(t, c, cdev, bdev, opts))
	}
}

// TestDirectWriteSettlesBeforeBackingWrite: as above, but the power
// fails just after the write-around's backing write, before the cache
// device sees anything more, and both devices keep every write they got.
// The eviction's deletion must be durable before the backing write
// starts, not merely committed by the time the write returns. (Mutant
// direct-write-before-settle: the two steps swapped.)
func TestDirectWriteSettlesBeforeBackingWrite(t *testing.T) {
	for _, brk := range []breakMode{breakNone, breakNoCleanGone} {
		c, cdev, bdev, opts := evictedCleanAtZero(t, brk)
		var wrote atomic.Bool
		var once sync.Once
		var devs []*storage.Crash
		cut := func() { once.Do(func() { devs, _ = storage.PowerCutAll(storage.KeepUnsynced, nil, cdev, bdev) }) }
		bdev.SetHook(func(op storage.Op) {
			if op.Kind == storage.OpWrite {
				wrote.Store(true)
			}
		})
		cdev.SetHook(func(op storage.Op) {
			if wrote.Load() && op.Kind != storage.OpRead {
				cut() // the first cache device write or sync after the backing write
			}
		})
		c.WriteAt(payload(0, 4096, 2), 0, 0) // write-around; fails at the cut
		cut()
		c.Close()
		if !wrote.Load() {
			t.Fatal("the write-around write never reached the backing")
		}
		expectStale(t, brk, checkStaleAfter(t, devs, opts))
	}
}

// TestZeroDirtyRunTurnedClean: Zero splits its range into runs first; a
// run that was dirty then may hold clean extents by the time zeroDirty
// takes it (written back meanwhile, here while an earlier run's backing
// zero runs). zeroDirty zeroed the backing under them and deleted them
// only afterwards: a cut in between (a process kill) left clean extents
// over zeroes. Now such a run is zeroed in the cache.
func TestZeroDirtyRunTurnedClean(t *testing.T) {
	for _, brk := range []breakMode{breakNone, breakNoCleanGone} {
		const bucket = 32 << 10
		cdev, bdev := storage.NewCrash(1<<20), storage.NewCrash(1<<20)
		if err := Format(cdev, bdev, FormatOptions{BackingID: testBackingID, BucketSize: bucket, JournalSize: 32 * metaBlock}); err != nil {
			t.Fatal(err)
		}
		opts := Options{BackingID: testBackingID, SequentialCutoff: -1}
		c, err := open(cdev, bdev, opts, testHooks{brk: brk, noBackground: true})
		if err != nil {
			t.Fatal(err)
		}
		// [0, bucket) uncached; [bucket, 3*bucket) dirty.
		if err := c.WriteAt(payload(bucket, 2*bucket, 1), bucket, 0); err != nil {
			t.Fatal(err)
		}
		var stage atomic.Int32
		var once sync.Once
		var devs []*storage.Crash
		bdev.SetHook(func(op storage.Op) {
			switch {
			case op.Kind == storage.OpZero && stage.CompareAndSwap(0, 1):
				// The first run's backing zero: write the dirty run back.
				if _, _, err := writebackStep(c, 0, 1<<20); err != nil {
					t.Error(err)
				}
				if err := c.Flush(); err != nil { // another client's FLUSH
					t.Error(err)
				}
				stage.Store(2)
			case op.Kind == storage.OpZero && stage.Load() == 2:
				stage.Store(3) // zeroDirty zeroes the backing under the run
			case op.Kind == storage.OpFlush && stage.Load() == 3:
				once.Do(func() { devs, _ = storage.PowerCutAll(storage.KeepUnsynced, nil, cdev, bdev) })
			}
		})
		c.Zero(0, 3*bucket, 0) // fails at the cut, or succeeds in the cache
		once.Do(func() { devs, _ = storage.PowerCutAll(storage.KeepUnsynced, nil, cdev, bdev) })
		c.Close()
		expectStale(t, brk, checkStaleAfter(t, devs, opts))
	}
}

// TestEvictSparesGapFillInFlight: the flusher bridges a gap between two
// dirty extents with a clean one, G, rewriting G's bytes on the backing
// (ReadCached holds G until the backing is flushed). A power cut that
// tears that write can fill a sector of G on the backing with garbage;
// the cache's copy of G is then the only good one. Eviction must not drop
// G while the writeback holds it: the deletion, published before the
// backing flush, survived such a cut in TestPowerCutConcurrent (seed
// 8197079793695682941: a covered write read back as garbage). (Mutant
// gc-evict-held.)
func TestEvictSparesGapFillInFlight(t *testing.T) {
	cdev, bdev := storage.NewCrash(1<<20), storage.NewCrash(1<<20)
	if err := Format(cdev, bdev, FormatOptions{BackingID: testBackingID, BucketSize: 32 << 10, JournalSize: 32 * metaBlock}); err != nil {
		t.Fatal(err)
	}
	c, err := openStill(cdev, bdev, Options{BackingID: testBackingID, Mode: Writearound, SequentialCutoff: -1, PromoteAll: true})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.WriteAt(payload(0, 4096, 1), 0, 0); err != nil { // to the backing
		t.Fatal(err)
	}
	if err := c.ReadAt(make([]byte, 4096), 0); err != nil { // promoted: G, clean
		t.Fatal(err)
	}
	g := cleanExtentAt(t, c, 0)
	piece := gcPiece{off: g.Off, n: g.Len, loc: g.Loc, ver: g.Ver}
	if err := c.ReadCached(g, make([]byte, g.Len)); err != nil { // the gap fill starts
		t.Fatal(err)
	}
	if c.gcEvict(piece) {
		t.Fatal("evicted a clean extent that a gap-fill writeback holds")
	}
	c.ReleaseCached(g) // written and flushed
	if !c.gcEvict(piece) {
		t.Fatal("did not evict the clean extent once released")
	}
}
