package writeback

import (
	"errors"
	"fmt"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/nbdcache/nbdcache/btreeidx"
)

func TestDecide(t *testing.T) {
	cfg, err := Config{}.withDefaults() // target 10, low 5, high 70
	if err != nil {
		t.Fatal(err)
	}
	const c = 1000
	for _, tc := range []struct {
		s    situation
		want Mode
	}{
		{situation{dirty: 0, capacity: c, draining: true, idle: true, aged: true}, ModeStopped},
		{situation{dirty: 10, capacity: c, draining: true}, ModeDrain},
		{situation{dirty: 10, capacity: c, draining: true, shed: true}, ModeDrain},
		{situation{dirty: 10, capacity: c, shed: true, idle: true}, ModeShed},
		{situation{dirty: 800, capacity: c, shed: true}, ModeShed},
		{situation{dirty: 0, capacity: c, shed: true}, ModeStopped},
		{situation{dirty: 700, capacity: c}, ModeFull},
		{situation{dirty: 699, capacity: c}, ModeRate},
		{situation{dirty: 500, capacity: c}, ModeRate},
		{situation{dirty: 800, capacity: c, idle: true, aged: true}, ModeFull},
		{situation{dirty: 10, capacity: c, idle: true}, ModeIdle},
		{situation{dirty: 10, capacity: c, idle: true, aged: true}, ModeIdle},
		{situation{dirty: 10, capacity: c, aged: true}, ModeAge},
		{situation{dirty: 49, capacity: c}, ModeStopped},
		{situation{dirty: 50, capacity: c}, ModeRate},
		{situation{dirty: 100, capacity: c}, ModeRate},
		{situation{dirty: 10, capacity: 0}, ModeFull},                // no capacity: everything is over the mark
		{situation{dirty: 10, capacity: c, probe: true}, ModeProbe},  // below the low mark
		{situation{dirty: 500, capacity: c, probe: true}, ModeProbe}, // in the rate band
		{situation{dirty: 0, capacity: c, probe: true}, ModeStopped},
		{situation{dirty: 800, capacity: c, probe: true}, ModeFull},
		{situation{dirty: 10, capacity: c, idle: true, probe: true}, ModeIdle},
		{situation{dirty: 10, capacity: c, shed: true, probe: true}, ModeShed},
	} {
		if got := decide(tc.s, &cfg); got != tc.want {
			t.Errorf("decide(%+v) = %v, want %v", tc.s, got, tc.want)
		}
	}
	cfg.LowWatermark = -1
	if got := decide(situation{dirty: 1, capacity: c}, &cfg); got != ModeRate {
		t.Errorf("with the stop disabled, decide = %v, want rate", got)
	}
}

func TestControllerStep(t *testing.T) {
	cfg, _ := Config{PTermInverse: 10, ITermInverse: 100, MinRate: 1, MaxRate: 1000}.withDefaults()
	c := newController(&cfg)
	// Proportional only while the rate is not binding: no integral.
	if r := c.update(600, 100, 1, false); r != 50 || c.integral != 0 {
		t.Errorf("rate %v integral %v, want 50 and 0", r, c.integral)
	}
	// Binding: the integral accumulates error*dt.
	c.update(600, 100, 2, true)
	if c.integral != 1000 || c.rate != 50+10 {
		t.Errorf("integral %v rate %v, want 1000 and 60", c.integral, c.rate)
	}
	// Below target: the integral unwinds, but never below 0.
	c.update(0, 100, 5, false)
	if c.integral != 500 || c.rate != 1 { // -10 + 5 clamps to MinRate
		t.Errorf("integral %v rate %v, want 500 and 1", c.integral, c.rate)
	}
	c.update(0, 100, 100, false)
	if c.integral != 0 {
		t.Errorf("integral %v, want 0", c.integral)
	}
	// A huge error clamps to MaxRate.
	if r := c.update(1e9, 0, 1, false); r != 1000 {
		t.Errorf("rate %v, want MaxRate 1000", r)
	}
}

