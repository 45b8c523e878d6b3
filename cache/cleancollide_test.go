package cache

import (
	"sync"
	"testing"

	"github.com/nbdcache/nbdcache/storage"
)

// deferDev holds back the writes made while armed at or beyond from (the
// data area): they reach the device under it only at the next Flush (reads see them meanwhile, as a page
// cache would), so a power cut before that Flush loses exactly them.
type deferDev struct {
	storage.Device
	mu      sync.Mutex
	armed   bool
	from    int64
	pending []deferredWrite
}

type deferredWrite struct {
	off int64
	p   []byte
}

func (d *deferDev) WriteAt(p []byte, off int64, flags storage.Flags) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.armed && off >= d.from && flags&storage.FUA == 0 {
		d.pending = append(d.pending, deferredWrite{off, append([]byte(nil), p...)})
		return nil
	}
	return d.Device.WriteAt(p, off, flags)
}

func (d *deferDev) ReadAt(p []byte, off int64) error {
	if err := d.Device.ReadAt(p, off); err != nil {
		return err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, w := range d.pending {
		lo, hi := max(off, w.off), min(off+int64(len(p)), w.off+int64(len(w.p)))
		if lo < hi {
			copy(p[lo-off:hi-off], w.p[lo-w.off:hi-w.off])
		}
	}
	return nil
}

func (d *deferDev) Flush() error {
	d.mu.Lock()
	for _, w := range d.pending {
		if err := d.Device.WriteAt(w.p, w.off, 0); err != nil {
			d.mu.Unlock()
			return err
		}
	}
	d.pending = nil
	d.mu.Unlock()
	return d.Device.Flush()
}

// TestMarkCleanCollisionBeforeBackingWrite: the failure of
// TestPowerCutConcurrent "clean extent [992768+2560) v69 ... cache holds
// 0, backing 91". A dirty extent A is being written back when a write B
// lands over part of it (dirty, in the cache). A's writeback ends:
// MarkClean cleans the rest of A, a collision over B's part, but its
// record names A's whole range. Then B is written back, and the backing
// flushed, while B's insert record is published but not durable; the
// power fails and B's data write, never synced, is lost. Replay drops
// B's insert (its data fails its checksum) and A comes back whole, and
// the clean record cleans all of it: a clean extent holding A's bytes
// over backing bytes that are B's. The fix makes a clean record that
// collided count as removing a clean extent (cleanGone): before the
// backing is written again, a commit makes it, and B's insert and data
// before it, durable.
func TestMarkCleanCollisionBeforeBackingWrite(t *testing.T) {
	for _, brk := range []breakMode{breakNone, breakNoCollisionSettle} {
		t.Run(map[breakMode]string{breakNone: "fixed", breakNoCollisionSettle: "broken"}[brk], func(t *testing.T) {
			expectStale(t, brk, markCleanCollision(t, brk))
		})
	}
}

func markCleanCollision(t *testing.T, brk breakMode) (stale int) {
	t.Helper()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	cdev, bdev := storage.NewCrash(1<<20), storage.NewCrash(1<<20)
	must(Format(cdev, bdev, FormatOptions{BackingID: testBackingID, BucketSize: 32 << 10, JournalSize: 32 * metaBlock}))
	dd := &deferDev{Device: cdev}
	opts := Options{BackingID: testBackingID, SequentialCutoff: -1}
	c, err := open(dd, bdev, opts, testHooks{brk: brk, noBackground: true})
	must(err)
	defer c.Close()
	const n = 4096
	must(c.WriteAt(payload(0, n, 1), 0, 0)) // A, dirty
	must(c.Flush())
	a := cleanExtentAt(t, c, 0)
	if !a.Dirty || a.Len != n {
		t.Fatalf("A is %v", a)
	}
	// The flusher starts A's writeback.
	bufA := make([]byte, n)
	must(c.ReadCached(a, bufA))
	// B over A's second half, dirty, its data write held back.
	dd.mu.Lock()
	dd.armed, dd.from = true, c.sb.DataOff
	dd.mu.Unlock()
	must(c.WriteAt(payload(n/2, n/2, 2), n/2, 0))
	dd.mu.Lock()
	dd.armed = false
	held := len(dd.pending)
	dd.mu.Unlock()
	if held != 1 {
		t.Fatalf("%d writes held back, want B's data write", held)
	}
	// A's writeback completes.
	must(bdev.WriteAt(bufA, 0, 0))
	must(bdev.Flush())
	if cleaned, collided := c.MarkClean(a); cleaned != n/2 || collided != n/2 {
		t.Fatalf("MarkClean(A): cleaned %d, collided %d", cleaned, collided)
	}
	// B's writeback (its backing write flushed), then any publish.
	_, _, err = writebackStep(c, 0, 1<<20)
	must(err)
	must(c.publish())
	devs, _ := storage.PowerCutAll(storage.KeepUnsynced, nil, cdev, bdev)
	return checkStaleAfter(t, devs, opts)
}
