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

// countReads counts the reads of the device it wraps, and their bytes.
type countReads struct {
	storage.Device
	n, bytes atomic.Int64
}

func (d *countReads) ReadAt(p []byte, off int64) error {
	d.n.Add(1)
	d.bytes.Add(int64(len(p)))
	return d.Device.ReadAt(p, off)
}

// TestReadCachedBatchReadsNearPiecesTogether: the pieces a writeback reads
// lie in the cache's log in the order they were written, not in the
// backing's. ReadCachedBatch reads those that touch there in one read
// (64 pieces written one after another: a few reads), reads around stale
// data between them (overwritten blocks), hands each piece its own
// bytes, and fails only the piece whose own bytes cannot be read.
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
	for k, i := range rng.Perm(blocks) {
		off := int64(i) * 64 << 10
		want[off] = payload(off, 4096, uint64(k+1))
		if err := c.WriteAt(want[off], off, 0); err != nil {
			t.Fatal(err)
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
	check := func(what string) int64 {
		es, ps, errs, reads := read()
		for i, e := range es {
			if errs[i] != nil || !bytes.Equal(ps[i], want[e.Off]) {
				t.Fatalf("%s: piece %v: err %v, bytes right %v", what, e, errs[i], bytes.Equal(ps[i], want[e.Off]))
			}
		}
		t.Logf("%s: %d pieces in %d reads", what, len(es), reads)
		if len(es) != blocks {
			t.Fatalf("%s: %d pieces, want %d", what, len(es), blocks)
		}
		return reads
	}
	if reads := check("written one after another"); reads > 4 {
		t.Fatalf("%d reads for pieces that touch: not read together", reads)
	}
	// Every fourth block again: its first copy is stale, between pieces.
	for i := 0; i < blocks; i += 4 {
		off := int64(i) * 64 << 10
		want[off] = payload(off, 4096, uint64(1000+i))
		if err := c.WriteAt(want[off], off, 0); err != nil {
			t.Fatal(err)
		}
	}
	check("with stale copies between them")

	// An error in a piece fails that piece alone: the read it shared is
	// done again piece by piece.
	var victim btreeidx.Extent // one that shares its read with the next
	locs := map[int64]bool{}
	for _, e := range dirtyOf(c) {
		locs[e.Loc] = true
	}
	for _, e := range dirtyOf(c) {
		if locs[e.Loc+e.Len] {
			victim = e
			break
		}
	}
	if victim.Len == 0 {
		t.Fatal("no two pieces touch")
	}
	faulty.SetFaults(storage.Fault{Ops: storage.OpRead, Off: victim.Loc, Length: 4096})
	es, ps, errs, _ := read()
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
