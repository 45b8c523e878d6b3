package btreeidx

// check.go: Check, the walk that verifies the index's invariants.

import "fmt"

// Check verifies every invariant listed in doc.go and returns an error
// wrapping ErrCorrupt that names the first violation, or nil. It walks the
// whole index: O(n log n), meant for tests, debugging and after recovery.
func (ix *Index) Check() error {
	var (
		err                       error
		n, sectors, dirty, dirtyN int64
		prevEnd                   int64
		cur                       int64 // region being counted
		curN                      int   // its dirty extents
	)
	// flush checks that region cur, if it holds dirty extents, is in the dirty set.
	flush := func() {
		if curN == 0 {
			return
		}
		if !ix.dirty.has(cur) {
			err = fmt.Errorf("%w: region %d (from byte %d) holds %d dirty extents but is not in the dirty set",
				ErrCorrupt, cur, cur<<(ix.regionShift+sectorShift), curN)
		}
	}
	ix.tree.Ascend(func(it item) bool {
		p := it.unpack()
		switch {
		case it.w0&spareBit != 0:
			err = fmt.Errorf("%w: extent %d %v: spare bit set", ErrCorrupt, n, p.extent())
		case p.len() <= 0:
			err = fmt.Errorf("%w: extent %d ending at %d: length %d", ErrCorrupt, n, p.end<<sectorShift, p.len()<<sectorShift)
		case p.start < prevEnd:
			err = fmt.Errorf("%w: extent %d %v starts before the previous one ends (%d)", ErrCorrupt, n, p.extent(), prevEnd<<sectorShift)
		case p.loc+p.len() > maxLocS:
			err = fmt.Errorf("%w: extent %d %v: location beyond %d", ErrCorrupt, n, p.extent(), MaxLoc)
		}
		if err != nil {
			return false
		}
		if id := p.end >> ix.regionShift; id != cur {
			if flush(); err != nil {
				return false
			}
			cur, curN = id, 0
		}
		n++
		sectors += p.len()
		if p.dirty {
			dirtyN++
			curN++
			dirty += p.len()
		}
		prevEnd = p.end
		return true
	})
	if err == nil {
		flush()
	}
	switch {
	case err != nil:
		return err
	case n != int64(ix.tree.Len()):
		return fmt.Errorf("%w: walked %d extents, tree says %d", ErrCorrupt, n, ix.tree.Len())
	case sectors != ix.sectors:
		return fmt.Errorf("%w: extents cover %d bytes, counter says %d", ErrCorrupt, sectors<<sectorShift, ix.Bytes())
	case dirty != ix.dirtySectors:
		return fmt.Errorf("%w: dirty extents cover %d bytes, counter says %d", ErrCorrupt, dirty<<sectorShift, ix.DirtyBytes())
	case dirtyN != int64(ix.dirtyN):
		return fmt.Errorf("%w: %d dirty extents, counter says %d", ErrCorrupt, dirtyN, ix.dirtyN)
	}
	return nil
}
