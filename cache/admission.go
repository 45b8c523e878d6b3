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
// a cache of its size holding the blocks written last. Thrashing ends
// when a window's ghost hit ratio reaches thrashHits: the writes' working
// set has become one the cache can hold, and it takes it in within about
// a window. (4k random writes over a fast file, a 64 MiB cache, twice as
// big a working set: 0.30x the backing alone without the detector, about
// 0.45x when it stepped aside for 16 windows at a time and kept its data,
// about 0.5x when it shed its data too.)
//
// A working set that fits can still lose: over a backing as fast as the
// cache device, a cache under pressure is slower than the backing. It
// pays for room (GC, checkpoints and their syncs), and the backing pays
// for none of it (4k random writes over half a 64 MiB cache, a fast file:
// 0.62-0.69x the backing alone). So each window also weighs what a write
// into the cache costs, per 4 KiB, against the backing's recent average
// write (Cache.noteBacking), as bcache's congestion bypass weighs the
// cache device's latency. A write's cost is its writer's time (waits for
// room included), shared among the writes in flight, plus the
// background's time making room (its GC passes, the checkpoints that free
// buckets). The writers' time alone does not show it: at ratio 0.5 it was
// 3.5-4.6 us per 4 KiB against 3-4 us for the backing's writes, the rest
// being in the background; with it, 8-30 us. A window whose writes cost
// over slowerBy times the backing's (a margin for noise) starts thrashing
// too (slower), and the ghost's hits do not end it: the working set fits,
// but the cache does not pay. Only writes are weighed, so a cache that
// served reads in the window (read hits beyond 1/readsWorth of the
// client's writes over the same span) is never slower: over a device
// whose page cache takes writes fast but whose reads are slow, stepping
// aside would lose those hits. The cost errs towards the cache being
// slower where a writer waits for the background (a checkpoint it needs):
// that time counts on both sides, and GC's backing flushes count against
// the cache, where a bypassed write has its flush only at the client's
// FLUSH. Aside, it is not measured again (the writes that still go into a
// cache shedding its data are not pressed): it ends when the backing
// becomes slower than the cost measured before, or after probe windows,
// to measure the cache again: it fills with what is written, and steps
// aside again if it is still slower once pressed. A probe costs a second
// or two at the cache's speed, so each probe that finds it slower again
// doubles the next wait, from probeWindows up to maxProbeWindows (a
// 64 MiB cache at 130k writes a second: 8 s, then up to about 2 min); one
// that finds it faster starts the waits over.
type thrashDetector struct {
	on           bool
	writes, hits int // in the current window
	mark         costs
	cleanedMark  int64 // GC's cleaned bytes when thrashing last ended
	ghost        ghost
	// cost: what a write into the cache cost per 4 KiB over the last
	// window measured (slowerOver).
	cost    int64
	slower  bool // on because the cache was slower than the backing
	windows int  // windows ended since on
	probe   int  // windows a slower cache stays aside this time
	probed  bool // it last ended to probe, and no window since found it worth it
}

// costs is what a window weighs besides the hits: running totals (a
// window's share is their growth from its first write to its end), and
// the backing's average.
type costs struct {
	cleaned      int64 // bytes GC wrote back to make room
	cachedNanos  int64 // writers' time in writes into the cache (waits for room included), and the background's making room
	cachedBytes  int64 // the bytes of those writes
	writes       int64 // the client's writes, every route
	readHits     int64 // reads served from the cache, wholly or in part
	backingPer4k int64 // the backing's recent average write per 4 KiB; 0: none timed
}

const (
	thrashHits      = 0.75 // hit ratio below which a window counts as thrashing
	readsWorth      = 8    // read hits beyond a window's writes / readsWorth keep a slower cache
	slowerBy        = 2    // slower: the cache's cost over slowerBy times the backing's
	probeWindows    = 64
	maxProbeWindows = 1024
)

