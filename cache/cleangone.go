package cache

// cleangone.go: goneSet, where records that removed a clean extent lie until
// a sync makes them durable.

// goneSet remembers where records that removed a clean extent lie, and
// when they were appended, until a sync makes them durable. A backing
// write must wait for such a record only if it lands on its range: a crash
// that loses the record brings the clean extent back, and it is stale only
// if the backing under it changed. (A global "any clean extent removed
// since the last sync" made every direct write of a cache full of evicted
// data commit the journal, and flush the backing, on its own: a 4 KiB
// random write over the hdd model ran at 6 IOPS.)
//
// Ranges are kept by 4 KiB page, or by 1 MiB region for a record longer
// than goneFineMax, so a lookup is a few map probes; a page or region
// holds the newest record's count. Both maps are emptied once a sync
// covers everything in them.
type goneSet struct {
	fine, coarse map[int64]uint64
	newest       uint64 // the newest count in either map
}

const (
	gonePageShift   = 12
	goneRegionShift = 20
	goneFineMax     = 256 << 10
	// goneCheckMax: a backing write longer than this settles whenever
	// anything is pending, rather than probing every page.
	goneCheckMax = 1 << goneRegionShift
)

// add records that the record appended as number seq removed clean data
// in [off, off+n).
func (g *goneSet) add(off, n int64, seq uint64) {
	if g.fine == nil {
		g.fine, g.coarse = map[int64]uint64{}, map[int64]uint64{}
	}
	m, shift := g.fine, int64(gonePageShift)
	if n > goneFineMax {
		m, shift = g.coarse, goneRegionShift
	}
	for k := off >> shift; k <= (off+max(n, 1)-1)>>shift; k++ {
		m[k] = seq
	}
	g.newest = max(g.newest, seq)
}

// pending reports whether a record that removed clean data in
// [off, off+n) is newer than synced, the count every record before which
// is durable.
func (g *goneSet) pending(off, n int64, synced uint64) bool {
	if g.newest <= synced {
		if len(g.fine)+len(g.coarse) > 0 {
			clear(g.fine)
			clear(g.coarse)
		}
		return false
	}
	if n > goneCheckMax {
		return true
	}
	last := off + max(n, 1) - 1
	for k := off >> gonePageShift; k <= last>>gonePageShift; k++ {
		if g.fine[k] > synced {
			return true
		}
	}
	for k := off >> goneRegionShift; k <= last>>goneRegionShift; k++ {
		if g.coarse[k] > synced {
			return true
		}
	}
	return false
}
