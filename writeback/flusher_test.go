package writeback

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/nbdcache/nbdcache/btreeidx"
	"github.com/nbdcache/nbdcache/storage"
	"github.com/nbdcache/nbdcache/test/testseed"
)

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// densely writes random 4 KiB blocks until the region has been written
// k times over on average.
func densely(s *fakeSource, seed uint64, k int) {
	rng := newRand(seed)
	n := len(s.mu.ver)
	for range k * n {
		s.write(rng.IntN(n), 1)
	}
}

// checkAscending checks the order backing writes arrived in, within one
// pass: ranking the writes by offset, a write may arrive after a write of
// higher rank only if their ranks differ by less than window (the sliding
// window of MaxInFlight spans); window 1 means strictly ascending.
func checkAscending(t *testing.T, ws []rec, window int) {
	t.Helper()
	sorted := slices.Clone(ws)
	slices.SortFunc(sorted, func(a, b rec) int { return cmp.Compare(a.off, b.off) })
	rank := map[int64]int{}
	for i, w := range sorted {
		if i > 0 && w.off < sorted[i-1].off+sorted[i-1].n {
			t.Fatalf("writes at %d and %d overlap within one pass", sorted[i-1].off, w.off)
		}
		rank[w.off] = i
	}
	// maxBefore is the highest rank that arrived before position i.
	maxBefore, overtaken := -1, 0
	for _, w := range ws {
		r := rank[w.off]
		if maxBefore-r >= window {
			t.Fatalf("write at %d (rank %d) arrived after rank %d: overtaken by more than %d", w.off, r, maxBefore, window-1)
		}
		if maxBefore > r {
			overtaken++
		}
		maxBefore = max(maxBefore, r)
	}
	t.Logf("%d of %d writes arrived after a later one (window %d)", overtaken, len(ws), window)
}

// TestDrainMergesAscending is the first claim: random 4 KiB writes
// that cover a region densely reach the backing as long writes in ascending
// order, and the backing ends up equal to the model.
func TestDrainMergesAscending(t *testing.T) {
	seed := testseed.Get(t)
	for _, inFlight := range []int{1, 4} {
		t.Run(fmt.Sprintf("inflight=%d", inFlight), func(t *testing.T) {
			const blocks = 8192 // 32 MiB
			src := newFakeSource(blocks, 4096, 1<<30)
			densely(src, seed, 5)
			dev := &recDev{inner: storage.NewMem(src.size())}
			guard(src, dev)
			f := New(src, dev, Config{MaxInFlight: inFlight, Logger: quiet})

			var last, calls int64
			var bad []string
			err := f.Drain(context.Background(), func(done, total int64) {
				calls++
				if done < last || done > total {
					bad = append(bad, fmt.Sprintf("progress(%d, %d) after done=%d", done, total, last))
				}
				last = done
			})
			if err != nil {
				t.Fatal(err)
			}
			src.check(t)
			for _, b := range bad {
				t.Error(b)
			}
			if d := src.DirtyBytes(); d != 0 {
				t.Errorf("DirtyBytes after Drain = %d", d)
			}
			checkImage(t, dev, src)
			ws := dev.writes()
			checkAscending(t, ws, inFlight)
			st := f.Stats()
			t.Logf("%d dirty blocks: %d backing writes, average %d KiB, %d flushes, %d batches, %d progress calls",
				st.Cleaned/4096, st.Writes, st.AvgWrite>>10, dev.flushes(), st.Batches, calls)
			if st.Writes != int64(len(ws)) || st.AvgWrite < 64<<10 {
				t.Errorf("average backing write %d bytes over %d writes: not merged", st.AvgWrite, st.Writes)
			}
			if dev.flushes() == 0 || int64(dev.flushes()) != st.Flushes {
				t.Errorf("flushes: device saw %d, stats say %d", dev.flushes(), st.Flushes)
			}
			if last != st.Cleaned || st.Collisions != 0 || st.Errors != 0 {
				t.Errorf("progress ended at %d, cleaned %d, collisions %d, errors %d", last, st.Cleaned, st.Collisions, st.Errors)
			}
		})
	}
}

