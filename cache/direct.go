package cache

// direct.go: writes that go to the backing directly (passthrough): the
// recheck under the lock, the deletion of what they supersede, and the
// holds that keep writebacks and promotions off their range.

import (
	"errors"
	"fmt"
	"slices"
	"time"
)

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