// note counts a write-back write of the blocks [b, b+blocks) (4 KiB
// blocks) made while free buckets are short or the cache thrashes (hit:
// part of its range is cached), with the running costs so far, and
// reports whether the cache thrashes. window is the cache's size in
// blocks. The ghost counts each of the write's blocks (at most 256): it
// holds as many blocks as the cache, so a 16 KiB write takes four of them,
// as it would take four in the cache (with one a write, 8 connections of
// 16 KiB writes over 4 times the cache's size all but hit it).
func (t *thrashDetector) note(b, blocks uint64, hit bool, now costs, turnover int64, window int) bool {
	if t.writes == 0 {
		t.mark = now // the window's span starts here
	}
	if t.on {
		for i := range min(max(blocks, 1), 256) {
			sampled, ghit := t.ghost.note(b + i)
			if !sampled {
				continue
			}
			t.writes++
			if ghit {
				t.hits++
			}
		}
		window = t.ghost.size()
	} else {
		t.writes++
		if hit {
			t.hits++
		}
	}
	if t.writes < window {
		return t.on
	}
	missing := float64(t.hits) < thrashHits*float64(t.writes)
	slower := t.slowerOver(now)
	t.writes, t.hits = 0, 0
	if t.on {
		t.windows++
	} else if !slower {
		t.probed = false // the last probe found the cache worth it
	}
	switch {
	case t.on && !missing && !(t.slower && slower && t.windows < t.probe):
		t.on, t.cleanedMark = false, now.cleaned
		t.probed = t.slower && slower
	case !t.on && (missing && now.cleaned-t.cleanedMark >= turnover || slower):
		t.on, t.slower, t.windows = true, slower, 0
		if !t.probed {
			t.probe = probeWindows
		} else if slower {
			t.probe = min(2*t.probe, maxProbeWindows)
		}
		t.ghost.reset(window)
	}
	return t.on
}

// slowerOver reports whether the cache is slower than the backing, at the
// end of a window that began at t.mark. Off, it measures the window's
// writes into the cache (a window with too few of them to say is not
// slower); aside, it weighs the cost it measured before it stepped aside
// against the backing's now (a backing that slowed down ends it): writes
// into a cache that sheds its data are no longer pressed, and measuring
// those would end every stay aside within a window or two (found by
// review). Reads and writes are counted over the same span: every write
// the client made, not only the window's (pressed or sampled) ones.
func (t *thrashDetector) slowerOver(now costs) bool {
	writes := now.writes - t.mark.writes
	reads := now.readHits - t.mark.readHits
	if !t.on {
		db := now.cachedBytes - t.mark.cachedBytes
		if db < 4096*max(writes/4, 1) {
			return false
		}
		t.cost = (now.cachedNanos - t.mark.cachedNanos) / max(db/4096, 1)
	}
	return now.backingPer4k > 0 && t.cost > slowerBy*now.backingPer4k && reads*readsWorth <= writes
}

// ghost is the cache it would be if it held the last size() distinct
// blocks written (least recently written out first), sampled: it reports
// whether a sampled write hits it. A block is sampled when its hash falls
// in 1/rate of the range, so the ghost of a large cache stays at most
// ghostMax blocks (SHARDS's spatial sampling: the hit ratio of the
// sampled blocks estimates that of all). Distinct blocks, not the last
// window of writes: uniform writes over a set a little smaller than the
// cache hit a window of writes only 1 - 1/e of the time, and thrashing
// never ended for a set of 0.75 to 1 times the cache (found by review).
type ghost struct {
	mask  uint64            // sampled: hash(b)&mask == 0
	k     int               // distinct blocks held
	queue []ghostWrite      // sampled writes, oldest from head on
	head  int               // first live entry of queue
	last  map[uint64]uint64 // each block held: the seq of its latest write
	seq   uint64
}

type ghostWrite struct{ b, seq uint64 }

// ghostMax bounds the ghost's blocks, and so a window's sampled writes
// while thrashing. With 4096, a cache of 16 MiB or less sampled every
// block, and the ghost's map took 4.5% of the server's CPU under the
// parallel load (8 connections of 16 KiB writes: four blocks each); a
// window of 1024 samples still measures a hit ratio to within a few
// hundredths.
const ghostMax = 1024

// reset empties the ghost and sizes it for a cache of window blocks.
func (g *ghost) reset(window int) {
	rate := 1
	for window/rate > ghostMax {
		rate *= 2
	}
	g.mask = uint64(rate - 1)
	g.k = max(window/rate, 1)
	g.queue, g.head, g.seq = make([]ghostWrite, 0, 2*g.k), 0, 0
	g.last = make(map[uint64]uint64, g.k+1)
}

func (g *ghost) size() int { return g.k }

// note records a write of block b, if sampled, and whether it hit.
func (g *ghost) note(b uint64) (sampled, hit bool) {
	if (b*0x9e3779b97f4a7c15)>>40&g.mask != 0 {
		return false, false
	}
	_, hit = g.last[b]
	g.seq++
	g.last[b] = g.seq
	g.queue = append(g.queue, ghostWrite{b, g.seq})
	// Out go the least recently written blocks beyond k, and writes that
	// a later write of the same block made stale; the queue keeps at most
	// 4k writes (past that, its oldest live block goes too).
	for g.head < len(g.queue) {
		e := g.queue[g.head]
		live := g.last[e.b] == e.seq
		if live && len(g.last) <= g.k && len(g.queue)-g.head <= 4*g.k {
			break
		}
		if live {
			delete(g.last, e.b)
		}
		g.head++
	}
	if g.head > len(g.queue)/2 {
		g.queue = append(g.queue[:0], g.queue[g.head:]...)
		g.head = 0
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