// TestSpanWritesWaitForTheSpanBefore: spans of a batch read concurrently
// (MaxInFlight 2 here), but a span issues its backing write only after the
// span before it has issued its last. The first span's cache read is held;
// once every goroutine of the batch is blocked, no backing write may have
// arrived. (Mutant writespan-no-order, which TestDrainMergesAscending
// catches only when the goroutines happen to race.)
func TestSpanWritesWaitForTheSpanBefore(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		src := newFakeSource(64, 4096, 1<<20)
		src.write(0, 4) // span A: blocks 0-3
		src.write(8, 4) // span B: blocks 8-11, after a hole no clean extent covers
		dev := &recDev{inner: storage.NewMem(src.size())}
		guard(src, dev)
		hold := make(chan struct{})
		src.afterRead = func(e btreeidx.Extent) {
			if e.Off == 0 {
				<-hold
			}
		}
		f := New(src, dev, Config{MaxInFlight: 2, Logger: quiet})
		done := make(chan batchResult)
		go func() { done <- oneBatch(f) }()
		synctest.Wait()
		if ws := dev.writes(); len(ws) > 0 {
			t.Errorf("backing writes %v issued while the first span was still reading", ws)
		}
		close(hold)
		if res := <-done; res.cleaned != 8*4096 {
			t.Errorf("batch cleaned %d bytes, want %d", res.cleaned, 8*4096)
		}
		src.check(t)
		checkImage(t, dev, src)
		if ws := dev.writes(); len(ws) != 2 || ws[0].off != 0 || ws[1].off != 8*4096 {
			t.Errorf("backing writes %v, want [0, 16 KiB) then [32 KiB, 48 KiB)", ws)
		}
	})
}

// oneBatch runs a single full-speed batch, as a Drain would.
func oneBatch(f *Flusher) batchResult {
	f.draining.Add(1)
	defer f.draining.Add(-1)
	f.acquire(context.Background())
	defer f.release()
	return f.batch(context.Background())
}

// TestCollision: a newer write lands between the read from the cache and
// MarkClean. The CAS loses, the block stays dirty with the newer data, the
// loss is counted, and a later pass writes the newer data back.
func TestCollision(t *testing.T) {
	src := newFakeSource(64, 4096, 1<<20)
	for b := range 64 {
		src.write(b, 1)
	}
	dev := &recDev{inner: storage.NewMem(src.size())}
	guard(src, dev)
	var once sync.Once
	src.afterRead = func(e btreeidx.Extent) {
		if e.Off <= 10*4096 && 10*4096 < e.End() {
			once.Do(func() { src.write(10, 1) })
		}
	}
	f := New(src, dev, Config{Logger: quiet})

	// One batch by hand, to look between passes.
	res := oneBatch(f)
	if res.collided != 4096 || res.cleaned != 63*4096 {
		t.Errorf("batch cleaned %d collided %d, want %d and 4096", res.cleaned, res.collided, 63*4096)
	}
	if st := f.Stats(); st.Collisions != 1 || st.CollidedBytes != 4096 || st.Errors != 0 {
		t.Errorf("stats %+v: want one collision of 4096 bytes and no error", st)
	}
	if d := src.DirtyBytes(); d != 4096 {
		t.Errorf("DirtyBytes = %d, want the newer block's 4096", d)
	}
	if err := f.Drain(context.Background(), nil); err != nil {
		t.Fatal(err)
	}
	src.check(t)
	checkImage(t, dev, src)
	if st := f.Stats(); st.Collisions != 1 {
		t.Errorf("collisions %d after the drain, want 1", st.Collisions)
	}
}

// TestStaleRead: ReadCached says ErrStale for one piece in the middle of a
// merged span. The pieces around it are still written (two backing writes),
// the stale one is a collision, not an error.
func TestStaleRead(t *testing.T) {
	src := newFakeSource(16, 4096, 1<<20)
	for b := range 16 {
		src.write(b, 1)
	}
	dev := &recDev{inner: storage.NewMem(src.size())}
	guard(src, dev)
	stale := true
	src.readErr = func(e btreeidx.Extent) error {
		if e.Off == 5*4096 && stale {
			stale = false
			return fmt.Errorf("bucket reused: %w", ErrStale)
		}
		return nil
	}
	f := New(src, dev, Config{MaxInFlight: 1, Logger: quiet})
	res := oneBatch(f)
	if res.errs != 0 || res.collided != 4096 || res.cleaned != 15*4096 {
		t.Errorf("batch: %+v", res)
	}
	ws := dev.writes()
	if len(ws) != 2 || ws[0] != (rec{0, 5 * 4096}) || ws[1] != (rec{6 * 4096, 10 * 4096}) {
		t.Errorf("backing writes %v, want [0,20K) and [24K,64K)", ws)
	}
	if err := f.Drain(context.Background(), nil); err != nil {
		t.Fatal(err)
	}
	src.check(t)
	checkImage(t, dev, src)
}

