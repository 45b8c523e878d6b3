package writeback

import (
	"context"
	"math"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/nbdcache/nbdcache/btreeidx"
	"github.com/nbdcache/nbdcache/storage"
	"github.com/nbdcache/nbdcache/test/testseed"
)

// Controller tests in virtual time (testing/synctest): a foreground
// goroutine writes random blocks at a set rate and calls NoteForeground
// while active; the test samples Stats once per (virtual) second.

// foreground writes perTick random blocks of [lo, hi) every 100 ms, and
// calls NoteForeground each tick while active.
type foreground struct {
	src     *fakeSource
	f       *Flusher
	rng     *rand.Rand
	lo, hi  int
	perTick atomic.Int64
	active  atomic.Bool
	dirtied atomic.Int64 // bytes turned from clean to dirty
}

func (g *foreground) run(ctx context.Context, wg *sync.WaitGroup) {
	wg.Go(func() {
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
			n := int(g.perTick.Load())
			for range n {
				before := g.src.DirtyBytes()
				g.src.write(g.lo+g.rng.IntN(g.hi-g.lo), 1)
				g.dirtied.Add(g.src.DirtyBytes() - before)
			}
			if g.active.Load() {
				g.f.NoteForeground()
			}
			if n > 0 {
				g.f.Kick()
			}
		}
	})
}

// sim is one simulated system: fake cache, backing, flusher, foreground.
type sim struct {
	src    *fakeSource
	f      *Flusher
	fg     *foreground
	cancel context.CancelFunc
	wg     sync.WaitGroup
	runErr chan error
}

// startSim starts a simulation; it is stopped at the end of the test (or
// by stop), so that a t.Fatal inside the bubble leaves no goroutine behind.
func startSim(t *testing.T, seed uint64, blocks int, capacity int64, backing storage.Device, cfg Config, setup ...func(*fakeSource)) *sim {
	src := newFakeSource(blocks, 4096, capacity)
	for _, fn := range setup {
		fn(src)
	}
	cfg.Logger = quiet
	f := New(src, backing, cfg)
	ctx, cancel := context.WithCancel(context.Background())
	s := &sim{src: src, f: f, cancel: cancel, runErr: make(chan error, 1)}
	s.fg = &foreground{src: src, f: f, rng: newRand(seed), hi: blocks}
	s.fg.run(ctx, &s.wg)
	go func() { s.runErr <- f.Run(ctx) }()
	t.Cleanup(func() {
		if s.cancel != nil {
			s.cancel()
			s.wg.Wait()
			<-s.runErr
		}
	})
	return s
}

func (s *sim) stop(t *testing.T) {
	t.Helper()
	s.cancel()
	s.cancel = nil
	s.wg.Wait()
	if err := <-s.runErr; err != nil {
		t.Fatal(err)
	}
	s.src.check(t)
}

// transferOnly is a disk that costs only its transfer time: full speed is
// a known bandwidth, whatever the order.
func transferOnly(size, rate int64) storage.Device {
	return storage.NewSlow(nullDev{size}, storage.DiskModel{Name: "xfer", TransferRate: rate, FlushTime: time.Millisecond})
}

