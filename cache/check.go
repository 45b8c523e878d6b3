package cache

// check.go: Check, the offline verification of a cache device, and its
// Report.

import (
	"fmt"
	"strings"

	"github.com/nbdcache/nbdcache/storage"
)

// Report is what Check found.
type Report struct {
	CacheID           [16]byte
	BackingID         [16]byte
	State             string // "clean" or "dirty"
	SuperblockCopies  int    // valid copies (of 2)
	Checkpoint        uint64 // sequence of the checkpoint loaded (0: recovery failed before)
	CheckpointsValid  int    // valid slots (of 2)
	CheckpointsUnused int    // slots never written (slot 1 until the first Open)
	JournalBlocks     int64  // blocks replayed
	JournalStop       string // why replay stopped (the torn tail, or an old block)
	Replayed          int64
	Dropped           int64 // records whose data never became durable
	Extents           int64
	CachedBytes       int64
	DirtyBytes        int64
	Buckets           int64
	UsedBuckets       int64
	StaleClean        int64    // CheckDeep: clean extents that differ from the backing (each a problem too)
	Problems          []string // anything wrong; Check's error summarizes them
	// WrongBacking: the backing given is not the cache's (its size
	// differs). Not corruption: Check's error wraps ErrWrongBacking when
	// there is no Problem.
	WrongBacking []string
	// Warnings are states a power cut leaves legitimately, and damage
	// that loses nothing: one invalid superblock copy or checkpoint slot
	// next to a valid one (an invalid checkpoint slot is a problem when a
	// journal block proves it held a newer checkpoint that was durable).
	Warnings []string
}

// Check verifies a cache offline: both superblock copies, both checkpoint
// slots, the journal chain and the data checksums of its records, and the
// rebuilt index (its invariants, every extent inside the data area with
// its bucket's generation, no two extents sharing cache space). The error
// (wrapping ErrCorrupt) names what and where.
func Check(cacheDev, backing storage.Device) (Report, error) {
	var r Report
	sb, err := readSuper(cacheDev)
	if err != nil {
		return r, err
	}
	r.CacheID, r.BackingID = sb.CacheID, sb.BackingID
	r.State = "dirty"
	if sb.State == stateClean {
		r.State = "clean"
	}
	// A damaged superblock copy is a warning, not a problem: both copies
	// are written alike, one after the other with a sync after each, so
	// the whole one that readSuper used has the same geometry and at
	// worst the state word and sequence of one superblock write before;
	// the state word only says whether dirty data may exist, which
	// recovery does not rely on. Nothing is lost, and the next Open
	// rewrites both. (A power cut between the two writes leaves one copy
	// torn, too.) A valid copy with another layout is a problem.
	for _, off := range []int64{0, metaBlock} {
		b := make([]byte, metaBlock)
		if err := cacheDev.ReadAt(b, off); err != nil {
			return r, err
		}
		other, err := decodeSuperblock(b, cacheDev.Size())
		switch {
		case err != nil:
			r.Warnings = append(r.Warnings, fmt.Sprintf("superblock copy at %d is invalid (%v); the other copy is whole and was used (sequence %d); the next Open rewrites both", off, err, sb.Seq))
		case other.CacheID != sb.CacheID || other.NBuckets != sb.NBuckets || other.DataOff != sb.DataOff:
			r.Problems = append(r.Problems, fmt.Sprintf("superblock copy at %d describes another layout", off))
		default:
			r.SuperblockCopies++
		}
	}
	if sb.BackingSize != backing.Size() {
		r.WrongBacking = append(r.WrongBacking, fmt.Sprintf("backing has %d bytes, superblock says %d", backing.Size(), sb.BackingSize))
	}
	slots, err := readCheckpointSlots(cacheDev, sb, sb.salt())
	if err != nil {
		return r, err
	}
	for _, s := range slots {
		switch {
		case s.ck != nil:
			r.CheckpointsValid++
		case s.unused:
			r.CheckpointsUnused++
		}
	}
	st, err := loadState(cacheDev, sb, breakNone, nil, true)
	if err != nil {
		r.Problems = append(r.Problems, err.Error())
		for i, s := range slots { // what recovery could not tell, slot by slot
			if s.ck == nil && !s.unused {
				r.Warnings = append(r.Warnings, fmt.Sprintf("checkpoint slot %d is invalid (%v)", i, s.err))
			}
		}
		return r, summarize(r)
	}
	r.Warnings = append(r.Warnings, st.warnings...)
	r.Checkpoint, r.JournalBlocks, r.JournalStop = st.ckptSeq, st.blocks, st.stopWhy
	r.Replayed, r.Dropped = st.replayed, st.dropped
	r.Problems = append(r.Problems, st.problems...)
	r.Extents, r.CachedBytes, r.DirtyBytes = int64(st.idx.Len()), st.idx.Bytes(), st.idx.DirtyBytes()
	r.Buckets = sb.NBuckets
	for _, b := range st.buckets {
		if b.live > 0 {
			r.UsedBuckets++
		}
		if b.live > sb.BucketSize {
			r.Problems = append(r.Problems, fmt.Sprintf("bucket holds %d live bytes, more than its size", b.live))
		}
	}
	if a, b, found := overlapsLoc(st.idx); found {
		r.Problems = append(r.Problems, fmt.Sprintf("extents %v and %v share cache space", a, b))
	}
	if r.Extents > sb.maxExtents() {
		r.Problems = append(r.Problems, fmt.Sprintf("%d extents exceed the checkpoint capacity %d", r.Extents, sb.maxExtents()))
	}
	return r, summarize(r)
}

func summarize(r Report) error {
	if len(r.Problems) == 0 && len(r.WrongBacking) > 0 {
		return fmt.Errorf("%w: %s", ErrWrongBacking, strings.Join(r.WrongBacking, "; "))
	}
	if len(r.Problems) == 0 {
		return nil
	}
	return fmt.Errorf("%w: %s", ErrCorrupt, strings.Join(r.Problems, "; "))
}
