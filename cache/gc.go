package cache

// gc.go: making room: GC passes that choose victim buckets by cost and
// benefit, write their dirty data back or move it, and evict clean data,
// so that the buckets settle and become free after a checkpoint.

import (
	"context"
	"sort"
)

// makeSpace tries to free buckets for an allocation that failed: reuse
// emptied buckets (after a checkpoint), else evict clean data and compact
// sparse buckets. It reports whether room was made, by it or meanwhile by
// others (other writers may have taken it again already): false means
// nothing can be freed now.
func (c *Cache) makeSpace() bool {
	room := func() (pending int, free bool) {
		c.mu.Lock()
		defer c.mu.Unlock()
		return len(c.mu.space.pending), len(c.mu.space.free) > c.fgReserve()
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
			// waited for gcPass; writers may have taken it since.
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
		return len(c.mu.space.free) <= c.fgReserve() && len(c.mu.space.pending) > 0
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

// gcStep picks victim buckets and empties them: dirty data is moved into
// the GC allocator's bucket, clean data is dropped (never moved: the
// backing holds it, and a read brings it back if it is wanted).
//
// It runs only when writers are about to reach the reserve and no bucket
// is pending, and empties what brings the free buckets back to lowFree.
//
// Victims are chosen by cost and benefit, as in LFS's cleaner: emptying a
// bucket frees it whole (its garbage, and its clean data, dropped) at the
// cost of moving its dirty bytes d, read and written again; old buckets
// are worth more, since their data is colder and less likely to be
// overwritten soon (which would empty it for free) or read again (which
// dropping clean data loses). So the score is
//
//	(size - d) * age / (size + d)
//
// with age the number of buckets filled since this one. A bucket whose
// dirty share is GCPercent or more is never a victim: moving it gains
// little, and the flusher, which the background loop kicks while free
// buckets are short, makes it cheaper by cleaning it. Without evict, only
// buckets that hold no clean data are victims: nothing cached is lost.
//
// The victims' extents are found through each bucket's refs, not by
// scanning the index: a pass costs in proportion to what it empties.
//
// The background loop runs gcClean instead when it has a flusher (and
// GCMove is off): earlier, as soon as free buckets fall below lowFree, and
// instead of moving dirty data it writes it back and drops it (the
// backing must receive it anyway; moving it would cost the cache device a
// copy, issue 18's write amplification). Over a disk, that writeback runs
// between two of the flusher's batches (Flusher.Exclusive): two sorted
// sweeps interleaved make every write of both a seek. (Over a fast
// backing, waiting for the flusher's batch only delays the free buckets:
// writers then run out and move data in the foreground, 20-30% slower on
// 4k random writes with the working set the cache's size.) Writers that wait
// for room over a slow backing wait for it to end (waitRoom). Foreground
// writers that still
// find the cache full run gcStep, which moves: they cannot wait for the
// backing (TestForegroundDoesNotWaitForWriteback).
//
// It returns the buckets it emptied, and hadRoom when it did nothing
// because room was there already: buckets pending or free above the
// reserve (another pass or a checkpoint made it while this one waited).
func (c *Cache) gcStep(evict bool) (freed int, hadRoom bool) {
	return c.gc(evict, false)
}

// gcClean is the background's GC pass: see gcStep.
func (c *Cache) gcClean() (freed int) {
	freed, _ = c.gc(true, true)
	return freed
}

func (c *Cache) gc(evict, clean bool) (freed int, hadRoom bool) {
	c.gcPass.Lock()
	c.mu.Lock()
	victims, work, hadRoom := c.gcPlanLocked(evict, clean)
	c.mu.Unlock()
	if len(victims) == 0 {
		c.gcPass.Unlock()
		return 0, hadRoom
	}
	if clean {
		// The backing may be slow: a foreground pass must not wait
		// behind this one. Every step below checks again under mu.
		c.gcPass.Unlock()
		c.gcPass.cleaning.Add(1)
		if c.bg.cancel != nil && c.diskLike() {
			c.flusher.Exclusive(context.Background(), func() { c.gcWriteback(work) })
		} else {
			c.gcWriteback(work)
		}
		c.gcPass.cleaning.Add(-1)
		for _, p := range work {
			c.gcEvict(p)
		}
	} else {
		for _, p := range work {
			if !p.dirty {
				c.gcEvict(p)
			} else if !c.gcMove(p, victims[c.sb.bucketOf(p.loc)]) {
				break // out of room; what is done stays done
			}
		}
		c.gcPass.Unlock()
	}
	c.mu.Lock()
	for b, epoch := range victims {
		if c.mu.space.buckets[b].state == bPending && c.mu.space.buckets[b].epoch != epoch {
			freed++
		}
	}
	c.mu.Unlock()
	c.stats.gcRuns.Add(1)
	return freed, false
}

// gcPlanLocked picks a pass's victims (bucket: its epoch now) and the
// pieces of the index in them, or none, with hadRoom when room was there
// already (see gcStep).
func (c *Cache) gcPlanLocked(evict, clean bool) (victims map[int64]uint64, work []gcPiece, hadRoom bool) {
	nb := int64(len(c.mu.space.buckets))
	enough := c.fgReserve() + 1
	if clean {
		enough = c.lowFree() - 1
	}
	// Pending buckets are free after the next checkpoint: they count.
	pending := len(c.mu.space.pending)
	if pending > 0 && !clean || len(c.mu.space.free)+pending > enough {
		return nil, nil, true
	}
	bsz := c.sb.BucketSize
	room := int64(min(len(c.mu.space.free), c.fgReserve())) * bsz
	if c.mu.space.gc.b >= 0 {
		room += c.sb.bucketStart(c.mu.space.gc.b+1) - c.mu.space.gc.wp
	}
	type cand struct {
		b     int64
		score float64
	}
	var cands []cand
	for b := range nb {
		bk := &c.mu.space.buckets[b]
		if bk.state != bFull || bk.inflight != 0 || bk.live == 0 || !clean && bk.dirty*100 >= bsz*int64(c.opts.GCPercent) {
			continue
		}
		if !evict && bk.live > bk.dirty {
			continue
		}
		age := float64(c.mu.space.sealCount - bk.sealed + 1)
		cands = append(cands, cand{b, float64(bsz-bk.dirty) * age / float64(bsz+bk.dirty)})
	}
	sort.Slice(cands, func(i, j int) bool { return cands[i].score > cands[j].score })
	victims = map[int64]uint64{}
	budget := room - bsz/2 // keep some room: moved data fragments by block
	// Enough to bring the free buckets back to lowFree. Over a disk, a
	// cleaning pass takes a quarter of the cache at least: its sorted
	// writeback is denser, so each write costs less head travel (on the
	// hdd model, 0.8 ms a write for 1/4 of a 64 MiB cache over 256 MiB,
	// 1.8 ms for 1/16).
	need := c.lowFree() - len(c.mu.space.free) - pending
	if clean {
		// A cleaning pass ends with a backing flush, and its buckets
		// wait for a checkpoint (reuseBatch): it takes a batch of
		// them, not the one or two that reach lowFree.
		need = max(need, c.reuseBatch()-pending)
	}
	if clean && c.diskLike() {
		need = max(need, int(nb/4))
	}
	for _, cd := range cands {
		if len(victims) >= need {
			break
		}
		bk := &c.mu.space.buckets[cd.b]
		if !clean && bk.dirty > budget {
			continue
		}
		victims[cd.b] = bk.epoch
		budget -= bk.dirty
	}
	for b := range victims {
		work = c.bucketPiecesLocked(b, work)
	}
	return victims, work, false
}

// bucketPiecesLocked appends to work the extents of the index that lie in
// bucket b, found through its refs, each once, and replaces the refs by
// the ranges of those pieces. (Keeping a ref because it led to a piece is
// not enough: an extent that crosses into the next bucket can be reached
// through a ref over its part there, and once the extent is cut, that ref
// no longer leads to the part in b.)
func (c *Cache) bucketPiecesLocked(b int64, work []gcPiece) []gcPiece {
	bk := &c.mu.space.buckets[b]
	seen := map[int64]bool{} // extents' offsets
	var refs []byteRange
	for _, r := range bk.refs {
		c.mu.idx.Ascend(r.off, func(e btreeExtent) bool { // whole extents
			if e.Off >= r.end {
				return false
			}
			c.sb.forBuckets(e.Loc, e.Len, func(eb, loc, n int64) {
				off := e.Off + loc - e.Loc
				if eb != b || seen[off] {
					return
				}
				seen[off] = true
				refs = append(refs, byteRange{off, off + n})
				work = append(work, gcPiece{off: off, n: n, loc: loc, ver: e.Ver, dirty: e.Dirty})
			})
			return true
		})
	}
	bk.refs = refs
	return work
}

// gcWriteback writes the dirty pieces of work back to the backing, in
// address order, flushes it once and marks them clean (so gcEvict can drop
// them). A piece that a writeback already holds, or that changed since
// the plan, is skipped: it stays, and its bucket is not freed this pass.
func (c *Cache) gcWriteback(work []gcPiece) {
	var dirty []gcPiece
	for _, p := range work {
		if p.dirty {
			dirty = append(dirty, p)
		}
	}
	es := make([]btreeExtent, len(dirty))
	for i, p := range dirty {
		es[i] = btreeExtent{Off: p.off, Len: p.n, Loc: p.loc, Ver: p.ver, Dirty: true}
	}
	// A piece that is busy or stale is skipped: left for the flusher.
	cleaned, err := c.flusher.WriteBack(es, c.noteBacking)
	c.stats.gcCleanedBytes.Add(cleaned)
	if err != nil {
		c.log.Warn("cache: gc writeback failed", "err", err)
	}
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
// room for the cut it may make), and reports whether it did. A piece a
// writeback holds is left alone: the flusher is rewriting it on the
// backing to bridge a gap, and until the backing is flushed (the flusher
// releases it after that) a disk that tears the write can damage the
// backing's copy; the cache's copy is then the only good one, and a
// deletion durable before the flush would lose it.
func (c *Cache) gcEvict(p gcPiece) bool {
	if c.enter() != nil {
		return false
	}
	defer c.leave()
	c.mu.Lock()
	defer c.mu.Unlock()
	var clean = true
	c.mu.idx.Lookup(p.off, p.n, func(e btreeExtent) bool { clean = !e.Dirty; return clean })
	if !clean || c.busyLocked(p.off, p.n) || !c.pieceCurrentLocked(p) || !c.roomLocked(c.edgeCutsLocked(p.off, p.n)/2) {
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
		if c.mu.space.buckets[ob].epoch != epoch {
			c.mu.Unlock()
			c.leave()
			return true // emptied meanwhile: what we read may be garbage
		}
		rest := gcPiece{off: p.off + done, n: p.n - done, loc: p.loc + done, ver: p.ver}
		if c.cleanLocked(rest.off, rest.n) {
			// Written back since the plan: clean data is dropped,
			// never moved.
			c.mu.Unlock()
			c.leave()
			c.gcEvict(rest)
			return true
		}
		loc, got, b, ok := c.allocLocked(&c.mu.space.gc, p.n-done, 0)
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
			c.mu.space.release(b)
			c.mu.Unlock()
			c.leave()
			return false // the index is full: moving would cut extents
		}
		// Still the same data, and still all dirty (a piece written
		// back meanwhile is left for the next pass to drop).
		if err == nil && c.pieceCurrentLocked(sub) && !c.cleanLocked(sub.off, n) {
			if c.test.onMove != nil {
				c.test.onMove(sub.off, n)
			}
			gen := c.mu.space.buckets[b].gen
			moved := c.mu.idx.Replace(sub.off, n, p.ver, loc, gen)
			if moved == n {
				c.liveLocked(btreeExtent{Off: sub.off, Len: n, Loc: sub.loc, Dirty: true}, -1)
				c.liveLocked(btreeExtent{Off: sub.off, Len: n, Loc: loc, Dirty: true}, 1)
				c.appendLocked(record{Type: recReplace, Off: sub.off, Len: n, Loc: loc, Ver: p.ver, Gen: gen, CRC: crc(chunk)})
				c.stats.gcMovedBytes.Add(n)
			} else if moved != 0 {
				panic("cache: partial replace of a piece checked current")
			}
		}
		c.mu.space.release(b)
		c.mu.Unlock()
		c.leave()
		done += n
	}
	return true
}
