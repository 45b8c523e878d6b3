package cache

// backing.go: what the cache measures of its backing device: how long its
// writes take (a disk or not) and whether it is in reach.

import (
	"errors"
	"sync/atomic"
	"time"

	"github.com/nbdcache/nbdcache/storage"
)

// backingHealth is Cache.health: atomics, read and written without mu.
type backingHealth struct {
	// nanos: the average time a backing write took, per 4 KiB: bypassed
	// writes and the cache's own writebacks (see slowBacking).
	nanos         atomic.Int64
	samples       atomic.Int64 // writes noted in nanos since the prior (assume)
	roomWaitAfter atomic.Int64 // unix nanoseconds: no waiting for room before
	// cachedNanos, cachedBytes: the time writes into the cache took,
	// waits for room included, each shared among the writes in flight
	// when it began (cachedInFlight), and their bytes (cachedStart,
	// cachedDone): running totals that thrashDetector weighs window by
	// window.
	cachedNanos, cachedBytes, cachedInFlight atomic.Int64
	// roomNanos: the background loop's time making room (its GC passes,
	// and the checkpoints that free the buckets they emptied), a running
	// total: writes into the cache cost that too.
	roomNanos atomic.Int64
	// rotates: the prior came from the backing's word that it rotates
	// (set once, before any goroutine of the cache starts).
	rotates bool
	// awayUntil: unix nanoseconds until which the backing is taken to be
	// unreachable (noteUnavailable).
	awayUntil atomic.Int64
}

// A write that finds the cache full goes to the backing (bypass), unless
// the backing is slow: bypassing a slow disk's random writes is slower
// than waiting for the flusher, whose sorted writeback passes over the
// disk in address order, to make room (on the hdd model, random 4 KiB
// writes bypassed during writeback ran at a fraction of the disk alone:
// they moved the head away from the flusher's next write each time). So
// the backing writes' latency is measured, per 4 KiB, as an average, and
// above slowBackingNanos writers wait (waitRoom) instead, at most
// maxRoomWait at a time, or while a GC pass writes its victims back (it
// frees them when it ends; at most maxCleanWait). A wait that times out
// shows that nothing frees a bucket soon: writers then bypass for
// roomBackoff before they wait again. (Bypassing while GC's sweep runs
// would cost more than the wait: on the hdd model, with a 64 MiB cache
// over a 256 MiB working set, every write bypassed and the cache ran at
// 0.25x the disk alone, its sweep broken up by the bypassed writes.)
const (
	slowBackingNanos = 1_000_000
	maxRoomWait      = 2 * time.Second
	maxCleanWait     = 30 * time.Second
	roomBackoff      = 10 * time.Second
)

// assume starts the measurement from what the backing claims: a device
// that says it rotates is taken for a disk until timed writes show
// otherwise (a virtio disk claims to rotate; a dozen or so fast ones bring
// the average down). Only bypassed writes and the Source's own writebacks
// (GC, flushRange) are timed here; the flusher times its batches itself
// for its own choice (writeback.Seeker is only its prior). Starting from
// nothing, the first GC pass over a real disk began before a single write
// had been timed: it was not kept apart from the flusher's sweep
// (Exclusive), the two sorted streams interleaved, every write of both
// was a seek, and writers waiting for the pass stalled for 20 s and more
// (hdd model, a 64 MiB cache under twice its size).
func (h *backingHealth) assume(c storage.Caps) {
	if c.Rotational {
		h.nanos.Store(2 * slowBackingNanos)
		h.rotates = true
	}
}

// noteBacking adds a backing write of n bytes that took d to the average
// (a lost update between two writers only weakens one sample). A sample
// counts for at most 4 ms a 4 KiB: a file in the page cache stalls for
// hundreds of milliseconds now and then (an fdatasync beside it, the
// kernel's dirty throttling), and one stall must not make it a disk for
// the next few dozen writes; a disk's writes are all slow, and three of
// them still do.
func (c *Cache) noteBacking(d time.Duration, n int64) {
	per4k := min(int64(d)*4096/max(n, 4096), 4*slowBackingNanos)
	old := c.health.nanos.Load()
	c.health.nanos.Store(old + (per4k-old)/8)
	c.health.samples.Add(1)
}

