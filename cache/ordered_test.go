package cache

import (
	"bytes"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/nbdcache/nbdcache/storage"
	"github.com/nbdcache/nbdcache/writeback"
)

// windowDev records the backing writes in flight at once and the order in
// which they arrive; failAt, if set, fails the write at that offset.
type windowDev struct {
	storage.Device
	failAt int64

	mu       sync.Mutex
	now, max int
	offs     []int64
}

func (d *windowDev) WriteAt(p []byte, off int64, fl storage.Flags) error {
	d.mu.Lock()
	d.now++
	d.max = max(d.max, d.now)
	d.offs = append(d.offs, off)
	d.mu.Unlock()
	time.Sleep(200 * time.Microsecond) // a slow backing: writes overlap if issued so
	d.mu.Lock()
	d.now--
	d.mu.Unlock()
	if d.failAt > 0 && off == d.failAt {
		return errInjected
	}
	return d.Device.WriteAt(p, off, fl)
}

// TestWritebackPipelines: the cache's own writebacks (GC's cleaning, the
// write-back before a bypass, a writeback step: the flusher's WriteBack)
// keep up to MaxInFlight backing writes in flight, issued in ascending
// order, so that a disk finds the next write of a sorted sweep queued;
// every byte lands. A failed write fails the step and leaves its block
// dirty, and only it: the others were written and flushed.
func TestWritebackPipelines(t *testing.T) {
	for _, fail := range []bool{false, true} {
		cdev, mem := storage.NewMem(8<<20), storage.NewMem(64<<20)
		if err := Format(cdev, mem, FormatOptions{BackingID: testBackingID}); err != nil {
			t.Fatal(err)
		}
		back := &windowDev{Device: mem}
		const window = 4
		c, err := openStill(cdev, back, Options{BackingID: testBackingID, SequentialCutoff: -1,
			Writeback: writeback.Config{MaxInFlight: window}})
		if err != nil {
			t.Fatal(err)
		}
		const n = 200
		for i := range int64(n) { // one 4 KiB write every 256 KiB: no two merge
			if err := c.WriteAt(payload(i<<18, 4096, uint64(i+1)), i<<18, 0); err != nil {
				t.Fatal(err)
			}
		}
		if fail {
			back.failAt = 100 << 18
		}
		_, _, err = writebackStep(c, 0, 64<<20)
		back.mu.Lock()
		maxInFlight, offs := back.max, back.offs
		back.mu.Unlock()
		swaps := 0
		for i := 1; i < len(offs); i++ {
			if offs[i] < offs[i-1] {
				swaps++
			}
		}
		t.Logf("fail=%v: %d writes, up to %d in flight, %d arrived before an earlier one; err %v", fail, len(offs), maxInFlight, swaps, err)
		if maxInFlight < 2 || maxInFlight > window {
			t.Errorf("up to %d writes in flight, want 2..%d", maxInFlight, window)
		}
		if swaps > len(offs)/10 {
			t.Errorf("%d of %d writes arrived before an earlier one", swaps, len(offs))
		}
		if fail {
			if !errors.Is(err, errInjected) || c.DirtyBytes() != 4096 {
				t.Errorf("a failed write: err %v, %d bytes still dirty, want its 4096", err, c.DirtyBytes())
			}
		} else if err != nil || c.DirtyBytes() != 0 {
			t.Fatalf("err %v, %d bytes still dirty", err, c.DirtyBytes())
		}
		if len(offs) != n {
			t.Errorf("%d backing writes, want %d", len(offs), n)
		}
		for i := range int64(n) {
			got := make([]byte, 4096)
			mem.ReadAt(got, i<<18)
			if landed := bytes.Equal(got, payload(i<<18, 4096, uint64(i+1))); landed != (!fail || i != 100) {
				t.Fatalf("block %d: landed %v", i, landed)
			}
		}
		c.Close()
	}
}
