package cache

import (
	"bytes"
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
	opts = Options{BackingID: testBackingID, NoBackground: true, SequentialCutoff: -1, testBreak: brk}
	c, err := Open(cdev, bdev, opts)
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
	_, _, err = c.WritebackStep(0, 1<<20)
	must(err)
	must(c.Flush())                         // A (write 1) clean, durably
	must(c.WriteAt(payload(0, n, 2), 0, 0)) // B (write 2) dirty, published only
	return c, cdev, bdev, opts
}

// checkNoStaleClean cuts the power (LoseUnsynced), reopens and compares
// every clean extent with the backing; it returns how many differ.
func checkNoStaleClean(t *testing.T, c *Cache, cdev, bdev *storage.Crash, opts Options) (stale int) {
	t.Helper()
	opts.testBreak = breakNone
	devs, _ := storage.PowerCutAll(storage.LoseUnsynced, nil, cdev, bdev)
	c.Close()
	c2, err := Open(devs[0], devs[1], opts)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	var es []btreeExtent
	c2.mu.Lock()
	c2.mu.idx.Ascend(0, func(e btreeExtent) bool {
		if !e.Dirty {
			es = append(es, e)
		}
		return true
	})
	c2.mu.Unlock()
	for _, e := range es {
		cb, bb := make([]byte, e.Len), make([]byte, e.Len)
		if err := devs[0].ReadAt(cb, e.Loc); err != nil {
			t.Fatal(err)
		}
		if err := devs[1].ReadAt(bb, e.Off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(cb, bb) {
			s := e.Off / sectorSize
			cid, _ := sectorID(cb[:sectorSize], s)
			bid, _ := sectorID(bb[:sectorSize], s)
			t.Logf("after the cut, clean extent %v holds write %d, the backing write %d", e, cid, bid)
			stale++
		}
	}
	return stale
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
		stale := checkNoStaleClean(t, c, cdev, bdev, opts)
		switch {
		case brk == breakNone && stale > 0:
			t.Fatalf("%d clean extents differ from the backing after the cut", stale)
		case brk != breakNone && stale == 0:
			t.Fatal("with breakNoCleanGone the stale clean extent went unnoticed")
		}
	}
}

// TestWritebackOfUndurableInsert: writeback writes B to the backing and
// flushes it before B's insert is durable.
func TestWritebackOfUndurableInsert(t *testing.T) {
	staleCleanCase(t, 4096, func(c *Cache) error {
		_, _, err := c.WritebackStep(0, 1<<20)
		return err
	})
}

// TestZeroDirtyOverUndurableInsert: a zero of a bucket or more of dirty
// data (zeroDirty) zeroes and flushes the backing before B's insert is
// durable; the zero is acknowledged (published), not flushed.
func TestZeroDirtyOverUndurableInsert(t *testing.T) {
	staleCleanCase(t, 64<<10, func(c *Cache) error { return c.Zero(0, 64<<10, 0) })
}

// TestDirectWriteAfterUndurableEviction: a clean extent A, durable, is
// evicted (the deletion published, not synced); a write-around write then
// finds nothing cached over its range, so it deleted nothing and, by the
// old rule, committed nothing before writing the backing; the cut brought
// A back over it.
func TestDirectWriteAfterUndurableEviction(t *testing.T) {
	for _, brk := range []breakMode{breakNone, breakNoCleanGone} {
		cdev, bdev := storage.NewCrash(1<<20), storage.NewCrash(1<<20)
		if err := Format(cdev, bdev, FormatOptions{BackingID: testBackingID, BucketSize: 32 << 10, JournalSize: 32 * metaBlock}); err != nil {
			t.Fatal(err)
		}
		opts := Options{BackingID: testBackingID, Mode: Writearound, NoBackground: true, SequentialCutoff: -1, PromoteAll: true, testBreak: brk}
		c, err := Open(cdev, bdev, opts)
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
		must(c.Flush())
		e := cleanExtentAt(t, c, 0)
		if !c.gcEvict(gcPiece{off: e.Off, n: e.Len, loc: e.Loc, ver: e.Ver}) {
			t.Fatal("evict failed")
		}
		must(c.WriteAt(payload(0, 4096, 2), 0, 0)) // write-around
		must(bdev.Flush())                         // the disk writes its cache out on its own
		stale := checkNoStaleClean(t, c, cdev, bdev, opts)
		switch {
		case brk == breakNone && stale > 0:
			t.Fatalf("%d clean extents differ from the backing after the cut", stale)
		case brk != breakNone && stale == 0:
			t.Fatal("with breakNoCleanGone the stale clean extent went unnoticed")
		}
	}
}