// cachedStart begins timing a write (or a batch's run of writes) into
// the cache; cachedDone ends it, with the bytes it wrote (0: none, not
// counted). Its time counts shared among the writes in flight when it
// began: what the detector weighs is how long the cache is busy per
// 4 KiB, not how long each of 8 writers waits behind the others (summed,
// that made 8 writers of a memory cache look 8 times slower than their
// backing, found by TestOverwritesAboveHalfStayCached).
func (c *Cache) cachedStart() (time.Time, int64) {
	return time.Now(), c.health.cachedInFlight.Add(1)
}

func (c *Cache) cachedDone(start time.Time, k, n int64) {
	c.health.cachedInFlight.Add(-1)
	if n > 0 {
		c.health.cachedNanos.Add(int64(time.Since(start)) / max(k, 1))
		c.health.cachedBytes.Add(n)
	}
}

// noteUnavailable reports whether err says the backing could not be
// reached (storage.ErrUnavailable: a remote that stayed away for its
// timeout), and if so remembers it for backingAwayFor: write-back streams
// are then cached instead of bypassed (backingAway).
func (c *Cache) noteUnavailable(err error) bool {
	if !errors.Is(err, storage.ErrUnavailable) {
		return false
	}
	c.health.awayUntil.Store(time.Now().Add(backingAwayFor).UnixNano())
	return true
}

// backingAway reports whether the backing is out of reach: by its own
// account (storage.Reachability, a remote), else if it was found
// unreachable within backingAwayFor.
func (c *Cache) backingAway() bool {
	if r, ok := c.back.(storage.Reachability); ok && !r.Reachable() {
		return true
	}
	u := c.health.awayUntil.Load() // 0 until it was away once: no clock read
	return u != 0 && time.Now().UnixNano() < u
}

// backingAwayFor is how long an unreachable backing is taken to stay away.
const backingAwayFor = 5 * time.Second

// diskLike reports whether backing writes are slow enough to be a disk's:
// then where its head goes matters more than anything else. The sysfs
// rotational flag does not tell: virtio disks claim to rotate.
//
// A backing taken for a disk on its word alone (it says it rotates, and
// the cache has timed fewer than trustSamples writes of its own) is not
// one once the flusher's timed writes say it is fast
// (writeback.Flusher.TimedSeeks). Without that, a fast file on a virtio
// disk stayed "a disk" for as long as no write went around the cache: at
// a working set half a 64 MiB cache (bench/pressure.sh, ratio 0.5) the
// writers then moved data themselves and waited for checkpoints in some
// runs and not in others (gc_moved_bytes 180 MB against 12 MB). The
// flusher's word only clears that prior, never makes a disk: it times a
// write, not 4 KiB, and a fast device's dense 1 MiB writes take
// milliseconds (found by review).
func (c *Cache) diskLike() bool {
	if c.health.rotates && c.health.samples.Load() < trustSamples && c.flusher != nil {
		if seeks, ok := c.flusher.TimedSeeks(); ok && !seeks {
			return false
		}
	}
	return c.health.nanos.Load() > slowBackingNanos
}

// trustSamples is how many writes the cache times before its own measure
// of the backing overrides the flusher's.
const trustSamples = 8

// BackingSeeks is writeback.Seeker: diskLike.
func (c *Cache) BackingSeeks() bool { return c.diskLike() }

// slowBacking reports whether bypassed writes are slow enough that
// waiting for room beats them (and no wait timed out lately).
func (c *Cache) slowBacking() bool {
	return c.diskLike() && time.Now().UnixNano() >= c.health.roomWaitAfter.Load()
}
