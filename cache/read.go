package cache

// read.go: the read path: lookups in the index, the RAM tier, the backing
// for misses, and the promotion of misses into the cache.

import (
	"errors"
	"fmt"

	"github.com/nbdcache/nbdcache/storage"
)

// readPiece is part of a read: a cached piece (in one bucket) or a gap.
type readPiece struct {
	off, n int64 // on the virtual device
	cached bool
	loc    int64
	ver    uint64
	dirty  bool
	b      int64
	epoch  uint64
}

// lookupLocked splits [off, off+n) into cached pieces, one bucket each,
// and gaps.
func (c *Cache) lookupLocked(off, n int64) []readPiece {
	var ps []readPiece
	pos := off
	c.mu.idx.Lookup(off, n, func(e btreeExtent) bool {
		if e.Off > pos {
			ps = append(ps, readPiece{off: pos, n: e.Off - pos})
		}
		c.sb.forBuckets(e.Loc, e.Len, func(b, loc, m int64) {
			ps = append(ps, readPiece{off: e.Off + (loc - e.Loc), n: m, cached: true, loc: loc, ver: e.Ver,
				dirty: e.Dirty, b: b, epoch: c.mu.space.buckets[b].epoch})
		})
		pos = e.End()
		return true
	})
	if pos < off+n {
		ps = append(ps, readPiece{off: pos, n: off + n - pos})
	}
	return ps
}

// ReadAt reads from the cache where it holds the data (RAM tier first),
// from the backing elsewhere; misses may be promoted.
func (c *Cache) ReadAt(p []byte, off int64) error {
	if err := storage.CheckRange(c.Size(), off, int64(len(p))); err != nil {
		return err
	}
	if len(p) == 0 {
		return nil
	}
	return c.read(p, off, false, false)
}

// ReadNoWait is ReadAt for a read that can be served from memory: what
// the cache holds from the RAM tier or the cache device's page cache
// (storage.ReadNoWait), and, where nothing would promote a miss (a
// thrashing cache), the rest from the backing's page cache. Otherwise it
// returns false having fed no detector and promoted nothing, and the
// caller reads with ReadAt.
func (c *Cache) ReadNoWait(p []byte, off int64) bool {
	if storage.CheckRange(c.Size(), off, int64(len(p))) != nil {
		return false
	}
	return len(p) == 0 || c.read(p, off, false, true) == nil
}

// errWouldWait ends a read with nowait that would have waited.
var errWouldWait = errors.New("cache: the read would wait")

// Prefetch warms [off, off+length) into the cache (NBD CACHE), past the
// admission policy.
func (c *Cache) Prefetch(off, length int64) error {
	if err := storage.CheckRange(c.Size(), off, length); err != nil {
		return err
	}
	// One buffer for the whole range: a bucket per call, not per bucket
	// warmed, since a client may ask for gigabytes (the NBD server lets
	// only a few CACHE calls run at once).
	buf := make([]byte, min(length, c.sb.BucketSize))
	for length > 0 {
		n := min(length, c.sb.BucketSize)
		if err := c.read(buf[:n], off, true, false); err != nil {
			return err
		}
		off, length = off+n, length-n
	}
	return nil
}

