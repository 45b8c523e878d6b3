package cache

import (
	"fmt"
	"strings"

	"github.com/nbdcache/nbdcache/storage"
)

// Report is what Check found.
type Report struct {
	CacheID          [16]byte
	BackingID        [16]byte
	State            string // "clean" or "dirty"
	SuperblockCopies int    // valid copies (of 2)
	Checkpoint       uint64 // sequence of the checkpoint loaded
	CheckpointsValid int    // valid slots (of 2)
	JournalBlocks    int64  // blocks replayed
	JournalStop      string // why replay stopped (the torn tail, or an old block)
	Replayed         int64
	Dropped          int64 // records whose data never became durable
	Extents          int64
	CachedBytes      int64
	DirtyBytes       int64
	Buckets          int64
	UsedBuckets      int64
	Problems         []string // anything wrong; Check's error summarizes them
	// WrongBacking: the backing given is not the cache's (its size
	// differs). Not corruption: Check's error wraps ErrWrongBacking when
	// there is no Problem.
	WrongBacking []string
	// Warnings are states a power cut leaves legitimately: one torn
	// superblock copy or checkpoint slot next to a valid one.
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
	for _, off := range []int64{0, metaBlock} {
		b := make([]byte, metaBlock)
		if err := cacheDev.ReadAt(b, off); err != nil {
			return r, err
		}
		other, err := decodeSuperblock(b, cacheDev.Size())
		switch {
		case err != nil:
			r.Warnings = append(r.Warnings, fmt.Sprintf("superblock copy at %d: %v", off, err))
		case other.CacheID != sb.CacheID || other.NBuckets != sb.NBuckets || other.DataOff != sb.DataOff:
			r.Problems = append(r.Problems, fmt.Sprintf("superblock copy at %d describes another layout", off))
		default:
			r.SuperblockCopies++
		}
	}
	if sb.BackingSize != backing.Size() {
		r.WrongBacking = append(r.WrongBacking, fmt.Sprintf("backing has %d bytes, superblock says %d", backing.Size(), sb.BackingSize))
	}
	for i := range 2 {
		if _, err := readCheckpoint(cacheDev, sb, sb.salt(), i); err == nil {
			r.CheckpointsValid++
		} else {
			r.Warnings = append(r.Warnings, err.Error())
		}
	}
	st, err := loadState(cacheDev, sb, breakNone, nil, true)
	if err != nil {
		r.Problems = append(r.Problems, err.Error())
		return r, summarize(r)
	}
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
