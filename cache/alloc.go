package cache

// alloc.go: where a write's data goes in the cache device (allocLocked),
// the index's capacity and the bucket accounting of index changes.

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

// reuseBatch is how many emptied buckets the background loop gathers
// before the checkpoint that frees them for reuse: a checkpoint writes the
// whole index (2 MiB for 64k extents), and freeing a bucket or two with
// each one, as GC passes that aim at lowFree do, cost a checkpoint every
// 28 ms under fio randwrite at QD32 (362 in 10 s, 743 MB written for
// 3.5 GB of client data).
func (c *Cache) reuseBatch() int { return max(1, c.lowFree()/2) }

// reuseNowLocked reports whether the background loop should checkpoint
// to free the pending buckets: a batch of them is there, or the free ones
// are down to half of lowFree (writers are nearing the reserve).
func (c *Cache) reuseNowLocked() bool {
	pending, free := len(c.mu.space.pending), len(c.mu.space.free)
	return pending >= c.reuseBatch() || pending > 0 && free < c.lowFree()/2
}

// allocLocked hands out up to want bytes (rounded up to the block size) in
// a's open bucket, opening a new bucket when needed. Foreground allocation
// (reserve > 0) fails when that would dip into the reserve or when the
// index nears the checkpoint's capacity.
func (c *Cache) allocLocked(a *allocator, want int64, reserve int) (loc, got, b int64, ok bool) {
	sp := &c.mu.space
	sp.sealIfFull(a)
	if a.b < 0 {
		if len(sp.free) <= reserve || reserve > 0 && c.indexFullLocked() {
			return 0, 0, 0, false
		}
		sp.open(a)
		if len(sp.free) < c.lowFree() {
			select { // the background loop makes room ahead of writers
			case c.bg.kick <- struct{}{}:
			default:
			}
		}
		if len(sp.sealed) > 0 {
			c.kickStartWriteback()
		}
	}
	loc, got, b = sp.take(a, alignUp(want, c.sb.BlockSize))
	return loc, got, b, true
}

// liveLocked adds (sign 1) or removes (sign -1) extent e in the counts of
// the buckets under it; a bucket left with nothing settles.
func (c *Cache) liveLocked(e btreeExtent, sign int64) { c.mu.space.live(e, sign) }

// cleanedLocked takes out of the buckets' dirty bytes what MarkClean of e
// is about to clean: the dirty parts of e's range that hold its version,
// which it returns.
func (c *Cache) cleanedLocked(e btreeExtent) []btreeExtent {
	var ps []btreeExtent
	c.mu.idx.Lookup(e.Off, e.Len, func(x btreeExtent) bool {
		if x.Dirty && x.Ver == e.Ver {
			c.sb.forBuckets(x.Loc, x.Len, func(b, _, n int64) { c.mu.space.buckets[b].dirty -= n })
			ps = append(ps, x)
		}
		return true
	})
	return ps
}

func (c *Cache) droppedLocked(e btreeExtent) {
	if !e.Dirty {
		c.mu.j.dropClean = true // the record being journaled removes a clean extent
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
//     cuts it at each edge that falls inside it (edgeCutsLocked); when
//     the index has no room for that, MarkClean cleans and drops what it
//     cleans: a piece at an edge of its extent adds nothing, one inside
//     it adds one (innerCutsLocked), and without room for that stays
//     dirty, for after the pieces before it;
//   - eviction of a piece may cut its extent in two: 1.
//
// Deletions before direct backing writes and trims never add one
// (deleteDirectLocked drops clean extents whole, and leaves a dirty extent
// whole when the range lies inside it); zeroDirty's runs are at least a
// bucket long, and no extent is longer than a bucket. Foreground writes
// already stop at 3/4 of maxExt (allocLocked) and bypass; makeSpace then
// evicts clean extents to bring the index down (shrinkIndex).

// maxExtents is the index's capacity: the extents a checkpoint slot holds
// (or fewer, in tests: testHooks.maxExt).
func (c *Cache) maxExtents() int64 {
	if m := c.test.maxExt; m > 0 {
		return min(m, c.sb.maxExtents())
	}
	return c.sb.maxExtents()
}

// roomLocked reports whether the index can take k more extents.
func (c *Cache) roomLocked(k int) bool {
	return int64(c.mu.idx.Len())+c.mu.reservedExt+int64(k) <= c.maxExtents()
}

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
func (c *Cache) indexFullLocked() bool { return int64(c.mu.idx.Len()) > c.maxExtents()*3/4 }

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
	excess := c.mu.idx.Len() - int(c.maxExtents()*5/8)
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
