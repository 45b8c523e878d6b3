package cache

// writeback.go: the cache as the flusher's Source (dirty extents, ReadCached,
// MarkClean), the range flush before a bypass, and Drain.

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/nbdcache/nbdcache/btreeidx"
	"github.com/nbdcache/nbdcache/storage"
	"github.com/nbdcache/nbdcache/writeback"
)

// DirtyExtents calls fn for dirty extents with End() > from, ascending: a
// snapshot taken in batches, no lock held while fn runs. Extents under a
// writeback in flight are skipped.
func (c *Cache) DirtyExtents(from int64, fn func(btreeidx.Extent) bool) {
	const batch = 256
	for {
		var es []btreeidx.Extent
		c.mu.Lock()
		var lo, hi int64 // a range no writeback in flight touches
		c.mu.idx.AscendDirty(from, func(e btreeidx.Extent) bool {
			if e.Off < lo || e.End() > hi {
				var free bool
				if lo, hi, free = c.mu.wb.gap(e.Off); !free {
					lo, hi = 0, 0
				}
			}
			if e.Off >= lo && e.End() <= hi && !c.directLocked(e.Off, e.Len) {
				es = append(es, e)
			}
			from = e.End()
			return len(es) < batch
		})
		c.mu.Unlock()
		if len(es) == 0 {
			return
		}
		for _, e := range es {
			if !fn(e) {
				return
			}
		}
	}
}

// CleanExtents calls fn, ascending, for the clean extents overlapping
// [off, end), clipped to it, that no writeback holds (writeback.Filler: the
// flusher writes them along to bridge a gap between dirty extents).
func (c *Cache) CleanExtents(off, end int64, fn func(btreeidx.Extent) bool) {
	var es []btreeidx.Extent
	c.mu.Lock()
	c.mu.idx.Lookup(off, end-off, func(e btreeidx.Extent) bool {
		if e.Dirty || c.heldLocked(e.Off, e.Len) {
			return false
		}
		es = append(es, e)
		return true
	})
	c.mu.Unlock()
	for _, e := range es {
		if !fn(e) {
			return
		}
	}
}

// ReadCached reads the cache-device data of e, as handed out by
// DirtyExtents, into p, and registers e as being written back: until
// MarkClean(e) or ReleaseCached(e), nothing writes its range to the
// backing directly and no overlapping ReadCached succeeds (ErrBusy); nor
// does one while a direct write over the range is in flight. Promotions
// under way over the range are void from now on: the backing changes
// under them. If e is no longer current (rewritten, moved, trimmed) it
// returns ErrStale. A closed or failed cache starts no writeback: it
// returns the cache's error (ErrClosed, ErrFailed), which the flusher
// counts as a failure and backs off from.
func (c *Cache) ReadCached(e btreeidx.Extent, p []byte) error {
	var err [1]error
	c.ReadCachedBatch([]btreeidx.Extent{e}, [][]byte{p}, err[:])
	return err[0]
}

