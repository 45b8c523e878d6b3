package cache

// write.go: the write path: the decision between cache and backing by
// mode, cutoff, thrash and space, and the writes into the cache.

import (
	"errors"
	"fmt"
	"time"

	"github.com/nbdcache/nbdcache/storage"
)

// writeCached appends p to the cache and inserts it as extents (dirty or
// clean), chunk by chunk. cond, if not nil, is checked under the lock
// before each insert; promotion passes one that also refuses ranges the
// index covers. It returns the bytes done; errNoSpace when the cache is
// full (if makeRoom, after trying to free space).
func (c *Cache) writeCached(p []byte, off int64, dirty bool, cond func() bool, makeRoom bool) (int64, error) {
	var done int64
	tries := 0
	for done < int64(len(p)) {
		if err := c.enter(); err != nil {
			return done, err
		}
		c.mu.Lock()
		if cond != nil && !cond() {
			c.mu.Unlock()
			c.leave()
			return done, nil
		}
		loc, got, b, ok := c.allocLocked(&c.mu.space.fg, int64(len(p))-done, c.fgReserve())
		c.mu.Unlock()
		if !ok {
			c.leave()
			c.kickBackground()
			if !makeRoom || tries >= maxSpaceTries || !c.makeSpace() {
				c.stats.noSpace.Add(1)
				return done, errNoSpace
			}
			tries++
			continue
		}
		n := min(got, int64(len(p))-done)
		chunk := p[done : done+n]
		sum := crc(chunk)
		err := c.dw.write(chunk, loc)
		c.mu.Lock()
		if err == nil && cond != nil {
			if !cond() {
				err = errSkip
			} else {
				c.mu.idx.Lookup(off+done, n, func(btreeExtent) bool { err = errSkip; return false })
			}
		}
		if err == nil && !c.roomLocked(2) {
			err = errNoSpace // the index is full (see roomLocked)
		}
		if err == nil {
			src := "write"
			switch {
			case !dirty && cond != nil:
				src = "promotion"
			case !dirty:
				src = "writethrough copy"
			}
			c.insertNewLocked(off+done, n, loc, b, dirty, sum, src)
		}
		c.mu.space.release(b)
		c.mu.Unlock()
		c.leave()
		if err == errSkip {
			return done, nil
		}
		if err == errNoSpace {
			c.stats.noSpace.Add(1)
			return done, err
		}
		if err != nil {
			c.stats.cacheWriteErrors.Add(1)
			return done, fmt.Errorf("cache: write cache device: %w", err)
		}
		c.stats.cachedBytes.Add(n)
		done += n
	}
	return done, nil
}

// insertNewLocked inserts data just written at loc, in bucket b, as the
// newest version of [off, off+n) (src names the writer in the trace).
func (c *Cache) insertNewLocked(off, n, loc, b int64, dirty bool, sum uint32, src string) {
	e := btreeExtent{Off: off, Len: n, Loc: loc, Ver: c.mu.nextVer, Gen: c.mu.space.buckets[b].gen, Dirty: dirty}
	c.mu.nextVer++
	if c.tracing() {
		c.tracef(e.Off, e.Len, "insert %v (%s)", e, src)
	}
	c.insertLocked(e, sum)
}

var errSkip = errors.New("cache: skipped")

// maxSpaceTries bounds how often a write retries after makeSpace made
// room that other writers then took, or when room is there but the index
// is near the checkpoint's capacity (which only a bypass helps).
const maxSpaceTries = 16

// WriteAt writes p at off. 512-byte-aligned requests are native; others go
// through read-modify-write of the sectors they touch.
func (c *Cache) WriteAt(p []byte, off int64, flags storage.Flags) error {
	if err := c.writeUnacked(p, off); err != nil {
		return err
	}
	return c.ack(flags)
}

// writeUnacked is WriteAt but for the acknowledgement.
func (c *Cache) writeUnacked(p []byte, off int64) error {
	if err := storage.CheckRange(c.Size(), off, int64(len(p))); err != nil {
		return err
	}
	switch {
	case len(p) == 0:
		return nil
	case off%sectorSize != 0 || len(p)%sectorSize != 0:
		return c.rmw(p, off)
	default:
		return c.write(p, off)
	}
}