// TestBusyRead: ReadCached says ErrBusy (someone else is writing the range
// back): the piece is skipped without error or collision and written on a
// later pass.
func TestBusyRead(t *testing.T) {
	src := newFakeSource(16, 4096, 1<<20)
	for b := range 16 {
		src.write(b, 1)
	}
	dev := &recDev{inner: storage.NewMem(src.size())}
	guard(src, dev)
	busy := 2
	src.readErr = func(e btreeidx.Extent) error {
		if e.Off == 7*4096 && busy > 0 {
			busy--
			return fmt.Errorf("cache: overlapping writeback: %w", ErrBusy)
		}
		return nil
	}
	f := New(src, dev, Config{Logger: quiet})
	res := oneBatch(f)
	if res.errs != 0 || res.collided != 0 || res.cleaned != 15*4096 || src.DirtyBytes() != 4096 {
		t.Errorf("batch %+v, %d dirty: want 15 blocks cleaned, block 7 left dirty", res, src.DirtyBytes())
	}
	if err := f.Drain(context.Background(), nil); err != nil {
		t.Fatal(err)
	}
	if st := f.Stats(); st.Busy != 2 || st.Errors != 0 || st.Collisions != 0 {
		t.Errorf("stats: busy %d errors %d collisions %d, want 2, 0, 0", st.Busy, st.Errors, st.Collisions)
	}
	src.check(t)
	checkImage(t, dev, src)
}

// TestBackingErrors: failing backing writes and flushes leave data dirty,
// are counted, and are retried with a growing backoff until they succeed.
func TestBackingErrors(t *testing.T) {
	boom := errors.New("disk on fire")
	t.Run("write", func(t *testing.T) {
		synctest.Test(t, func(t *testing.T) {
			src := newFakeSource(256, 4096, 64<<20)
			for b := 0; b < 256; b += 2 {
				src.write(b, 1)
			}
			dev := &recDev{inner: storage.NewMem(src.size())}
			guard(src, dev)
			var mu sync.Mutex
			var attempts []time.Time
			dev.failWrite = func(off, n int64) error {
				if off <= 100*4096 && 100*4096 < off+n {
					mu.Lock()
					defer mu.Unlock()
					attempts = append(attempts, time.Now())
					if len(attempts) <= 5 {
						return boom
					}
				}
				return nil
			}
			f := New(src, dev, Config{IdleAfter: time.Millisecond, RetryMin: 100 * time.Millisecond, Logger: quiet})
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error)
			go func() { done <- f.Run(ctx) }()
			time.Sleep(50 * time.Millisecond)
			synctest.Wait()
			if d := src.DirtyBytes(); d != 4096 {
				t.Errorf("after the first pass DirtyBytes = %d, want the failed block's 4096", d)
			}
			time.Sleep(time.Minute)
			synctest.Wait()
			cancel()
			if err := <-done; err != nil {
				t.Fatal(err)
			}
			src.check(t)
			if d := src.DirtyBytes(); d != 0 {
				t.Errorf("DirtyBytes = %d after the retries", d)
			}
			checkImage(t, dev, src)
			st := f.Stats()
			if st.Errors != 5 || !errors.Is(st.LastError, boom) {
				t.Errorf("errors %d (last %v), want 5 of %v", st.Errors, st.LastError, boom)
			}
			mu.Lock()
			defer mu.Unlock()
			for i := 2; i < len(attempts) && i < 6; i++ {
				a, b := attempts[i-1].Sub(attempts[i-2]), attempts[i].Sub(attempts[i-1])
				if b < 2*a-time.Millisecond || a < 100*time.Millisecond {
					t.Errorf("retry intervals %v then %v: backoff does not double from RetryMin", a, b)
				}
			}
		})
	})
	t.Run("flush", func(t *testing.T) {
		src := newFakeSource(64, 4096, 64<<20)
		for b := range 64 {
			src.write(b, 1)
		}
		dev := &recDev{inner: storage.NewMem(src.size())}
		guard(src, dev)
		dev.failFlush = func() error { return boom }
		f := New(src, dev, Config{Logger: quiet})
		res := oneBatch(f)
		if res.cleaned != 0 || res.errs != 64 || src.DirtyBytes() != 64*4096 {
			t.Errorf("a failed flush cleaned %d, %d pieces failed, %d dirty: want 0, 64, all", res.cleaned, res.errs, src.DirtyBytes())
		}
		src.mu.Lock()
		marks := src.mu.marks
		src.mu.Unlock()
		if marks != 0 {
			t.Errorf("%d MarkClean calls after a failed flush", marks)
		}
		src.mu.Lock()
		releases := src.mu.releases
		src.mu.Unlock()
		if releases != 64 {
			t.Errorf("%d ReleaseCached calls after a failed flush, want one per piece, 64", releases)
		}
		// A drain that cannot flush gives up with ErrDrain after some
		// passes that clean nothing.
		synctest.Test(t, func(t *testing.T) {
			f := New(src, dev, Config{Logger: quiet})
			start := time.Now()
			err := f.Drain(context.Background(), nil)
			if !errors.Is(err, ErrDrain) || !errors.Is(err, boom) {
				t.Errorf("Drain = %v, want ErrDrain wrapping %v", err, boom)
			}
			if n := f.Stats().Errors; n != drainPasses {
				t.Errorf("%d errors, want one failed flush per pass, %d", n, drainPasses)
			}
			t.Logf("gave up after %v: %v", time.Since(start), err)
		})
		src.check(t)
	})
}