// TestControllerLoop closes the loop on the pure controller: a foreground
// rate W starts filling an empty cache. Linearised, the error obeys
// e” + e'/P + e/I = 0 from e = 0, e' = W when dirty crosses the target, so
// e(t) = W/(r1-r2) (exp(r1 t) - exp(r2 t)) with r1, r2 the roots of
// s² + s/P + 1/I: for the defaults (-0.005 and -0.02 per s) the error peaks
// at about 31.5 s * W after 92 s, then decays without ever crossing zero
// (overdamped). The test checks the peak against that, the absence of any
// undershoot (oscillation bound: 0.5% of target), and the settling.
func TestControllerLoop(t *testing.T) {
	cfg, _ := Config{}.withDefaults() // bcache's 40 s and 10000 s²
	c := newController(&cfg)
	const (
		target = 100 << 20
		w      = 2 << 20 // bytes/s
	)
	p, i := cfg.PTermInverse, cfg.ITermInverse
	disc := math.Sqrt(1/(p*p) - 4/i)
	r1, r2 := (-1/p+disc)/2, (-1/p-disc)/2
	tPeak := math.Log(r2/r1) / (r1 - r2)
	wantPeak := w / (r1 - r2) * (math.Exp(r1*tPeak) - math.Exp(r2*tPeak))

	dirty := float64(0)
	peak, under := 0.0, 0.0
	crossed := false
	for range 3000 {
		rate := c.update(int64(dirty), target, 1, true)
		dirty = max(dirty+w-rate, 0)
		e := dirty - target
		crossed = crossed || e > 0
		peak = max(peak, e)
		if crossed {
			under = min(under, e)
		}
	}
	t.Logf("peak error %.1f MiB (linear model %.1f MiB at %.0f s), worst undershoot %.3f MiB, final error %.3f MiB, rate %.3f MiB/s",
		peak/(1<<20), wantPeak/(1<<20), tPeak, under/(1<<20), (dirty-target)/(1<<20), c.rate/(1<<20))
	if math.Abs(peak-wantPeak) > 0.1*wantPeak {
		t.Errorf("peak error %.0f, linear model says %.0f", peak, wantPeak)
	}
	if under < -0.005*target {
		t.Errorf("undershoot %.0f bytes: the loop rings", under)
	}
	if e := math.Abs(dirty - target); e > 0.01*target {
		t.Errorf("after 3000 s dirty %.0f, target %d: error %.1f%%", dirty, target, 100*e/target)
	}
	if math.Abs(c.rate-w) > 0.01*w {
		t.Errorf("after 3000 s rate %.0f, want %d", c.rate, w)
	}
}

func TestLimiter(t *testing.T) {
	t0 := time.Unix(1000, 0)
	l := limiter{next: t0, lag: 100 * time.Millisecond, maxWait: time.Second}
	if d := l.delay(t0); d != 0 {
		t.Fatalf("first delay %v", d)
	}
	l.charge(1000, 2000) // 0.5 s at 2000 B/s
	if d := l.delay(t0); d != 500*time.Millisecond {
		t.Errorf("delay %v, want 500ms", d)
	}
	// A huge write: the wait is capped.
	l.charge(1e6, 2000)
	if d := l.delay(t0.Add(500 * time.Millisecond)); d != time.Second {
		t.Errorf("delay %v, want the 1s cap", d)
	}
	// Long quiet: no more than lag of catch-up.
	now := t0.Add(time.Hour)
	if d := l.delay(now); d != 0 || !l.next.Equal(now.Add(-100*time.Millisecond)) {
		t.Errorf("after an hour: delay %v next %v, want 0 and now-lag", l.delay(now), l.next.Sub(now))
	}
	l.charge(100, 1000) // 100 ms: uses up the lag
	if d := l.delay(now); d != 0 {
		t.Errorf("delay %v, want 0", d)
	}
	l.charge(100, 1000)
	if d := l.delay(now); d != 100*time.Millisecond {
		t.Errorf("delay %v, want 100ms", d)
	}
}

// sliceSource lists fixed extents; for plan tests.
type sliceSource []btreeidx.Extent

func (s sliceSource) DirtyExtents(from int64, fn func(btreeidx.Extent) bool) {
	for _, e := range s {
		if e.End() > from && !fn(e) {
			return
		}
	}
}
func (sliceSource) ReadCached(btreeidx.Extent, []byte) error { return nil }
func (sliceSource) MarkClean(btreeidx.Extent) (int64, int64) { return 0, 0 }
func (sliceSource) DirtyBytes() int64                        { return 0 }
func (sliceSource) CapacityBytes() int64                     { return 0 }

// ext makes a dirty extent; Loc = 10*Off so pieces show their Loc.
func ext(off, n int64, ver uint64) btreeidx.Extent {
	return btreeidx.Extent{Off: off, Len: n, Loc: 10 * off, Ver: ver, Dirty: true}
}

// spansString renders spans as "off+n[piece piece]" for comparison.
func spansString(spans []span) string {
	var b strings.Builder
	for _, s := range spans {
		fmt.Fprintf(&b, "%d+%d[", s.off, s.n)
		for i, e := range s.ext {
			if i > 0 {
				b.WriteByte(' ')
			}
			fmt.Fprintf(&b, "%d+%d@%d/v%d", e.Off, e.Len, e.Loc, e.Ver)
		}
		b.WriteString("] ")
	}
	return strings.TrimSpace(b.String())
}

