package cache

// wbset.go: wbSet, the writebacks in flight, ordered by offset.

import "github.com/google/btree"

// wbSet holds the writebacks in flight (ReadCached to MarkClean or
// ReleaseCached, and zeroDirty's runs), ordered by offset. Their ranges
// are disjoint: each is registered only where none is held (heldLocked).
// So the one that starts last before a range's end is the only one that
// can reach into it, and a lookup costs a tree descent, however many
// pieces a writeback batch holds (a linear scan of them made the
// flusher's planning quadratic).
type wbSet struct {
	t *btree.BTreeG[inflightWB]
}

func newWBSet() wbSet {
	return wbSet{btree.NewG(8, func(a, b inflightWB) bool {
		if a.off != b.off {
			return a.off < b.off
		}
		if a.end != b.end {
			return a.end < b.end
		}
		return a.ver < b.ver
	})}
}

func (s wbSet) len() int { return s.t.Len() }

func (s wbSet) add(w inflightWB) { s.t.ReplaceOrInsert(w) }

// remove deletes w and reports whether it was there.
func (s wbSet) remove(w inflightWB) bool {
	_, ok := s.t.Delete(w)
	return ok
}

// gap returns the range around off that no writeback in flight touches,
// [lo, hi) with lo <= off < hi, or ok false when one holds off. Walking
// ascending ranges, a caller looks again only once it passes hi.
func (s wbSet) gap(off int64) (lo, hi int64, ok bool) {
	lo, hi, ok = 0, 1<<63-1, true
	s.t.DescendLessOrEqual(inflightWB{off: off, end: 1<<63 - 1, ver: 1<<64 - 1}, func(w inflightWB) bool {
		if w.end > off {
			ok = false
		}
		lo = w.end
		return false
	})
	if !ok {
		return 0, 0, false
	}
	s.t.AscendGreaterOrEqual(inflightWB{off: off + 1}, func(w inflightWB) bool {
		hi = w.off
		return false
	})
	return lo, hi, true
}

// first returns the writeback that overlaps [off, off+n) and starts
// first, if any.
func (s wbSet) first(off, n int64) (inflightWB, bool) {
	var found inflightWB
	ok := false
	if n <= 0 {
		return found, false
	}
	// The last one starting at or before off may reach into the range;
	// else the first one starting inside it.
	s.t.DescendLessOrEqual(inflightWB{off: off, end: 1<<63 - 1, ver: 1<<64 - 1}, func(w inflightWB) bool {
		found, ok = w, w.end > off
		return false
	})
	if ok {
		return found, true
	}
	s.t.AscendGreaterOrEqual(inflightWB{off: off + 1}, func(w inflightWB) bool {
		found, ok = w, w.off < off+n
		return false
	})
	return found, ok
}

// overlaps reports whether a writeback in flight covers part of
// [off, off+n).
func (s wbSet) overlaps(off, n int64) bool {
	_, ok := s.first(off, n)
	return ok
}

// each calls fn for the writebacks overlapping [off, off+n), ascending.
func (s wbSet) each(off, n int64, fn func(inflightWB)) {
	w, ok := s.first(off, n)
	if !ok {
		return
	}
	s.t.AscendGreaterOrEqual(w, func(w inflightWB) bool {
		if w.off >= off+n {
			return false
		}
		fn(w)
		return true
	})
}