// ReadCachedBatch is ReadCached for each es[i] into ps[i], its result in
// errs[i] (writeback.BatchReader): the checks of all of them under one
// hold of the lock, before the reads and after, and the reads coalesced
// where the pieces touch on the cache device (readNear). The flusher
// hands it a window of a full-speed batch at a time: a drain of
// scattered 4 KiB extents checked each under three holds of the lock
// and read each with a pread of its own, 8,000 of them after issue 22's
// burst, a third of the drain's CPU in the VM. es must not overlap one
// another.
func (c *Cache) ReadCachedBatch(es []btreeidx.Extent, ps [][]byte, errs []error) {
	type be struct{ b, epoch int64 }
	var eps []be
	epsOf := make([]int, len(es)+1) // es[i]'s epochs are eps[epsOf[i]:epsOf[i+1]]
	held := make([]bool, len(es))
	c.mu.Lock()
	cerr := c.errLocked()
	for i, e := range es {
		errs[i] = nil
		switch {
		case int64(len(ps[i])) != e.Len:
			errs[i] = fmt.Errorf("%w: buffer of %d bytes for %d", ErrBadOption, len(ps[i]), e.Len)
		case cerr != nil:
			errs[i] = cerr
		case c.heldLocked(e.Off, e.Len):
			errs[i] = ErrBusy
		case !c.pieceCurrentLocked(gcPiece{off: e.Off, n: e.Len, loc: e.Loc, ver: e.Ver}):
			errs[i] = ErrStale
		default:
			c.sb.forBuckets(e.Loc, e.Len, func(b, _, _ int64) { eps = append(eps, be{b, int64(c.mu.space.buckets[b].epoch)}) })
			c.mu.wb.add(inflightWB{off: e.Off, end: e.End(), ver: e.Ver})
			held[i] = true
			if c.tracing() {
				c.tracef(e.Off, e.Len, "writeback start %v", e)
			}
			if c.test.brk != breakNoPromoGuard {
				c.backingWriteLocked(e.Off, e.End())
			}
		}
		epsOf[i+1] = len(eps)
	}
	c.mu.Unlock()
	c.readNear(es, ps, errs)
	c.mu.Lock()
	for i := range es {
		for _, x := range eps[epsOf[i]:epsOf[i+1]] {
			if errs[i] == nil && int64(c.mu.space.buckets[x.b].epoch) != x.epoch {
				errs[i] = ErrStale
			}
		}
	}
	c.mu.Unlock()
	// The caller writes the backing next: what superseded a clean extent
	// over the ranges must be durable first.
	var settle error
	for i, e := range es {
		if errs[i] == nil && settle == nil {
			settle = c.settleCleanGone(e.Off, e.Len)
		}
		if errs[i] == nil {
			errs[i] = settle
		}
		if errs[i] != nil && held[i] {
			c.ReleaseCached(e)
		}
	}
}

// Reads of the cache device that readNear coalesces: pieces that touch
// there (written one after another: a client's sequential writes, GC's
// moves) share one read of at most nearRead bytes. Not pieces with a gap
// between them: under the VM's emulation, reading the gap cost more than
// the system calls it saved (with gaps of up to 32 KiB merged, the
// drain's reads took 0.36-0.42 CPU-s; with none, 0.21-0.28).
const (
	nearGap  = 0
	nearRead = 1 << 20
)

// readNear reads es[i] from the cache device into ps[i] for each i with
// errs[i] == nil, setting errs[i] on failure: pieces in cache-device
// order, those within nearGap of each other in one read. A coalesced
// read that fails is done again piece by piece, so that an error fails
// only the pieces it lies in.
func (c *Cache) readNear(es []btreeidx.Extent, ps [][]byte, errs []error) {
	var idx []int
	for i := range es {
		if errs[i] == nil {
			idx = append(idx, i)
		}
	}
	slices.SortFunc(idx, func(a, b int) int { return cmp.Compare(es[a].Loc, es[b].Loc) })
	var scratch []byte
	for k := 0; k < len(idx); {
		first := es[idx[k]]
		from, end, m := first.Loc, first.Loc+first.Len, k+1
		for m < len(idx) {
			e := es[idx[m]]
			if e.Loc-end > nearGap || max(end, e.Loc+e.Len)-from > nearRead {
				break
			}
			end = max(end, e.Loc+e.Len)
			m++
		}
		group := idx[k:m]
		k = m
		if len(group) > 1 {
			// Sized to the group, not to nearRead: most groups are a
			// few blocks, and a zeroed 1 MiB a call was most of the
			// CPU of GC's writebacks in small caches.
			if int64(len(scratch)) < end-from { // at most doubling, up to nearRead
				scratch = storage.AlignedBuf(int(min(max(2*int64(len(scratch)), alignUp(end-from, 64<<10)), nearRead)))
			}
			if c.dev.ReadAt(scratch[:end-from], from) == nil {
				for _, i := range group {
					copy(ps[i], scratch[es[i].Loc-from:])
				}
				continue
			}
		}
		for _, i := range group {
			errs[i] = c.dev.ReadAt(ps[i], es[i].Loc)
		}
	}
}

// ReleaseCached ends a writeback of e that will not be marked clean (its
// backing write failed).
func (c *Cache) ReleaseCached(e btreeidx.Extent) {
	c.mu.Lock()
	if c.tracing() {
		c.tracef(e.Off, e.Len, "writeback released %v", e)
	}
	c.unregisterLocked(e)
	c.mu.Unlock()
}

