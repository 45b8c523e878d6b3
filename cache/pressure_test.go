package cache

import (
	"bytes"
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nbdcache/nbdcache/storage"
	"github.com/nbdcache/nbdcache/test/testseed"
	"github.com/nbdcache/nbdcache/writeback"
)

// TestGCNeverMovesClean: a tiny cache (16 buckets) under a working set
// eight times its size, so that every write lands on a full cache, with
// reads promoting clean data among the dirty, the flusher and GC running,
// and moves forced (GCMove, and GCStep from the test). Every time GC is
// about to move a range, the test looks the range up in the index itself:
// all of it must be dirty. Reads check the data throughout; Verify and
// the deep check end it.
func TestGCNeverMovesClean(t *testing.T) {
	for _, move := range []bool{true, false} {
		t.Run(map[bool]string{true: "move", false: "clean"}[move], func(t *testing.T) {
			const size = 8 << 20
			d := formatMem(t, 1<<20+256<<10, size, FormatOptions{BucketSize: 64 << 10, JournalSize: 64 << 10})
			var c *Cache
			var cleanMoved, moves int64
			onMove := func(off, n int64) { // mu held
				moves++
				c.mu.idx.Lookup(off, n, func(e btreeExtent) bool {
					if !e.Dirty {
						cleanMoved += e.Len
					}
					return true
				})
			}
			c = openHooked(t, d, Options{GCMove: move, PromoteAll: true}, testHooks{onMove: onMove})
			r := rng(testseed.Get(t))
			model := make([]byte, size)
			id := uint64(0)
			for i := range 6000 {
				off := r.Int64N(size/4096-4) * 4096
				n := 4096 * (1 + r.Int64N(4))
				switch x := r.IntN(10); {
				case x < 6:
					id++
					p := payload(off, n, id)
					if err := c.WriteAt(p, off, 0); err != nil {
						t.Fatal(err)
					}
					copy(model[off:], p)
				case x < 9:
					got := make([]byte, n)
					if err := c.ReadAt(got, off); err != nil {
						t.Fatal(err)
					}
					if !bytes.Equal(got, model[off:off+n]) {
						t.Fatalf("op %d: read [%d+%d) differs from what was written", i, off, n)
					}
				default:
					c.GCStep(r.IntN(2) == 0)
				}
			}
			c.mu.Lock()
			bad, nm := cleanMoved, moves
			c.mu.Unlock()
			st := c.Stats()
			t.Logf("moves %d (%d bytes), GC cleaned %d bytes, evicted %d, promoted %d, bypasses %d",
				nm, st.GCMovedBytes, st.GCCleanedBytes, st.EvictedBytes, st.PromotedBytes, st.Bypasses)
			if bad > 0 {
				t.Errorf("GC moved %d bytes of clean data", bad)
			}
			// Without GCMove, GC cleans rather than moves, and with one
			// CPU the flusher may keep up so that nothing is moved.
			if (move && nm == 0) || (nm == 0 && st.GCCleanedBytes == 0) || st.PromotedBytes == 0 || st.EvictedBytes == 0 {
				t.Errorf("the test did not exercise GC: %d moves, %d bytes cleaned, %d promoted, %d evicted", nm, st.GCCleanedBytes, st.PromotedBytes, st.EvictedBytes)
			}
			closeChecked(t, c, d)
		})
	}
}

