package btreeidx

// index.go: Index, the B-tree of extents: insert, delete, lookup, ascending
// walks over all or dirty extents, and the dirty-region bookkeeping.

import "github.com/google/btree"

const (
	// degree is the B-tree degree of both trees: nodes hold 63 to 127
	// items. Measured (bench_test.go): 64 gives fewer bytes per extent
	// and faster inserts than 16 or 32, and is no slower than 128.
	degree = 64
	// batch bounds the items a range operation gathers before it
	// changes the tree (the tree cannot change while it is iterated).
	// The scratch slice therefore never outgrows batch items.
	batch = 64
)

// Index is the extent index. The zero value is not usable; call New.
//
// An Index is not safe for concurrent use: the cache guards it with its
// own mutex, held across every call, including the callbacks. Callbacks
// (fn, dropped) may read the Index but must not modify it.
type Index struct {
	tree  *btree.BTreeG[item] // every extent, keyed by end sector
	dirty regionSet           // regions that may hold dirty extents (all that do)

	sectors      int64 // sectors covered by tree
	dirtySectors int64 // sectors covered by dirty extents
	dirtyN       int   // number of dirty extents
	regionShift  uint  // log2 of the region size in sectors; tests shrink it

	scratch []item // reused by range operations; never more than batch items
}

// New returns an empty index.
func New() *Index { return newIndex(degree, regionShift) }

func newIndex(d int, regionShift uint) *Index {
	return &Index{
		tree:        btree.NewG(d, less),
		dirty:       newRegionSet(),
		regionShift: regionShift,
		scratch:     make([]item, 0, batch),
	}
}

// Len is the number of extents (tree items; an extent longer than
// MaxItemLen counts as several).
func (ix *Index) Len() int { return ix.tree.Len() }

// Bytes is the number of bytes covered by extents.
func (ix *Index) Bytes() int64 { return ix.sectors << sectorShift }

// DirtyBytes is the number of bytes covered by dirty extents.
func (ix *Index) DirtyBytes() int64 { return ix.dirtySectors << sectorShift }

// DirtyLen is the number of dirty extents.
func (ix *Index) DirtyLen() int { return ix.dirtyN }

// Insert adds e, replacing whatever overlapped [e.Off, e.End()):
// overlapped extents are split or trimmed. dropped (may be nil) is called,
// after the index has been updated, once for every piece that was
// displaced, clipped to the overlap, with Loc adjusted
// (Loc + (pieceOff - origOff)) so the caller can account the space freed in
// each bucket. e must pass Validate; Insert panics with an error wrapping
// ErrInvalid otherwise.
func (ix *Index) Insert(e Extent, dropped func(Extent)) {
	if err := e.Validate(); err != nil {
		panic(err)
	}
	p := piece{
		start: e.Off >> sectorShift,
		end:   e.End() >> sectorShift,
		loc:   e.Loc >> sectorShift,
		ver:   e.Ver,
		gen:   e.Gen,
		dirty: e.Dirty,
	}
	for p.start < p.end {
		q := p
		if q.len() > maxLenS {
			q.end = q.start + maxLenS
		}
		// Store q first, then cut around it: the cut's search then walks
		// the path the insert has just brought into the CPU cache, which
		// saves most of a cold descent (see BenchmarkInsertRandom).
		old, replaced := ix.put(q)
		// An item that ended where q ends and began at or before q's
		// start covered all of q, and items never overlap: nothing else
		// lies under q, and the cut (a second descent) is skipped. This
		// is the common overwrite of a block in place.
		if !replaced || old.startS() > q.start {
			ix.cut(q.start, q.end, q.end, dropped)
		}
		if replaced {
			// old ended where q ends; only its part before q can stay.
			o := old.unpack()
			if o.start < q.start {
				l := o
				l.end = q.start
				ix.put(l) // new key q.start
			}
			if dropped != nil {
				dropped(o.clip(q.start, q.end).extent()) // the last piece, in order
			}
		}
		p.loc += q.len()
		p.start = q.end
	}
}

// Delete removes [off, off+length) (trim, invalidation); dropped as for
// Insert. off and length must pass ValidRange; Delete panics otherwise.
func (ix *Index) Delete(off, length int64, dropped func(Extent)) {
	s, t := sectorRange(off, length)
	if s < t {
		ix.cut(s, t, -1, dropped)
	}
}

// Lookup calls fn, in ascending order, for every extent overlapping
// [off, off+length), clipped to that range (Off, Len and Loc adjusted).
// It stops when fn returns false. Gaps (uncached ranges) are simply not
// reported. Any byte range is accepted; the clipping is exact to the byte.
func (ix *Index) Lookup(off, length int64, fn func(Extent) bool) {
	if length <= 0 {
		return
	}
	end := off + length
	if end < off { // overflow
		end = MaxOffset
	}
	off = max(off, 0)
	first, ok := pivot(off)
	if !ok || off >= end {
		return
	}
	ix.tree.AscendGreaterOrEqual(keyItem(first), func(it item) bool {
		e := it.extent()
		if e.Off >= end {
			return false
		}
		if e.Off < off {
			d := off - e.Off
			e.Off, e.Loc, e.Len = off, e.Loc+d, e.Len-d
		}
		if e.End() > end {
			e.Len = end - e.Off
		}
		return fn(e)
	})
}