func TestPlan(t *testing.T) {
	for _, tc := range []struct {
		name                string
		src                 sliceSource
		from, budget, maxWr int64
		want                string
		more                bool
	}{
		{
			name: "adjacent merge, gap splits",
			src:  sliceSource{ext(0, 512, 1), ext(512, 1024, 2), ext(2048, 512, 3)},
			from: 0, budget: 1 << 20, maxWr: 1 << 20,
			want: "0+1536[0+512@0/v1 512+1024@5120/v2] 2048+512[2048+512@20480/v3]",
		},
		{
			name: "long extent cut at MaxWrite, Loc moves with Off",
			src:  sliceSource{ext(0, 2560, 1)},
			from: 0, budget: 1 << 20, maxWr: 1024,
			want: "0+1024[0+1024@0/v1] 1024+1024[1024+1024@1024/v1] 2048+512[2048+512@2048/v1]",
		},
		{
			name: "an extent fills the span then starts the next",
			src:  sliceSource{ext(0, 512, 1), ext(512, 1024, 2)},
			from: 0, budget: 1 << 20, maxWr: 1024,
			want: "0+1024[0+512@0/v1 512+512@5120/v2] 1024+512[1024+512@5632/v2]",
		},
		{
			name: "clipped at from",
			src:  sliceSource{ext(0, 2048, 1), ext(2048, 512, 2)},
			from: 1024, budget: 1 << 20, maxWr: 1 << 20,
			want: "1024+1536[1024+1024@1024/v1 2048+512@20480/v2]",
		},
		{
			name: "budget stops mid-extent",
			src:  sliceSource{ext(0, 4096, 1), ext(8192, 512, 2)},
			from: 0, budget: 1024, maxWr: 512,
			want: "0+512[0+512@0/v1] 512+512[512+512@512/v1]", more: true,
		},
		{
			name: "budget reached exactly at the end",
			src:  sliceSource{ext(0, 1024, 1)},
			from: 0, budget: 1024, maxWr: 512,
			want: "0+512[0+512@0/v1] 512+512[512+512@512/v1]",
		},
		{
			name: "at least one piece whatever the budget",
			src:  sliceSource{ext(512, 4096, 1)},
			from: 0, budget: 1, maxWr: 1024,
			want: "512+1024[512+1024@5120/v1]", more: true,
		},
		{
			name: "overlap ends the plan",
			src:  sliceSource{ext(0, 1024, 1), ext(512, 1024, 2), ext(4096, 512, 3)},
			from: 0, budget: 1 << 20, maxWr: 1 << 20,
			want: "0+1024[0+1024@0/v1]", more: true,
		},
		{
			name: "clean and empty extents are skipped",
			src:  sliceSource{{Off: 0, Len: 512}, {Off: 512, Len: 0, Dirty: true}, ext(1024, 512, 4)},
			from: 0, budget: 1 << 20, maxWr: 1 << 20,
			want: "1024+512[1024+512@10240/v4]",
		},
		{name: "nothing", src: sliceSource{ext(0, 512, 1)}, from: 512, budget: 1, maxWr: 512, want: ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			spans, more := planRange(tc.src, nil, 0, tc.from, math.MaxInt64, tc.budget, tc.maxWr)
			if got := spansString(spans); got != tc.want || more != tc.more {
				t.Errorf("plan = %q, more %v\nwant   %q, more %v", got, more, tc.want, tc.more)
			}
		})
	}
}

func TestConfigValidate(t *testing.T) {
	if err := (Config{}).Validate(); err != nil {
		t.Fatalf("defaults: %v", err)
	}
	for _, c := range []Config{
		{TargetPercent: 101},
		{TargetPercent: 10, LowWatermark: 20},
		{TargetPercent: 30, HighWatermark: 20},
		{MaxInFlight: -1},
		{MaxWrite: 1000},
		{MaxWrite: 1 << 20, BatchBytes: 4096},
		{PTermInverse: -1},
		{MinRate: 10, MaxRate: 5},
		{RetryMin: time.Second, RetryMax: time.Millisecond},
	} {
		if err := c.Validate(); !errors.Is(err, ErrConfig) {
			t.Errorf("Validate(%+v) = %v, want ErrConfig", c, err)
		}
	}
}

// TestWriteTimesFirstStall: one stalled write among the first trustTimes
// does not make a fast backing a disk, wherever it falls (the average
// started from the first sample, and a 4 ms first write left it at
// 1.6 ms after 8); eight slow writes make one, and a disk's times stay a
// disk's when fast ones follow only a few.
func TestWriteTimesFirstStall(t *testing.T) {
	const fast, stall = 10 * time.Microsecond, 4 * time.Millisecond
	for at := range trustTimes {
		var f Flusher
		for i := range trustTimes {
			d := fast
			if i == at {
				d = stall
			}
			f.times.note(d)
		}
		if seeks, ok := f.TimedSeeks(); !ok || seeks {
			t.Errorf("a stall at write %d of %d: seeks %v, ok %v (average %d ns); want a fast verdict", at, trustTimes, seeks, ok, f.times.avg)
		}
	}
	var f Flusher
	for range trustTimes {
		f.times.note(2 * time.Millisecond)
	}
	f.times.note(fast)
	if seeks, ok := f.TimedSeeks(); !ok || !seeks {
		t.Errorf("8 writes of 2 ms and one fast: seeks %v, ok %v; want a disk", seeks, ok)
	}
}
