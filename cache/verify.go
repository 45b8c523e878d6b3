package cache

import (
	"bytes"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/nbdcache/nbdcache/btreeidx"
	"github.com/nbdcache/nbdcache/storage"
)

// verify.go: the invariants across the whole cache that no single
// operation can see (issue 23's deep check). Tests run Verify on a live
// cache, with everything running; `nbdcache check --deep` runs CheckDeep
// offline.
//
//   - A clean extent holds exactly what the backing holds at its offset:
//     every backing write over a range either deletes the clean extents
//     there first (direct writes) or writes what they hold (gap-fill), and
//     writeback marks clean only after its backing write is durable.
//   - Every extent has its bucket's generation, and its bucket is full or
//     open (never free or pending: those hold nothing live).
//   - One of a bucket's refs overlaps each extent's part in it (GC finds a
//     bucket's extents through them).
//   - A bucket's live and dirty bytes are the bytes of the extents in it,
//     and of its dirty ones.

// ErrInvariant is wrapped by Verify's error.
var ErrInvariant = errors.New("cache: invariant violated")

// maxFindings bounds how many findings a verification lists.
const maxFindings = 16

// Verify checks the invariants above on a live cache. It takes the lock
// only for snapshots: the clean extents are compared with the backing
// outside it, and one that changed meanwhile (rewritten, deleted, moved,
// its bucket emptied) is skipped, not reported.
func (c *Cache) Verify() error {
	var found []string
	add := func(format string, a ...any) {
		if len(found) < maxFindings {
			found = append(found, fmt.Sprintf(format, a...))
		}
	}
	type cleanPiece struct {
		e     btreeidx.Extent
		epoch []uint64
	}
	var clean []cleanPiece
	c.mu.Lock()
	if err := c.mu.idx.Check(); err != nil {
		add("index: %v", err)
	}
	live, dirty := make([]int64, len(c.mu.space.buckets)), make([]int64, len(c.mu.space.buckets))
	c.mu.idx.Ascend(0, func(e btreeidx.Extent) bool {
		ok := true
		c.sb.forBuckets(e.Loc, e.Len, func(b, loc, n int64) {
			off := e.Off + loc - e.Loc
			if !slices.ContainsFunc(c.mu.space.buckets[b].refs, func(r byteRange) bool { return r.overlaps(off, n) }) {
				add("extent %v: its part in bucket %d is not among the bucket's refs (GC cannot find it)", e, b)
			}
			live[b] += n
			if e.Dirty {
				dirty[b] += n
			}
			bk := &c.mu.space.buckets[b]
			if bk.gen != e.Gen {
				add("extent %v has generation %d, its bucket %d has %d", e, e.Gen, b, bk.gen)
				ok = false
			}
			if bk.state == bFree || bk.state == bPending {
				add("extent %v lies in bucket %d, which is %s", e, b, [...]string{"free", "open", "full", "pending"}[bk.state])
				ok = false
			}
		})
		if ok && !e.Dirty && !c.heldLocked(e.Off, e.Len) {
			var ep []uint64
			c.sb.forBuckets(e.Loc, e.Len, func(b, _, _ int64) { ep = append(ep, c.mu.space.buckets[b].epoch) })
			clean = append(clean, cleanPiece{e, ep})
		}
		return true
	})
	for b := range c.mu.space.buckets {
		if live[b] != c.mu.space.buckets[b].live || dirty[b] != c.mu.space.buckets[b].dirty {
			add("bucket %d counts %d live and %d dirty bytes, its extents hold %d and %d", b, c.mu.space.buckets[b].live, c.mu.space.buckets[b].dirty, live[b], dirty[b])
		}
	}
	c.mu.Unlock()

	for _, p := range clean {
		e := p.e
		cached, back := make([]byte, e.Len), make([]byte, e.Len)
		if err := c.dev.ReadAt(cached, e.Loc); err != nil {
			return fmt.Errorf("cache: verify: %w", err)
		}
		if err := c.back.ReadAt(back, e.Off); err != nil {
			return fmt.Errorf("cache: verify: %w", err)
		}
		if bytes.Equal(cached, back) {
			continue
		}
		c.mu.Lock()
		same := c.pieceCurrentLocked(gcPiece{off: e.Off, n: e.Len, loc: e.Loc, ver: e.Ver}) && !c.heldLocked(e.Off, e.Len)
		i := 0
		c.sb.forBuckets(e.Loc, e.Len, func(b, _, _ int64) {
			same = same && c.mu.space.buckets[b].epoch == p.epoch[i]
			i++
		})
		c.mu.Unlock()
		if same {
			add("clean extent %v differs from the backing at byte %d", e, firstDiff(cached, back))
		}
	}
	if len(found) > 0 {
		return fmt.Errorf("%w: %s", ErrInvariant, strings.Join(found, "; "))
	}
	return nil
}

func firstDiff(a, b []byte) int64 {
	for i := range a {
		if a[i] != b[i] {
			return int64(i)
		}
	}
	return -1
}

// CheckDeep is Check, and then compares every clean extent of the
// recovered index with the backing: a clean extent that differs serves
// data the backing does not hold, and would change what a read returns
// once it is evicted. It reads the whole cached data.
func CheckDeep(cacheDev, backing storage.Device) (Report, error) {
	r, err := Check(cacheDev, backing)
	if err != nil {
		return r, err
	}
	sb, err := readSuper(cacheDev)
	if err != nil {
		return r, err
	}
	st, err := loadState(cacheDev, sb, breakNone, nil, false)
	if err != nil {
		return r, err
	}
	var bad []btreeidx.Extent
	var ioErr error
	st.idx.Ascend(0, func(e btreeidx.Extent) bool {
		if e.Dirty {
			return true
		}
		cached, back := make([]byte, e.Len), make([]byte, e.Len)
		if ioErr = cacheDev.ReadAt(cached, e.Loc); ioErr != nil {
			return false
		}
		if ioErr = backing.ReadAt(back, e.Off); ioErr != nil {
			return false
		}
		if !bytes.Equal(cached, back) {
			bad = append(bad, e)
		}
		return true
	})
	if ioErr != nil {
		return r, fmt.Errorf("cache: deep check: %w", ioErr)
	}
	r.StaleClean = int64(len(bad))
	for i, e := range bad {
		if i == maxFindings {
			r.Problems = append(r.Problems, fmt.Sprintf("... and %d more clean extents differ from the backing", len(bad)-i))
			break
		}
		r.Problems = append(r.Problems, fmt.Sprintf("clean extent %v differs from the backing", e))
	}
	return r, summarize(r)
}