// Ascend calls fn, in ascending order, for every extent with End() > from,
// until fn returns false. Extents are reported whole, not clipped.
func (ix *Index) Ascend(from int64, fn func(Extent) bool) {
	first, ok := pivot(from)
	if !ok {
		return
	}
	ix.tree.AscendGreaterOrEqual(keyItem(first), func(it item) bool {
		return fn(it.extent())
	})
}

// AscendDirty calls fn, in ascending order, for every dirty extent with
// End() > from, until fn returns false. Extents are reported whole. It
// visits only the regions (see doc.go) of the dirty set, so its cost
// follows the dirty extents, not the clean ones elsewhere; a region it
// walks whole and finds clean leaves the set.
func (ix *Index) AscendDirty(from int64, fn func(Extent) bool) {
	first, ok := pivot(from)
	if !ok {
		return
	}
	for r := first >> ix.regionShift; ; r++ {
		if r, ok = ix.dirty.next(r); !ok {
			return
		}
		start, limit := r<<ix.regionShift, (r+1)<<ix.regionShift
		seen, cont := false, true
		ix.tree.AscendGreaterOrEqual(keyItem(max(first, start)), func(it item) bool {
			if it.endS() >= limit {
				return false
			}
			if it.dirty() {
				seen = true
				cont = fn(it.extent())
			}
			return cont
		})
		if !cont {
			return
		}
		if !seen && first <= start {
			ix.dirty.remove(r)
		}
	}
}

// pivot is the smallest end sector of an extent with End() > from, and
// false when no extent can end beyond from.
func pivot(from int64) (int64, bool) {
	if from < 0 {
		return 0, true
	}
	p := from>>sectorShift + 1
	return p, p <= maxEndS
}

// collect fills ix.scratch, in order, with up to batch items whose end
// sector is > after and whose start sector is < t. It reports whether
// more such items remain beyond the batch.
func (ix *Index) collect(after, t int64) (more bool) {
	ix.scratch = ix.scratch[:0]
	if after+1 > maxEndS {
		return false
	}
	ix.tree.AscendGreaterOrEqual(keyItem(max(after+1, 0)), func(it item) bool {
		if it.startS() >= t {
			return false
		}
		if len(ix.scratch) == batch {
			more = true
			return false
		}
		ix.scratch = append(ix.scratch, it)
		return true
	})
	return more
}

// cut removes the sectors [s, t) from the index: overlapped items are
// trimmed or split so that their parts outside the range stay. Every
// removed part is reported to dropped (if not nil) after the batch it
// belongs to has been applied. The item ending at skip (Insert's new
// extent, already in the tree) is left alone.
func (ix *Index) cut(s, t, skip int64, dropped func(Extent)) {
	after := s
	for {
		more := ix.collect(after, t)
		for _, it := range ix.scratch {
			x := it.unpack()
			if x.end == skip {
				continue
			}
			if x.start < s {
				l := x
				l.end = s
				ix.put(l) // new key s
			}
			if x.end > t {
				r := x
				r.loc += t - x.start
				r.start = t
				ix.put(r) // replaces x: same key
			} else {
				ix.remove(it)
			}
		}
		if dropped != nil {
			for _, it := range ix.scratch {
				if it.endS() != skip {
					dropped(it.unpack().clip(s, t).extent())
				}
			}
		}
		if !more {
			return
		}
		after = ix.scratch[len(ix.scratch)-1].endS()
	}
}

// put stores p, replacing the item with the same end sector if there is
// one (returned), and keeps the counters and the dirty set in step.
func (ix *Index) put(p piece) (old item, replaced bool) {
	old, replaced = ix.tree.ReplaceOrInsert(p.pack())
	wasDirty := false
	if replaced {
		ix.sectors -= old.lenS()
		if old.dirty() {
			wasDirty = true
			ix.dirtySectors -= old.lenS()
		}
	}
	n := p.len()
	ix.sectors += n
	switch {
	case p.dirty:
		ix.dirtySectors += n
		if !wasDirty {
			ix.markDirty(p.end, 1)
		}
	case wasDirty:
		ix.markDirty(p.end, -1)
	}
	return old, replaced
}

// remove deletes it from the tree, the counters and the dirty set.
func (ix *Index) remove(it item) {
	ix.tree.Delete(it)
	n := it.lenS()
	ix.sectors -= n
	if it.dirty() {
		ix.dirtySectors -= n
		ix.markDirty(it.endS(), -1)
	}
}

// markDirty counts one dirty extent more (d = 1) or less (d = -1) ending
// at end sector endS. A new one puts its region in the dirty set; the set
// forgets a region only when AscendDirty finds it clean.
func (ix *Index) markDirty(endS int64, d int) {
	ix.dirtyN += d
	if d > 0 {
		ix.dirty.add(endS >> ix.regionShift)
	}
}
