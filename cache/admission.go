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
// goes around it, a write over what it holds stays in it, read misses are
// not promoted, and the cache sheds what it holds (Cache.Shedding): its
// dirty data is written back and dropped, so that writes stop landing in
// it at all.
//
// The evidence is the write hit ratio while free buckets are short,
// counted over windows of about as many writes as the cache holds
// blocks: a working set that fits is mostly overwrites of what is cached
// (GC's evictions make some misses), one that does not is mostly misses.
// A window with under thrashHits hits in it starts thrashing, if GC has
// also written back a turnover's worth only to make room since the last
// time (a cache full of clean data frees room without the backing).
//
// A cache that has shed its data hits nothing, so while it thrashes the
// hit ratio is a ghost's (ghost): the share of writes that would have hit
// a cache holding the blocks of the last window's writes. Thrashing ends
// when a window's ghost hit ratio reaches thrashHits: the writes' working
// set has become one the cache can hold, and it takes it in within about
// a window. (4k random writes over a fast file, a 64 MiB cache, twice as
// big a working set: 0.30x the backing alone without the detector, about
// 0.45x when it stepped aside for 16 windows at a time and kept its data,
// about 0.5x when it shed its data too.)
type thrashDetector struct {
	on           bool
	writes, hits int // in the current window
	cleanedMark  int64
	ghost        ghost
}

const thrashHits = 0.75 // hit ratio below which a window counts as thrashing

// note counts a write-back write of block b (its first 4 KiB block) made
// while free buckets are short or the cache thrashes (hit: part of its
// range is cached), with GC's cleaned bytes so far, and reports whether
// the cache thrashes. window is the cache's size in blocks.
func (t *thrashDetector) note(b uint64, hit bool, cleaned, turnover int64, window int) bool {
	if t.on {
		sampled, ghit := t.ghost.note(b)
		if !sampled {
			return true
		}
		hit, window = ghit, t.ghost.size()
	}
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
	case t.on && !missing:
		t.on, t.cleanedMark = false, cleaned
	case !t.on && missing && cleaned-t.cleanedMark >= turnover:
		t.on = true
		t.ghost.reset(window)
	}
	return t.on
}

// ghost remembers the blocks of the last size() sampled writes, a window's
// worth, and reports whether a sampled write hits one of them. A block is
// sampled when its hash falls in 1/rate of the range, so the ghost of a
// large cache stays at most ghostMax entries (SHARDS's spatial sampling:
// the hit ratio of the sampled blocks estimates that of all).
type ghost struct {
	mask uint64           // sampled: hash(b)&mask == 0
	ring []uint64         // the last sampled blocks, oldest at next once full
	next int              // where the next goes
	full bool             // ring has wrapped
	in   map[uint64]int32 // how often each block is in ring
}

const ghostMax = 4096

// reset empties the ghost and sizes it for a window of window writes.
func (g *ghost) reset(window int) {
	rate := 1
	for window/rate > ghostMax {
		rate *= 2
	}
	g.mask = uint64(rate - 1)
	g.ring = make([]uint64, max(window/rate, 1))
	g.next, g.full = 0, false
	g.in = make(map[uint64]int32, len(g.ring))
}

func (g *ghost) size() int { return len(g.ring) }

// note records a write of block b, if sampled, and whether it hit.
func (g *ghost) note(b uint64) (sampled, hit bool) {
	if (b*0x9e3779b97f4a7c15)>>40&g.mask != 0 {
		return false, false
	}
	hit = g.in[b] > 0
	if g.full {
		old := g.ring[g.next]
		if g.in[old]--; g.in[old] <= 0 {
			delete(g.in, old)
		}
	}
	g.ring[g.next] = b
	g.in[b]++
	g.next++
	if g.next == len(g.ring) {
		g.next, g.full = 0, true
	}
	return true, hit
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
