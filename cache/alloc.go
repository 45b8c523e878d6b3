package cache

import (
	"errors"
	"sort"

	"github.com/nbdcache/nbdcache/btreeidx"
)

type btreeExtent = btreeidx.Extent

// errNoSpace: the cache has no room for this write now; the caller
// bypasses or writes back.
var errNoSpace = errors.New("cache: no space")

// Space management (gcStep):
//   - foreground allocation leaves 1/reserveDiv of the buckets (at least
//     one) to GC, and a GC pass moves no more live data than that reserve
//     (less half a bucket) holds, since writers may take every other free
//     bucket while it runs. So compaction always has room to move live
//     data into. With a reserve of one bucket, a cache whose emptiest
//     buckets were over half live could not compact at all;
//   - GC runs as late as it can, when writers are about to reach the
//     reserve (the later, the less live data its victims hold), and
//     compacts what brings the free buckets back to 1/lowFreeDiv of them;
//   - compaction takes the emptiest full buckets first, up to GCPercent
//     live.
const (
	reserveDiv = 32
	lowFreeDiv = 8
)

// fgReserve is the number of free buckets foreground allocation leaves to
// GC.
func (c *Cache) fgReserve() int { return int(max(1, c.sb.NBuckets/reserveDiv)) }

// lowFree is the free bucket count a GC pass aims at, and below which the
// background loop works to make room.
func (c *Cache) lowFree() int { return max(c.fgReserve()+2, int(c.sb.NBuckets/lowFreeDiv)) }

// allocLocked hands out up to want bytes (rounded up to the block size) in
// a's open bucket, opening a new bucket when needed. Foreground allocation
// (reserve > 0) fails when that would dip into the reserve or when the
// index nears the checkpoint's capacity.
func (c *Cache) allocLocked(a *allocator, want int64, reserve int) (loc, got, b int64, ok bool) {
	bs := c.sb.BlockSize
	want = alignUp(want, bs)
	if a.b >= 0 && a.wp >= c.sb.bucketStart(a.b+1) {
		c.sealBucketLocked(a)
	}
	if a.b < 0 {
		if len(c.mu.free) <= reserve {
			return 0, 0, 0, false
		}
		if reserve > 0 && c.indexFullLocked() {
			return 0, 0, 0, false
		}
		a.b = c.mu.free[0]
		c.mu.free = c.mu.free[1:]
		c.mu.buckets[a.b].state = bOpen
		a.wp = c.sb.bucketStart(a.b)
	}
	got = min(want, c.sb.bucketStart(a.b+1)-a.wp)
	loc, b = a.wp, a.b
	a.wp += got
	c.mu.buckets[b].inflight++
	if a.wp >= c.sb.bucketStart(a.b+1) {
		c.sealBucketLocked(a)
	}
	return loc, got, b, true
}

// sealBucketLocked closes a's bucket: it is full now.
func (c *Cache) sealBucketLocked(a *allocator) {
	b := a.b
	a.b = -1
	c.mu.sealCount++
	c.mu.buckets[b].sealed = c.mu.sealCount
	c.mu.buckets[b].state = bFull
	if !c.opts.NoBackground {
		c.mu.sealed = append(c.mu.sealed, b)
	}
	c.settleLocked(b)
}

// releaseLocked ends an allocation of bucket b (its extent is inserted, or
// the write failed).
func (c *Cache) releaseLocked(b int64) {
	c.mu.buckets[b].inflight--
	c.settleLocked(b)
}

// settleLocked moves a full bucket that holds nothing and has nothing in
// flight to pending: its generation and epoch change now, and it becomes
// free once a checkpoint that no longer refers to it is durable.
func (c *Cache) settleLocked(b int64) {
	bk := &c.mu.buckets[b]
	if bk.state != bFull || bk.inflight != 0 || bk.live != 0 {
		return
	}
	bk.state = bPending
	bk.gen++
	bk.epoch++
	c.mu.pending = append(c.mu.pending, b)
	c.stats.bucketsFreed.Add(1)
}

// liveLocked adds sign*len of e to the live bytes of the buckets under it.
func (c *Cache) liveLocked(e btreeExtent, sign int64) {
	c.sb.forBuckets(e.Loc, e.Len, func(b, _, n int64) {
		c.mu.buckets[b].live += sign * n
		if sign < 0 {
			c.settleLocked(b)
		}
	})
}

func (c *Cache) droppedLocked(e btreeExtent) {
	if !e.Dirty {
		c.mu.dropClean = true // the record being journaled removes a clean extent
	}
	c.liveLocked(e, -1)
}