// TestDrainWhileRunning: Run is rate-limiting a busy foreground; Drain
// takes over at full speed, and leaves nothing dirty once the foreground
// stops writing.
func TestDrainWhileRunning(t *testing.T) {
	seed := testseed.Get(t)
	synctest.Test(t, func(t *testing.T) {
		rng := newRand(seed)
		src := newFakeSource(4096, 4096, 64<<20)
		dev := &recDev{inner: storage.NewMem(src.size())}
		guard(src, dev)
		f := New(src, dev, Config{Logger: quiet})
		ctx, cancel := context.WithCancel(context.Background())
		runDone := make(chan error)
		go func() { runDone <- f.Run(ctx) }()

		stop := make(chan struct{})
		fgDone := make(chan struct{})
		go func() { // 4 MiB/s of random 4 KiB writes, all the time active
			defer close(fgDone)
			tick := time.NewTicker(10 * time.Millisecond)
			defer tick.Stop()
			for {
				select {
				case <-stop:
					return
				case <-tick.C:
					for range 10 {
						src.write(rng.IntN(4096), 1)
					}
					f.NoteForeground()
				}
			}
		}()
		time.Sleep(3 * time.Second)
		if m := f.Stats().Mode; m != ModeRate {
			t.Errorf("mode %v while busy between the watermarks, want rate", m)
		}
		close(stop) // the cache switches to writethrough: no new dirty data
		<-fgDone
		var last int64
		if err := f.Drain(context.Background(), func(done, total int64) { last = done }); err != nil {
			t.Fatal(err)
		}
		if d := src.DirtyBytes(); d != 0 || last == 0 {
			t.Errorf("after Drain: DirtyBytes %d, progress %d", d, last)
		}
		checkImage(t, dev, src)
		cancel()
		if err := <-runDone; err != nil {
			t.Fatal(err)
		}
		src.check(t)
	})
}

func TestRunTwice(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		src := newFakeSource(16, 4096, 1<<20)
		f := New(src, nullDev{src.size()}, Config{Logger: quiet})
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error)
		go func() { done <- f.Run(ctx) }()
		synctest.Wait()
		if err := f.Run(ctx); !errors.Is(err, ErrRunning) {
			t.Errorf("second Run = %v, want ErrRunning", err)
		}
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run = %v after cancel, want nil", err)
		}
	})
}

// liar reports dirty bytes but lists no dirty extent (as a cache does while
// another writeback holds every dirty range). After 1000 listings it blocks
// until released, so that a spinning flusher shows up as a count, not a hang.
type liar struct {
	sliceSource
	calls   atomic.Int64
	release chan struct{}
}

func (l *liar) DirtyBytes() int64 { return 4096 }
func (l *liar) DirtyExtents(from int64, fn func(btreeidx.Extent) bool) {
	if l.calls.Add(1) > 1000 {
		<-l.release
	}
}

// TestNoSpin: dirty data that cannot be listed makes Run wait for the next
// controller step, not spin, and makes Drain give up with ErrDrain.
func TestNoSpin(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		l := &liar{release: make(chan struct{})}
		defer close(l.release)
		f := New(l, nullDev{1 << 20}, Config{IdleAfter: time.Millisecond, Logger: quiet})
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error)
		go func() { done <- f.Run(ctx) }()
		time.Sleep(10 * time.Second)
		calls := l.calls.Load()
		cancel()
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		// Two listings (from the cursor, then from 0) per controller step.
		if calls > 30 {
			t.Errorf("Run listed dirty extents %d times in 10 s: it spins", calls)
		}
		l.calls.Store(0)
		err := f.Drain(context.Background(), nil)
		if !errors.Is(err, ErrDrain) || !errors.Is(err, ErrStalled) {
			t.Errorf("Drain = %v, want ErrDrain and ErrStalled", err)
		}
		t.Logf("Run: %d listings in 10 s; Drain: %v", calls, err)
	})
}