// TestDirectOverDropsMovedVersion: a write that finds the cache full goes
// to the backing and then drops the dirty data it superseded, found by
// version: GC may have moved that data to another bucket meanwhile (here,
// while the backing write is in flight). Dropping only what is still at
// the old location would leave the moved copy, older than the write, in
// the index: reads would return it. (Mutant directover-drops-by-location,
// which TestPowerCutConcurrent caught at some seeds only.)
func TestDirectOverDropsMovedVersion(t *testing.T) {
	cdev, bdev := storage.NewMem(512<<10), storage.NewCrash(8<<20) // Crash: for its hook
	if err := Format(cdev, bdev, FormatOptions{BackingID: testBackingID, BucketSize: 32 << 10, JournalSize: 16 * metaBlock}); err != nil {
		t.Fatal(err)
	}
	c, err := openStill(cdev, bdev, Options{BackingID: testBackingID, SequentialCutoff: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// Fill the cache with dirty data, no overwrites: every bucket full of
	// live dirty data, so GC finds no victim and a write must bypass.
	var off int64
	for c.Stats().NoSpace == 0 {
		if err := c.WriteAt(payload(off, 4096, 1), off, 0); err != nil {
			t.Fatal(err)
		}
		off += 4096
	}
	var d btreeExtent
	c.mu.Lock()
	c.mu.idx.Lookup(0, 4096, func(e btreeExtent) bool { d = e; return false })
	c.mu.Unlock()
	if !d.Dirty {
		t.Fatalf("no dirty extent at 0: %+v", d)
	}
	moved := false
	bdev.SetHook(func(op storage.Op) {
		if op.Kind != storage.OpWrite || op.Off != 0 || moved {
			return
		}
		moved = true // the bypass's backing write: GC moves D now
		c.mu.Lock()
		epoch := c.mu.space.buckets[c.sb.bucketOf(d.Loc)].epoch
		c.mu.Unlock()
		if !c.gcMove(gcPiece{off: d.Off, n: d.Len, loc: d.Loc, ver: d.Ver, dirty: true}, epoch) {
			t.Error("GC could not move the extent")
		}
	})
	before := c.Stats().Bypasses
	if err := c.WriteAt(payload(0, 4096, 2), 0, 0); err != nil {
		t.Fatal(err)
	}
	bdev.SetHook(nil)
	if !moved || c.Stats().Bypasses == before {
		t.Fatalf("the write did not bypass the full cache (moved %v, bypasses %d)", moved, c.Stats().Bypasses-before)
	}
	if c.Stats().GCMovedBytes == 0 {
		t.Fatal("GC moved nothing")
	}
	got := make([]byte, 4096)
	if err := c.ReadAt(got, 0); err != nil || !bytes.Equal(got, payload(0, 4096, 2)) {
		t.Fatalf("after a bypassed write over dirty data that GC moved meanwhile, a read returns older data (%v)", err)
	}
	if err := c.Verify(); err != nil {
		t.Fatal(err)
	}
}

// TestBucketPiecesKeepsPieceRefs: the shape behind a CI failure of
// TestGCNeverMovesClean. Bucket b holds write A. A later extent X covers
// A's range, but lies across b's tail and the next bucket's head (GC's
// moves make such extents: the pieces of one write, moved into adjacent
// buckets of one generation, merge), so X's part in b lies away from A's
// range. GC's scan of b reaches X through A's old ref first. Keeping that
// ref, and dropping X's own ref as already seen, leaves no ref over X's
// part in b: once X is split, GC can no longer find that part, and the
// bucket never frees.
func TestBucketPiecesKeepsPieceRefs(t *testing.T) {
	d := formatMem(t, 1<<20, 4<<20, FormatOptions{BucketSize: 64 << 10, JournalSize: 64 << 10})
	c := openStillT(t, d, Options{SequentialCutoff: -1})
	const kb = 1 << 10
	for off := int64(0); off < 44*kb; off += 4 * kb { // A at 100 KiB, then filler
		at := 1<<20 + off
		if off == 0 {
			at = 100 * kb
		}
		if err := c.WriteAt(payload(at, 4*kb, 1), at, 0); err != nil {
			t.Fatal(err)
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	// X: [80, 120) KiB, 20 KiB at b's tail and 20 KiB at the next
	// bucket's head, one version, one generation.
	loc, got, b, ok := c.allocLocked(&c.mu.space.fg, 20*kb, 0)
	loc2, got2, b2, ok2 := c.allocLocked(&c.mu.space.fg, 20*kb, 0)
	if !ok || !ok2 || got != 20*kb || got2 != 20*kb || loc2 != loc+got || b2 != b+1 || c.mu.space.buckets[b].gen != c.mu.space.buckets[b2].gen {
		t.Fatalf("setup: X's space is not 20 KiB at the tail of A's bucket and 20 at the head of the next (%d+%d in %d, %d+%d in %d)", loc, got, b, loc2, got2, b2)
	}
	c.insertLocked(btreeExtent{Off: 80 * kb, Len: 40 * kb, Loc: loc, Ver: c.mu.nextVer, Gen: c.mu.space.buckets[b].gen, Dirty: true}, 0)
	c.mu.nextVer++
	c.mu.space.release(b)
	c.mu.space.release(b2)
	c.bucketPiecesLocked(b, nil)
	c.mu.Unlock()
	defer c.mu.Lock()
	if err := c.Verify(); err != nil {
		t.Fatal(err)
	}
}

// TestFullIndexOverDiskDoesNotSpin: a hang found by the soak
// (TestPowerCutConcurrent, seed 1796488419497829353, one in about 65,000
// cuts: seven clients spun for 60 s). Over a backing that counts as a
// disk, a write that finds the cache full waits for room (waitRoom)
// instead of bypassing. When what is full is the index, not the buckets,
// waitRoom found free buckets, reported room at once, and the write tried
// again, found the index still full, and so on for ever: nothing writes
// back dirty extents below the dirty target. A write that finds the index
// full now goes to the backing (which writes back what it must first).
func TestFullIndexOverDiskDoesNotSpin(t *testing.T) {
	d := formatMem(t, 4<<20, 16<<20, FormatOptions{BucketSize: 64 << 10, JournalSize: 64 << 10})
	c := openHooked(t, d, Options{SequentialCutoff: -1}, testHooks{noBackground: true, maxExt: 40})
	c.health.nanos.Store(5 * slowBackingNanos) // a disk's latency (diskLike)
	for i := range int64(60) {                 // far apart: one extent each, 3/4 of 40 reached at 30
		done := make(chan error, 1)
		go func() { done <- c.WriteAt(payload(i<<16, 4096, uint64(i+1)), i<<16, 0) }()
		select {
		case err := <-done:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("write %d has not returned after 10 s (%d extents, index capacity %d, %d free buckets)",
				i, c.Stats().Extents, c.maxExtents(), c.Stats().FreeBuckets)
		}
	}
	for i := range int64(60) {
		got := make([]byte, 4096)
		if err := c.ReadAt(got, i<<16); err != nil || !bytes.Equal(got, payload(i<<16, 4096, uint64(i+1))) {
			t.Fatalf("write %d reads back wrong (%v)", i, err)
		}
	}
	if err := c.Verify(); err != nil {
		t.Fatal(err)
	}
}

// awayDev is a backing out of reach: every write waits stall, then fails
// with storage.ErrUnavailable, and it says so (storage.Reachability).
type awayDev struct {
	storage.Device
	stall  time.Duration
	stalls atomic.Int64
}

func (d *awayDev) WriteAt(p []byte, off int64, fl storage.Flags) error {
	d.stalls.Add(1)
	time.Sleep(d.stall)
	return fmt.Errorf("remote: %w", storage.ErrUnavailable)
}

func (d *awayDev) Reachable() bool { return false }

// TestStreamCachedWhileBackingAway: during an outage of a backing that
// reports its reachability, a write-back stream past the cutoff is cached
// at once: it never waits for the backing. (Found by review: with only
// the 5 s mark that an ErrUnavailable leaves, the stream waited out the
// backing's timeout again every time the mark ran out.)
func TestStreamCachedWhileBackingAway(t *testing.T) {
	d := formatMem(t, 8<<20, 64<<20, FormatOptions{})
	ad := &awayDev{Device: d.back, stall: 300 * time.Millisecond}
	c, err := openStill(d.cache, ad, Options{BackingID: testBackingID, SequentialCutoff: 16 << 10})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for off := int64(0); off < 2<<20; off += 4096 { // a stream 128 times the cutoff
		if err := c.WriteAt(payload(off, 4096, 1), off, 0); err != nil {
			t.Fatal(err)
		}
	}
	if n := ad.stalls.Load(); n > 0 {
		t.Fatalf("the stream waited for the unreachable backing %d times", n)
	}
}

// TestThrashBypass: a cache of 16 buckets under a working set eight times
// its size over a fast backing, with the background running. Once GC has
// cleaned half the cache only to make room and most writes miss, the
// cache thrashes: a write
// that misses it goes to the backing, a write over data it holds (clean or
// dirty) stays in it. Reads check every byte throughout, and the deep
// check ends it. Over a disk-like backing it never thrashes.
func TestThrashBypass(t *testing.T) {
	const size = 8 << 20
	d := formatMem(t, 1<<20+256<<10, size, FormatOptions{BucketSize: 64 << 10, JournalSize: 64 << 10})
	slow := storage.NewDelay(d.back) // fast until the end
	c := openT(t, devPair{d.cache, slow}, Options{SequentialCutoff: -1})
	r := rng(testseed.Get(t))
	model := make([]byte, size)
	id := uint64(0)
	write := func(off, n int64) {
		id++
		p := payload(off, n, id)
		if err := c.WriteAt(p, off, 0); err != nil {
			t.Fatal(err)
		}
		copy(model[off:], p)
	}
	check := func(off, n int64) {
		got := make([]byte, n)
		if err := c.ReadAt(got, off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, model[off:off+n]) {
			t.Fatalf("read [%d+%d) differs from what was written", off, n)
		}
	}
	thrashing := func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.thrashingLocked()
	}
	// Write until it thrashes (GC cleans what the flusher has not, and
	// most writes miss); again whenever a window of writes all cached
	// (thrashDetector) interrupts it.
	untilThrashing := func() {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for i := 0; !thrashing(); i++ {
			if time.Now().After(deadline) {
				st := c.Stats()
				t.Fatalf("no thrashing after %d writes: free %d, GC cleaned %d of %d", i, st.FreeBuckets, st.GCCleanedBytes, st.CapacityBytes)
			}
			off := r.Int64N(size/4096-4) * 4096
			write(off, 4096*(1+r.Int64N(4)))
			if i%7 == 0 {
				check(r.Int64N(size/4096-4)*4096, 16384)
			}
		}
	}
	untilThrashing()
	var misses, hits, hitsCached int
	// The flusher's batches stay out meanwhile: while it thrashes they
	// drop what they clean (Shedding), and a hit seen here would often
	// be a miss by the time of its write.
	release := make(chan struct{})
	held := make(chan struct{})
	go c.flusher.Exclusive(context.Background(), func() { close(held); <-release })
	<-held
	for range 4000 {
		off := r.Int64N(size/4096-4) * 4096
		n := 4096 * (1 + r.Int64N(4))
		c.mu.Lock()
		hit := c.cachedLocked(off, n)
		thrash := c.thrashingLocked()
		c.mu.Unlock()
		before := c.Stats()
		write(off, n)
		after := c.Stats()
		// The background may change the state between the look and the
		// write: count only writes whose state held across it.
		c.mu.Lock()
		held := c.thrashingLocked() == thrash && thrash
		c.mu.Unlock()
		if !held {
			continue
		}
		bypassed := after.Bypasses > before.Bypasses
		if hit {
			hits++
			if after.CachedWriteBytes > before.CachedWriteBytes {
				hitsCached++
			}
			continue
		}
		misses++
		if !bypassed {
			t.Fatalf("a write of [%d+%d) that missed the thrashing cache was not bypassed", off, n)
		}
		if r.IntN(3) == 0 {
			check(off, n)
		}
	}
	close(release)
	if misses == 0 || hits == 0 {
		t.Fatalf("thrashing writes: %d misses, %d hits; want both", misses, hits)
	}
	if hitsCached < hits*9/10 { // a hit may go to the backing when the cache is full
		t.Fatalf("only %d of %d writes over cached data stayed in the cache", hitsCached, hits)
	}
	// Over clean data only, too (a write over dirty data could not go
	// around the cache anyway: it is pinned). Few hits are clean while
	// it thrashes (it drops what it writes back: Shedding), so some are
	// made by an NBD CACHE, which it still takes, and written over.
	for cleanHits, tries := 0, 0; cleanHits < 5; tries++ {
		if tries == 200 {
			t.Fatalf("found %d clean extents to write over in %d tries", cleanHits, tries)
		}
		if err := c.Prefetch(r.Int64N(size/4096-4)*4096, 16384); err != nil {
			t.Fatal(err)
		}
		var e btreeExtent
		c.mu.Lock()
		c.mu.idx.Ascend(r.Int64N(size), func(x btreeExtent) bool {
			if x.Dirty || c.busyLocked(x.Off, x.Len) {
				return true
			}
			e = x
			return false
		})
		c.mu.Unlock()
		if e.Len == 0 {
			continue
		}
		n := min(e.Len, 16384)
		before := c.Stats().CachedWriteBytes
		write(e.Off, n)
		if !thrashing() { // the write may have ended a window
			untilThrashing()
			continue
		}
		if c.Stats().CachedWriteBytes == before {
			t.Fatalf("a write over clean cached data [%d+%d) went around the thrashing cache", e.Off, n)
		}
		cleanHits++
	}
	// Read misses are not promoted into it either, however often they
	// come; an NBD CACHE (Prefetch) still is.
	promoted := func(off int64, prefetch bool) bool {
		before := c.Stats().Promotions
		for range 3 {
			if prefetch {
				if err := c.Prefetch(off, 4096); err != nil {
					t.Fatal(err)
				}
			} else {
				check(off, 4096)
			}
		}
		return c.Stats().Promotions > before
	}
	for _, prefetch := range []bool{false, true} {
		for try := 0; ; try++ {
			off := r.Int64N(size/4096-1) * 4096
			c.mu.Lock()
			hit := c.cachedLocked(off, 4096)
			c.mu.Unlock()
			if hit {
				continue
			}
			if try == 50 {
				t.Fatal("the thrashing kept ending")
			}
			if !thrashing() {
				untilThrashing()
			}
			got := promoted(off, prefetch)
			if !thrashing() {
				continue
			}
			if got != prefetch {
				t.Fatalf("a thrashing cache, prefetch %v: promoted %v", prefetch, got)
			}
			break
		}
	}
	if got := c.Stats().ThrashBypasses; got < int64(misses) {
		t.Errorf("Stats.ThrashBypasses %d, want at least the %d misses bypassed", got, misses)
	}
	t.Logf("while thrashing: %d misses bypassed, %d of %d hits cached", misses, hitsCached, hits)
	for off := int64(0); off < size; off += 1 << 20 {
		check(off, 1<<20)
	}
	// It sheds what it holds: its dirty data is written back at full
	// speed and dropped once clean, so that random writes, hits and
	// misses alike, soon find it nearly empty. (Without shedding, it
	// took 8,000 to 15,000 writes here: GC's evictions alone.)
	for i := 0; ; i++ {
		if !thrashing() {
			untilThrashing()
		}
		st := c.Stats()
		if st.CachedBytes < st.CapacityBytes/4 {
			t.Logf("shed to %d bytes cached of %d after %d writes", st.CachedBytes, st.CapacityBytes, i)
			break
		}
		if i == 3000 {
			t.Fatalf("a thrashing cache still holds %d bytes (%d dirty) of %d after %d writes", st.CachedBytes, st.DirtyBytes, st.CapacityBytes, i)
		}
		write(r.Int64N(size/4096-4)*4096, 4096)
	}
	for off := int64(0); off < size; off += 1 << 20 {
		check(off, 1<<20)
	}
	// The backing turns into a disk: the first writes bypassed find it
	// out, and it stops thrashing (a disk's random writes are better
	// cached and swept back in order).
	untilThrashing()
	slow.Set(storage.OpWrite, 4*time.Millisecond)
	for i := 0; thrashing(); i++ {
		if i == 4 {
			t.Fatalf("still thrashing after %d writes bypassed to a backing taking 4 ms a write", i)
		}
		var off int64
		for { // a miss
			off = r.Int64N(size/4096-1) * 4096
			c.mu.Lock()
			hit := c.cachedLocked(off, 4096)
			c.mu.Unlock()
			if !hit {
				break
			}
		}
		write(off, 4096)
	}
	slow.Set(storage.OpWrite, 0)
	closeChecked(t, c, d)
}

// TestThrashSparesAFittingSet: random writes over a working set of 40%
// of the cache, 300 passes, with the background running (GC cleans and
// drops what it evicts, so its cleaned bytes pass any turnover): the
// writes mostly hit, so the cache never thrashes, and at the end most of
// the set is cached. (The first detector, which looked at free buckets
// and cleaned bytes alone, bypassed about half of these writes for good.)
// The miss rule alone (neverSlower): over a memory backing the cache is
// slower, and steps aside by the cost rule (TestSlowerCacheStepsAside).
func TestThrashSparesAFittingSet(t *testing.T) {
	d := formatMem(t, 1<<20+256<<10, 8<<20, FormatOptions{BucketSize: 64 << 10, JournalSize: 64 << 10})
	c := openHooked(t, d, Options{SequentialCutoff: -1}, testHooks{neverSlower: true})
	r := rng(testseed.Get(t))
	set := c.CapacityBytes() * 40 / 100 / 4096
	for i := range 300 * set {
		off := r.Int64N(set) * 4096
		if err := c.WriteAt(payload(off, 4096, uint64(i+1)), off, 0); err != nil {
			t.Fatal(err)
		}
	}
	st := c.Stats()
	cached := 0
	c.mu.Lock()
	for b := range set {
		if c.cachedLocked(b*4096, 4096) {
			cached++
		}
	}
	c.mu.Unlock()
	t.Logf("%d writes over %d blocks: GC cleaned %d bytes (capacity %d), %d thrash bypasses, %d of the blocks cached; a write per 4 KiB: %d ns into the cache, %d ns to the backing",
		300*set, set, st.GCCleanedBytes, st.CapacityBytes, st.ThrashBypasses, cached, st.CachedWriteNanos, st.BackingWriteNanos)
	if st.ThrashBypasses != 0 {
		t.Errorf("%d writes of a working set that fits went around the cache", st.ThrashBypasses)
	}
	if int64(cached) < set*3/4 {
		t.Errorf("only %d of the set's %d blocks are cached", cached, set)
	}
	closeChecked(t, c, d)
}

// TestCachedCostMeasured: what the cost rule weighs is measured as it
// says. 8 writers of 4 KiB (WriteAt) and one of batches (WriteBatch) over
// 40% of a memory cache, with the background running (neverSlower: they
// all stay in the cache): every byte written into the cache is counted,
// the batches' too; the writers' time is shared among the writes in
// flight, so it adds up to about the time the cache was busy, at most
// three times the run's wall time (1.1-1.4 times, measured; summed, 8
// times and more); and the background's time making room is counted once
// room ran short.
func TestCachedCostMeasured(t *testing.T) {
	d := formatMem(t, 1<<20+256<<10, 8<<20, FormatOptions{BucketSize: 64 << 10, JournalSize: 64 * metaBlock})
	c := openHooked(t, d, Options{SequentialCutoff: -1}, testHooks{neverSlower: true})
	seed := testseed.Get(t)
	set := c.CapacityBytes() * 40 / 100 / 4096
	const writers, each, batch = 8, 4000, 16
	start := time.Now()
	var wg sync.WaitGroup
	for w := range writers + 1 {
		wg.Go(func() {
			r := rng(seed + uint64(w))
			for i := 0; i < each; i += batch {
				if w < writers {
					for j := range batch {
						off := r.Int64N(set) * 4096
						if err := c.WriteAt(payload(off, 4096, uint64(i+j+1)), off, 0); err != nil {
							t.Error(err)
							return
						}
					}
					continue
				}
				ws := make([]BatchWrite, batch)
				for j := range ws {
					off := r.Int64N(set) * 4096
					ws[j] = BatchWrite{P: payload(off, 4096, uint64(i+j+1)), Off: off}
				}
				c.WriteBatch(ws)
				for _, bw := range ws {
					if bw.Err != nil {
						t.Error(bw.Err)
						return
					}
				}
			}
		})
	}
	wg.Wait()
	wall := time.Since(start)
	st := c.Stats()
	nanos, bytes, room := c.health.cachedNanos.Load(), c.health.cachedBytes.Load(), c.health.roomNanos.Load()
	t.Logf("%d writes in %v: %d bytes into the cache, writers' shared time %v, the background's making room %v; batched %d, bypasses %d",
		(writers+1)*each, wall, bytes, time.Duration(nanos), time.Duration(room), st.BatchedWrites, st.Bypasses)
	if want := int64((writers + 1) * each * 4096); bytes != want {
		t.Errorf("%d bytes counted into the cache, want %d", bytes, want)
	}
	if st.BatchedWrites == 0 {
		t.Error("no write went the batch way")
	}
	if time.Duration(nanos) > 3*wall {
		t.Errorf("writers' shared time %v, over the run's %v: not shared among the writes in flight", time.Duration(nanos), wall)
	}
	if room == 0 {
		t.Error("the background's time making room was not counted")
	}
	closeChecked(t, c, d)
}

// TestSlowerCacheStepsAside: the working set of TestThrashSparesAFittingSet
// (40% of the cache), but over a backing as fast as the cache (memory
// both), with the background running: writers pay for room (GC, the
// checkpoints that free buckets) and the backing pays for nothing, so the
// cache is slower and steps aside (thrashDetector's slower) though the set
// fits; every block reads back as last written, and Verify passes. With a
// read of the set after every write, the cache serves reads, and it stays.
func TestSlowerCacheStepsAside(t *testing.T) {
	for _, reads := range []bool{false, true} {
		t.Run(map[bool]string{false: "writes", true: "reads too"}[reads], func(t *testing.T) {
			d := formatMem(t, 1<<20+256<<10, 8<<20, FormatOptions{BucketSize: 64 << 10, JournalSize: 64 << 10})
			c := openT(t, d, Options{SequentialCutoff: -1})
			r := rng(testseed.Get(t))
			set := c.CapacityBytes() * 40 / 100 / 4096
			last := make([]uint64, set)
			got := make([]byte, 4096)
			writes := 300 * set
			for i := range writes {
				b := r.Int64N(set)
				last[b] = uint64(i + 1)
				if err := c.WriteAt(payload(b*4096, 4096, last[b]), b*4096, 0); err != nil {
					t.Fatal(err)
				}
				if reads {
					if err := c.ReadAt(got, r.Int64N(set)*4096); err != nil {
						t.Fatal(err)
					}
				}
			}
			st := c.Stats()
			t.Logf("%d writes over %d blocks: %d thrash bypasses; a write per 4 KiB: %d ns into the cache, %d ns to the backing",
				writes, set, st.ThrashBypasses, st.CachedWriteNanos, st.BackingWriteNanos)
			if !reads && st.ThrashBypasses < writes/4 {
				t.Errorf("%d of %d writes went around a cache slower than its backing, want a quarter or more", st.ThrashBypasses, writes)
			}
			if reads && st.ThrashBypasses != 0 {
				t.Errorf("%d writes went around a cache that serves reads", st.ThrashBypasses)
			}
			for b := range set {
				if err := c.ReadAt(got, b*4096); err != nil || !bytes.Equal(got, payload(b*4096, 4096, last[b])) {
					t.Fatalf("block %d: not as last written (write %d), err %v", b, last[b], err)
				}
			}
			closeChecked(t, c, d)
		})
	}
}

// TestThrashLetsAHotSetIn: after the cache thrashes under a working set
// eight times its size, the load moves to a hot set of an eighth of the
// cache: it must be cached (and stay so) within a bounded number of
// writes, so that the cache never bypasses for good. The miss rule alone
// (neverSlower): a cache slower than its backing stays aside until it
// probes (TestThrashWhenSlower).
func TestThrashLetsAHotSetIn(t *testing.T) {
	const size = 8 << 20
	d := formatMem(t, 1<<20+256<<10, size, FormatOptions{BucketSize: 64 << 10, JournalSize: 64 << 10})
	c := openHooked(t, d, Options{SequentialCutoff: -1}, testHooks{neverSlower: true})
	r := rng(testseed.Get(t))
	id := uint64(0)
	write := func(off int64) {
		id++
		if err := c.WriteAt(payload(off, 4096, id), off, 0); err != nil {
			t.Fatal(err)
		}
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		c.mu.Lock()
		on := c.mu.admit.thrash.on
		c.mu.Unlock()
		if on {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the cache never thrashed")
		}
		write(r.Int64N(size/4096) * 4096)
	}
	hot := c.CapacityBytes() / 8 / 4096
	base := int64(size/2) / 4096 // away from nothing in particular: any blocks
	// A window that fills the ghost, one that hits it, and a window or
	// two to take the set in, at most three times: the window after may
	// still miss (writes that find the cache full go to the backing, not
	// into it), and thrash again.
	limit := int(max(64, c.CapacityBytes()/4096)) * 3 * 4
	cachedAll := func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		for b := range hot {
			if !c.cachedLocked((base+b)*4096, 4096) {
				return false
			}
		}
		return true
	}
	for i := 0; ; i++ {
		if i == limit {
			t.Fatalf("the hot set of %d blocks is not all cached after %d writes", hot, limit)
		}
		write((base + r.Int64N(hot)) * 4096)
		if i%64 == 0 && cachedAll() {
			t.Logf("hot set of %d blocks cached after %d writes", hot, i+1)
			break
		}
	}
	before := c.Stats().ThrashBypasses
	for range 4 * hot {
		write((base + r.Int64N(hot)) * 4096)
	}
	if got := c.Stats().ThrashBypasses - before; got != 0 {
		t.Errorf("%d writes of the cached hot set went around the cache", got)
	}
	closeChecked(t, c, d)
}

// TestDrainOverFullIndex: a drain of an index exactly at its capacity,
// with no background work to evict. The flusher cuts an extent longer
// than its 1 MiB spans into pieces; cleaning a piece would cut the
// extent, and the index had no room for that, so MarkClean refused it
// and counted it as a collision, which is progress: the drain wrote the
// same pieces back for ever. A piece at the edge of its extent is
// cleaned and dropped now (eviction, which adds no extent).
func TestDrainOverFullIndex(t *testing.T) {
	t.Run("edges", func(t *testing.T) { drainOverFullIndex(t, 4, 1536<<10, 2<<20) })
	t.Run("inner", func(t *testing.T) { drainOverFullIndex(t, 3, 3<<20, 4<<20) }) // a middle piece each
}

func drainOverFullIndex(t *testing.T, n, size, bucket int64) {
	// Adjacent extents longer than a span, written last first so that
	// the bucket edges (where an extent is split) fall elsewhere than the
	// spans': every pass cuts some.
	d := formatMem(t, 4*bucket+n*size, n*size, FormatOptions{BucketSize: bucket, JournalSize: 64 << 10})
	c := openStillT(t, d, Options{Mode: Writeback, SequentialCutoff: -1})
	for i := n - 1; i >= 0; i-- {
		if err := c.WriteAt(payload(i*size, size, uint64(i+1)), i*size, 0); err != nil {
			t.Fatal(err)
		}
	}
	full := c.Stats().Extents
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	c = openHooked(t, d, Options{Mode: Writeback}, testHooks{noBackground: true, maxExt: full})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c.Drain(ctx, nil); err != nil {
		t.Fatalf("drain of a full index: %v (%d dirty bytes, %d extents of %d)", err, c.DirtyBytes(), c.Stats().Extents, c.maxExtents())
	}
	if got := c.Stats().Extents; got > full {
		t.Fatalf("%d extents after the drain, capacity %d", got, full)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := Check(d.cache, d.back); err != nil {
		t.Fatal(err)
	}
	for i := range n {
		got := make([]byte, size)
		if err := d.back.ReadAt(got, i*size); err != nil || !bytes.Equal(got, payload(i*size, size, uint64(i+1))) {
			t.Fatalf("extent %d is not on the backing after the drain (%v)", i, err)
		}
	}
}

// TestReuseBatchesCheckpoints: emptied buckets are freed for reuse a
// batch per checkpoint, not one or two. A checkpoint writes the whole
// index; the background loop used to write one as soon as any bucket was
// pending below lowFree: under fio randwrite at QD32, a checkpoint every
// 28 ms, 2 MiB each, for a bucket or two (here 1158 buckets took 951).
func TestReuseBatchesCheckpoints(t *testing.T) {
	seed := testseed.Get(t)
	r := rng(seed)
	// 128 buckets of 64 KiB; 4 KiB writes over 2 MiB (a quarter of the
	// cache) overwrite whole buckets, which then need no GC work.
	d := formatMem(t, 8<<20, 2<<20, FormatOptions{BucketSize: 64 << 10, JournalSize: 1 << 20})
	c := openT(t, d, Options{Mode: Writeback, SequentialCutoff: -1, WritebackPercent: 90})
	defer c.Close()
	start := c.Stats()
	for i := range 20000 {
		off := r.Int64N(2<<20/4096) * 4096
		if err := c.WriteAt(payload(off, 4096, uint64(i+1)), off, 0); err != nil {
			t.Fatal(err)
		}
	}
	st := c.Stats()
	ckpts, freed := st.Checkpoints-start.Checkpoints, st.BucketsFreed-start.BucketsFreed
	t.Logf("%d buckets freed by %d checkpoints (batch %d, lowFree %d); %d room waits", freed, ckpts, c.reuseBatch(), c.lowFree(), st.RoomWaits)
	if freed < 100 {
		t.Fatalf("only %d buckets freed: the test wrote too little", freed)
	}
	if ckpts == 0 || freed/ckpts < int64(c.reuseBatch())/2 {
		t.Fatalf("%d buckets freed by %d checkpoints: fewer than %d each", freed, ckpts, c.reuseBatch()/2)
	}
}

// TestFullIndexWritebackKeepsCleanExtentWhole (found by review): MarkClean
// of a piece that lies strictly
// inside an extent that is already clean (a writeback of the whole extent,
// e.g. gcWriteback or flushRange through flusher.WriteBack, cleaned it
// after the flusher planned the piece; ReadCached checks version and
// location only, not dirtiness) takes the new evict path when the index is
// full. The first version of that path deleted every clean piece of the
// version in the piece's range, and so cut the clean extent in two: the
// index ended one extent over its capacity, and the next checkpoint
// (Close) failed, for good. Only what MarkClean cleaned is dropped now.
func TestFullIndexWritebackKeepsCleanExtentWhole(t *testing.T) {
	const bucket, size = 4 << 20, 3 << 20
	d := formatMem(t, 4*bucket+2*size, 4*size, FormatOptions{BucketSize: bucket, JournalSize: 64 << 10})
	c := openStillT(t, d, Options{Mode: Writeback, SequentialCutoff: -1})
	// X: one dirty extent of 3 MiB; and a few 4 KiB extents elsewhere.
	if err := c.WriteAt(payload(0, size, 1), 0, 0); err != nil {
		t.Fatal(err)
	}
	for i := range 4 {
		off := int64(2*size + i*8192)
		if err := c.WriteAt(payload(off, 4096, uint64(10+i)), off, 0); err != nil {
			t.Fatal(err)
		}
	}
	full := c.Stats().Extents
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	c = openHooked(t, d, Options{Mode: Writeback}, testHooks{noBackground: true, maxExt: full})
	var x btreeExtent
	c.mu.Lock()
	c.mu.idx.Lookup(0, size, func(e btreeExtent) bool { x = e; return false })
	c.mu.Unlock()
	if x.Off != 0 || x.Len != size || !x.Dirty {
		t.Fatalf("setup: extent %v", x)
	}
	// The flusher planned a piece of X, one span's worth from its middle.
	p := x
	p.Off, p.Loc, p.Len = x.Off+1<<20, x.Loc+1<<20, 1<<20
	// Meanwhile X is written back whole (as gcWriteback or flushRange do).
	if _, err := c.flusher.WriteBack([]btreeExtent{x}, nil); err != nil {
		t.Fatal(err)
	}
	// Then the flusher writes its piece back: ReadCached accepts it
	// (version and location current), MarkClean takes the evict path.
	if _, err := c.flusher.WriteBack([]btreeExtent{p}, nil); err != nil {
		t.Fatal(err)
	}
	c.mu.Lock()
	n, max := int64(c.mu.idx.Len()), c.maxExtents()
	c.mu.Unlock()
	t.Logf("extents %d, capacity %d", n, max)
	if n > max {
		// Nothing brings it back: eviction needs room for no cut (roomLocked(0)).
		c.shrinkIndex()
		c.GCStep(true)
		c.mu.Lock()
		t.Logf("after shrinkIndex and GCStep: %d extents", c.mu.idx.Len())
		c.mu.Unlock()
	}
	if err := c.Checkpoint(); err != nil {
		t.Errorf("Checkpoint: %v", err)
	}
	err := c.Close()
	if n > max {
		t.Errorf("index holds %d extents, capacity %d (Close: %v)", n, max, err)
	}
	if err != nil {
		t.Errorf("Close: %v", err)
	}
}

// TestRotatingBackingStartsAsADisk: a backing that says it rotates is
// taken for a disk before any write was timed, so that the first GC pass
// over it keeps apart from the flusher's sweep (Exclusive); fast writes
// then show otherwise. A backing that does not say so starts fast.
func TestRotatingBackingStartsAsADisk(t *testing.T) {
	for _, rotates := range []bool{true, false} {
		d := formatMem(t, 1<<20+256<<10, 8<<20, FormatOptions{BucketSize: 64 << 10, JournalSize: 64 << 10})
		back := d.back
		if rotates {
			back = storage.NewSlow(d.back, storage.DiskModel{Name: "instant", TransferRate: 1 << 40})
		}
		c := openStillT(t, devPair{d.cache, back}, Options{SequentialCutoff: -1})
		if got := c.diskLike(); got != rotates {
			t.Errorf("rotational %v: disk-like %v before any write", rotates, got)
		}
		if rotates {
			for range 40 {
				c.noteBacking(10*time.Microsecond, 4096)
			}
			if c.diskLike() {
				t.Error("still disk-like after 40 fast writes")
			}
		}
		closeChecked(t, c, devPair{d.cache, back})
	}
}

// TestFlusherTimesCorrectARotatingBacking: a fast backing that says it
// rotates (a file on a virtio disk) stops being taken for a disk once the
// flusher has timed its own writes, though no write went around the cache
// and the cache timed none itself (a working set that fits: nothing
// bypasses, and GC need not clean).
func TestFlusherTimesCorrectARotatingBacking(t *testing.T) {
	d := formatMem(t, 1<<20+256<<10, 8<<20, FormatOptions{BucketSize: 64 << 10, JournalSize: 64 << 10})
	back := storage.NewSlow(d.back, storage.DiskModel{Name: "instant", TransferRate: 1 << 40})
	c := openStillT(t, devPair{d.cache, back}, Options{SequentialCutoff: -1})
	defer closeChecked(t, c, devPair{d.cache, back})
	if !c.diskLike() {
		t.Fatal("a rotating backing is not taken for a disk before any write was timed")
	}
	// 16 dirty blocks apart from each other: 16 backing writes.
	for i := range int64(16) {
		if err := c.WriteAt(payload(i*8192, 4096, 1), i*8192, 0); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.Drain(t.Context(), nil); err != nil {
		t.Fatal(err)
	}
	if n := c.health.samples.Load(); n >= trustSamples {
		t.Fatalf("the cache timed %d writes itself: the test no longer shows the flusher's", n)
	}
	if _, ok := c.flusher.TimedSeeks(); !ok {
		t.Fatal("the flusher timed too few writes to say")
	}
	if c.diskLike() {
		t.Error("still taken for a disk after the flusher timed fast writes")
	}
}

// TestFlusherProbesARotatingBacking: a fast backing that says it rotates
// is timed as soon as it has dirty data, not when the dirty level, an age
// pass or an idle spell next sends the flusher to it (ModeProbe): the
// flusher writes back a little, probeBytes a batch, until it has timed
// trustTimes writes, and no more, since the level is below the low
// watermark. The dirty data is dense, 2 MiB in a row of 4 KiB extents
// (a batch's budget is checked before each): a probe batch merges 8 of
// them into one 32 KiB write, where a batch with a full budget would
// write it all back in 1 MiB writes. Without the probe, nothing here is
// written back within the test's 10 s (no idle, no age).
func TestFlusherProbesARotatingBacking(t *testing.T) {
	d := formatMem(t, 64<<20, 128<<20, FormatOptions{})
	back := storage.NewSlow(d.back, storage.DiskModel{Name: "instant", TransferRate: 1 << 40})
	c := openT(t, devPair{d.cache, back}, Options{SequentialCutoff: -1,
		Writeback: writeback.Config{IdleAfter: time.Hour, MaxDirtyAge: -1}})
	defer closeChecked(t, c, devPair{d.cache, back})
	if !c.diskLike() {
		t.Fatal("a rotating backing is not taken for a disk before any write was timed")
	}
	const dense = 2 << 20 // below the low watermark (5% of 64 MiB)
	for off := int64(0); off < dense; off += 4096 {
		if err := c.WriteAt(payload(off, 4096, 1), off, 0); err != nil {
			t.Fatal(err)
		}
	}
	waitFor(t, func() bool { _, ok := c.flusher.TimedSeeks(); return ok })
	if c.diskLike() {
		t.Error("still taken for a disk after the flusher's probe timed fast writes")
	}
	waitFor(t, func() bool { st := c.flusher.Stats(); return st.Mode == writeback.ModeStopped && st.Pending == 0 })
	st := c.flusher.Stats()
	const limit = 8 * (32 + 4) << 10 // 8 batches of 32 KiB, and a piece over
	if st.BytesWritten > limit || c.Stats().DirtyBytes < dense-limit {
		t.Errorf("the probe wrote back %d bytes in %d writes (%d left dirty), want at most %d", st.BytesWritten, st.Writes, c.Stats().DirtyBytes, limit)
	}
}

// slowPerByte is a backing that is not rotational and takes 2 ns a byte
// (500 MB/s): 8 µs a 4 KiB write, 2 ms a 1 MiB one.
type slowPerByte struct{ storage.Device }

func (s slowPerByte) WriteAt(p []byte, off int64, fl storage.Flags) error {
	time.Sleep(time.Duration(2 * len(p)))
	return s.Device.WriteAt(p, off, fl)
}

// TestFlusherTimesMakeNoDisk: the flusher's timed writes can only clear a
// rotational prior, never make a disk of a fast backing: they time a
// write, and a drain of dense dirty data writes 1 MiB at a time, 2 ms
// each on a 500 MB/s device (found by review).
func TestFlusherTimesMakeNoDisk(t *testing.T) {
	d := formatMem(t, 16<<20, 64<<20, FormatOptions{BucketSize: 1 << 20, JournalSize: 256 << 10})
	back := slowPerByte{d.back}
	c := openStillT(t, devPair{d.cache, back}, Options{SequentialCutoff: -1})
	defer closeChecked(t, c, devPair{d.cache, back})
	if c.diskLike() {
		t.Fatal("a backing that does not say it rotates is taken for a disk before any write")
	}
	for off := int64(0); off < 8<<20; off += 64 << 10 {
		if err := c.WriteAt(payload(off, 64<<10, 1), off, 0); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.Drain(t.Context(), nil); err != nil {
		t.Fatal(err)
	}
	if seeks, ok := c.flusher.TimedSeeks(); !ok || !seeks {
		t.Fatalf("the flusher's writes: seeks %v, ok %v; want a verdict of slow writes, or the test shows nothing", seeks, ok)
	}
	if c.diskLike() {
		t.Error("a 500 MB/s backing is taken for a disk after the flusher timed its 1 MiB writes")
	}
}

// TestPrefetchMakesRoom: an NBD CACHE into a full cache evicts clean data
// to take its range, as a write would, where a read miss takes only free
// space. With no background to free buckets, a cache of 16 buckets takes
// every one of 64 prefetches of a bucket's size, and the last ones are
// what it holds at the end. (A prefetch that only took free space was
// refused from the 15th on.)
func TestPrefetchMakesRoom(t *testing.T) {
	const bucket = 64 << 10
	d := formatMem(t, 1<<20+256<<10, 8<<20, FormatOptions{BucketSize: bucket, JournalSize: 64 << 10})
	c := openStillT(t, d, Options{SequentialCutoff: -1})
	r := rng(testseed.Get(t))
	order := r.Perm(64)
	for i, k := range order {
		off := int64(k) * bucket
		before := c.Stats().Promotions
		if err := c.Prefetch(off, bucket); err != nil {
			t.Fatal(err)
		}
		if c.Stats().Promotions == before {
			st := c.Stats()
			t.Fatalf("prefetch %d of [%d+%d) not promoted: %d free buckets, %d bytes cached", i, off, bucket, st.FreeBuckets, st.CachedBytes)
		}
	}
	for _, k := range order[len(order)-4:] {
		off := int64(k) * bucket
		c.mu.Lock()
		hit := c.cachedLocked(off, bucket)
		c.mu.Unlock()
		if !hit {
			t.Fatalf("[%d+%d), one of the last prefetches, is not cached", off, bucket)
		}
	}
	closeChecked(t, c, d)
}