// innerCutsLocked counts the dirty extents of e's version that e lies
// strictly inside: cleaning e and dropping it cuts each in two.
func (c *Cache) innerCutsLocked(e btreeidx.Extent) int {
	cuts := 0
	c.mu.idx.Ascend(e.Off, func(x btreeExtent) bool {
		if x.Off >= e.End() {
			return false
		}
		if x.Dirty && x.Ver == e.Ver && x.Off < e.Off && x.End() > e.End() {
			cuts++
		}
		return true
	})
	return cuts
}

func (c *Cache) unregisterLocked(e btreeidx.Extent) {
	if c.mu.wb.remove(inflightWB{off: e.Off, end: e.End(), ver: e.Ver}) {
		c.mu.holdsEnded++
		c.mu.wbCond.Broadcast()
	}
}

// MarkClean is called once the backing write of e is durable. It does the
// compare-and-swap on e.Ver and journals it; a part rewritten meanwhile
// stays dirty and counts as collided. A closed or failed cache marks
// nothing and reports nothing collided: e stays dirty, and the writeback
// made no progress (a collision would count as progress, and a drain
// would go on writing the same extents back for ever).
func (c *Cache) MarkClean(e btreeidx.Extent) (cleaned, collided int64) {
	err := c.enter()
	c.mu.Lock()
	defer c.mu.Unlock()
	c.unregisterLocked(e)
	if err != nil {
		return 0, 0
	}
	defer c.leave()
	evict := false
	if !c.roomLocked(c.edgeCutsLocked(e.Off, e.Len)) {
		// The index is full and cleaning a piece of an extent would cut
		// it in two. Instead the pieces it cleans are dropped (evicted)
		// once clean: the index then holds what it held less those
		// ranges, so a piece at an edge of its extent adds no extent,
		// and one inside it adds one. Without room for that, the piece
		// stays dirty and counts as no progress: the flusher retries
		// it, and by then has dropped the pieces before it. Only what
		// was dirty is dropped: a clean extent around the piece (a
		// writeback of the whole extent cleaned it meanwhile) would be
		// cut in two.
		if !c.roomLocked(c.innerCutsLocked(e)) {
			return 0, 0
		}
		evict = true
	} else if c.thrashingLocked() {
		// A cache that steps aside drops what it cleans (Shedding).
		// Room for the cuts cleaning makes is room for the one or none
		// that dropping makes.
		evict = true
	}
	before := c.mu.idx.DirtyBytes()
	pieces := c.cleanedLocked(e)
	cleaned, collided = c.mu.idx.MarkClean(e.Off, e.Len, e.Ver)
	if c.tracing() {
		c.tracef(e.Off, e.Len, "MarkClean %v: cleaned %d collided %d evict %v", e, cleaned, collided, evict)
	}
	if before != c.mu.idx.DirtyBytes() {
		// The record names e's whole range, but where it collided
		// another version lies now, put there by an insert that may
		// not be durable yet. Were that insert dropped at replay (its
		// data not on the disk), the piece of e it displaced would
		// come back and this record would clean it, though the
		// writeback of the insert may have written other bytes to the
		// backing by then. So the record counts as removing a clean
		// extent: settleCleanGone makes it durable, and the inserts
		// and data before it, before the next backing write.
		if collided > 0 && c.test.brk != breakNoCollisionSettle {
			c.mu.j.dropClean = true
		}
		c.appendLocked(record{Type: recClean, Off: e.Off, Len: e.Len, Ver: e.Ver})
	}
	if evict {
		for _, x := range pieces {
			c.deleteLocked(x.Off, x.Len)
			c.stats.evictedBytes.Add(x.Len)
		}
	}
	c.stats.writebackBytes.Add(before - c.mu.idx.DirtyBytes())
	c.stats.writebackCollisions.Add(collided)
	return cleaned, collided
}

// Shedding is writeback.Shedder. A cache that steps aside for a working
// set it cannot hold (thrashingLocked) has its dirty data written back at
// full speed, and MarkClean drops what it cleans: writes over it would
// otherwise go on landing in the cache (a write over cached data stays
// in it), each one to be written back and the backing flushed before the
// next found room. Emptied, the cache sends every write around it, at
// about the backing's own cost, until the thrashing ends.
func (c *Cache) Shedding() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.thrashingLocked()
}

