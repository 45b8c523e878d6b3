package btreeidx

// extent.go: Extent, the validation of extents and ranges, the sentinel
// errors and the limits of the packed form.

import (
	"errors"
	"fmt"
)

// Sentinel errors.
var (
	// ErrCorrupt is wrapped by every error Check returns.
	ErrCorrupt = errors.New("btreeidx: index invariant violated")
	// ErrInvalid is wrapped by the value a mutating method panics with
	// when it is given an extent or range that Validate or ValidRange
	// rejects. Callers validate at their edge; reaching the index with a
	// bad argument is a programming error.
	ErrInvalid = errors.New("btreeidx: invalid extent or range")
)

// Limits of the packed representation (see doc.go).
const (
	// SectorSize is the unit of every offset, length and location that
	// the mutating methods accept.
	SectorSize = 512
	// MaxOffset bounds the virtual device: every End() is <= MaxOffset
	// (4 PiB - 512).
	MaxOffset int64 = maxEndS << sectorShift
	// MaxLoc bounds the cache device: every Loc+Len is <= MaxLoc (4 PiB).
	MaxLoc int64 = 1 << (locBits + sectorShift)
	// MaxItemLen is the longest extent a single item holds
	// (2 TiB - 512). Insert splits longer extents into several items,
	// and MarkClean and Replace never merge pieces beyond it.
	MaxItemLen int64 = maxLenS << sectorShift
)

// Extent says that [Off, Off+Len) of the virtual device lives at
// [Loc, Loc+Len) on the cache device.
type Extent struct {
	Off   int64  // start on the virtual device, bytes
	Len   int64  // length in bytes, > 0
	Loc   int64  // byte offset of the first byte on the cache device
	Ver   uint64 // version of the write that created the data (unique, increasing; the CAS token)
	Gen   uint8  // generation of the cache bucket holding Loc when the data was written
	Dirty bool   // not yet written back to the backing device
}

// End is the first byte after the extent on the virtual device.
func (e Extent) End() int64 { return e.Off + e.Len }

// String formats e for logs and test failures.
func (e Extent) String() string {
	d := "clean"
	if e.Dirty {
		d = "dirty"
	}
	return fmt.Sprintf("[%d+%d)@%d v%d g%d %s", e.Off, e.Len, e.Loc, e.Ver, e.Gen, d)
}

// Validate reports whether Insert accepts e: Off, Len and Loc are
// multiples of SectorSize, Off >= 0, Len > 0, Loc >= 0, End() <= MaxOffset
// and Loc+Len <= MaxLoc. The error wraps ErrInvalid.
func (e Extent) Validate() error {
	switch {
	case e.Off < 0 || e.Len <= 0 || e.Loc < 0:
		return fmt.Errorf("%w: %v: negative offset or location, or empty", ErrInvalid, e)
	case (e.Off|e.Len|e.Loc)&(SectorSize-1) != 0:
		return fmt.Errorf("%w: %v: not a multiple of %d", ErrInvalid, e, SectorSize)
	case e.Len > MaxOffset-e.Off:
		return fmt.Errorf("%w: %v: ends beyond %d", ErrInvalid, e, MaxOffset)
	case e.Len > MaxLoc-e.Loc:
		return fmt.Errorf("%w: %v: location ends beyond %d", ErrInvalid, e, MaxLoc)
	}
	return nil
}

// ValidRange reports whether Delete, MarkClean and Replace accept the range
// [off, off+length): off and length are non-negative multiples of
// SectorSize. A range reaching beyond MaxOffset is fine; nothing lies
// there. The error wraps ErrInvalid.
func ValidRange(off, length int64) error {
	if off < 0 || length < 0 || (off|length)&(SectorSize-1) != 0 {
		return fmt.Errorf("%w: range [%d+%d)", ErrInvalid, off, length)
	}
	return nil
}

// sectorRange converts a valid byte range to sectors, clamped to the
// representable space. Empty ranges come back with s >= t.
func sectorRange(off, length int64) (s, t int64) {
	if err := ValidRange(off, length); err != nil {
		panic(err)
	}
	s = off >> sectorShift
	t = s + length>>sectorShift // no overflow: both <= MaxInt64/512
	return min(s, maxEndS), min(t, maxEndS)
}