// TestDrainBridgesCleanGaps: every other block dirty, the blocks between
// them clean in the cache. The drain writes the clean ones along (they
// hold what the backing holds), so the backing sees long writes, never
// marks a clean piece, and ends equal to the model. Where the blocks
// between are not cached at all, nothing is bridged: the flusher has no
// data for them and must not write any.
func TestDrainBridgesCleanGaps(t *testing.T) {
	const blocks = 4096 // 16 MiB
	for _, tc := range []struct {
		name        string
		cachedGaps  bool
		maxGap      int64
		wantBridged bool
	}{
		{"clean-gaps", true, 0, true},
		{"clean-gaps-no-bridging", true, -1, false},
		{"uncached-gaps", false, 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src := newFakeSource(blocks, 4096, 1<<30)
			dev := &recDev{inner: storage.NewMem(src.size())}
			guard(src, dev)
			f := New(src, dev, Config{MaxGap: tc.maxGap, Logger: quiet})
			if tc.cachedGaps {
				for b := range blocks {
					src.write(b, 1)
				}
				if err := f.Drain(context.Background(), nil); err != nil {
					t.Fatal(err)
				}
			}
			base := f.Stats()
			for b := 0; b < blocks; b += 2 {
				src.write(b, 1)
			}
			if err := f.Drain(context.Background(), nil); err != nil {
				t.Fatal(err)
			}
			src.check(t)
			checkImage(t, dev, src)
			if d := src.DirtyBytes(); d != 0 {
				t.Fatalf("DirtyBytes after Drain = %d", d)
			}
			st := f.Stats()
			writes, bytes, filled := st.Writes-base.Writes, st.BytesWritten-base.BytesWritten, st.FilledBytes-base.FilledBytes
			t.Logf("%d dirty blocks: %d backing writes, average %d KiB, %d KiB of clean data bridged",
				blocks/2, writes, bytes/max(writes, 1)>>10, filled>>10)
			if bridged := filled > 0; bridged != tc.wantBridged {
				t.Fatalf("bridged %d bytes; want bridging %v", filled, tc.wantBridged)
			}
			if tc.wantBridged && bytes/writes < 512<<10 {
				t.Errorf("average backing write %d KiB with the gaps bridged", bytes/writes>>10)
			}
			if !tc.wantBridged && writes != blocks/2 {
				t.Errorf("%d backing writes, want one per dirty block (%d)", writes, blocks/2)
			}
		})
	}
}

// TestExclusive: while Exclusive's function runs, no batch of Run writes to
// the backing; Run goes on afterwards. The flusher runs at full speed over
// plenty of dirty data, so a batch is always due.
func TestExclusive(t *testing.T) {
	src := newFakeSource(4096, 4096, 1<<20) // far above the high watermark
	for b := 0; b < 4096; b += 2 {
		src.write(b, 1)
	}
	var inFn atomic.Bool
	var overlapped atomic.Int64
	dev := &recDev{inner: storage.NewMem(src.size())}
	dev.failWrite = func(off, n int64) error {
		if inFn.Load() {
			overlapped.Add(1)
		}
		time.Sleep(50 * time.Microsecond) // a slow backing: batches take a while
		return nil
	}
	f := New(src, dev, Config{Logger: quiet})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { done <- f.Run(ctx) }()
	for f.Stats().Writes == 0 {
		time.Sleep(time.Millisecond)
	}
	for range 5 {
		if err := f.Exclusive(ctx, func() {
			inFn.Store(true)
			before := f.Stats().Writes
			time.Sleep(20 * time.Millisecond)
			if after := f.Stats().Writes; after != before {
				t.Errorf("the flusher wrote %d times during Exclusive", after-before)
			}
			inFn.Store(false)
		}); err != nil {
			t.Fatal(err)
		}
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if n := overlapped.Load(); n > 0 {
		t.Errorf("%d backing writes of the flusher overlapped Exclusive", n)
	}
	if f.Stats().Writes < 10 {
		t.Errorf("the flusher made only %d writes: Run did not go on between Exclusive calls", f.Stats().Writes)
	}
	src.check(t)
}

// shedder is a fakeSource that may ask to be shed (Shedder).
type shedder struct {
	*fakeSource
	shed atomic.Bool
}

func (s *shedder) Shedding() bool { return s.shed.Load() }

// TestShedMode: dirty data below the low watermark stays dirty while the
// foreground is busy, unless the Source sheds its data: then Run writes
// it all back at full speed.
func TestShedMode(t *testing.T) {
	for _, shed := range []bool{false, true} {
		synctest.Test(t, func(t *testing.T) {
			src := &shedder{fakeSource: newFakeSource(64, 4096, 1<<30)}
			src.shed.Store(shed)
			densely(src.fakeSource, 1, 1)
			f := New(src, nullDev{src.size()}, Config{Logger: quiet, IdleAfter: time.Hour})
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error)
			go func() { done <- f.Run(ctx) }()
			f.Kick()
			time.Sleep(5 * time.Second)
			synctest.Wait()
			cancel()
			<-done
			left := src.DirtyBytes()
			if shed && left != 0 {
				t.Errorf("shedding: %d bytes still dirty after 5 s", left)
			}
			if !shed && left == 0 {
				t.Errorf("not shedding, below the low watermark: all written back (the test shows nothing)")
			}
		})
	}
}

// seeker is a fakeSource whose backing is a disk (Seeker).
type seeker struct {
	*fakeSource
	seeks bool
}

func (s *seeker) BackingSeeks() bool { return s.seeks }

