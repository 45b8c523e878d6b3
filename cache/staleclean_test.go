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
func staleCleanSetup(t *testing.T, n int64) (c *Cache, cdev, bdev *storage.Crash, opts Options) {
	t.Helper()
	cdev, bdev = storage.NewCrash(1<<20), storage.NewCrash(1<<20)
	if err := Format(cdev, bdev, FormatOptions{BackingID: testBackingID, BucketSize: 32 << 10, JournalSize: 32 * metaBlock}); err != nil {
		t.Fatal(err)
	}
	opts = Options{BackingID: testBackingID, NoBackground: true, SequentialCutoff: -1}
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
// every clean extent with the backing.
func checkNoStaleClean(t *testing.T, c *Cache, cdev, bdev *storage.Crash, opts Options) {
	t.Helper()
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
			t.Errorf("after the cut, clean extent %v holds write %d, the backing write %d", e, cid, bid)
		}
	}
}

// TestWritebackOfUndurableInsert: writeback writes B to the backing and
// flushes it before B's insert is durable.
func TestWritebackOfUndurableInsert(t *testing.T) {
	c, cdev, bdev, opts := staleCleanSetup(t, 4096)
	if _, _, err := c.WritebackStep(0, 1<<20); err != nil {
		t.Fatal(err)
	}
	checkNoStaleClean(t, c, cdev, bdev, opts)
}

// TestZeroDirtyOverUndurableInsert: a zero of a bucket or more of dirty
// data (zeroDirty) zeroes and flushes the backing before B's insert is
// durable; the zero is acknowledged (published), not flushed.
func TestZeroDirtyOverUndurableInsert(t *testing.T) {
	c, cdev, bdev, opts := staleCleanSetup(t, 64<<10)
	if err := c.Zero(0, 64<<10, 0); err != nil {
		t.Fatal(err)
	}
	checkNoStaleClean(t, c, cdev, bdev, opts)
}