// Index capacity. A checkpoint slot holds maxExt extents, and the index
// must never outgrow it: a checkpoint that cannot be written stops every
// index change, Close, and Open (the cache would be bricked). So every
// operation that can add extents checks, under the same hold of mu as its
// change, that the index has room for what it may add (roomLocked):
//   - an insert adds its extent and may cut one extent in two: 2;
//   - a compare-and-swap (MarkClean, GC's Replace) of part of an extent
//     cuts it at each edge that falls inside it (edgeCutsLocked);
//   - eviction of a piece may cut its extent in two: 1.
//
// Deletions before direct backing writes and trims never add one
// (deleteDirectLocked drops clean extents whole, and leaves a dirty extent
// whole when the range lies inside it); zeroDirty's runs are at least a
// bucket long, and no extent is longer than a bucket. Foreground writes
// already stop at 3/4 of maxExt (allocLocked) and bypass; makeSpace then
// evicts clean extents to bring the index down (shrinkIndex).

// roomLocked reports whether the index can take k more extents.
func (c *Cache) roomLocked(k int) bool { return int64(c.mu.idx.Len())+int64(k) <= c.maxExt }

// edgeCutsLocked counts the edges of [off, off+n) that fall strictly inside
// an extent: the extents a change of exactly that range adds by cutting.
func (c *Cache) edgeCutsLocked(off, n int64) int {
	cuts := 0
	c.mu.idx.Ascend(off, func(e btreeExtent) bool {
		if e.Off >= off+n {
			return false
		}
		if e.Off < off {
			cuts++
		}
		if e.End() > off+n {
			cuts++
		}
		return true
	})
	return cuts
}

// indexFullLocked: foreground writes stop caching here (allocLocked).
func (c *Cache) indexFullLocked() bool { return int64(c.mu.idx.Len()) > c.maxExt*3/4 }

// shrinkIndex evicts clean extents, oldest data first (by version), until
// the index is back below 5/8 of its capacity, so that foreground writes
// cache again; it kicks the flusher, whose cleaned extents it can evict
// next. It reports whether it evicted anything.
func (c *Cache) shrinkIndex() bool {
	c.mu.Lock()
	if !c.indexFullLocked() {
		c.mu.Unlock()
		return true
	}
	excess := c.mu.idx.Len() - int(c.maxExt*5/8)
	var clean []btreeExtent
	c.mu.idx.Ascend(0, func(e btreeExtent) bool {
		if !e.Dirty {
			clean = append(clean, e)
		}
		return true
	})
	c.mu.Unlock()
	c.kickBackground()
	sort.Slice(clean, func(i, j int) bool { return clean[i].Ver < clean[j].Ver })
	evicted := 0
	for _, e := range clean[:min(len(clean), excess)] {
		if c.gcEvict(gcPiece{off: e.Off, n: e.Len, loc: e.Loc, ver: e.Ver}) {
			evicted++
		}
	}
	return evicted > 0
}

// insertLocked puts e in the index and the journal.
func (c *Cache) insertLocked(e btreeExtent, sum uint32) {
	c.mu.idx.Insert(e, c.droppedLocked)
	c.liveLocked(e, 1)
	c.appendLocked(record{Type: recInsert, Off: e.Off, Len: e.Len, Loc: e.Loc, Ver: e.Ver, Gen: e.Gen, Dirty: e.Dirty, CRC: sum})
}

// deleteLocked drops [off, off+n) from the index, journaling it only if
// something was there. It reports whether a clean extent was there.
func (c *Cache) deleteLocked(off, n int64) (clean bool) {
	found := false
	c.mu.idx.Lookup(off, n, func(e btreeExtent) bool {
		found, clean = true, !e.Dirty
		return !clean // the first clean one answers
	})
	if !found {
		return false
	}
	c.mu.idx.Delete(off, n, c.droppedLocked)
	c.appendLocked(record{Type: recDelete, Off: off, Len: n})
	return clean
}

