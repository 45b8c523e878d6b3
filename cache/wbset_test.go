package cache

import (
	"testing"

	"github.com/nbdcache/nbdcache/test/testseed"
)

// TestWBSet checks wbSet's lookups against a scan of a plain list, over
// random sets of disjoint ranges (what the cache registers) and random
// queries.
func TestWBSet(t *testing.T) {
	r := rng(testseed.Get(t))
	for round := range 200 {
		s := newWBSet()
		var list []inflightWB
		for range r.IntN(40) {
			off := r.Int64N(1000)
			w := inflightWB{off: off, end: off + 1 + r.Int64N(40), ver: r.Uint64N(3)}
			disjoint := true
			for _, x := range list {
				if x.off < w.end && w.off < x.end {
					disjoint = false
				}
			}
			if disjoint {
				s.add(w)
				list = append(list, w)
			}
		}
		if len(list) > 0 && r.IntN(2) == 0 { // remove one
			i := r.IntN(len(list))
			if !s.remove(list[i]) {
				t.Fatalf("round %d: remove %v: not found", round, list[i])
			}
			list = append(list[:i], list[i+1:]...)
		}
		if s.len() != len(list) {
			t.Fatalf("round %d: len %d, want %d", round, s.len(), len(list))
		}
		for range 100 {
			off, n := r.Int64N(1100)-50, r.Int64N(60)
			var want []inflightWB
			for _, x := range list {
				if n > 0 && x.off < off+n && off < x.end {
					want = append(want, x)
				}
			}
			if got := s.overlaps(off, n); got != (len(want) > 0) {
				t.Fatalf("round %d: overlaps(%d, %d) = %v, want %v (set %v)", round, off, n, got, !got, list)
			}
			if lo, hi, free := s.gap(off); off < 0 {
				// offsets are never negative
			} else if free != !s.overlaps(off, 1) {
				t.Fatalf("round %d: gap(%d) free %v, overlaps %v", round, off, free, s.overlaps(off, 1))
			} else if free && (lo > off || hi <= off || s.overlaps(lo, hi-lo) ||
				lo > 0 && !s.overlaps(lo-1, 1) || hi < 1<<63-1 && !s.overlaps(hi, 1)) {
				t.Fatalf("round %d: gap(%d) = [%d, %d): not the free range around it (set %v)", round, off, lo, hi, list)
			}
			var got []inflightWB
			s.each(off, n, func(w inflightWB) { got = append(got, w) })
			if len(got) != len(want) {
				t.Fatalf("round %d: each(%d, %d) gave %v, want %v", round, off, n, got, want)
			}
			for i := 1; i < len(got); i++ {
				if got[i].off <= got[i-1].off {
					t.Fatalf("round %d: each(%d, %d) not ascending: %v", round, off, n, got)
				}
			}
		}
	}
}