// DirtyBytes is the amount of dirty data in the cache.
func (c *Cache) DirtyBytes() int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.mu.idx.DirtyBytes()
}

// CapacityBytes is the size of the data area.
func (c *Cache) CapacityBytes() int64 { return c.sb.NBuckets * c.sb.BucketSize }

// flushBacking flushes the backing, sharing the flush with whoever asks
// at the same time (flushGroup), and counts it (Stats.BackingFlushes). A
// flush covers the direct backing writes done before it began: the
// journal learns it (backingFlushed), so a commit that needs them flushed
// finds them so. It is the flusher's FlushBacking too.
func (c *Cache) flushBacking() error {
	return c.bflush.flush(func() error {
		c.mu.Lock()
		n := c.mu.j.bWrites
		c.mu.Unlock()
		if err := c.back.Flush(); err != nil {
			return err
		}
		c.stats.backingFlushes.Add(1)
		c.mu.Lock()
		c.mu.j.backingFlushed(n)
		c.mu.Unlock()
		return nil
	})
}

// FlushBacking is writeback.BackingFlusher: the flusher's flushes are
// shared with the cache's own.
func (c *Cache) FlushBacking() error { return c.flushBacking() }

// flushRange writes back the dirty extents overlapping [off, off+n) now,
// whole (cleaning part of one would cut it, and a full index refuses
// that), waiting for writebacks of them already in flight.
func (c *Cache) flushRange(off, n int64) error {
	for {
		var es []btreeidx.Extent
		c.mu.Lock()
		c.mu.idx.Ascend(off, func(e btreeidx.Extent) bool {
			if e.Off >= off+n {
				return false
			}
			if e.Dirty {
				es = append(es, e)
			}
			return true
		})
		lo, hi := off, off+n
		if len(es) > 0 {
			lo, hi = min(lo, es[0].Off), max(hi, es[len(es)-1].End())
		}
		held := c.heldLocked(lo, hi-lo)
		if len(es) == 0 && !held {
			c.mu.Unlock()
			return nil
		}
		if held {
			if err := c.errLocked(); err != nil {
				c.mu.Unlock()
				return err
			}
			c.mu.wbCond.Wait()
			c.mu.Unlock()
			continue
		}
		c.mu.Unlock()
		// Whole extents, never cut (WriteBack's promise); one moved,
		// rewritten or in flight meanwhile is skipped, and the next
		// round sees it.
		if _, err := c.flusher.WriteBack(es, c.noteBacking); err != nil {
			return fmt.Errorf("cache: write back before bypass: %w", err)
		}
	}
}

// Drain writes back every dirty byte and syncs the backing; afterwards the
// backing alone holds the whole disk (unless writes continue in writeback
// mode). progress, if not nil, is called with bytes done and the total.
func (c *Cache) Drain(ctx context.Context, progress func(done, total int64)) error {
	for tries := 0; ; tries++ {
		c.mu.Lock()
		ended := c.mu.holdsEnded
		c.mu.Unlock()
		err := c.flusher.Drain(ctx, progress)
		if err == nil {
			break
		}
		// The flusher gives up when it lists nothing writable while
		// data is dirty: here that is dirty data held by a writeback or
		// a direct write of someone else, for a moment. Go on once a
		// hold ended; with no hold the failure is real.
		if !errors.Is(err, writeback.ErrStalled) || tries >= drainRetries || !c.waitHold(ended) {
			return fmt.Errorf("cache: drain: %w", err)
		}
	}
	if err := c.flushBacking(); err != nil {
		return fmt.Errorf("cache: drain: flush backing: %w", err)
	}
	return c.commitBacking()
}

// drainRetries bounds how often Drain starts the flusher's drain again
// after it gave up while backing writes of others held dirty ranges.
const drainRetries = 100

// waitHold reports whether a drain that began when ended holds had ended
// may have found nothing writable because of holds: one ended since
// (true at once), or one is in flight (true once it ends). With neither,
// it reports false: the dirty data was not held.
func (c *Cache) waitHold(ended uint64) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.mu.holdsEnded != ended {
		return true
	}
	if c.mu.wb.len() == 0 && len(c.mu.direct) == 0 || c.errLocked() != nil {
		return false
	}
	c.mu.wbCond.Wait()
	return true
}
