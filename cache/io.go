package cache

import (
	"errors"
	"fmt"
	"slices"
	"time"

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
				dirty: e.Dirty, b: b, epoch: c.mu.buckets[b].epoch})
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
	return c.read(p, off, false)
}

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
		if err := c.read(buf[:n], off, true); err != nil {
			return err
		}
		off, length = off+n, length-n
	}
	return nil
}

func (c *Cache) read(p []byte, off int64, prefetch bool) error {
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
		seq := c.mu.admit.sequential(off, n)
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
		for _, pc := range ps {
			dst := p[pc.off-off : pc.off-off+pc.n]
			if !pc.cached {
				gaps = true
				if err := c.back.ReadAt(dst, pc.off); err != nil {
					done()
					return fmt.Errorf("cache: read backing: %w", err)
				}
				continue
			}
			if c.ramGet(pc, dst) {
				c.stats.ramHits.Add(1)
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
			if c.mu.buckets[pc.b].epoch != pc.epoch {
				stale = true
				break
			}
		}
		admit := false
		if gaps && !stale && guard != nil && !guard.void {
			admit = c.mu.admit.promote(off, n, prefetch)
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
					c.promote(p[a-off:e-off], a, guard)
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
func (c *Cache) promote(data []byte, off int64, guard *promoGuard) {
	ok := func() bool { return !guard.void }
	done, _ := c.writeCached(data, off, false, ok, false)
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
		loc, got, b, ok := c.allocLocked(&c.mu.fg, int64(len(p))-done, c.fgReserve())
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
			e := btreeExtent{Off: off + done, Len: n, Loc: loc, Ver: c.mu.nextVer, Gen: c.mu.buckets[b].gen, Dirty: dirty}
			c.mu.nextVer++
			if c.tracing() {
				src := "write"
				switch {
				case !dirty && cond != nil:
					src = "promotion"
				case !dirty:
					src = "writethrough copy"
				}
				c.tracef(e.Off, e.Len, "insert %v (%s)", e, src)
			}
			c.insertLocked(e, sum)
		}
		c.releaseLocked(b)
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

var errSkip = errors.New("cache: skipped")

// maxSpaceTries bounds how often a write retries after makeSpace made
// room that other writers then took, or when room is there but the index
// is near the checkpoint's capacity (which only a bypass helps).
const maxSpaceTries = 16

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
	return c.mu.admit.thrash.on && !c.diskLike() && !c.backingAway()
}

// noteThrashLocked feeds the thrash detector with a write-back write of
// [off, off+n) while free buckets are short or the cache thrashes, and
// reports whether the write misses a cache that steps aside. Otherwise it
// costs no index lookup.
func (c *Cache) noteThrashLocked(off, n int64) (around bool) {
	if !c.mu.admit.thrash.on && len(c.mu.free)+len(c.mu.pending) >= c.lowFree() {
		return false
	}
	hit := c.cachedLocked(off, n)
	window := int(max(64, c.CapacityBytes()/4096))
	c.mu.admit.thrash.note(hit, c.stats.gcCleanedBytes.Load(), c.CapacityBytes()/2, window)
	return !hit && c.thrashingLocked()
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

// WriteAt writes p at off. 512-byte-aligned requests are native; others go
// through read-modify-write of the sectors they touch.
func (c *Cache) WriteAt(p []byte, off int64, flags storage.Flags) error {
	if err := storage.CheckRange(c.Size(), off, int64(len(p))); err != nil {
		return err
	}
	if len(p) > 0 {
		var err error
		if off%sectorSize != 0 || len(p)%sectorSize != 0 {
			err = c.rmw(p, off)
		} else {
			err = c.write(p, off)
		}
		if err != nil {
			return err
		}
	}
	return c.ack(flags)
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
	if err := c.read(buf, a, false); err != nil {
		return err
	}
	copy(buf[off-a:], p)
	c.stats.rmw.Add(1)
	return c.write(buf, a)
}

// write is the aligned write path: the mode, the cutoff and the space
// decide between the cache (dirty or clean) and the backing. The pin
// decided here is only a first guess: a direct write checks it again
// under the lock that starts it (passthrough), and comes back here with
// errPinned when dirty data arrived meanwhile.
func (c *Cache) write(p []byte, off int64) error {
	n := int64(len(p))
	c.mu.Lock()
	if err := c.errLocked(); err != nil {
		c.mu.Unlock()
		return err
	}
	mode := c.mu.mode
	// While the backing is away, a write-back stream past the cutoff is
	// cached like any write, rather than sent to wait for the backing.
	around := c.mu.admit.sequential(off, n) && !(mode == Writeback && c.backingAway())
	// A miss goes around a thrashing cache; a write over cached data stays
	// in it (it supersedes that data, with no journal record of its own).
	thrash := false
	if mode == Writeback && !around {
		thrash = c.noteThrashLocked(off, n)
		around = thrash
	}
	// A write-back write goes to the cache whether the range is pinned or
	// not: skip the index lookup then (it is a tenth of the write path).
	// Nor is one needed for a write around a thrashing cache: its range
	// was just found holding nothing, under this same lock.
	pinned := false
	if routeNeedsPin(mode, around) && !thrash {
		pinned = c.pinnedLocked(off, n)
	}
	c.mu.Unlock()
	c.stats.writes.Add(1)
	c.stats.writeBytes.Add(n)
	if c.flusher != nil {
		c.flusher.NoteForeground()
	}
	for {
		var err error
		switch writeRoute(mode, around, pinned) {
		case routeDirty:
			return c.writeDirty(p, off)
		case routeBacking:
			c.stats.bypasses.Add(1)
			var took time.Duration
			took, err = c.writeBacking(p, off, directWrite, nil)
			if thrash && err == nil {
				// What diskLike measures: a random write's cost on the
				// backing. A disk's ends the thrashing at once.
				c.stats.thrashBypasses.Add(1)
				c.noteBacking(took, n)
			}
			if c.noteUnavailable(err) && mode == Writeback {
				return c.writeDirty(p, off) // the stream's bypass found the backing away
			}
		case routeThrough:
			err = c.writeThrough(p, off)
		}
		if !errors.Is(err, errPinned) {
			return err
		}
		pinned = true
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
		c.mu.spaceCond.Broadcast()
	})
	defer t.Stop()
	c.mu.Lock()
	defer c.mu.Unlock()
	for len(c.mu.free) <= c.fgReserve() && len(c.mu.pending) == 0 && !timedOut && c.errLocked() == nil {
		c.mu.spaceCond.Wait()
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

// errPinned: a direct write found dirty data in its range when it
// checked again under the lock; the caller writes into the cache instead.
var errPinned = errors.New("cache: range holds dirty data")

// directKind is what passthrough does about a range that is held.
type directKind int

const (
	// directWrite (a write, a zero): dirty data in the range refuses it
	// (errPinned); writebacks and direct writes in flight over it are
	// waited for.
	directWrite directKind = iota
	// directTrim: a held range is skipped (a trim may leave a sector's
	// data); dirty data is dropped, as bcache's discard does.
	directTrim
	// directOver (a write that found the cache full): held ranges are
	// waited for, and the dirty data in the range is dropped, as an
	// overwrite in the cache would drop it, but only once the backing
	// write is done (so a commit that makes the deletion durable flushes
	// the backing first: a deletion durable before the data that
	// supersedes it would lose a flushed write), and only where it still
	// holds the version found at the start; errPinned only when the
	// index has no room for the cut that may need.
	directOver
)

// passthrough performs op on the backing for [off, off+n). Under the lock
// that starts it, it checks the range again (see directKind): a check made
// before, under an earlier hold of the lock, is void by now (a gap-fill
// writeback may have started over the range, or dirty data landed). Then
// it registers the range as written directly (writebacks of it wait,
// promotions of it are void) and deletes the extents over it
// (deleteDirectLocked), durably if one was clean: a clean extent that
// outlived a crash over newer backing data would be stale. A deleted dirty
// extent is like an overwritten one: its deletion is made durable by the
// next commit, and until then a crash brings back data the range held.
// After op, then (if not nil) runs with the backing write counted, so the
// records it appends are committed only after a backing flush; the range
// stays registered until then returns.
func (c *Cache) passthrough(off, n int64, kind directKind, op func() error, then func() error) error {
	r := byteRange{off, off + n}
	for {
		if err := c.enter(); err != nil {
			return err
		}
		c.mu.Lock()
		if c.test.brk == breakNoPinRecheck || !c.heldLocked(off, n) && (kind != directWrite || !c.dirtyLocked(off, n)) {
			if kind == directOver && !c.roomLocked(1) {
				c.mu.Unlock()
				c.leave()
				return errPinned
			}
			break
		}
		c.leave()
		if kind == directTrim {
			c.mu.Unlock()
			return nil
		}
		if kind == directWrite && c.dirtyLocked(off, n) {
			c.mu.Unlock()
			return errPinned
		}
		c.stats.directWaits.Add(1)
		if c.test.onDirectWait != nil {
			c.test.onDirectWait()
		}
		for c.heldLocked(off, n) && c.errLocked() == nil {
			c.mu.wbCond.Wait()
		}
		err := c.errLocked()
		c.mu.Unlock()
		if err != nil {
			return err
		}
	}
	c.mu.direct = append(c.mu.direct, r)
	c.backingWriteLocked(r.off, r.end)
	if c.tracing() {
		c.tracef(off, n, "direct start [%d+%d) kind %d", off, n, kind)
	}
	var clean bool
	var superseded []btreeExtent
	if kind == directOver {
		clean, superseded = c.deleteCleanLocked(off, n)
		c.mu.reservedExt++ // for the cut dropSuperseded may make
		defer func() {
			c.mu.Lock()
			c.mu.reservedExt--
			c.mu.Unlock()
		}()
	} else {
		clean = c.deleteDirectLocked(off, n)
	}
	c.mu.Unlock()
	c.leave()
	defer func() {
		c.mu.Lock()
		for i, x := range c.mu.direct {
			if x == r {
				c.mu.direct = append(c.mu.direct[:i], c.mu.direct[i+1:]...)
				c.mu.holdsEnded++
				break
			}
		}
		c.mu.wbCond.Broadcast()
		c.mu.Unlock()
	}()
	if clean && c.test.brk == breakNoCleanGone {
		if err := c.commit(); err != nil { // the old rule: only a clean extent this write deleted
			return err
		}
	}
	if err := c.settleCleanGone(off, n); err != nil {
		return err
	}
	if err := op(); err != nil {
		return err
	}
	c.mu.Lock()
	c.mu.j.bWrites++
	if c.tracing() {
		c.tracef(off, n, "direct backing op done [%d+%d)", off, n)
	}
	c.mu.Unlock()
	if len(superseded) > 0 {
		if err := c.dropSuperseded(superseded); err != nil {
			return err
		}
	}
	if then != nil {
		return then()
	}
	return nil
}

// deleteCleanLocked drops the clean extents that overlap [off, off+n),
// whole, before a directOver write, journaling each, and returns whether
// there was one, and the dirty pieces in the range (clipped to it).
func (c *Cache) deleteCleanLocked(off, n int64) (clean bool, dirty []btreeExtent) {
	var cleans []btreeExtent
	c.mu.idx.Ascend(off, func(e btreeExtent) bool { // whole extents
		if e.Off >= off+n {
			return false
		}
		if !e.Dirty {
			cleans = append(cleans, e) // whole: cutting it could add one
			return true
		}
		if d := off - e.Off; d > 0 {
			e.Off, e.Loc, e.Len = off, e.Loc+d, e.Len-d
		}
		e.Len = min(e.End(), off+n) - e.Off
		dirty = append(dirty, e)
		return true
	})
	for _, e := range cleans {
		c.mu.idx.Delete(e.Off, e.Len, c.droppedLocked)
		c.appendLocked(record{Type: recDelete, Off: e.Off, Len: e.Len})
	}
	return len(cleans) > 0, dirty
}

// dropSuperseded deletes what still holds the versions of the dirty
// pieces a directOver write superseded, once its backing write is done
// (and counted: the records are committed after a backing flush).
func (c *Cache) dropSuperseded(pieces []btreeExtent) error {
	if err := c.enter(); err != nil {
		return err
	}
	defer c.leave()
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, p := range pieces { // reservedExt kept room for the cut
		var same []btreeExtent
		c.mu.idx.Lookup(p.Off, p.Len, func(e btreeExtent) bool {
			if e.Ver == p.Ver { // wherever GC moved it since
				same = append(same, e)
			}
			return true
		})
		for _, e := range same {
			if c.tracing() {
				c.tracef(e.Off, e.Len, "directOver drops superseded %v", e)
			}
			c.mu.idx.Delete(e.Off, e.Len, c.droppedLocked)
			c.appendLocked(record{Type: recDelete, Off: e.Off, Len: e.Len})
			if c.mu.j.backingUnflushed() {
				// Even a publish, unsynced, may reach the disk
				// before a power cut: not before the data.
				c.mu.j.cleanDep = c.mu.j.appended
			}
		}
	}
	return nil
}

// deleteDirectLocked drops the extents over [off, off+n) before a direct
// backing write, without ever adding one to the index (whose size a
// checkpoint slot bounds): a clean extent that overlaps the range is
// dropped whole, not cut (it is a copy of the backing); a dirty one, which
// only a trim meets (or a write through when a concurrent write landed
// dirty data), loses its part inside the range, unless the range lies
// strictly inside it: then it stays whole (a trimmed sector may keep its
// data; a concurrent write may win). It journals one deletion and reports
// whether a clean extent was dropped.
func (c *Cache) deleteDirectLocked(off, n int64) (clean bool) {
	lo, hi := off, off+n
	found, inside := false, false
	c.mu.idx.Ascend(off, func(e btreeExtent) bool {
		if e.Off >= off+n {
			return false
		}
		found = true
		switch {
		case !e.Dirty:
			clean = true
			lo, hi = min(lo, e.Off), max(hi, e.End())
		case e.Off < off && e.End() > off+n:
			inside = true
		}
		return true
	})
	if !found || inside {
		return false
	}
	if c.test.brk == breakNoPinRecheck {
		lo, hi = off, off+n // the old exact deletion
	}
	c.mu.idx.Delete(lo, hi-lo, c.droppedLocked)
	c.appendLocked(record{Type: recDelete, Off: lo, Len: hi - lo})
	return clean
}

// writeBacking writes p to the backing at off through passthrough, and
// returns how long the backing write itself took (what noteBacking
// measures: not the bookkeeping around it, which may commit or wait).
func (c *Cache) writeBacking(p []byte, off int64, kind directKind, then func() error) (took time.Duration, err error) {
	err = c.passthrough(off, int64(len(p)), kind, func() error {
		start := time.Now()
		err := c.back.WriteAt(p, off, 0)
		took = time.Since(start)
		if err != nil {
			return fmt.Errorf("cache: write backing: %w", err)
		}
		c.stats.backingWriteBytes.Add(int64(len(p)))
		return nil
	}, then)
	return took, err
}

// runs splits [off, off+n) at extent and writeback boundaries into runs
// for which held (pinnedLocked or busyLocked) is true (dirty set) and runs
// for which it is not.
func (c *Cache) runs(off, n int64, held func(off, n int64) bool) (runs []readPiece) {
	c.mu.Lock()
	defer c.mu.Unlock()
	var cur *readPiece
	// Walk extent boundaries rather than sectors: collect the boundaries.
	cuts := []int64{off, off + n}
	c.mu.idx.Lookup(off, n, func(e btreeExtent) bool {
		cuts = append(cuts, e.Off, e.End())
		return true
	})
	c.mu.wb.each(off, n, func(w inflightWB) {
		cuts = append(cuts, max(w.off, off), min(w.end, off+n))
	})
	slices.Sort(cuts)
	for i := 0; i+1 < len(cuts); i++ {
		a, b := cuts[i], cuts[i+1]
		if a >= b || a < off || b > off+n {
			continue
		}
		p := held(a, b-a)
		if cur != nil && cur.dirty == p && cur.off+cur.n == a {
			cur.n += b - a
			continue
		}
		runs = append(runs, readPiece{off: a, n: b - a, dirty: p})
		cur = &runs[len(runs)-1]
	}
	return runs
}

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
