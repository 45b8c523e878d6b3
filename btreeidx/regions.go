package btreeidx

// regions.go: regionSet, the paged bitmap of the regions that may hold dirty
// extents.

import (
	"math/bits"
	"slices"
)

// regionSet is a set of region numbers (see doc.go, invariant 4): a
// bitmap cut into pages of pageBits regions, allocated on first use and
// kept in a map, with the page numbers also kept sorted for ascending
// walks. A page is 1 KiB and covers 16 GiB of the virtual device with
// 2 MiB regions, so the set costs at most 64 KiB per TiB of the address
// space that ever held dirty data, and adding a member is a map lookup in
// a small, hot map and one OR.
type regionSet struct {
	pages map[uint32]*regionPage
	order []uint32 // the keys of pages, ascending
}

const (
	pageShift = 13 // regions per page: 8192
	pageBits  = 1 << pageShift
)

type regionPage [pageBits / 64]uint64

func newRegionSet() regionSet { return regionSet{pages: make(map[uint32]*regionPage)} }

func (s *regionSet) add(r int64) {
	k := uint32(r >> pageShift)
	p := s.pages[k]
	if p == nil {
		p = new(regionPage)
		s.pages[k] = p
		i, _ := slices.BinarySearch(s.order, k)
		s.order = slices.Insert(s.order, i, k)
	}
	p[r&(pageBits-1)/64] |= 1 << (r & 63)
}

func (s *regionSet) remove(r int64) {
	if p := s.pages[uint32(r>>pageShift)]; p != nil {
		p[r&(pageBits-1)/64] &^= 1 << (r & 63)
	}
}

func (s *regionSet) has(r int64) bool {
	p := s.pages[uint32(r>>pageShift)]
	return p != nil && p[r&(pageBits-1)/64]&(1<<(r&63)) != 0
}

// next returns the smallest member >= r.
func (s *regionSet) next(r int64) (int64, bool) {
	k := uint32(r >> pageShift)
	i, _ := slices.BinarySearch(s.order, k)
	for ; i < len(s.order); i++ {
		pk := s.order[i]
		p := s.pages[pk]
		w, bit := 0, 0
		if pk == k {
			w, bit = int(r&(pageBits-1)/64), int(r&63)
		}
		for ; w < len(p); w, bit = w+1, 0 {
			if m := p[w] >> bit << bit; m != 0 {
				return int64(pk)<<pageShift | int64(w*64+bits.TrailingZeros64(m)), true
			}
		}
	}
	return 0, false
}
