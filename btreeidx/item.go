package btreeidx

// item.go: the packed tree item: 24 bytes per extent. doc.go draws the
// layout.

const (
	sectorShift = 9
	endBits     = 43 // end sector: virtual device up to 4 PiB
	locBits     = 43 // location sector: cache device up to 4 PiB
	lenBits     = 32 // length in sectors: up to 2 TiB - 512 per item

	maxEndS = int64(1)<<endBits - 1 // largest end sector; keys must not overflow w0
	maxLocS = int64(1) << locBits
	maxLenS = int64(1)<<lenBits - 1

	endShift   = 64 - endBits // 21
	genShift   = 13
	dirtyBit   = 1 << 12
	spareBit   = 1 << 11
	locHiBits  = locBits - 32 // 11
	locHiMask  = 1<<locHiBits - 1
	lenMask    = 1<<lenBits - 1
	locLoShift = 32
)

// item is one extent as stored in the tree. Only the end sector takes
// part in comparisons; the other fields of w0 ride along in its low bits.
type item struct {
	w0  uint64 // endS<<21 | gen<<13 | dirty<<12 | locS>>32
	ver uint64
	w2  uint64 // locS&0xffffffff<<32 | lenS
}

// less orders items by end sector.
func less(a, b item) bool { return a.w0>>endShift < b.w0>>endShift }

// keyItem is a search key for the item ending at sector endS.
func keyItem(endS int64) item { return item{w0: uint64(endS) << endShift} }

// piece is an unpacked item, in sectors.
type piece struct {
	start, end, loc int64
	ver             uint64
	gen             uint8
	dirty           bool
}

func (p piece) len() int64 { return p.end - p.start }

// pack encodes p. The caller guarantees the limits: 0 <= start < end <=
// maxEndS, end-start <= maxLenS, 0 <= loc, loc+len <= maxLocS.
func (p piece) pack() item {
	w0 := uint64(p.end)<<endShift | uint64(p.gen)<<genShift | uint64(p.loc)>>32&locHiMask
	if p.dirty {
		w0 |= dirtyBit
	}
	return item{
		w0:  w0,
		ver: p.ver,
		w2:  uint64(p.loc)<<locLoShift | uint64(p.end-p.start),
	}
}

func (it item) endS() int64   { return int64(it.w0 >> endShift) }
func (it item) lenS() int64   { return int64(it.w2 & lenMask) }
func (it item) locS() int64   { return int64(it.w0&locHiMask<<32 | it.w2>>locLoShift) }
func (it item) gen() uint8    { return uint8(it.w0 >> genShift) }
func (it item) dirty() bool   { return it.w0&dirtyBit != 0 }
func (it item) startS() int64 { return it.endS() - it.lenS() }

func (it item) unpack() piece {
	e := it.endS()
	return piece{
		start: e - it.lenS(),
		end:   e,
		loc:   it.locS(),
		ver:   it.ver,
		gen:   it.gen(),
		dirty: it.dirty(),
	}
}

// extent converts an item to the public form, in bytes.
func (it item) extent() Extent {
	l := it.lenS()
	return Extent{
		Off:   (it.endS() - l) << sectorShift,
		Len:   l << sectorShift,
		Loc:   it.locS() << sectorShift,
		Ver:   it.ver,
		Gen:   it.gen(),
		Dirty: it.dirty(),
	}
}

// clip returns the part of p inside [s, t), with loc adjusted. The caller
// guarantees that they overlap.
func (p piece) clip(s, t int64) piece {
	if p.start < s {
		p.loc += s - p.start
		p.start = s
	}
	if p.end > t {
		p.end = t
	}
	return p
}

// extent converts a piece to the public form, in bytes.
func (p piece) extent() Extent {
	return Extent{
		Off:   p.start << sectorShift,
		Len:   (p.end - p.start) << sectorShift,
		Loc:   p.loc << sectorShift,
		Ver:   p.ver,
		Gen:   p.gen,
		Dirty: p.dirty,
	}
}

// The dirty set: the virtual device is cut into regions of
// 1<<regionShift sectors (2 MiB) by END sector; an extent belongs to the
// region of its end sector (regions.go).
const regionShift = 12 // 2 MiB: measured 5-10% faster inserts than 1 MiB; a region scan reads at most 4096 extents