// inflightDev counts the writes in flight at once, among those that start
// after the first 32; each takes lat. The flusher has timed 8 by the 16th,
// but up to MaxInFlight jobs of a span each, issued while the Source's
// word held, may still be under way then: counting from the 16th, the
// fast device that claims to rotate showed 3 to 8 in flight in 5 runs of
// 100 (2026-12-06, before and after read-ahead).
type inflightDev struct {
	nullDev
	lat          time.Duration
	mu           sync.Mutex
	started, now int
	top          int
}

func (d *inflightDev) WriteAt(p []byte, off int64, f storage.Flags) error {
	d.mu.Lock()
	d.now++
	if d.started++; d.started > 32 {
		d.top = max(d.top, d.now)
	}
	d.mu.Unlock()
	time.Sleep(d.lat)
	d.mu.Lock()
	d.now--
	d.mu.Unlock()
	return d.nullDev.WriteAt(p, off, f)
}

// TestSeekerKeepsWritesQueued: over a disk, a batch of small scattered
// spans keeps MaxInFlight writes queued at the device (each span a job of
// its own); otherwise spans go in jobs of up to 32 KiB, one after the
// other within a job. With jobs over the hdd model, about one write was in
// flight, each missed its sector, and GC's sweeps ran at a tenth of their
// speed. The Source's word (Seeker) holds only until the flusher has
// timed its own writes: a virtio disk claims to rotate, and in the VM
// every drain went a span a job.
func TestSeekerKeepsWritesQueued(t *testing.T) {
	for _, tc := range []struct {
		says   bool          // the Source's Seeker
		lat    time.Duration // a backing write
		queued bool          // want MaxInFlight queued, once timed
	}{
		{true, 2 * time.Millisecond, true},
		{false, 2 * time.Millisecond, true},    // a disk the Source did not know
		{true, 100 * time.Microsecond, false},  // a fast device that claims to rotate
		{false, 100 * time.Microsecond, false}, // a fast device
	} {
		synctest.Test(t, func(t *testing.T) {
			src := &seeker{fakeSource: newFakeSource(4096, 4096, 1<<30), seeks: tc.says}
			for b := 0; b < 4096; b += 32 { // 4 KiB every 128 KiB: a span each
				src.write(b, 1)
			}
			dev := &inflightDev{nullDev: nullDev{src.size()}, lat: tc.lat}
			f := New(src, dev, Config{Logger: quiet, MaxInFlight: 8})
			if err := f.Drain(context.Background(), nil); err != nil {
				t.Fatal(err)
			}
			t.Logf("Seeker %v, %v a write: at most %d writes in flight after the first 32", tc.says, tc.lat, dev.top)
			if tc.queued && dev.top < 6 {
				t.Errorf("over a disk, at most %d writes in flight, want MaxInFlight (8) or near it", dev.top)
			}
			if !tc.queued && dev.top > 2 {
				t.Errorf("off a disk, %d writes in flight: the spans did not go in jobs", dev.top)
			}
		})
	}
}

// lostDev is a backing whose every Flush fails as a File's does after a
// failed sync (storage.ErrSyncFailed); it counts writes and flushes.
type lostDev struct {
	nullDev
	writes, flushes atomic.Int64
}

func (d *lostDev) WriteAt(p []byte, off int64, f storage.Flags) error {
	d.writes.Add(1)
	return d.nullDev.WriteAt(p, off, f)
}

func (d *lostDev) Flush() error {
	d.flushes.Add(1)
	return fmt.Errorf("%w: test", storage.ErrSyncFailed)
}

// TestLostBackingStopsWriteback: once the backing fails a flush for good
// (storage.ErrSyncFailed: it lost writes and fails every flush until
// reopened), nothing written back can be marked clean again. Run stops
// writing back, whatever kicks it, rather than rewrite a batch every few
// hundred milliseconds for nothing; Drain fails at once. The dirty data
// stays dirty.
func TestLostBackingStopsWriteback(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		src := newFakeSource(4096, 4096, 1<<30)
		for b := 0; b < 4096; b += 64 {
			src.write(b, 1)
		}
		dirty := src.DirtyBytes()
		dev := &lostDev{nullDev: nullDev{src.size()}}
		f := New(src, dev, Config{Logger: quiet, MaxInFlight: 8})
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- f.Run(ctx) }()
		for range 50 {
			f.Kick()
			time.Sleep(200 * time.Millisecond)
		}
		if n := dev.flushes.Load(); n != 1 {
			t.Errorf("Run flushed %d times over 10 s of kicks, want 1: writeback went on after the backing lost writes", n)
		}
		cancel()
		if err := <-done; err != nil {
			t.Fatal(err)
		}
		if got := src.DirtyBytes(); got != dirty {
			t.Errorf("%d bytes dirty, want %d: something was marked clean", got, dirty)
		}
		flushes := dev.flushes.Load()
		if err := f.Drain(context.Background(), nil); !errors.Is(err, ErrDrain) || !errors.Is(err, storage.ErrSyncFailed) {
			t.Fatalf("Drain: %v, want ErrDrain wrapping ErrSyncFailed", err)
		}
		if n := dev.flushes.Load() - flushes; n != 1 {
			t.Errorf("Drain flushed %d times, want 1", n)
		}
	})
}

