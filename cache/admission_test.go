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

// TestThrashDetector: a window of writes mostly missing starts thrashing
// only after GC's turnover; it holds while windows keep missing, ends
// after thrashWindows of them or at once when a window hits again, and a
// new start needs a new turnover.
func TestThrashDetector(t *testing.T) {
	const window, turnover = 10, 100
	var d thrashDetector
	feed := func(hits int, cleaned int64) bool { // one window
		var on bool
		for i := range window {
			on = d.note(i < hits, cleaned, turnover, window)
		}
		return on
	}
	if feed(0, 99) {
		t.Fatal("thrashing with less than a turnover cleaned")
	}
	if feed(9, 1000) {
		t.Fatal("thrashing on a window of 90% hits")
	}
	if !feed(2, 1000) {
		t.Fatal("not thrashing on a window of 20% hits after a turnover")
	}
	for w := 1; w < thrashWindows; w++ {
		if !feed(2, 1000) {
			t.Fatalf("thrashing ended after %d missing windows, before thrashWindows", w)
		}
	}
	if feed(2, 1000) {
		t.Fatalf("still thrashing after thrashWindows windows")
	}
	if feed(0, 1050) {
		t.Fatal("thrashing again with only 50 cleaned since it ended")
	}
	if !feed(0, 1100) {
		t.Fatal("not thrashing after a new turnover")
	}
	if feed(8, 1100) {
		t.Fatal("still thrashing after a window of 80% hits")
	}
}
