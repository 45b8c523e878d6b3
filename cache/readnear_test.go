package cache

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"sync/atomic"
	"testing"

	"github.com/nbdcache/nbdcache/btreeidx"
	"github.com/nbdcache/nbdcache/storage"
	"github.com/nbdcache/nbdcache/test/testseed"
)

// countReads counts the reads of the device it wraps.
type countReads struct {
	storage.Device
	n atomic.Int64
}

func (d *countReads) ReadAt(p []byte, off int64) error {
	d.n.Add(1)
	return d.Device.ReadAt(p, off)
}

// TestReadCachedBatchReadsNearPiecesTogether: the pieces a writeback reads
// lie scattered through the cache's log, with stale data between them
// (overwritten blocks). ReadCachedBatch reads those near each other in
// one read, hands each piece its own bytes, fails only the piece whose
// own bytes cannot be read, and reads around an error in a gap piece by
// piece.
func TestReadCachedBatchReadsNearPiecesTogether(t *testing.T) {
	seed := testseed.Get(t)
	rng := rand.New(rand.NewPCG(seed, 1))
	counted := &countReads{Device: storage.NewMem(8 << 20)}
	faulty := storage.NewFaulty(counted, seed)
	d := devPair{faulty, storage.NewMem(16 << 20)}
	if err := Format(d.cache, d.back, FormatOptions{BackingID: testBackingID, BucketSize: 256 << 10, JournalSize: 64 * metaBlock}); err != nil {
		t.Fatal(err)
	}
	c := openStillT(t, d, Options{SequentialCutoff: -1})
	defer c.Close()
	const blocks = 64
	want := map[int64][]byte{}
	order := rng.Perm(blocks)
	var stale []int64 // cache locations of overwritten data
	for k, i := range order {
		off := int64(i) * 64 << 10
		p := payload(off, 4096, uint64(k+1))
		if err := c.WriteAt(p, off, 0); err != nil {
			t.Fatal(err)
		}
		want[off] = p
		if k%4 == 3 { // every fourth block again: its first copy is stale
			old := dirtyOf(c)[off].Loc
			p = payload(off, 4096, uint64(1000+k))
			if err := c.WriteAt(p, off, 0); err != nil {
				t.Fatal(err)
			}
			want[off] = p
			stale = append(stale, old)
		}
	}
	read := func() ([]btreeidx.Extent, [][]byte, []error, int64) {
		var es []btreeidx.Extent
		for _, e := range dirtyOf(c) {
			es = append(es, e)
		}
		ps := make([][]byte, len(es))
		for i, e := range es {
			ps[i] = make([]byte, e.Len)
		}
		errs := make([]error, len(es))
		n0 := counted.n.Load()
		c.ReadCachedBatch(es, ps, errs)
		reads := counted.n.Load() - n0
		for i, e := range es {
			if errs[i] == nil {
				c.ReleaseCached(e)
			}
		}
		return es, ps, errs, reads
	}

	es, ps, errs, reads := read()
	for i, e := range es {
		if errs[i] != nil || !bytes.Equal(ps[i], want[e.Off]) {
			t.Fatalf("piece %v: err %v, bytes right %v", e, errs[i], bytes.Equal(ps[i], want[e.Off]))
		}
	}
	t.Logf("%d pieces in %d reads", len(es), reads)
	if len(es) != blocks || reads > int64(len(es))/4 {
		t.Fatalf("%d pieces in %d reads: want %d pieces, read together", len(es), reads, blocks)
	}

	// An error in a gap: the coalesced read fails, and each piece is
	// read on its own.
	faulty.SetFaults(storage.Fault{Ops: storage.OpRead, Off: stale[len(stale)/2], Length: 4096})
	es, ps, errs, reads = read()
	for i, e := range es {
		if errs[i] != nil || !bytes.Equal(ps[i], want[e.Off]) {
			t.Fatalf("with an error in a gap, piece %v: err %v", e, errs[i])
		}
	}
	t.Logf("an error in a gap: %d pieces in %d reads", len(es), reads)

	// An error in a piece fails that piece alone.
	var victim btreeidx.Extent
	for _, e := range dirtyOf(c) {
		victim = e
		break
	}
	faulty.SetFaults(storage.Fault{Ops: storage.OpRead, Off: victim.Loc, Length: 4096})
	es, ps, errs, _ = read()
	for i, e := range es {
		switch {
		case e.Off == victim.Off && !errors.Is(errs[i], storage.ErrInjected):
			t.Fatalf("piece %v over the error: err %v", e, errs[i])
		case e.Off != victim.Off && (errs[i] != nil || !bytes.Equal(ps[i], want[e.Off])):
			t.Fatalf("piece %v beside the error: err %v", e, errs[i])
		}
	}
	faulty.Clear()
	if err := c.Drain(t.Context(), nil); err != nil {
		t.Fatal(err)
	}
	for off, p := range want {
		got := make([]byte, len(p))
		if err := d.back.ReadAt(got, off); err != nil || !bytes.Equal(got, p) {
			t.Fatalf("backing at %d after the drain: err %v, bytes right %v", off, err, bytes.Equal(got, p))
		}
	}
}

// dirtyOf is the cache's dirty extents by offset.
func dirtyOf(c *Cache) map[int64]btreeidx.Extent {
	m := map[int64]btreeidx.Extent{}
	c.DirtyExtents(0, func(e btreeidx.Extent) bool {
		m[e.Off] = e
		return true
	})
	return m
}