// TestRateConverges: a steady foreground write rate W, a backing that keeps
// up. The dirty level must settle at the target and the writeback rate at
// the rate data is dirtied, with bounded oscillation. The controller terms
// are faster than bcache's so that the run is 600 virtual seconds (linear
// model: time constants 40 s and 10 s, overdamped); -long also runs the
// defaults for 4000 s.
func TestRateConverges(t *testing.T) {
	seed := testseed.Get(t)
	type params struct {
		name   string
		p, i   float64
		run    time.Duration
		window int // seconds at the end that are checked
		long   bool
	}
	for _, pc := range []params{
		{name: "P8,I400", p: 8, i: 400, run: 600 * time.Second, window: 200},
		{name: "defaults", p: 40, i: 10000, run: 4000 * time.Second, window: 1000, long: true},
	} {
		t.Run(pc.name, func(t *testing.T) {
			if pc.long && !*longFlag {
				t.Skip("needs -long")
			}
			synctest.Test(t, func(t *testing.T) {
				const (
					blocks   = 1 << 18 // a 1 GiB device
					capacity = 256 << 20
					perTick  = 50 // 500 blocks/s: 2 MB/s
				)
				target := float64(capacity) * 0.10
				s := startSim(t, seed, blocks, capacity, nullDev{blocks * 4096}, Config{
					PTermInverse: pc.p, ITermInverse: pc.i, MaxDirtyAge: -1,
				})
				s.fg.active.Store(true)
				s.fg.perTick.Store(perTick)

				var dirty, rate []float64
				var dirtiedAt, writtenAt int64
				steps := int(pc.run / time.Second)
				for sec := range steps {
					time.Sleep(time.Second)
					st := s.f.Stats()
					if sec == steps-pc.window {
						dirtiedAt, writtenAt = s.fg.dirtied.Load(), st.Cleaned
					}
					if sec >= steps-pc.window {
						dirty = append(dirty, float64(s.src.DirtyBytes()-st.Pending))
						rate = append(rate, float64(st.Rate))
					}
					if st.Mode.FullSpeed() {
						t.Fatalf("at %d s mode %v: the test is about the controller", sec, st.Mode)
					}
				}
				inflow := float64(s.fg.dirtied.Load()-dirtiedAt) / float64(pc.window)
				outflow := float64(s.f.Stats().Cleaned-writtenAt) / float64(pc.window)
				s.stop(t)

				dLo, dHi, dMean := stats(dirty)
				rLo, rHi, rMean := stats(rate)
				t.Logf("last %d s: dirty %.2f..%.2f MiB (mean %.2f, target %.2f); controller rate %.0f..%.0f KiB/s (mean %.0f); dirtied %.0f KiB/s, cleaned %.0f KiB/s",
					pc.window, dLo/(1<<20), dHi/(1<<20), dMean/(1<<20), target/(1<<20), rLo/1024, rHi/1024, rMean/1024, inflow/1024, outflow/1024)
				// Converged: the mean dirty level is at the target, and
				// data leaves as fast as it comes.
				if math.Abs(dMean-target) > 0.02*target {
					t.Errorf("mean dirty %.0f, target %.0f: off by more than 2%%", dMean, target)
				}
				if math.Abs(outflow-inflow) > 0.02*inflow {
					t.Errorf("cleaned %.0f B/s, dirtied %.0f B/s: not balanced", outflow, inflow)
				}
				if math.Abs(rMean-inflow) > 0.05*inflow {
					t.Errorf("mean controller rate %.0f B/s, inflow %.0f B/s", rMean, inflow)
				}
				// Oscillation bound: dirty not yet written back within ±4%
				// of target and the controller's rate within ±5% of the
				// inflow, every second of the window (seen: ±1%).
				if dLo < 0.96*target || dHi > 1.04*target {
					t.Errorf("dirty swings %.0f..%.0f around target %.0f: more than ±4%%", dLo, dHi, target)
				}
				if rLo < 0.95*inflow || rHi > 1.05*inflow {
					t.Errorf("rate swings %.0f..%.0f around %.0f: more than ±5%%", rLo, rHi, inflow)
				}
			})
		})
	}
}

func stats(xs []float64) (lo, hi, mean float64) {
	lo, hi = math.Inf(1), math.Inf(-1)
	for _, x := range xs {
		lo, hi, mean = min(lo, x), max(hi, x), mean+x
	}
	return lo, hi, mean / float64(len(xs))
}

