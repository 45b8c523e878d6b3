package cache

// zero.go: TRIM and WRITE_ZEROES: dropping cached data and zeroing the
// backing in the order writeback keeps.

import (
	"errors"

	"github.com/nbdcache/nbdcache/storage"
)

// Trim discards [off, off+length), as bcache does: the extents over it,
// dirty ones too, are deleted (see passthrough for when that is committed
// first), then the backing is trimmed. A trimmed sector may so read back
// as zeroes or as any data it held before, never as another sector's. A
// range being written back at that moment is left alone: its writeback
// lands data the range held. Only whole sectors are trimmed.
func (c *Cache) Trim(off, length int64, flags storage.Flags) error {
	if err := storage.CheckRange(c.Size(), off, length); err != nil {
		return err
	}
	a, e := alignUp(off, sectorSize), (off+length)/sectorSize*sectorSize
	c.stats.trims.Add(1)
	if a < e {
		for _, r := range c.runs(a, e-a, c.heldLocked) {
			if r.dirty {
				continue
			}
			err := c.passthrough(r.off, r.n, directTrim, func() error {
				if !c.back.Caps().Trim {
					return nil
				}
				return c.back.Trim(r.off, r.n, 0)
			}, nil)
			if err != nil {
				return err
			}
		}
	}
	return c.ack(flags)
}

// Zero makes [off, off+length) read back as zeroes: dirty ranges get zeroes
// written into the cache, the rest is invalidated and zeroed on the
// backing.
func (c *Cache) Zero(off, length int64, flags storage.Flags) error {
	if err := storage.CheckRange(c.Size(), off, length); err != nil {
		return err
	}
	c.stats.zeros.Add(1)
	if flags&storage.FastZero != 0 {
		c.mu.Lock()
		pinned := c.pinnedLocked(off, length)
		c.mu.Unlock()
		if pinned || !c.back.Caps().FastZero {
			return storage.ErrNotSupported
		}
	}
	a, e := alignUp(off, sectorSize), (off+length)/sectorSize*sectorSize
	if a >= e {
		if err := c.rmw(make([]byte, length), off); err != nil {
			return err
		}
	} else {
		if a > off {
			if err := c.rmw(make([]byte, a-off), off); err != nil {
				return err
			}
		}
		if e < off+length {
			if err := c.rmw(make([]byte, off+length-e), e); err != nil {
				return err
			}
		}
		for _, r := range c.runs(a, e-a, c.pinnedLocked) {
			if err := c.zeroRun(r, flags); err != nil {
				return err
			}
		}
	}
	return c.ack(flags)
}

// zeroRun zeroes one run of a Zero. A clean or uncached run is invalidated
// and zeroed on the backing. A dirty run of a bucket or more is zeroed on
// the backing too, and its extents dropped (zeroDirty), so as not to fill
// the cache with zeroes; a shorter one, or one being written back, gets
// zeroes written into the cache, as dirty data.
func (c *Cache) zeroRun(r readPiece, flags storage.Flags) error {
	bflags := flags & (storage.NoHole | storage.FastZero)
	if !r.dirty {
		err := c.passthrough(r.off, r.n, directWrite, func() error { return c.zeroBacking(r.off, r.n, bflags) }, nil)
		if !errors.Is(err, errPinned) {
			return err
		}
		// Dirty data landed meanwhile: zero the run as a dirty one.
	}
	if r.n >= c.sb.BucketSize {
		if done, err := c.zeroDirty(r.off, r.n, bflags); done || err != nil {
			return err
		}
	}
	for done := int64(0); done < r.n; {
		m := min(r.n-done, c.sb.BucketSize)
		if err := c.write(make([]byte, m), r.off+done); err != nil {
			return err
		}
		done += m
	}
	return nil
}

// zeroDirty zeroes [off, off+n), which dirty extents cover, on the backing
// and then drops them, in the order writeback keeps: the range is
// registered as being written back (no writeback of it starts, writes to
// it go into the cache, direct backing writes wait), the backing is zeroed
// and flushed, and only then are the extents deleted. The deletion needs
// no commit of its own: a crash before it is durable brings the dirty data
// back; after, the backing holds the zeroes. It does nothing and reports
// false if part of the range is being written back.
func (c *Cache) zeroDirty(off, n int64, bflags storage.Flags) (bool, error) {
	w := inflightWB{off: off, end: off + n} // version 0 is no extent's
	c.mu.Lock()
	// The run was dirty when Zero split the request, but a clean extent
	// may lie in it now (one being gap-filled then counted as held, or
	// one inserted since): the backing must not be zeroed under it
	// before its deletion is durable. Such a run is zeroed in the cache.
	if c.heldLocked(off, n) || c.cleanLocked(off, n) && c.test.brk != breakNoCleanGone {
		c.mu.Unlock()
		return false, nil
	}
	c.mu.wb.add(w)
	c.backingWriteLocked(w.off, w.end)
	if c.tracing() {
		c.tracef(off, n, "zeroDirty start [%d+%d)", off, n)
	}
	c.mu.Unlock()
	err := c.settleCleanGone(off, n)
	if err == nil {
		err = c.zeroBacking(off, n, bflags)
	}
	if err == nil {
		err = c.flushBacking()
	}
	if err == nil {
		err = c.enter()
	}
	clean := false
	c.mu.Lock()
	if err == nil {
		clean = c.deleteLocked(off, n)
	}
	c.unregisterLocked(btreeExtent{Off: w.off, Len: w.end - w.off, Ver: w.ver})
	c.mu.Unlock()
	if err == nil {
		c.leave()
		if clean {
			err = c.commit() // no clean extent can be here; if one were, it is stale now
		}
	}
	return true, err
}

// zeroBacking zeroes [off, off+n) on the backing: with its Zero, or by
// writing zeroes where it has none (or, without FastZero, refuses).
func (c *Cache) zeroBacking(off, n int64, bflags storage.Flags) error {
	if c.back.Caps().Zero {
		err := c.back.Zero(off, n, bflags)
		if err == nil || !errors.Is(err, storage.ErrNotSupported) || bflags&storage.FastZero != 0 {
			return err
		}
	}
	z := make([]byte, min(n, 1<<20))
	for done := int64(0); done < n; {
		m := min(n-done, int64(len(z)))
		if err := c.back.WriteAt(z[:m], off+done, 0); err != nil {
			return err
		}
		done += m
	}
	return nil
}