// rmw handles an unaligned write. The sectors it covers only in part are
// read, patched and written whole (rmwSectors); the whole sectors between
// them are written straight from p, as an aligned write would be. Copying
// the whole payload instead would cost its size in memory for every
// unaligned write (up to the NBD maximum block size, which a client can
// repeat at will). Unaligned writes are serialized among themselves,
// middle included, so that two sharing a sector never lose each other's
// bytes: one's whole sector written between the other's read and write
// of that sector would be undone.
func (c *Cache) rmw(p []byte, off int64) error {
	c.rmwMu.Lock()
	defer c.rmwMu.Unlock()
	end := off + int64(len(p))
	a, e := alignUp(off, sectorSize), end/sectorSize*sectorSize
	if a >= e {
		return c.rmwSectors(p, off) // within two sectors
	}
	if a > off {
		if err := c.rmwSectors(p[:a-off], off); err != nil {
			return err
		}
	}
	if err := c.write(p[a-off:e-off], a); err != nil {
		return err
	}
	if e < end {
		return c.rmwSectors(p[e-off:], e)
	}
	return nil
}

// rmwSectors writes p (within at most two sectors) by reading the sectors
// it touches, patching them and writing them whole. rmwMu is held.
func (c *Cache) rmwSectors(p []byte, off int64) error {
	a := off / sectorSize * sectorSize
	e := alignUp(off+int64(len(p)), sectorSize)
	buf := make([]byte, e-a)
	if err := c.read(buf, a, false, false); err != nil {
		return err
	}
	copy(buf[off-a:], p)
	c.stats.rmw.Add(1)
	return c.write(buf, a)
}

// write is the aligned write path: the mode, the cutoff and the space
// decide between the cache (dirty or clean) and the backing
// (decideLocked), then writeAs carries it out.
func (c *Cache) write(p []byte, off int64) error {
	c.mu.Lock()
	if err := c.errLocked(); err != nil {
		c.mu.Unlock()
		return err
	}
	d := c.decideLocked(off, int64(len(p)))
	c.mu.Unlock()
	return c.writeAs(p, off, d)
}

// writeDecision is where an aligned write goes, decided under mu
// (decideLocked): its route, and what the route needs to know.
type writeDecision struct {
	mode           Mode
	around, thrash bool // bypasses the cache: a stream past the cutoff, or a miss of a thrashing cache
	pinned         bool // the range holds dirty data or is being written back (only for routes that need it)
}

func (d writeDecision) route() route { return writeRoute(d.mode, d.around, d.pinned) }

// decideLocked decides the route of a write of [off, off+n), feeding the
// admission policy's detectors (once per write, in the order writes
// arrive). The pin decided here is only a first guess: a direct write
// checks it again under the lock that starts it (passthrough), and comes
// back with errPinned when dirty data arrived meanwhile.
func (c *Cache) decideLocked(off, n int64) writeDecision {
	d := writeDecision{mode: c.mu.mode}
	// While the backing is away, a write-back stream past the cutoff is
	// cached like any write, rather than sent to wait for the backing.
	d.around = c.mu.admit.sequential(off, n) && !(d.mode == Writeback && c.backingAway())
	// A miss goes around a thrashing cache; a write over cached data stays
	// in it (it supersedes that data, with no journal record of its own).
	if d.mode == Writeback && !d.around {
		d.thrash = c.noteThrashLocked(off, n)
		d.around = d.thrash
	}
	// A write-back write goes to the cache whether the range is pinned or
	// not: skip the index lookup then (it is a tenth of the write path).
	// Nor is one needed for a write around a thrashing cache: its range
	// was just found holding nothing, under this same lock.
	if routeNeedsPin(d.mode, d.around) && !d.thrash {
		d.pinned = c.pinnedLocked(off, n)
	}
	if c.bypassHint.Load() != d.thrash {
		c.bypassHint.Store(d.thrash)
	}
	return d
}

// writeAs carries out the write of p at off that d decided.
func (c *Cache) writeAs(p []byte, off int64, d writeDecision) error {
	n := int64(len(p))
	c.noteWrites(1, n, d.route() != routeBacking)
	for {
		var err error
		switch d.route() {
		case routeDirty:
			start, inFlight := c.cachedStart()
			err := c.writeDirty(p, off)
			written := n
			if err != nil {
				written = 0 // not counted
			}
			c.cachedDone(start, inFlight, written)
			return err
		case routeBacking:
			c.stats.bypasses.Add(1)
			var took time.Duration
			took, err = c.writeBacking(p, off, directWrite, nil)
			if d.thrash && err == nil {
				// What diskLike measures: a random write's cost on the
				// backing. A disk's ends the thrashing at once.
				c.stats.thrashBypasses.Add(1)
				c.noteBacking(took, n)
			}
			if c.noteUnavailable(err) && d.mode == Writeback {
				return c.writeDirty(p, off) // the stream's bypass found the backing away
			}
		case routeThrough:
			err = c.writeThrough(p, off)
		}
		if !errors.Is(err, errPinned) {
			return err
		}
		d.pinned = true
	}
}

