package cache

// space.go: the cache device's buckets: their states and counts, the free
// and pending lists, and the two allocators that fill them.

import (
	"sync"
	"sync/atomic"
)

// Bucket states.
const (
	bFree    uint8 = iota // empty, reusable
	bOpen                 // being filled by an allocator
	bFull                 // sealed; holds extents
	bPending              // emptied; reusable once a checkpoint is durable
)

type bucket struct {
	gen      uint8  // on-disk generation, in extents and checkpoints
	state    uint8  // bFree...
	inflight int32  // allocations whose extent is not inserted yet
	epoch    uint64 // bumped whenever the bucket is emptied: readers revalidate
	live     int64  // bytes of index extents in the bucket
	dirty    int64  // of which dirty: what GC must move to empty it
	sealed   uint64 // order in which the bucket filled (GC's age)
	// refs names the virtual ranges whose data was put in the bucket
	// since it was last emptied (some overwritten since): GC finds the
	// bucket's extents through them instead of scanning the index.
	refs []byteRange
}

// allocator appends into one open bucket.
type allocator struct {
	b  int64 // open bucket, -1 for none
	wp int64 // next free byte in it, device offset
}

// space is the bucket table, Cache.mu.space; Cache.mu guards it. What to
// allocate, and when to make room (GC, eviction), the cache decides
// (alloc.go, gc.go); space keeps the books.
//
// Invariants, under Cache.mu:
//   - each bucket is in one state. bFree: in free (FIFO), nothing in it.
//     bOpen: the b of fg (the foreground's allocator) or gc (GC's). bFull:
//     sealed, with live bytes or allocations in flight. bPending: in
//     pending, emptied (live 0, nothing in flight) since the last durable
//     checkpoint: its old contents may still be named by that checkpoint
//     or the journal after it, so it becomes free only when a newer
//     checkpoint is durable (freePending).
//   - a bucket's live and dirty bytes are those of the index extents that
//     lie in it (live), and it settles (full -> pending) the moment live
//     and inflight reach 0, with gen and epoch advanced then: an extent
//     or a read that names the old gen or epoch is stale.
//   - sealed lists the buckets filled since the background loop last
//     started their writeback (only when it runs: listSealed).
type space struct {
	geo        *superblock // bucket geometry (immutable)
	buckets    []bucket
	free       []int64 // free buckets, FIFO
	pending    []int64 // emptied; free after the next durable checkpoint
	sealed     []int64 // filled since the background loop last started their writeback
	listSealed bool    // someone takes sealed (the background loop runs)
	fg, gc     allocator
	sealCount  uint64
	cond       sync.Cond     // signalled when buckets become pending or free
	emptied    *atomic.Int64 // counts settles (Stats.BucketsFreed)
}

// init takes the recovered bucket table: buckets holding nothing are free,
// the others full, in table order.
func (sp *space) init(geo *superblock, buckets []bucket, mu *sync.Mutex, emptied *atomic.Int64, listSealed bool) {
	sp.geo, sp.buckets, sp.emptied, sp.listSealed = geo, buckets, emptied, listSealed
	sp.cond.L = mu
	sp.fg.b, sp.gc.b = -1, -1
	for b := range sp.buckets {
		bk := &sp.buckets[b]
		if bk.live == 0 {
			bk.state = bFree
			sp.free = append(sp.free, int64(b))
		} else {
			bk.state = bFull
			sp.sealCount++
			bk.sealed = sp.sealCount
		}
	}
}

// sealIfFull seals a's bucket if a has filled it.
func (sp *space) sealIfFull(a *allocator) {
	if a.b >= 0 && a.wp >= sp.geo.bucketStart(a.b+1) {
		sp.seal(a)
	}
}

// open gives a, which has no bucket, the oldest free one; there must be
// one.
func (sp *space) open(a *allocator) {
	a.b = sp.free[0]
	sp.free = sp.free[1:]
	sp.buckets[a.b].state = bOpen
	a.wp = sp.geo.bucketStart(a.b)
}

// take hands out up to want bytes (block-aligned) at a's write pointer in
// its open bucket, counted in flight until release, and seals the bucket
// when that fills it.
func (sp *space) take(a *allocator, want int64) (loc, got, b int64) {
	got = min(want, sp.geo.bucketStart(a.b+1)-a.wp)
	loc, b = a.wp, a.b
	a.wp += got
	sp.buckets[b].inflight++
	sp.sealIfFull(a)
	return loc, got, b
}

// seal closes a's bucket: it is full now.
func (sp *space) seal(a *allocator) {
	b := a.b
	a.b = -1
	sp.sealCount++
	sp.buckets[b].sealed = sp.sealCount
	sp.buckets[b].state = bFull
	if sp.listSealed {
		sp.sealed = append(sp.sealed, b)
	}
	sp.settle(b)
}

// release ends an allocation of bucket b (its extent is inserted, or the
// write failed).
func (sp *space) release(b int64) {
	sp.buckets[b].inflight--
	sp.settle(b)
}

// settle moves a full bucket that holds nothing and has nothing in flight
// to pending: its generation and epoch change now, and it becomes free
// once a checkpoint that no longer refers to it is durable.
func (sp *space) settle(b int64) {
	bk := &sp.buckets[b]
	if bk.state != bFull || bk.inflight != 0 || bk.live != 0 {
		return
	}
	bk.state = bPending
	bk.gen++
	bk.epoch++
	bk.refs = bk.refs[:0]
	sp.pending = append(sp.pending, b)
	sp.cond.Broadcast()
	sp.emptied.Add(1)
}

// live adds (sign 1) or removes (sign -1) extent e in the counts of the
// buckets under it; a bucket left with nothing settles.
func (sp *space) live(e btreeExtent, sign int64) {
	sp.geo.forBuckets(e.Loc, e.Len, func(b, loc, n int64) {
		sp.buckets[b].account(e.Off+loc-e.Loc, n, e.Dirty, sign)
		if sign < 0 {
			sp.settle(b)
		}
	})
}

// freePending frees the first n pending buckets: a checkpoint that no
// longer names their old contents is durable.
func (sp *space) freePending(n int) {
	for _, b := range sp.pending[:n] {
		sp.buckets[b].state = bFree
		sp.free = append(sp.free, b)
	}
	sp.pending = append(sp.pending[:0], sp.pending[n:]...)
	sp.cond.Broadcast()
}

// takeSealed returns the buckets sealed since the last call.
func (sp *space) takeSealed() []int64 {
	s := sp.sealed
	sp.sealed = nil
	return s
}

// account adds (sign 1) or removes (sign -1) the n bytes of virtual
// offset off that lie in the bucket to its live bytes, and to its dirty
// bytes if dirty; an added range joins refs. (An extent may cross from
// one bucket into the next: the index merges the pieces of one write that
// lie contiguous on the device.)
func (bk *bucket) account(off, n int64, dirty bool, sign int64) {
	bk.live += sign * n
	if dirty {
		bk.dirty += sign * n
	}
	if sign > 0 {
		bk.refs = append(bk.refs, byteRange{off, off + n})
	}
}
