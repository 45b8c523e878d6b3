package btreeidx

import "fmt"

// Check verifies every invariant listed in doc.go and returns an error
// wrapping ErrCorrupt that names the first violation, or nil. It walks the
// whole index: O(n log n), meant for tests, debugging and after recovery.
func (ix *Index) Check() error {
	var (
		err                       error
		n, sectors, dirty, dirtyN int64
		prevEnd                   int64
	)
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
		case p.dirty && !ix.dirty.Has(p.end):
			err = fmt.Errorf("%w: dirty extent %d %v missing from the dirty set", ErrCorrupt, n, p.extent())
		}
		if err != nil {
			return false
		}
		n++
		sectors += p.len()
		if p.dirty {
			dirtyN++
			dirty += p.len()
		}
		prevEnd = p.end
		return true
	})
	switch {
	case err != nil:
		return err
	case n != int64(ix.tree.Len()):
		return fmt.Errorf("%w: walked %d extents, tree says %d", ErrCorrupt, n, ix.tree.Len())
	case sectors != ix.sectors:
		return fmt.Errorf("%w: extents cover %d bytes, counter says %d", ErrCorrupt, sectors<<sectorShift, ix.Bytes())
	case dirty != ix.dirtySectors:
		return fmt.Errorf("%w: dirty extents cover %d bytes, counter says %d", ErrCorrupt, dirty<<sectorShift, ix.DirtyBytes())
	case dirtyN != int64(ix.dirty.Len()):
		// Every dirty extent's key is in the set (checked above), so equal
		// sizes mean the set holds nothing else.
		return fmt.Errorf("%w: %d dirty extents, dirty set holds %d keys", ErrCorrupt, dirtyN, ix.dirty.Len())
	}
	return nil
}
