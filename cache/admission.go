package cache

// admission.go: where a request goes: into the cache or around it, and
// whether a read's misses are copied in. The decisions are pure functions
// of the request and of the state handed to them (writeRoute, mayPromote),
// as bcache's check_should_bypass and should_writeback are; the only state
// they read is owned here by admitter, which lives under c.mu (c.mu.admit)
// and is touched by nothing else:
//   - the sequential-cutoff detector: the last streams seen, each with its
//     end and length;
//   - the promotion doorkeeper: saturating miss counts per region, halved
//     every window;
//   - whether the cache thrashes (thrashDetector).
// None is durable: after a restart every stream and count starts over.

// route is where a write goes.
type route int

const (
	routeDirty   route = iota // into the cache, dirty (writeDirty)
	routeBacking              // to the backing alone (a bypass)
	routeThrough              // to the backing, then a clean copy into the cache
)

// writeRoute decides a write's route from the cache mode, whether it
// should go around the cache (around: it continues a stream past the
// cutoff, or it misses a thrashing cache) and whether its range holds
// dirty data or is being written back (pinned). Pinned data is never
// bypassed: the write must supersede it in the cache (doc.go).
func writeRoute(mode Mode, around, pinned bool) route {
	switch {
	case pinned || (mode == Writeback && !around):
		return routeDirty
	case around || mode != Writethrough:
		return routeBacking
	default:
		return routeThrough
	}
}

// routeNeedsPin reports whether writeRoute's answer can depend on pinned:
// a write-back write that is no stream goes to the cache either way, so
// the write path skips the index lookup (a tenth of its cost).
func routeNeedsPin(mode Mode, around bool) bool { return mode != Writeback || around }

// mayPromote reports whether a read's misses may be copied into the cache,
// as far as the request decides: the cache is on, the read is no stream
// past the cutoff, and it has a gap. (The read path also needs no backing
// write in flight over the range: promoGuard.)
func mayPromote(mode Mode, seq, gap bool) bool { return mode != None && !seq && gap }

// admitter owns admission's state; c.mu guards it.
type admitter struct {
	cutoff     int64 // Options.SequentialCutoff: < 0 turns detection off
	promoteAll bool  // Options.PromoteAll: every miss is promoted
	streams    [16]stream
	tick       uint64 // advances with every request seen: streams' age
	door       doorkeeper
	thrash     thrashDetector
}

// stream is one sequential stream for the cutoff.
type stream struct {
	end, bytes int64
	used       uint64
}

func newAdmitter(o Options) admitter {
	return admitter{cutoff: o.SequentialCutoff, promoteAll: o.PromoteAll, door: doorkeeper{counts: make([]uint8, doorSlots)}}
}

// sequential feeds the detector with a request and reports whether it
// belongs to a stream longer than the cutoff. A request that continues no
// stream replaces the least recently used one.
func (a *admitter) sequential(off, n int64) bool {
	if a.cutoff < 0 {
		return false
	}
	a.tick++
	victim := 0
	for i := range a.streams {
		s := &a.streams[i]
		if s.used != 0 && s.end == off {
			s.end, s.bytes, s.used = off+n, s.bytes+n, a.tick
			return s.bytes > a.cutoff
		}
		if s.used < a.streams[victim].used {
			victim = i
		}
	}
	a.streams[victim] = stream{end: off + n, bytes: n, used: a.tick}
	return n > a.cutoff
}

// thrashDetector decides whether the cache thrashes: its working set does
// not fit, so every write it takes must be written back (and the backing
// flushed) before the next finds room. A write-back cache over a backing
// as fast as it gains nothing from such a write (bcache's congestion
// bypass has the same aim): while it thrashes, a write that misses it
// goes around it, a write over what it holds stays in it, and read misses
// are not promoted.
//
// The evidence is the write hit ratio while free buckets are short,
// counted over windows of about as many writes as the cache holds
// blocks: a working set that fits is mostly overwrites of what is cached
// (GC's evictions make some misses), one that does not is mostly misses.
// A window with under thrashHits hits in it starts thrashing, if GC has
// also written back a turnover's worth only to make room since the last
// time (a cache full of clean data frees room without the backing). It
// lasts thrashWindows windows, or until a window's hit ratio is high
// again; then a window of writes all cached must find it again. So the
// cache keeps taking in a new hot set within a window or so, and never
// bypasses for good. (4k random writes over a fast file, a 64 MiB cache,
// 2 to 8 times as big a working set: 0.30x the backing alone without it,
// about 0.45x with it.)
type thrashDetector struct {
	on           bool
	left         int // windows left while on
	writes, hits int // in the current window
	cleanedMark  int64
}

const (
	thrashHits    = 0.75 // hit ratio below which a window counts as thrashing
	thrashWindows = 16
)

// note counts a write-back write made while free buckets are short or
// the cache thrashes (hit: part of its range is cached), with GC's
// cleaned bytes so far, and reports whether the cache thrashes.
func (t *thrashDetector) note(hit bool, cleaned, turnover int64, window int) bool {
	t.writes++
	if hit {
		t.hits++
	}
	if t.writes < window {
		return t.on
	}
	missing := float64(t.hits) < thrashHits*float64(t.writes)
	t.writes, t.hits = 0, 0
	switch {
	case t.on:
		t.left--
		if !missing || t.left <= 0 {
			t.on, t.cleanedMark = false, cleaned
		}
	case missing && cleaned-t.cleanedMark >= turnover:
		t.on, t.left = true, thrashWindows
	}
	return t.on
}

// promote records a read miss of [off, off+n) that mayPromote allowed and
// reports whether to copy it into the cache: always for a prefetch (NBD
// CACHE) or with promoteAll, else as the doorkeeper says.
func (a *admitter) promote(off, n int64, prefetch bool) bool {
	return prefetch || a.promoteAll || a.door.touch(off, n)
}

// doorkeeper is the read-promotion filter: a miss is promoted the second
// time its 64 KiB region misses within the sketch's window, a doorkeeper in
// TinyLFU's sense. One-hit wonders (a backup scan, a single read of a cold
// file) never displace cached data; anything read twice is cached.
// Counters are saturating bytes (at most 15), halved every window (aging).
type doorkeeper struct {
	counts []uint8
	seen   int
}

const (
	doorRegion = 64 << 10
	doorSlots  = 1 << 14
	doorWindow = doorSlots * 4
)

func (d *doorkeeper) slot(region int64) int {
	h := uint64(region) * 0x9e3779b97f4a7c15
	return int(h >> (64 - 14))
}

// touch records a miss of [off, off+n) and reports whether a region of it
// missed before.
func (d *doorkeeper) touch(off, n int64) bool {
	admit := false
	for r := off / doorRegion; r <= (off+n-1)/doorRegion; r++ {
		s := d.slot(r)
		if d.counts[s] >= 1 {
			admit = true
		}
		if d.counts[s] < 15 {
			d.counts[s]++
		}
	}
	d.seen++
	if d.seen >= doorWindow {
		d.seen = 0
		for i := range d.counts {
			d.counts[i] /= 2
		}
	}
	return admit
}
