package cache

import (
	"bytes"
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/nbdcache/nbdcache/storage"
)

// TestFlushGroupSharesTheNextFlush: a caller that arrives while a flush
// runs waits for the next one (the running one may have begun before its
// writes completed), every caller waiting then shares that one, and a
// failure of the running flush reaches the callers who arrived during it.
func TestFlushGroupSharesTheNextFlush(t *testing.T) {
	var g flushGroup
	release := make(chan error)
	began := make(chan int, 8)
	var mu sync.Mutex
	n := 0
	do := func() error {
		mu.Lock()
		n++
		k := n
		mu.Unlock()
		began <- k
		return <-release
	}
	first := make(chan error, 1)
	go func() { first <- g.flush(do) }()
	if k := <-began; k != 1 {
		t.Fatalf("flush %d began first", k)
	}
	// Three callers arrive while flush 1 runs.
	late := make(chan error, 3)
	for range 3 {
		go func() { late <- g.flush(do) }()
	}
	waitFor(t, func() bool {
		g.mu.Lock()
		defer g.mu.Unlock()
		return g.waiters() == 3
	})
	injected := errors.New("injected")
	release <- injected // flush 1 fails
	if err := <-first; !errors.Is(err, injected) {
		t.Fatalf("the caller of the failed flush got %v", err)
	}
	select {
	case err := <-late:
		t.Fatalf("a caller that arrived during flush 1 returned with it (%v): flush 1 may have begun before its writes", err)
	case k := <-began:
		if k != 2 {
			t.Fatalf("flush %d began second", k)
		}
	}
	release <- nil // flush 2, shared by the three, succeeds
	for range 3 {
		if err := <-late; !errors.Is(err, injected) {
			t.Fatalf("a caller that arrived during the failed flush 1 got %v: it may have covered (and lost) its writes", err)
		}
	}
	select {
	case k := <-began:
		t.Fatalf("flush %d began: the three waiters did not share one", k)
	default:
	}
	// A caller with nothing running starts its own, and a success is nil.
	go func() { first <- g.flush(do) }()
	<-began
	release <- nil
	if err := <-first; err != nil {
		t.Fatal(err)
	}
}

// waiters counts the callers blocked in flush (for the test only; g.mu
// held).
func (g *flushGroup) waiters() int { return g.nwait }

func waitFor(t *testing.T, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatal("timed out")
		}
		time.Sleep(time.Millisecond)
	}
}

// TestBackingFlushCoversOnlyEarlierWrites: the journal learns what a
// backing flush covered (so a FLUSH after the flusher's need not flush
// again), but only the direct writes done before that flush began. A
// bypassed write that completes while the flush runs is not covered: a
// client's FLUSH after it must flush the backing again, and the write
// survives a power cut.
func TestBackingFlushCoversOnlyEarlierWrites(t *testing.T) {
	c, cdev, bdev := openCrashStill(t, 1<<20, 2<<20, FormatOptions{BucketSize: 32 << 10, JournalSize: 16 * metaBlock},
		Options{Mode: Writearound, SequentialCutoff: -1}, testHooks{noBackground: true})
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(c.WriteAt(payload(0, 4096, 1), 0, 0)) // to the backing
	flushes := func() int64 { return c.stats.backingFlushes.Load() }

	// The flusher's flush (here a direct call, as FlushBacking) covers
	// write 1, and a FLUSH then needs none of its own.
	must(c.FlushBacking())
	before := flushes()
	must(c.Flush())
	if got := flushes() - before; got != 0 {
		t.Errorf("a FLUSH after a backing flush that covered every bypassed write flushed the backing %d more times", got)
	}

	// Write 2 completes while a backing flush runs.
	var once sync.Once
	bdev.SetHook(func(op storage.Op) {
		if op.Kind == storage.OpFlush {
			once.Do(func() { must(c.WriteAt(payload(64<<10, 4096, 2), 64<<10, 0)) })
		}
	})
	must(c.FlushBacking())
	bdev.SetHook(nil)
	before = flushes()
	must(c.Flush())
	if got := flushes() - before; got != 1 {
		t.Errorf("a FLUSH after a bypassed write that completed during the last backing flush flushed the backing %d times, want 1", got)
	}
	devs, _ := storage.PowerCutAll(storage.LoseUnsynced, nil, cdev, bdev)
	c2, err := openStill(devs[0], devs[1], Options{BackingID: testBackingID})
	must(err)
	defer c2.Close()
	for i, off := range []int64{0, 64 << 10} {
		got := make([]byte, 4096)
		if err := c2.ReadAt(got, off); err != nil || !bytes.Equal(got, payload(off, 4096, uint64(i+1))) {
			t.Errorf("write %d at %d lost after a FLUSH and a power cut (%v)", i+1, off, err)
		}
	}
}

// TestCheckpointLeavesBypassedWritesToFlush: a checkpoint's commit makes
// the journal durable, not the client's bypassed writes (only a FLUSH or
// FUA must): it flushes the backing only for a record that depends on a
// backing write. Each checkpoint of a thrashing cache used to flush the
// backing, and with it every bypassed write in the page cache.
func TestCheckpointLeavesBypassedWritesToFlush(t *testing.T) {
	c, _, _ := openCrashStill(t, 1<<20, 2<<20, FormatOptions{BucketSize: 32 << 10, JournalSize: 16 * metaBlock},
		Options{Mode: Writearound, SequentialCutoff: -1}, testHooks{noBackground: true})
	defer c.Close()
	if err := c.WriteAt(payload(0, 4096, 1), 0, 0); err != nil {
		t.Fatal(err)
	}
	if err := c.SetMode(context.Background(), Writeback); err != nil {
		t.Fatal(err)
	}
	before := c.stats.backingFlushes.Load()
	if err := c.WriteAt(payload(64<<10, 4096, 2), 64<<10, 0); err != nil {
		t.Fatal(err)
	}
	if err := c.Checkpoint(); err != nil {
		t.Fatal(err)
	}
	if got := c.stats.backingFlushes.Load() - before; got != 0 {
		t.Errorf("a checkpoint flushed the backing %d times with nothing depending on it", got)
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	if got := c.stats.backingFlushes.Load() - before; got != 1 {
		t.Errorf("the FLUSH after it flushed the backing %d times, want 1 (the bypassed write)", got)
	}
}
