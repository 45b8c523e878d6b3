package cache

import (
	"bytes"
	"sync"
	"testing"
	"time"

	"github.com/nbdcache/nbdcache/storage"
	"github.com/nbdcache/nbdcache/test/testseed"
	"github.com/nbdcache/nbdcache/writeback"
)

// gatedDevice holds every write and flush while its gate is shut, and
// reports the first one that arrives.
type gatedDevice struct {
	storage.Device
	open    chan struct{} // closed: the gate is open
	arrived chan struct{} // closed when the first held request arrives
	once    sync.Once
}

func newGated(inner storage.Device) *gatedDevice {
	return &gatedDevice{Device: inner, open: make(chan struct{}), arrived: make(chan struct{})}
}

func (g *gatedDevice) wait() {
	g.once.Do(func() { close(g.arrived) })
	<-g.open
}

func (g *gatedDevice) WriteAt(p []byte, off int64, flags storage.Flags) error {
	g.wait()
	return g.Device.WriteAt(p, off, flags)
}

func (g *gatedDevice) Flush() error {
	g.wait()
	return g.Device.Flush()
}

// TestForegroundDoesNotWaitForWriteback: the background flusher is stuck
// in a backing write that never returns (a backing disk that hangs), and
// clients go on: writes (some over the very range being written back),
// FUA writes, FLUSHes, and reads of dirty, clean and uncached data all
// complete and read back right. Only when the gate opens does writeback
// finish, and then the backing holds the newest data.
func TestForegroundDoesNotWaitForWriteback(t *testing.T) {
	const size = 8 << 20
	d := formatMem(t, 8<<20, size, FormatOptions{BucketSize: 64 << 10})
	back := newGated(d.back)
	c := openT(t, devPair{d.cache, back}, Options{SequentialCutoff: -1, Writeback: writeback.Config{
		TargetPercent: 1, LowWatermark: -1, IdleAfter: time.Millisecond,
		UpdateInterval: time.Millisecond, BatchTime: time.Millisecond,
	}})
	defer c.Close()
	r := rng(testseed.Get(t))
	model := make([]byte, size)
	id := uint64(0)
	write := func(off, n int64, fl storage.Flags) {
		id++
		p := payload(off, n, id)
		if err := c.WriteAt(p, off, fl); err != nil {
			t.Error(err)
			return
		}
		copy(model[off:], p)
	}
	// Dirty data in the first 1 MiB; the flusher, seeing the export idle,
	// starts writing it back and sticks in the gate.
	for range 64 {
		write(r.Int64N(1<<20/4096)*4096, 4096, 0)
	}
	select {
	case <-back.arrived:
	case <-time.After(20 * time.Second):
		t.Fatal("writeback never reached the backing")
	}

	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := range 2000 {
			off := r.Int64N(2<<20/4096) * 4096 // half of it over the range under writeback
			var fl storage.Flags
			if i%50 == 0 {
				fl = storage.FUA
			}
			write(off, 4096*(1+r.Int64N(4)), fl)
			if i%100 == 0 {
				if err := c.Flush(); err != nil {
					t.Error(err)
				}
			}
			off, n := r.Int64N(size/4096-16)*4096, int64(16*4096) // anywhere: dirty, clean or uncached
			got := make([]byte, n)
			if err := c.ReadAt(got, off); err != nil {
				t.Error(err)
			} else if !bytes.Equal(got, model[off:off+n]) {
				t.Errorf("read at %d differs from what was written", off)
			}
		}
	}()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		close(back.open) // let everything unwind
		t.Fatal("client requests waited behind a writeback stuck in the backing")
	}
	if t.Failed() {
		return
	}
	st := c.Stats()
	t.Logf("with writeback stuck: %d writes, %d flushes, %d FUA, dirty %d bytes", st.Writes, st.Flushes, st.FUA, st.DirtyBytes)

	close(back.open)
	if err := c.Drain(t.Context(), nil); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, size)
	if err := d.back.ReadAt(got, 0); err != nil || !bytes.Equal(got, model) {
		t.Fatalf("after the drain the backing differs from what was written (%v)", err)
	}
}