// noteWrites counts k client writes of n bytes in all (a batch's run, or
// one write), and tells the flusher the foreground is busy, once (it reads
// the clock). cached: they go into the cache device, whose pages are
// started on their way every earlyWriteback bytes (a write around the
// cache has nothing there to start).
func (c *Cache) noteWrites(k, n int64, cached bool) {
	c.stats.writes.Add(k)
	c.stats.writeBytes.Add(n)
	c.flusher.NoteForeground()
	if cached && c.bg.unstarted.Add(n) >= earlyWriteback && c.kickStartWriteback() {
		c.bg.unstarted.Store(0)
	}
}

// writeDirty writes p into the cache as dirty data. When the cache is
// full, the rest goes to the backing, dropping whatever dirty data it
// overlaps (directOver): the write supersedes it, as it would in the
// cache, and a crash that loses the deletion brings back older data, never
// stale clean data. Only when the index has no room for the cut that may
// need is that dirty data written back first.
func (c *Cache) writeDirty(p []byte, off int64) error {
	for {
		done, err := c.writeCached(p, off, true, nil, true)
		if err == nil {
			return nil
		}
		if !errors.Is(err, errNoSpace) {
			return err
		}
		p, off = p[done:], off+done
		if c.slowBacking() && c.waitRoom() {
			continue
		}
		if took, err := c.writeBacking(p, off, directOver, nil); !errors.Is(err, errPinned) {
			if err == nil {
				c.stats.bypasses.Add(1)
				c.noteBacking(took, int64(len(p)))
			}
			if c.noteUnavailable(err) {
				// A full cache while the backing is away (it waited for
				// it, up to its timeout): the client learns that space
				// ran out, not that its data is damaged.
				return fmt.Errorf("cache: full of dirty data while the backing is unreachable: %w: %w", storage.ErrNoSpace, err)
			}
			return err
		}
		if err := c.flushRange(off, int64(len(p))); err != nil {
			return err
		}
		c.mu.Lock()
		pinned := c.pinnedLocked(off, int64(len(p)))
		c.mu.Unlock()
		if pinned {
			continue
		}
		c.stats.bypasses.Add(1)
		if _, err := c.writeBacking(p, off, directWrite, nil); !errors.Is(err, errPinned) {
			return err
		}
	}
}

// waitRoom waits until buckets are free beyond the reserve or pending (a
// checkpoint frees those), at most maxRoomWait; it reports whether there
// is room to try again: buckets, and an index that is not full.
func (c *Cache) waitRoom() bool {
	c.kickBackground()
	c.stats.roomWaits.Add(1)
	timedOut := false
	start := time.Now()
	var t *time.Timer
	t = time.AfterFunc(maxRoomWait, func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		// A GC pass writing its victims back frees them when it ends:
		// wait for it, up to maxCleanWait.
		if c.gcPass.cleaning.Load() > 0 && time.Since(start) < maxCleanWait {
			t.Reset(maxRoomWait / 4)
			return
		}
		timedOut = true
		c.mu.space.cond.Broadcast()
	})
	defer t.Stop()
	c.mu.Lock()
	defer c.mu.Unlock()
	for len(c.mu.space.free) <= c.fgReserve() && len(c.mu.space.pending) == 0 && !timedOut && c.errLocked() == nil {
		c.mu.space.cond.Wait()
	}
	if timedOut {
		c.health.roomWaitAfter.Store(time.Now().Add(roomBackoff).UnixNano())
	}
	// Free buckets are no room while the index is full: retrying would
	// spin (nothing writes back dirty extents below the dirty target to
	// make index room), so the write goes to the backing instead.
	return !timedOut && c.errLocked() == nil && !c.indexFullLocked()
}

// writeThrough writes p to the backing, then a clean copy into the cache.
func (c *Cache) writeThrough(p []byte, off int64) error {
	n := int64(len(p))
	_, err := c.writeBacking(p, off, directWrite, func() error {
		done, err := c.writeCached(p, off, false, nil, false)
		if errors.Is(err, errNoSpace) {
			err = nil
		}
		if err != nil || done < n {
			// Nothing stale may stay for the part not cached.
			if e := c.enter(); e != nil {
				return e
			}
			c.mu.Lock()
			c.deleteDirectLocked(off+done, n-done)
			c.mu.Unlock()
			c.leave()
		}
		return err
	})
	return err
}