// makeSpace tries to free buckets for an allocation that failed: reuse
// emptied buckets (after a checkpoint), else evict clean data and compact
// sparse buckets. It reports whether room was made, by it or meanwhile by
// others (other writers may have taken it again already): false means
// nothing can be freed now.
func (c *Cache) makeSpace() bool {
	room := func() (pending int, free bool) {
		c.mu.Lock()
		defer c.mu.Unlock()
		return len(c.mu.pending), len(c.mu.free) > c.fgReserve()
	}
	c.mu.Lock()
	full := c.indexFullLocked()
	c.mu.Unlock()
	if full {
		return c.shrinkIndex()
	}
	pending, free := room()
	if free {
		return true
	}
	if pending == 0 {
		if _, hadRoom := c.gcStep(true); hadRoom {
			// Another pass or a checkpoint made room while this one
			// waited for gcMu; writers may have taken it since.
			return true
		}
		if pending, free = room(); free {
			return true
		}
	}
	if pending == 0 {
		return false
	}
	// Writers that all ran out of space at once share one checkpoint.
	return c.checkpointIf(func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return len(c.mu.free) <= c.fgReserve() && len(c.mu.pending) > 0
	}, true) == nil
}

// GCStep runs one pass of garbage collection (and eviction when evict).
// It returns the number of buckets emptied; they are reusable after the
// next checkpoint.
func (c *Cache) GCStep(evict bool) int {
	freed, _ := c.gcStep(evict)
	return freed
}

type gcPiece struct {
	off, n, loc int64
	ver         uint64
	dirty       bool
}

// gcStep picks victim buckets and empties them: live data of sparse
// buckets is moved (compaction); the oldest buckets are evicted: clean data
// dropped, dirty data moved.
//
// It runs only when writers are about to reach the reserve and no bucket
// is pending, and compacts what brings the free buckets back to lowFree.
// Under random overwrites of a working set above about half the cache, no
// bucket gets below 25% live: with that threshold (GCPercent's old
// default) and a reserve of one bucket, the cache filled with garbage and
// every write went to the backing.
//
// It returns the buckets it emptied, and hadRoom when it did nothing
// because room was there already: buckets pending or free above the
// reserve (another pass or a checkpoint made it while this one waited).
func (c *Cache) gcStep(evict bool) (freed int, hadRoom bool) {
	c.gcMu.Lock()
	defer c.gcMu.Unlock()

	c.mu.Lock()
	nb := int64(len(c.mu.buckets))
	if len(c.mu.pending) > 0 || len(c.mu.free) > c.fgReserve()+1 {
		c.mu.Unlock()
		return 0, true
	}
	dirty := make([]int64, nb)
	c.mu.idx.AscendDirty(0, func(e btreeExtent) bool {
		c.sb.forBuckets(e.Loc, e.Len, func(b, _, n int64) { dirty[b] += n })
		return true
	})
	bsz := c.sb.BucketSize
	room := int64(min(len(c.mu.free), c.fgReserve())) * bsz
	if c.mu.gc.b >= 0 {
		room += c.sb.bucketStart(c.mu.gc.b+1) - c.mu.gc.wp
	}
	var cands []int64
	for b := range nb {
		bk := &c.mu.buckets[b]
		if bk.state == bFull && bk.inflight == 0 && bk.live > 0 {
			cands = append(cands, b)
		}
	}
	// Compaction first: the emptiest buckets.
	sort.Slice(cands, func(i, j int) bool { return c.mu.buckets[cands[i]].live < c.mu.buckets[cands[j]].live })
	victims := map[int64]bool{}
	dropClean := map[int64]bool{}
	budget := room - bsz/2 // keep some room: moved data fragments by block
	// Enough to bring the free buckets back to lowFree: each victim
	// gains its garbage.
	need := int64(c.lowFree()-len(c.mu.free)) * bsz
	for _, b := range cands {
		if need <= 0 {
			break
		}
		live := c.mu.buckets[b].live
		if live*100 >= bsz*int64(c.opts.GCPercent) || live > budget {
			continue
		}
		victims[b] = true
		budget -= live
		need -= bsz - live
	}
	if evict {
		// Eviction: oldest first; clean data is dropped, dirty moved.
		sort.Slice(cands, func(i, j int) bool { return c.mu.buckets[cands[i]].sealed < c.mu.buckets[cands[j]].sealed })
		n := 0
		for _, b := range cands {
			if victims[b] || dirty[b] > bsz/2 || dirty[b] > budget {
				continue
			}
			victims[b], dropClean[b] = true, true
			budget -= dirty[b]
			n++
			if n >= max(2, int(nb/16)) {
				break
			}
		}
	}
	if len(victims) == 0 {
		c.mu.Unlock()
		return 0, false
	}
	var work []gcPiece
	c.mu.idx.Ascend(0, func(e btreeExtent) bool {
		c.sb.forBuckets(e.Loc, e.Len, func(b, loc, n int64) {
			if victims[b] {
				work = append(work, gcPiece{off: e.Off + (loc - e.Loc), n: n, loc: loc, ver: e.Ver, dirty: e.Dirty || !dropClean[b]})
			}
		})
		return true
	})
	epochs := map[int64]uint64{}
	for b := range victims {
		epochs[b] = c.mu.buckets[b].epoch
	}
	c.mu.Unlock()

	for _, p := range work {
		if p.dirty {
			if !c.gcMove(p, epochs[c.sb.bucketOf(p.loc)]) {
				break // out of room; what is done stays done
			}
		} else {
			c.gcEvict(p)
		}
	}
	c.mu.Lock()
	for b := range victims {
		if c.mu.buckets[b].state == bPending && c.mu.buckets[b].epoch != epochs[b] {
			freed++
		}
	}
	c.mu.Unlock()
	c.stats.gcRuns.Add(1)
	return freed, false
}