// batchSource is a fakeSource that reads in batches (BatchReader).
type batchSource struct {
	*fakeSource
	batches atomic.Int64
	onRead  func(bytes int64) // if not nil, called at each ReadCachedBatch with the bytes it reads
}

func (s *batchSource) ReadCachedBatch(es []btreeidx.Extent, ps [][]byte, errs []error) {
	s.batches.Add(1)
	if s.onRead != nil {
		var n int64
		for _, p := range ps {
			n += int64(len(p))
		}
		s.onRead(n)
	}
	for i, e := range es {
		errs[i] = s.ReadCached(e, ps[i])
	}
}

// TestReadAheadReleasesWhatItDoesNotWrite: at full speed a batch reads
// all its pieces at once (BatchReader), before writing any. When it stops
// early (BatchTime runs out over a slow backing), the pieces it read but
// never wrote are released, not left registered: a later batch writes
// them, and the drain ends with the backing equal to the model.
func TestReadAheadReleasesWhatItDoesNotWrite(t *testing.T) {
	seed := testseed.Get(t)
	synctest.Test(t, func(t *testing.T) {
		src := &batchSource{fakeSource: newFakeSource(4096, 4096, 1<<30)}
		densely(src.fakeSource, seed, 3)
		mem := storage.NewMem(src.size())
		slow := storage.NewDelay(mem)
		slow.Set(storage.OpWrite, 20*time.Millisecond)
		f := New(src, slow, Config{Logger: quiet, MaxInFlight: 2, BatchTime: 100 * time.Millisecond})
		if err := f.Drain(context.Background(), nil); err != nil {
			t.Fatal(err)
		}
		src.check(t)
		checkImage(t, mem, src.fakeSource)
		st := f.Stats()
		t.Logf("%d batches, %d read in one call, %d releases, %d backing writes", st.Batches, src.batches.Load(), src.mu.releases, st.Writes)
		if src.batches.Load() == 0 {
			t.Error("no batch read its pieces at once")
		}
		if src.mu.releases == 0 {
			t.Error("no piece read ahead was released: no batch stopped early, the test proves nothing")
		}
	})
}

// denseBatchSource is a batchSource of blocks 4 KiB blocks, each written
// twice over on average.
func denseBatchSource(blocks int, seed uint64) *batchSource {
	src := &batchSource{fakeSource: newFakeSource(blocks, 4096, 1<<30)}
	densely(src.fakeSource, seed, 2)
	return src
}

// writingDev counts the writes under way on a device.
type writingDev struct {
	storage.Device
	n atomic.Int64
}

func (d *writingDev) WriteAt(p []byte, off int64, f storage.Flags) error {
	d.n.Add(1)
	defer d.n.Add(-1)
	return d.Device.WriteAt(p, off, f)
}

// TestReadAheadOverlapsWrites: a full-speed batch reads its next window
// while the window before is being written (issue 22: a window read
// before its writes took a third of the VM's drain), into an arena no job
// still writes from: the backing ends equal to the model.
func TestReadAheadOverlapsWrites(t *testing.T) {
	seed := testseed.Get(t)
	synctest.Test(t, func(t *testing.T) {
		src := denseBatchSource(2048, seed)
		slow := storage.NewDelay(storage.NewMem(src.size()))
		slow.Set(storage.OpWrite, time.Millisecond)
		dev := &writingDev{Device: slow}
		var reads, overlapped atomic.Int64
		src.onRead = func(int64) {
			reads.Add(1)
			if dev.n.Load() > 0 {
				overlapped.Add(1)
			}
		}
		f := New(src, dev, Config{Logger: quiet, MaxWrite: 64 << 10, BatchBytes: 1 << 20})
		if err := f.Drain(context.Background(), nil); err != nil {
			t.Fatal(err)
		}
		src.check(t)
		checkImage(t, dev, src.fakeSource)
		t.Logf("%d window reads, %d of them while writes were under way, %d batches", reads.Load(), overlapped.Load(), f.Stats().Batches)
		if overlapped.Load() == 0 {
			t.Error("no window was read while the one before was being written")
		}
	})
}

