package btreeidx

// cas.go: the compare-and-swap updates (MarkClean for writeback, Replace for
// GC) and the merging of pieces after them.

import "fmt"

// MarkClean is writeback's compare-and-swap: every part of
// [off, off+length) still holding version ver becomes clean. Parts holding
// another version are left alone. cleaned counts the bytes of the range
// that hold ver (already clean or not; they are all clean afterwards);
// collided counts the rest of the range (another version, or nothing), so
// cleaned+collided == length. A lost race is a collision, not an error.
// Pieces of one write that end up adjacent, alike and contiguous on the
// cache device are merged back into one extent; nothing else observable
// changes. off and length must pass ValidRange; MarkClean panics otherwise.
func (ix *Index) MarkClean(off, length int64, ver uint64) (cleaned, collided int64) {
	s, t := sectorRange(off, length)
	if s < t {
		cleaned = ix.rewrite(s, t, ver, casOp{clean: true}) << sectorShift
	}
	return cleaned, length - cleaned
}

// Replace is GC's compare-and-swap: every part of [off, off+length) still
// holding version ver is moved to newLoc + (partOff - off) with generation
// newGen (Dirty and Ver kept). It returns the bytes moved (the bytes of the
// range holding ver). Pieces are merged back as in MarkClean. off, length
// must pass ValidRange, newLoc must be a multiple of SectorSize and the
// destination must end by MaxLoc; Replace panics otherwise.
func (ix *Index) Replace(off, length int64, ver uint64, newLoc int64, newGen uint8) (moved int64) {
	s, t := sectorRange(off, length)
	if newLoc < 0 || newLoc&(SectorSize-1) != 0 || (t-s)<<sectorShift > MaxLoc-newLoc {
		panic(fmt.Errorf("%w: Replace to location %d of %d bytes", ErrInvalid, newLoc, length))
	}
	if s >= t {
		return 0
	}
	op := casOp{move: true, base: newLoc>>sectorShift - s, gen: newGen}
	return ix.rewrite(s, t, ver, op) << sectorShift
}

// casOp is the change a compare-and-swap applies to a matching piece.
type casOp struct {
	clean bool  // clear dirty
	move  bool  // set loc to base+start and gen
	base  int64 // newLoc - s, in sectors
	gen   uint8
}

func (op casOp) apply(p piece) piece {
	if op.clean {
		p.dirty = false
	}
	if op.move {
		p.loc = op.base + p.start
		p.gen = op.gen
	}
	return p
}

// rewrite applies op to every part of the sectors [s, t) held by an item
// of version ver, splitting items at the range's edges, and returns the
// number of sectors that matched. Then it merges what it can.
func (ix *Index) rewrite(s, t int64, ver uint64, op casOp) (matched int64) {
	changed := false
	after := s
	for {
		more := ix.collect(after, t)
		for _, it := range ix.scratch {
			if it.ver != ver {
				continue
			}
			x := it.unpack()
			m := x.clip(s, t)
			matched += m.len()
			n := op.apply(m)
			if n == m {
				continue
			}
			changed = true
			if x.start < m.start {
				l := x
				l.end = m.start
				ix.put(l) // new key m.start
			}
			ix.put(n) // new key m.end, or replaces x
			if x.end > m.end {
				r := x
				r.loc += m.end - x.start
				r.start = m.end
				ix.put(r) // replaces x
			}
		}
		if !more {
			break
		}
		after = ix.scratch[len(ix.scratch)-1].endS()
	}
	if changed {
		ix.merge(s, t)
	}
	return matched
}

// mergeable reports whether b continues a so exactly that one extent can
// stand for both: adjacent, the same write, generation and state, and
// contiguous on the cache device.
func mergeable(a, b piece) bool {
	return a.end == b.start && a.ver == b.ver && a.gen == b.gen && a.dirty == b.dirty &&
		a.loc+a.len() == b.loc &&
		a.len()+b.len() <= maxLenS
}

// merge joins mergeable neighbours among the items that overlap or touch
// the sectors [s, t].
func (ix *Index) merge(s, t int64) {
	var prev piece
	have := false
	after := s - 1
	for {
		more := ix.collect(after, t+1)
		for _, it := range ix.scratch {
			x := it.unpack()
			if have && mergeable(prev, x) {
				ix.remove(prev.pack())
				x.start, x.loc = prev.start, prev.loc
				ix.put(x) // replaces it: same key
			}
			prev, have = x, true
		}
		if !more {
			return
		}
		after = ix.scratch[len(ix.scratch)-1].endS()
	}
}