// read reads p at off (ReadAt; Prefetch with prefetch). With nowait it
// reads only from memory (what it holds, and a miss nothing promotes
// from the backing's page cache), or fails with errWouldWait before
// anything it does is seen (the stream detector is fed only once the
// read is done).
func (c *Cache) read(p []byte, off int64, prefetch, nowait bool) error {
	n := int64(len(p))
	for {
		c.mu.Lock()
		if c.mu.closed {
			c.mu.Unlock()
			return ErrClosed
		}
		ps := c.lookupLocked(off, n)
		if c.tracing() {
			var b []byte
			for _, pc := range ps {
				if pc.cached {
					b = fmt.Appendf(b, " [%d+%d)@%d v%d dirty=%v", pc.off, pc.n, pc.loc, pc.ver, pc.dirty)
				} else {
					b = fmt.Appendf(b, " [%d+%d) gap", pc.off, pc.n)
				}
			}
			c.tracef(off, n, "read lookup [%d+%d):%s", off, n, b)
		}
		mode := c.mu.mode
		seq := !nowait && c.mu.admit.sequential(off, n)
		// A miss may be promoted unless the backing is being written
		// over the range right now, directly or by a writeback (a
		// zeroDirty's range may hold a gap: TestZeroDirtyVoidsPromotion);
		// a backing write that starts later voids the guard.
		var guard *promoGuard
		// A thrashing cache takes no read misses either (but an NBD
		// CACHE asks for them): each would push out data written back
		// at a cost.
		thrash := mode == Writeback && c.thrashingLocked()
		if mayPromote(mode, seq, hasGap(ps)) && !c.heldLocked(off, n) && (prefetch || !thrash) {
			if nowait {
				// A miss that may be promoted takes the worker's path:
				// the promotion writes to the cache.
				c.mu.Unlock()
				return errWouldWait
			}
			guard = &promoGuard{byteRange: byteRange{off, off + n}}
			c.mu.promos = append(c.mu.promos, guard)
		}
		c.mu.Unlock()
		done := func() {
			if guard != nil {
				c.mu.Lock()
				c.unguardLocked(guard)
				c.mu.Unlock()
			}
		}

		var fromDev []readPiece
		gaps := false
		ramHits := int64(0) // counted once the read is done: a no-wait read may yet refuse
		for _, pc := range ps {
			dst := p[pc.off-off : pc.off-off+pc.n]
			if !pc.cached {
				gaps = true
				if nowait {
					// A miss nothing promotes (a thrashing cache's) is
					// served inline too if the backing's page cache
					// holds it.
					if !storage.ReadNoWait(c.back, dst, pc.off) {
						return errWouldWait // no guard: nothing to undo
					}
					continue
				}
				if err := c.back.ReadAt(dst, pc.off); err != nil {
					done()
					return fmt.Errorf("cache: read backing: %w", err)
				}
				continue
			}
			if c.ramGet(pc, dst) {
				ramHits++
				continue
			}
			if nowait {
				if !storage.ReadNoWait(c.dev, dst, pc.loc) {
					return errWouldWait // no guard: nothing to undo
				}
				fromDev = append(fromDev, pc)
				continue
			}
			if err := c.dev.ReadAt(dst, pc.loc); err != nil {
				c.stats.cacheReadErrors.Add(1)
				if pc.dirty {
					done()
					c.log.Error("cache: read of dirty data failed; it exists nowhere else", "off", pc.off, "len", pc.n, "err", err)
					return fmt.Errorf("cache: read dirty data at %d: %w", pc.off, err)
				}
				c.log.Warn("cache: cache read failed; reading the backing", "off", pc.off, "err", err)
				if err := c.back.ReadAt(dst, pc.off); err != nil {
					done()
					return fmt.Errorf("cache: read backing: %w", err)
				}
				continue
			}
			fromDev = append(fromDev, pc)
		}
		// Data read from a bucket that was emptied (and maybe reused)
		// meanwhile may be garbage: read again.
		stale := false
		c.mu.Lock()
		for _, pc := range fromDev {
			if c.mu.space.buckets[pc.b].epoch != pc.epoch {
				stale = true
				break
			}
		}
		admit := false
		if gaps && !stale && guard != nil && !guard.void {
			admit = c.mu.admit.promote(off, n, prefetch)
		}
		if nowait && !stale {
			seq = c.mu.admit.sequential(off, n) // for the bypass count
		}
		c.mu.Unlock()
		if stale {
			done()
			c.stats.readRetries.Add(1)
			continue
		}
		for _, pc := range fromDev {
			c.ramPut(pc, p[pc.off-off:pc.off-off+pc.n])
		}
		c.stats.ramHits.Add(ramHits)
		c.stats.reads.Add(1)
		c.stats.readBytes.Add(n)
		switch {
		case !gaps:
			c.stats.hits.Add(1)
		case len(ps) == 1:
			c.stats.misses.Add(1)
		default:
			c.stats.partialHits.Add(1)
		}
		if seq && gaps {
			c.stats.bypasses.Add(1)
		}
		if admit {
			for _, pc := range ps {
				// Only whole sectors are cached.
				a, e := alignUp(pc.off, sectorSize), (pc.off+pc.n)/sectorSize*sectorSize
				if !pc.cached && a < e {
					c.promote(p[a-off:e-off], a, guard, prefetch)
				}
			}
		}
		done()
		return nil
	}
}

func hasGap(ps []readPiece) bool {
	for _, pc := range ps {
		if !pc.cached {
			return true
		}
	}
	return false
}

// promote copies data just read from the backing into the cache as clean
// extents, unless a backing write over the read's range started since the
// read looked it up (guard.void), or the index got an extent there
// (writeCached's check): either would make the copy stale.
//
// A read's promotion takes free space only: it makes none, since a read
// miss is a guess and room costs evictions or GC moves. An NBD CACHE
// (prefetch) is the client's word that it will read the range, so it
// makes room as a write-back write does (makeSpace: evicting clean data,
// moving dirty data, a checkpoint), in every mode and while thrashing
// too; without that, a full cache (a thrashing one, say) refused every
// CACHE until the background freed a bucket. The NBD server bounds how
// many CACHE requests run at once.
func (c *Cache) promote(data []byte, off int64, guard *promoGuard, prefetch bool) {
	ok := func() bool { return !guard.void }
	done, _ := c.writeCached(data, off, false, ok, prefetch)
	if done > 0 {
		c.stats.promotions.Add(1)
		c.stats.promotedBytes.Add(done)
	}
}

// unguardLocked ends a read's promotion guard.
func (c *Cache) unguardLocked(g *promoGuard) {
	for i, x := range c.mu.promos {
		if x == g {
			c.mu.promos = append(c.mu.promos[:i], c.mu.promos[i+1:]...)
			return
		}
	}
}

// backingWriteLocked notes that a backing write over [off, end) starts:
// the promotions under way over it are void.
func (c *Cache) backingWriteLocked(off, end int64) {
	for _, g := range c.mu.promos {
		if g.overlaps(off, end-off) {
			g.void = true
		}
	}
}