// TestReadAheadStopsOverDisk: once the flusher's own timed writes say the
// backing seeks, a WriteBack reads no further window ahead (found by
// review: the next window was read whatever the backing, so a GC
// cleaning pass over a disk held every window's pieces through its
// seeks). The window read when the timing turns may still be in flight.
func TestReadAheadStopsOverDisk(t *testing.T) {
	seed := testseed.Get(t)
	synctest.Test(t, func(t *testing.T) {
		src := denseBatchSource(4096, seed)
		slow := storage.NewDelay(storage.NewMem(src.size()))
		slow.Set(storage.OpWrite, 3*time.Millisecond) // a disk: over seekNanos
		var f *Flusher
		var afterDisk atomic.Int64
		src.onRead = func(int64) {
			if seeks, ok := f.TimedSeeks(); ok && seeks {
				afterDisk.Add(1)
			}
		}
		f = New(src, slow, Config{Logger: quiet, MaxWrite: 64 << 10, BatchBytes: 1 << 20})
		var es []btreeidx.Extent
		src.DirtyExtents(0, func(e btreeidx.Extent) bool { es = append(es, e); return true })
		if _, err := f.WriteBack(es, nil); err != nil {
			t.Fatal(err)
		}
		src.check(t)
		checkImage(t, slow, src.fakeSource)
		t.Logf("%d extents, %d window reads, %d begun after the backing was timed as a disk", len(es), src.batches.Load(), afterDisk.Load())
		if afterDisk.Load() > 1 {
			t.Errorf("%d windows read ahead after the backing was timed as a disk, want at most 1", afterDisk.Load())
		}
	})
}

// TestDrainCancelledWhileReadingAhead: a drain whose ctx ends inside a
// window's read, or inside a backing write while the next window is read,
// leaves nothing registered, and a second drain ends with the backing
// equal to the model.
func TestDrainCancelledWhileReadingAhead(t *testing.T) {
	seed := testseed.Get(t)
	for k := 1; k <= 6; k++ {
		for _, inWrite := range []bool{false, true} {
			t.Run(fmt.Sprintf("k=%d,in-write=%v", k, inWrite), func(t *testing.T) {
				synctest.Test(t, func(t *testing.T) {
					src := denseBatchSource(2048, seed+uint64(k))
					slow := storage.NewDelay(storage.NewMem(src.size()))
					slow.Set(storage.OpWrite, time.Millisecond)
					ctx, cancel := context.WithCancel(context.Background())
					defer cancel()
					if !inWrite {
						var reads atomic.Int64
						src.onRead = func(int64) {
							if reads.Add(1) == int64(k) {
								cancel()
								time.Sleep(5 * time.Millisecond) // the dispatcher sees ctx end first
							}
						}
					}
					dev := &cancelDev{Device: slow, at: int64(7 * k)}
					if inWrite {
						dev.cancel = cancel
					}
					f := New(src, dev, Config{Logger: quiet, MaxWrite: 64 << 10, BatchBytes: 1 << 20, MaxInFlight: 3})
					err := f.Drain(ctx, nil)
					t.Logf("first drain: %v after %d window reads", err, src.batches.Load())
					src.check(t)
					if err := f.Drain(context.Background(), nil); err != nil {
						t.Fatal(err)
					}
					src.check(t)
					checkImage(t, slow, src.fakeSource)
				})
			})
		}
	}
}

// cancelDev calls cancel at its at'th write, if cancel is set.
type cancelDev struct {
	storage.Device
	n      atomic.Int64
	at     int64
	cancel func()
}

func (d *cancelDev) WriteAt(p []byte, off int64, f storage.Flags) error {
	if d.cancel != nil && d.n.Add(1) == d.at {
		d.cancel()
	}
	return d.Device.WriteAt(p, off, f)
}

// TestFirstWindowIsSmall: nothing is written while a batch reads its
// first window, so the first is MaxWrite and the next ones grow, each read
// while the one before is written, up to a quarter of BatchBytes.
func TestFirstWindowIsSmall(t *testing.T) {
	seed := testseed.Get(t)
	synctest.Test(t, func(t *testing.T) {
		src := denseBatchSource(2048, seed)
		mem := storage.NewMem(src.size())
		const maxWrite, batch = 64 << 10, 1 << 20
		var mu sync.Mutex
		var sizes []int64
		src.onRead = func(n int64) {
			mu.Lock()
			sizes = append(sizes, n)
			mu.Unlock()
		}
		f := New(src, mem, Config{Logger: quiet, MaxWrite: maxWrite, BatchBytes: batch})
		if err := f.Drain(context.Background(), nil); err != nil {
			t.Fatal(err)
		}
		src.check(t)
		checkImage(t, mem, src.fakeSource)
		t.Logf("%d batches; window reads of %v bytes", f.Stats().Batches, sizes)
		if len(sizes) == 0 || sizes[0] > maxWrite {
			t.Fatalf("first window read %v bytes, want at most MaxWrite (%d)", sizes, maxWrite)
		}
		if top := slices.Max(sizes); top > batch/4 || top <= maxWrite {
			t.Errorf("largest window %d bytes, want more than MaxWrite (%d) and at most a quarter of BatchBytes (%d)", top, maxWrite, batch/4)
		}
	})
}
