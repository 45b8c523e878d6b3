package cache

// ranges.go: what lies over a range, asked under mu: dirty or clean
// extents, writebacks and direct backing writes in flight, and whether a
// thrashing cache steps aside for a write there.

// pinnedLocked reports whether [off, off+n) holds dirty data or is being
// written back: such a range must never be written to the backing
// directly, or a writeback in flight could land stale data over it.
func (c *Cache) pinnedLocked(off, n int64) bool {
	return c.dirtyLocked(off, n) || c.busyLocked(off, n)
}

func (c *Cache) dirtyLocked(off, n int64) bool {
	dirty := false
	c.mu.idx.Lookup(off, n, func(e btreeExtent) bool { dirty = e.Dirty; return !dirty })
	return dirty
}

// thrashingLocked reports whether a thrashing cache steps aside: it
// thrashes (thrashDetector), and its backing is no disk (diskLike: a
// disk's random writes are better cached, and swept back in order) and
// is in reach.
func (c *Cache) thrashingLocked() bool {
	return (c.mu.admit.thrash.on || c.test.alwaysThrash) && !c.diskLike() && !c.backingAway()
}

// noteThrashLocked feeds the thrash detector with a write-back write of
// [off, off+n) while free buckets are short or the cache thrashes, and
// reports whether the write misses a cache that steps aside. Otherwise it
// costs no index lookup.
func (c *Cache) noteThrashLocked(off, n int64) (around bool) {
	if !c.mu.admit.thrash.on && !c.test.alwaysThrash && len(c.mu.space.free)+len(c.mu.space.pending) >= c.lowFree() {
		return false
	}
	hit := c.cachedLocked(off, n)
	window := int(max(64, c.CapacityBytes()/4096))
	was := c.mu.admit.thrash.on
	if c.mu.admit.thrash.note(uint64(off/4096), uint64((off%4096+n+4095)/4096), hit, c.costsNow(), c.CapacityBytes()/2, window) && !was {
		c.flusher.Kick() // to shed (Shedding)
	}
	return !hit && c.thrashingLocked()
}

// costsNow is what thrashDetector weighs at a window's end.
func (c *Cache) costsNow() costs {
	s := costs{
		cleaned:      c.stats.gcCleanedBytes.Load(),
		cachedNanos:  c.health.cachedNanos.Load() + c.health.roomNanos.Load(),
		cachedBytes:  c.health.cachedBytes.Load(),
		writes:       c.stats.writes.Load(),
		readHits:     c.stats.hits.Load() + c.stats.partialHits.Load(),
		backingPer4k: c.health.nanos.Load(),
	}
	if c.test.neverSlower {
		s.backingPer4k = 0 // none timed: never slower
	}
	return s
}

// cachedLocked reports whether part of [off, off+n) is cached, clean or
// dirty, or being written back.
func (c *Cache) cachedLocked(off, n int64) bool {
	cached := false
	c.mu.idx.Lookup(off, n, func(btreeExtent) bool { cached = true; return false })
	return cached || c.busyLocked(off, n)
}

// cleanLocked reports whether a clean extent lies over part of
// [off, off+n).
func (c *Cache) cleanLocked(off, n int64) bool {
	clean := false
	c.mu.idx.Lookup(off, n, func(e btreeExtent) bool { clean = !e.Dirty; return !clean })
	return clean
}

// busyLocked reports whether a writeback over part of [off, off+n) is in
// flight.
func (c *Cache) busyLocked(off, n int64) bool {
	return c.mu.wb.overlaps(off, n)
}

// directLocked reports whether a direct backing write over part of
// [off, off+n) is in flight.
func (c *Cache) directLocked(off, n int64) bool {
	for _, r := range c.mu.direct {
		if r.overlaps(off, n) {
			return true
		}
	}
	return false
}

// heldLocked reports whether the backing is being written over part of
// [off, off+n), by a writeback or directly.
func (c *Cache) heldLocked(off, n int64) bool {
	return c.busyLocked(off, n) || c.directLocked(off, n)
}
