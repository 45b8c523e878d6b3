package cache

import (
	"sync"
	"sync/atomic"
	"testing"

	"github.com/nbdcache/nbdcache/storage"
)

// Deterministic cases of the rule that the journal never claims, durably
// or visibly, what the backing may still lose: a clean extent is not
// published before the backing write it copies is flushed (cleanDep), and
// an extent written back is not marked clean, then deleted, before the
// backing holds it durably. The randomized power-cut tests rarely cut
// between the two steps; these cut exactly there.

// crashCache formats and opens a cache on two Crash devices.
func crashCache(t *testing.T, cacheSize, backSize int64, opts Options) (*Cache, *storage.Crash, *storage.Crash) {
	t.Helper()
	cdev, bdev := storage.NewCrash(cacheSize), storage.NewCrash(backSize)
	if err := Format(cdev, bdev, FormatOptions{BackingID: testBackingID, BucketSize: 32 << 10, JournalSize: 32 * metaBlock}); err != nil {
		t.Fatal(err)
	}
	opts.BackingID = testBackingID
	c, err := openStill(cdev, bdev, opts)
	if err != nil {
		t.Fatal(err)
	}
	return c, cdev, bdev
}

// TestWritethroughCopyWaitsForBackingFlush: a write-through write goes to
// the backing, then into the cache as a clean copy, and is acknowledged
// with its records published. Publishing the clean insert before the
// backing write is flushed would let a power cut that keeps the cache
// device's writes and loses the backing's leave a clean extent over
// backing bytes it does not equal. (Mutant clean-insert-no-backing-dep.)
func TestWritethroughCopyWaitsForBackingFlush(t *testing.T) {
	c, cdev, bdev := crashCache(t, 1<<20, 1<<20, Options{Mode: Writethrough, SequentialCutoff: -1})
	if err := c.WriteAt(payload(0, 8192, 1), 0, 0); err != nil {
		t.Fatal(err)
	}
	if got := c.Stats().CachedWriteBytes; got != 8192 {
		t.Fatalf("%d bytes copied into the cache, want 8192", got)
	}
	// One possible power cut: the cache device had written everything
	// out, the backing nothing since its last flush.
	cdev2, _ := cdev.PowerCut(storage.KeepUnsynced, nil)
	bdev2, _ := bdev.PowerCut(storage.LoseUnsynced, nil)
	c.Close()
	rep, err := CheckDeep(cdev2, bdev2)
	for _, p := range rep.Problems {
		t.Logf("after the cut: %s", p)
	}
	if rep.StaleClean > 0 {
		t.Fatalf("%d clean extents differ from the backing after the cut", rep.StaleClean)
	}
	if err != nil {
		t.Fatal(err)
	}
}

// TestBypassOverDirtyKeepsFlushedData: when the cache is full of dirty
// data, a write over a dirty extent goes to the backing (directOver) and
// drops the extent only once that backing write is done. The power fails
// just as the direct write starts, or just after the write returned, when
// the cache device may also keep the unsynced journal block that publishes
// the drop while the backing loses the unflushed write (so publishing the
// drop must flush the backing first): the flushed data of the extent, or
// after the write the new data, must read back, never the backing's old
// zeroes. (Mutant directover-drop-no-backing-dep fails "keep-journal".)
func TestBypassOverDirtyKeepsFlushedData(t *testing.T) {
	for _, mode := range []string{"cut-at-write", "cut-after-write", "keep-journal"} {
		t.Run(mode, func(t *testing.T) { bypassOverDirty(t, mode) })
	}
}

func bypassOverDirty(t *testing.T, mode string) {
	after := mode != "cut-at-write"
	c, cdev, bdev := crashCache(t, 1<<20, 8<<20, Options{SequentialCutoff: -1})
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	// Fill the cache with dirty data until a write bypasses it.
	const bs = 4096
	for off := int64(0); ; off += bs {
		if off >= bdev.Size() {
			t.Fatal("the cache never filled")
		}
		before := c.Stats().Bypasses
		must(c.WriteAt(payload(off, bs, uint64(off/bs+1)), off, 0))
		if c.Stats().Bypasses > before {
			break
		}
	}
	must(c.Flush())

	// The write over [0, bs) finds no room: the backing sees the direct
	// write; cut at it, or after the write returned.
	var writes atomic.Int32
	var once sync.Once
	var devs []*storage.Crash
	cut := func() {
		once.Do(func() {
			if mode == "keep-journal" {
				c2, _ := cdev.PowerCut(storage.KeepUnsynced, nil)
				b2, _ := bdev.PowerCut(storage.LoseUnsynced, nil)
				devs = []*storage.Crash{c2, b2}
				return
			}
			devs, _ = storage.PowerCutAll(storage.LoseUnsynced, nil, cdev, bdev)
		})
	}
	bdev.SetHook(func(op storage.Op) {
		if op.Kind == storage.OpWrite && writes.Add(1) == 1 && !after {
			cut()
		}
	})
	bypasses := c.Stats().Bypasses
	err := c.WriteAt(payload(0, bs, 1000), 0, 0) // fails at the cut, unless after
	if after && (err != nil || c.Stats().Bypasses == bypasses) {
		t.Fatalf("the write over the dirty extent did not bypass the full cache (%v)", err)
	}
	cut()
	c.Close()
	if n := writes.Load(); n < 1 {
		t.Fatalf("%d backing writes: the write did not go to the backing", n)
	}

	c2, err := openStill(devs[0], devs[1], Options{BackingID: testBackingID})
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	p := make([]byte, bs)
	must(c2.ReadAt(p, 0))
	for s := int64(0); s < bs/sectorSize; s++ {
		id, err := sectorID(p[s*sectorSize:(s+1)*sectorSize], s)
		if err != nil || id != 1 && !(after && id == 1000) {
			t.Fatalf("sector %d after the cut: write %d (%v), want write 1, which was flushed", s, id, err)
		}
	}
}