// TestIdleFastPath: when the foreground goes quiet for IdleAfter, writeback
// runs at full speed; when a request comes, it drops back to the
// controller's rate at once; quiet again, it finishes the job.
func TestIdleFastPath(t *testing.T) {
	seed := testseed.Get(t)
	synctest.Test(t, func(t *testing.T) {
		const (
			blocks   = 8192 // 32 MiB
			capacity = 128 << 20
			diskRate = 4 << 20 // full speed: 4 MiB/s
		)
		s := startSim(t, seed, blocks, capacity, transferOnly(blocks*4096, diskRate), Config{MaxDirtyAge: -1})
		s.fg.active.Store(true)
		s.fg.perTick.Store(50) // 2 MB/s for 10 s
		time.Sleep(10 * time.Second)
		st := s.f.Stats()
		if st.Mode != ModeRate {
			t.Fatalf("busy with %d MiB dirty: mode %v, want rate", s.src.DirtyBytes()>>20, st.Mode)
		}
		busyRate := float64(st.Rate)

		// Quiet: no writes, no requests.
		s.fg.perTick.Store(0)
		s.fg.active.Store(false)
		time.Sleep(1200 * time.Millisecond)
		if m := s.f.Stats().Mode; m != ModeIdle {
			t.Fatalf("1.2 s after the last request mode %v, want idle", m)
		}
		c0 := s.f.Stats().Cleaned
		time.Sleep(time.Second)
		idleRate := float64(s.f.Stats().Cleaned - c0)

		// A request: back to the rate.
		s.fg.active.Store(true)
		time.Sleep(200 * time.Millisecond)
		st = s.f.Stats()
		if st.Mode != ModeRate {
			t.Fatalf("200 ms after a request mode %v, want rate", st.Mode)
		}
		c0 = st.Cleaned
		time.Sleep(5 * time.Second)
		st = s.f.Stats()
		busyAgain := float64(st.Cleaned-c0) / 5
		t.Logf("controller rate %.0f KiB/s; idle cleaned %.0f KiB/s; busy again cleaned %.0f KiB/s (controller %d KiB/s)",
			busyRate/1024, idleRate/1024, busyAgain/1024, st.Rate/1024)
		if idleRate < 0.8*diskRate {
			t.Errorf("idle writeback %.0f B/s, want near the disk's %d", idleRate, diskRate)
		}
		// Back at the rate: at most the controller's rate plus the one
		// full-speed batch that was under way when the request came.
		if limit := 2*float64(st.Rate) + float64(s.f.cfg.BatchBytes)/5; busyAgain > limit {
			t.Errorf("after the request writeback %.0f B/s, want at most %.0f", busyAgain, limit)
		}

		// Quiet again: everything is written back, then the flusher stops.
		s.fg.active.Store(false)
		time.Sleep(30 * time.Second)
		if d, m := s.src.DirtyBytes(), s.f.Stats().Mode; d != 0 || m != ModeStopped {
			t.Errorf("after 30 s idle: %d dirty, mode %v", d, m)
		}
		s.stop(t)
	})
}

// TestWatermarks: at or above the high watermark, full speed; between the
// watermarks, the rate; below the low one, nothing at all is written.
func TestWatermarks(t *testing.T) {
	seed := testseed.Get(t)
	synctest.Test(t, func(t *testing.T) {
		const (
			blocks   = 8192 // 32 MiB
			capacity = 16 << 20
		)
		// Target 10% (1.6 MiB), low 5% (0.8 MiB), high 50% (8 MiB).
		dev := &recDev{inner: transferOnly(blocks*4096, 4<<20)}
		s := startSim(t, seed, blocks, capacity, dev, Config{MaxDirtyAge: -1, HighWatermark: 50})
		s.fg.active.Store(true)

		// Below the low watermark: 0.5 MiB dirty, 20 s, no write.
		for b := range 128 {
			s.src.write(b*8, 1)
		}
		s.f.Kick()
		time.Sleep(20 * time.Second)
		if n, m := len(dev.writes()), s.f.Stats().Mode; n != 0 || m != ModeStopped {
			t.Fatalf("below the low watermark: %d backing writes, mode %v", n, m)
		}

		// Above the high watermark: full speed while there.
		s.fg.perTick.Store(250) // 10 MB/s, faster than the disk
		var modes []Mode
		for range 40 {
			time.Sleep(250 * time.Millisecond)
			modes = append(modes, s.f.Stats().Mode)
			if s.src.DirtyBytes() >= 9<<20 {
				s.fg.perTick.Store(0)
			}
		}
		// Now falling through 8 MiB at full speed, then rate-limited.
		sawFull, sawRateAfter := false, false
		for _, m := range modes {
			sawFull = sawFull || m == ModeFull
			sawRateAfter = sawRateAfter || (sawFull && m == ModeRate)
			if m == ModeIdle {
				t.Errorf("mode idle while the foreground is active")
			}
		}
		d := s.src.DirtyBytes()
		t.Logf("modes every 250 ms: %v; dirty now %d KiB", modes, d>>10)
		if !sawFull || !sawRateAfter {
			t.Errorf("want full above the high watermark, then rate below it")
		}
		if d >= 8<<20 || d < 4<<20 {
			t.Errorf("dirty %d: want it just below the high watermark, held there by the rate", d)
		}
		s.stop(t)
	})
}