// pieceCurrentLocked reports whether [p.off, p.off+p.n) still holds p.ver
// at p.loc, all of it.
func (c *Cache) pieceCurrentLocked(p gcPiece) bool {
	ok, seen := true, int64(0)
	c.mu.idx.Lookup(p.off, p.n, func(e btreeExtent) bool {
		if e.Ver != p.ver || e.Loc != p.loc+(e.Off-p.off) {
			ok = false
			return false
		}
		seen += e.Len
		return true
	})
	return ok && seen == p.n
}

// gcEvict drops a clean piece if it is still current (and the index has
// room for the cut it may make), and reports whether it did.
func (c *Cache) gcEvict(p gcPiece) bool {
	if c.enter() != nil {
		return false
	}
	defer c.leave()
	c.mu.Lock()
	defer c.mu.Unlock()
	var clean = true
	c.mu.idx.Lookup(p.off, p.n, func(e btreeExtent) bool { clean = !e.Dirty; return clean })
	if !clean || !c.pieceCurrentLocked(p) || !c.roomLocked(c.edgeCutsLocked(p.off, p.n)/2) {
		return false
	}
	if c.tracing() {
		c.tracef(p.off, p.n, "evict [%d+%d) v%d", p.off, p.n, p.ver)
	}
	c.deleteLocked(p.off, p.n)
	c.stats.evictedBytes.Add(p.n)
	return true
}

// gcMove copies a piece into the GC allocator's bucket and swaps the index
// over with a compare-and-swap on the version. It returns false when there
// is no room.
func (c *Cache) gcMove(p gcPiece, epoch uint64) bool {
	data := make([]byte, p.n)
	if err := c.dev.ReadAt(data, p.loc); err != nil {
		c.log.Warn("cache: gc read failed", "loc", p.loc, "err", err)
		return true
	}
	for done := int64(0); done < p.n; {
		if c.enter() != nil {
			return false
		}
		c.mu.Lock()
		ob := c.sb.bucketOf(p.loc)
		if c.mu.buckets[ob].epoch != epoch {
			c.mu.Unlock()
			c.leave()
			return true // emptied meanwhile: what we read may be garbage
		}
		loc, got, b, ok := c.allocLocked(&c.mu.gc, p.n-done, 0)
		c.mu.Unlock()
		if !ok {
			c.leave()
			return false
		}
		n := min(got, p.n-done)
		chunk := data[done : done+n]
		err := c.dev.WriteAt(chunk, loc, 0)
		c.mu.Lock()
		sub := gcPiece{off: p.off + done, n: n, loc: p.loc + done, ver: p.ver}
		if err == nil && !c.roomLocked(c.edgeCutsLocked(sub.off, n)) {
			c.releaseLocked(b)
			c.mu.Unlock()
			c.leave()
			return false // the index is full: moving would cut extents
		}
		if err == nil && c.pieceCurrentLocked(sub) {
			gen := c.mu.buckets[b].gen
			moved := c.mu.idx.Replace(sub.off, n, p.ver, loc, gen)
			if moved == n {
				c.liveLocked(btreeExtent{Loc: sub.loc, Len: n}, -1)
				c.liveLocked(btreeExtent{Loc: loc, Len: n}, 1)
				c.appendLocked(record{Type: recReplace, Off: sub.off, Len: n, Loc: loc, Ver: p.ver, Gen: gen, CRC: crc(chunk)})
				c.stats.gcMovedBytes.Add(n)
			} else if moved != 0 {
				panic("cache: partial replace of a piece checked current")
			}
		}
		c.releaseLocked(b)
		c.mu.Unlock()
		c.leave()
		done += n
	}
	return true
}
