package cache

import "testing"

// TestWriteRoute pins the write decision for every mode, and that the
// write path may skip the pin lookup only where the answer does not
// depend on it.
func TestWriteRoute(t *testing.T) {
	want := map[Mode][2]route{ // [not a stream, a stream], unpinned
		Writeback:    {routeDirty, routeBacking},
		Writethrough: {routeThrough, routeBacking},
		Writearound:  {routeBacking, routeBacking},
		None:         {routeBacking, routeBacking},
	}
	for mode, w := range want {
		for i, seq := range []bool{false, true} {
			if got := writeRoute(mode, seq, false); got != w[i] {
				t.Errorf("%v, stream %v: route %d, want %d", mode, seq, got, w[i])
			}
			if got := writeRoute(mode, seq, true); got != routeDirty {
				t.Errorf("%v, stream %v, pinned: route %d, want the cache (pinned data is never bypassed)", mode, seq, got)
			}
			if !routeNeedsPin(mode, seq) && writeRoute(mode, seq, false) != writeRoute(mode, seq, true) {
				t.Errorf("%v, stream %v: the pin lookup is skipped but decides the route", mode, seq)
			}
		}
	}
}

// TestSequentialDetector: a stream is recognised once it passes the
// cutoff, survives other requests in between, and is forgotten when 16
// newer streams push it out.
func TestSequentialDetector(t *testing.T) {
	a := newAdmitter(Options{SequentialCutoff: 64 << 10})
	for i := range int64(16) {
		if seq := a.sequential(i*4096, 4096); seq {
			t.Fatalf("request %d of a stream reported sequential at %d KiB", i, (i+1)*4)
		}
		a.sequential(1<<30+i*(1<<20), 4096) // another client's random reads
	}
	if !a.sequential(16*4096, 4096) {
		t.Fatal("a stream past the cutoff is not reported")
	}
	for i := range int64(16) {
		a.sequential(2<<30+i*(1<<20), 4096)
	}
	if a.sequential(17*4096, 4096) {
		t.Fatal("a stream pushed out by 16 newer ones is still reported")
	}
	if off := newAdmitter(Options{SequentialCutoff: -1}); off.sequential(0, 1<<30) {
		t.Fatal("a negative cutoff does not turn detection off")
	}
}

// TestThrashing: the detector starts only when free buckets are short and
// GC has cleaned a turnover's worth since it last ended, holds until the
// free buckets reach high, and then needs a new turnover to start again.
func TestThrashing(t *testing.T) {
	const low, high, turnover = 4, 16, 100
	var a admitter
	steps := []struct {
		free    int
		cleaned int64
		want    bool
		why     string
	}{
		{2, 0, false, "short of buckets, but GC cleaned nothing: the working set fits"},
		{20, 99, false, "plenty of buckets"},
		{3, 99, false, "short, but less than a turnover cleaned"},
		{3, 100, true, "short, and a turnover cleaned"},
		{10, 100, true, "between low and high: it holds"},
		{15, 150, true, "just below high: it holds"},
		{16, 160, false, "high reached"},
		{3, 200, false, "short again, but only 40 cleaned since it ended"},
		{3, 260, true, "a turnover since it ended"},
	}
	for i, s := range steps {
		if got := a.thrashing(s.free, low, high, s.cleaned, turnover); got != s.want {
			t.Fatalf("step %d (free %d, cleaned %d): thrashing %v, want %v: %s", i, s.free, s.cleaned, got, s.want, s.why)
		}
	}
}
