package cache

import (
	"bytes"
	"testing"

	"github.com/nbdcache/nbdcache/test/testseed"
)

// TestGCNeverMovesClean: a tiny cache (16 buckets) under a working set
// eight times its size, so that every write lands on a full cache, with
// reads promoting clean data among the dirty, the flusher and GC running,
// and moves forced (GCMove, and GCStep from the test). Every time GC is
// about to move a range, the test looks the range up in the index itself:
// all of it must be dirty. Reads check the data throughout; Verify and
// the deep check end it.
func TestGCNeverMovesClean(t *testing.T) {
	for _, move := range []bool{true, false} {
		t.Run(map[bool]string{true: "move", false: "clean"}[move], func(t *testing.T) {
			const size = 8 << 20
			d := formatMem(t, 1<<20+256<<10, size, FormatOptions{BucketSize: 64 << 10, JournalSize: 64 << 10})
			var c *Cache
			var cleanMoved, moves int64
			onMove := func(off, n int64) { // mu held
				moves++
				c.mu.idx.Lookup(off, n, func(e btreeExtent) bool {
					if !e.Dirty {
						cleanMoved += e.Len
					}
					return true
				})
			}
			c = openT(t, d, Options{GCMove: move, PromoteAll: true, testOnMove: onMove})
			r := rng(testseed.Get(t))
			model := make([]byte, size)
			id := uint64(0)
			for i := range 6000 {
				off := r.Int64N(size/4096-4) * 4096
				n := 4096 * (1 + r.Int64N(4))
				switch x := r.IntN(10); {
				case x < 6:
					id++
					p := payload(off, n, id)
					if err := c.WriteAt(p, off, 0); err != nil {
						t.Fatal(err)
					}
					copy(model[off:], p)
				case x < 9:
					got := make([]byte, n)
					if err := c.ReadAt(got, off); err != nil {
						t.Fatal(err)
					}
					if !bytes.Equal(got, model[off:off+n]) {
						t.Fatalf("op %d: read [%d+%d) differs from what was written", i, off, n)
					}
				default:
					c.GCStep(r.IntN(2) == 0)
				}
			}
			c.mu.Lock()
			bad, nm := cleanMoved, moves
			c.mu.Unlock()
			st := c.Stats()
			t.Logf("moves %d (%d bytes), GC cleaned %d bytes, evicted %d, promoted %d, bypasses %d",
				nm, st.GCMovedBytes, st.GCCleanedBytes, st.EvictedBytes, st.PromotedBytes, st.Bypasses)
			if bad > 0 {
				t.Errorf("GC moved %d bytes of clean data", bad)
			}
			if nm == 0 || st.PromotedBytes == 0 || st.EvictedBytes == 0 {
				t.Errorf("the test did not exercise GC: %d moves, %d bytes promoted, %d evicted", nm, st.PromotedBytes, st.EvictedBytes)
			}
			closeChecked(t, c, d)
		})
	}
}