// TestMaxDirtyAge: dirty data under the low watermark, a busy foreground:
// nothing is written until the data is MaxDirtyAge old, then all of it.
func TestMaxDirtyAge(t *testing.T) {
	seed := testseed.Get(t)
	synctest.Test(t, func(t *testing.T) {
		const blocks = 8192
		dev := &recDev{inner: transferOnly(blocks*4096, 4<<20)}
		s := startSim(t, seed, blocks, 1<<30, dev, Config{MaxDirtyAge: 10 * time.Second})
		s.fg.active.Store(true)
		time.Sleep(3 * time.Second) // the last pass started long ago; nothing dirty yet
		start := time.Now()
		for b := range 64 {
			s.src.write(b*16, 1)
		}
		s.f.Kick()
		var cleanAt time.Duration
		for cleanAt == 0 {
			time.Sleep(100 * time.Millisecond)
			if len(dev.writes()) > 0 && cleanAt == 0 && time.Since(start) < 9*time.Second {
				t.Fatalf("written back after %v, before the age limit", time.Since(start))
			}
			if s.src.DirtyBytes() == 0 {
				cleanAt = time.Since(start)
			}
			if time.Since(start) > time.Minute {
				t.Fatal("never written back")
			}
		}
		t.Logf("64 dirty blocks under the low watermark written back after %v", cleanAt)
		if cleanAt < 9*time.Second || cleanAt > 12*time.Second {
			t.Errorf("written back after %v, want about MaxDirtyAge 10s (within one controller interval before, one pass after)", cleanAt)
		}
		if m := s.f.Stats().Mode; m != ModeStopped {
			t.Errorf("mode %v after the age pass, want stopped", m)
		}
		s.stop(t)
	})
}

// TestRateModeMergesUnderOverwrites: in rate mode the pace makes a span
// wait, and clients overwrite its extents meanwhile (here each block about
// every 0.2 s). A span is planned again just before it is issued, so the
// newer versions take the place of the stale ones and the backing still
// sees long writes; planned once at the start of the batch, the stale
// pieces cut the spans into runs of a few blocks.
func TestRateModeMergesUnderOverwrites(t *testing.T) {
	seed := testseed.Get(t)
	synctest.Test(t, func(t *testing.T) {
		const blocks = 4096 // 16 MiB, all dirty: 25% of the capacity
		dev := &recDev{inner: transferOnly(blocks*4096, 64<<20)}
		// As in the cache, reading a piece that a newer write replaced
		// fails with ErrStale.
		staleReads := func(src *fakeSource) {
			src.readErr = func(e btreeidx.Extent) error {
				src.mu.Lock()
				defer src.mu.Unlock()
				for b := e.Off / src.bs; b < (e.End()+src.bs-1)/src.bs; b++ {
					if src.mu.ver[b] != e.Ver {
						return ErrStale
					}
				}
				return nil
			}
		}
		s := startSim(t, seed, blocks, 64<<20, dev, Config{PTermInverse: 4, MaxDirtyAge: -1}, staleReads)
		for b := range blocks {
			s.src.write(b, 1)
		}
		s.fg.active.Store(true)
		s.fg.perTick.Store(2000) // 20k random block writes a second
		time.Sleep(20 * time.Second)
		st := s.f.Stats()
		s.stop(t)
		t.Logf("mode %v, rate %d KiB/s: %d backing writes, average %d KiB, %d collisions",
			st.Mode, st.Rate>>10, st.Writes, st.AvgWrite>>10, st.Collisions)
		if st.Mode != ModeRate || st.Writes == 0 {
			t.Fatalf("mode %v with %d writes: the test does not exercise rate mode", st.Mode, st.Writes)
		}
		if st.AvgWrite < 256<<10 {
			t.Errorf("average backing write %d KiB in rate mode under overwrites: spans were cut by stale pieces", st.AvgWrite>>10)
		}
	})
}
