package cache

import (
	"testing"

	"github.com/nbdcache/nbdcache/test/testseed"
)

// TestGoneSet checks goneSet against a list of the records it was given:
// pending must be true whenever a record newer than synced overlaps the
// range (it may be true more often: by page and by region), and false
// when no record is newer than synced at all.
func TestGoneSet(t *testing.T) {
	r := rng(testseed.Get(t))
	type rec struct {
		off, n int64
		seq    uint64
	}
	for round := range 300 {
		var g goneSet
		var recs []rec
		seq, synced := uint64(0), uint64(0)
		for range 200 {
			switch r.IntN(4) {
			case 0, 1:
				seq++
				n := 512 * (1 + r.Int64N(16))
				if r.IntN(8) == 0 {
					n = 512 << 10 * (1 + r.Int64N(4)) // coarse
				}
				off := r.Int64N(64<<20/512) * 512
				g.add(off, n, seq)
				recs = append(recs, rec{off, n, seq})
			case 2:
				seq++ // a record that removed no clean data
				if r.IntN(3) == 0 {
					synced = seq - uint64(r.IntN(3))
				}
			default:
				off, n := r.Int64N(64<<20/512)*512, 512*(1+r.Int64N(4096))
				want := false
				for _, x := range recs {
					if x.seq > synced && x.off < off+n && off < x.off+x.n {
						want = true
					}
				}
				got := g.pending(off, n, synced)
				if want && !got {
					t.Fatalf("round %d: pending(%d, %d, synced %d) = false, but a record newer lies there (%v)", round, off, n, synced, recs)
				}
				newer := false
				for _, x := range recs {
					newer = newer || x.seq > synced
				}
				if got && !newer {
					t.Fatalf("round %d: pending(%d, %d, synced %d) = true with every record durable", round, off, n, synced)
				}
			}
		}
	}
}
