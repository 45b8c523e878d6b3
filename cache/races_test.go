package cache

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nbdcache/nbdcache/btreeidx"
	"github.com/nbdcache/nbdcache/storage"
	"github.com/nbdcache/nbdcache/test/testseed"
)

// Deterministic reproductions of the races of issue 14: each test steers
// one interleaving through device hooks, and fails on the code before the
// fix.

// hookDev runs a hook around one kind of call of the device it wraps.
type hookDev struct {
	storage.Device
	beforeFlush func()
	afterRead   func(off int64)
}

func (d *hookDev) Flush() error {
	if d.beforeFlush != nil {
		d.beforeFlush()
	}
	return d.Device.Flush()
}

func (d *hookDev) ReadAt(p []byte, off int64) error {
	err := d.Device.ReadAt(p, off)
	if d.afterRead != nil {
		d.afterRead(off)
	}
	return err
}

// cleanExtentAt returns the extent the index holds at off.
func cleanExtentAt(t *testing.T, c *Cache, off int64) btreeidx.Extent {
	t.Helper()
	var found []btreeidx.Extent
	c.mu.Lock()
	c.mu.idx.Lookup(off, 1, func(e btreeidx.Extent) bool { found = append(found, e); return true })
	c.mu.Unlock()
	if len(found) != 1 {
		t.Fatalf("no extent at %d", off)
	}
	var e btreeidx.Extent
	c.mu.Lock()
	c.mu.idx.Ascend(off, func(x btreeidx.Extent) bool { e = x; return false })
	c.mu.Unlock()
	return e
}

// TestDirectWriteWaitsForGapFill is bug 1: a direct backing write decided
// "not pinned", then left the lock (here: enter runs a soft checkpoint,
// whose cache flush the hook uses); meanwhile the flusher started a
// gap-fill writeback of the clean extent over the range and read its old
// data. The write must wait for that writeback; before the fix it deleted
// the extent, wrote the backing and returned, and the writeback then
// landed the old data over it for good.
func TestDirectWriteWaitsForGapFill(t *testing.T) {
	for _, mode := range []Mode{Writearound, Writethrough} {
		t.Run(mode.String(), func(t *testing.T) {
			if v := gapFillRace(t, mode, breakNone); v != "" {
				t.Fatal(v)
			}
			if gapFillRace(t, mode, breakNoPinRecheck) == "" {
				t.Fatal("with the pin re-check broken, the race went unnoticed")
			}
		})
	}
}

// gapFillRace runs bug 1's interleaving and returns what went wrong.
func gapFillRace(t *testing.T, mode Mode, brk breakMode) string {
	d := formatMem(t, 1<<20, 1<<20, FormatOptions{BucketSize: 64 << 10, JournalSize: 32 * metaBlock})
	cdev := &hookDev{Device: d.cache}
	waiting := make(chan struct{}, 1)
	o := Options{Mode: mode, PromoteAll: true, SequentialCutoff: -1,
		CheckpointPercent: 1} // every enter runs a soft checkpoint: the window opens
	c := openHooked(t, devPair{cdev, d.back}, o, testHooks{onDirectWait: func() { waiting <- struct{}{} }, brk: brk, noBackground: true})
	defer c.Close()
	const off, n = 8 << 10, 4 << 10
	// The old data, promoted: a clean extent.
	old := payload(off, n, 1)
	if err := d.back.WriteAt(old, off, 0); err != nil {
		t.Fatal(err)
	}
	if err := c.ReadAt(make([]byte, n), off); err != nil {
		t.Fatal(err)
	}
	e := cleanExtentAt(t, c, off)
	if e.Dirty {
		t.Fatal("promoted extent is dirty")
	}

	gapFill := make([]byte, n)
	registered := make(chan error, 1)
	cdev.beforeFlush = func() {
		cdev.beforeFlush = nil
		registered <- c.ReadCached(e, gapFill) // the flusher bridges a gap
	}
	newData := payload(off, n, 2)
	writeDone := make(chan error, 1)
	go func() { writeDone <- c.WriteAt(newData, off, 0) }()
	if err := <-registered; err != nil {
		t.Fatalf("gap-fill ReadCached: %v", err)
	}
	select {
	case err := <-writeDone:
		// Only broken code gets here: the write did not wait.
		writeDone <- err
	case <-waiting:
	}
	// The flusher's backing write of what it read, then release.
	if err := d.back.WriteAt(gapFill, off, 0); err != nil {
		t.Fatal(err)
	}
	c.ReleaseCached(e)
	if err := <-writeDone; err != nil {
		t.Fatal(err)
	}
	got := make([]byte, n)
	for i := range 2 {
		if err := c.ReadAt(got, off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, newData) {
			id, _ := sectorID(got[:sectorSize], off/sectorSize)
			return fmt.Sprintf("read %d after the acknowledged write returns write %d: the gap-fill writeback overwrote it", i, id)
		}
	}
	back := make([]byte, n)
	if err := d.back.ReadAt(back, off); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(back, newData) {
		return "the backing holds the old data under the acknowledged write"
	}
	return ""
}

// TestPromotionAfterWritebackIsDropped is bug 2: a read misses and reads
// old data from the backing; during that read a write lands dirty, is
// written back, marked clean and evicted. The promotion then finds the
// index empty; before the fix it inserted the old data as clean, and
// every later read returned it.
func TestPromotionAfterWritebackIsDropped(t *testing.T) {
	if v := promotionRace(t, breakNone); v != "" {
		t.Fatal(v)
	}
	if promotionRace(t, breakNoPromoGuard) == "" {
		t.Fatal("with the promotion guard broken, the race went unnoticed")
	}
}

// promotionRace runs bug 2's interleaving and returns what went wrong.
func promotionRace(t *testing.T, brk breakMode) string {
	d := formatMem(t, 1<<20, 1<<20, FormatOptions{BucketSize: 64 << 10, JournalSize: 32 * metaBlock})
	back := &hookDev{Device: d.back}
	c := openHooked(t, devPair{d.cache, back}, Options{Mode: Writeback, PromoteAll: true, SequentialCutoff: -1}, testHooks{noBackground: true, brk: brk})
	defer c.Close()
	const off, n = 16 << 10, 4 << 10
	if err := d.back.WriteAt(payload(off, n, 1), off, 0); err != nil {
		t.Fatal(err)
	}
	newData := payload(off, n, 2)
	var hookErr error
	back.afterRead = func(int64) {
		back.afterRead = nil
		// While the read's data is on its way: write, write back, evict.
		if hookErr = c.WriteAt(newData, off, 0); hookErr != nil {
			return
		}
		if _, _, hookErr = writebackStep(c, 0, 1<<20); hookErr != nil {
			return
		}
		e := cleanExtentAt(t, c, off)
		if e.Dirty || !c.gcEvict(gcPiece{off: e.Off, n: e.Len, loc: e.Loc, ver: e.Ver}) {
			hookErr = fmt.Errorf("could not write back and evict %v", e)
		}
	}
	if err := c.ReadAt(make([]byte, n), off); err != nil {
		t.Fatal(err)
	}
	if hookErr != nil {
		t.Fatal(hookErr)
	}
	got := make([]byte, n)
	if err := c.ReadAt(got, off); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, newData) {
		id, _ := sectorID(got[:sectorSize], off/sectorSize)
		return fmt.Sprintf("read after the write was written back returns write %d: a stale promotion", id)
	}
	return ""
}

// TestDirectWriteDropsCleanExtentWhole: a direct backing write over the
// middle of a clean extent deletes the whole extent, so the deletion never
// adds one to the index (which roomLocked does not check for deletions).
// Cutting the extent at the range would leave two. (Mutant
// direct-delete-exact, which TestIndexNeverOutgrowsCheckpoint catches only
// at some seeds.)
func TestDirectWriteDropsCleanExtentWhole(t *testing.T) {
	d := formatMem(t, 4<<20, 4<<20, FormatOptions{BucketSize: 64 << 10, JournalSize: 32 * metaBlock})
	c := openStillT(t, d, Options{Mode: Writearound, SequentialCutoff: -1, PromoteAll: true})
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(c.WriteAt(payload(0, 16<<10, 1), 0, 0)) // to the backing
	must(c.ReadAt(make([]byte, 16<<10), 0))      // promoted: one clean extent
	c.mu.Lock()
	before := c.mu.idx.Len()
	c.mu.Unlock()
	if before != 1 {
		t.Fatalf("%d extents after the promotion, want 1", before)
	}
	must(c.WriteAt(payload(4<<10, 4<<10, 2), 4<<10, 0)) // write-around, inside the extent
	c.mu.Lock()
	after := c.mu.idx.Len()
	c.mu.Unlock()
	if after != 0 {
		t.Errorf("%d extents after a direct write inside the clean one, want 0 (dropped whole)", after)
	}
	p := make([]byte, 16<<10)
	must(c.ReadAt(p, 0))
	for i := range int64(len(p)) / sectorSize {
		want := uint64(1)
		if i >= 8 && i < 16 {
			want = 2
		}
		if id, err := sectorID(p[i*sectorSize:(i+1)*sectorSize], i); err != nil || id != want {
			t.Fatalf("sector %d: write %d (%v), want %d", i, id, err, want)
		}
	}
	closeChecked(t, c, d)
}

// TestWritebackReadRacingWithReuse: while writeback reads a dirty extent
// from the cache device (ReadCached), GC moves it to another bucket, a
// checkpoint frees its old bucket and a new write reuses it. The read got
// the new write's bytes; the bucket's epoch says so, and ReadCached must
// return ErrStale. Were the read trusted, writeback would land the other
// sector's data on the backing and mark the extent, whose version GC kept,
// clean over it. (Mutant readcached-epoch-recheck-wrong.)
func TestWritebackReadRacingWithReuse(t *testing.T) {
	const bs, bucket = 4096, 32 << 10
	c, cdev, bdev := crashCache(t, 1<<20, 1<<20, Options{SequentialCutoff: -1})
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	// X (write 1) at [0, bs) is the only live data of a full bucket, and
	// the foreground allocator has no open bucket.
	for i := int64(0); i < bucket/bs; i++ {
		must(c.WriteAt(payload(i*bs, bs, uint64(i+1)), i*bs, 0))
	}
	must(c.WriteAt(payload(bs, bucket-bs, 9), bs, 0))
	must(c.WriteAt(payload(64*bs, bs, 10), 64*bs, 0))
	must(c.Flush())
	var x btreeExtent
	c.mu.Lock()
	c.mu.idx.Ascend(0, func(e btreeExtent) bool { x = e; return false })
	b0 := c.sb.bucketOf(x.Loc)
	live, open := c.mu.space.buckets[b0].live, c.mu.space.fg.b
	c.mu.Unlock()
	if x.Off != 0 || x.Len != bs || !x.Dirty || live != bs || open >= 0 {
		t.Fatalf("setup: X %v, bucket %d live %d, open bucket %d", x, b0, live, open)
	}

	var armed atomic.Bool
	cdev.SetHook(func(op storage.Op) {
		if op.Kind != storage.OpRead || op.Off != x.Loc || !armed.CompareAndSwap(true, false) {
			return
		}
		// ReadCached is about to read X. Move it, free its bucket and
		// write write 99 (sector 80's data) into the bucket.
		c.mu.Lock()
		epoch := c.mu.space.buckets[b0].epoch
		c.mu.Unlock()
		if !c.gcMove(gcPiece{off: x.Off, n: x.Len, loc: x.Loc, ver: x.Ver, dirty: true}, epoch) {
			t.Error("gc move failed")
		}
		if err := c.Checkpoint(); err != nil {
			t.Error(err)
		}
		c.mu.Lock()
		i := slices.Index(c.mu.space.free, b0)
		if i >= 0 {
			c.mu.space.free = slices.Insert(slices.Delete(c.mu.space.free, i, i+1), 0, b0) // next to be handed out
		}
		c.mu.Unlock()
		if i < 0 {
			t.Error("X's bucket was not freed")
		}
		if err := c.WriteAt(payload(80*sectorSize, bs, 99), 80*sectorSize, 0); err != nil {
			t.Error(err)
		}
		c.mu.Lock()
		reused := false
		c.mu.idx.Lookup(80*sectorSize, bs, func(e btreeExtent) bool { reused = e.Loc == x.Loc; return false })
		c.mu.Unlock()
		if !reused {
			t.Error("write 99 did not land where X was")
		}
	})
	armed.Store(true)
	if _, _, err := writebackStep(c, 0, 1<<20); err != nil {
		t.Fatal(err)
	}
	if armed.Load() {
		t.Fatal("writeback never read X")
	}
	p := make([]byte, bs)
	must(bdev.ReadAt(p, 0))
	for i := range int64(bs / sectorSize) {
		if id, err := sectorID(p[i*sectorSize:(i+1)*sectorSize], i); err != nil || id != 0 && id != 1 {
			t.Fatalf("backing sector %d after the writeback: write %d (%v); want X's data or zeroes", i, id, err)
		}
	}
	c.mu.Lock()
	var now btreeExtent
	c.mu.idx.Ascend(0, func(e btreeExtent) bool { now = e; return false })
	c.mu.Unlock()
	if now.Off != 0 || !now.Dirty || now.Ver != x.Ver {
		t.Errorf("X after the writeback: %v, want it dirty still (its read was stale)", now)
	}
}

// TestIndexNeverOutgrowsCheckpoint is bug 3: the index must never hold more
// extents than a checkpoint slot, whatever splits them. Dirty 4 KiB
// blocks everywhere, then 512-byte trims, zeroes, writes into the middle of
// them and direct writes over clean ones (writearound), with GC,
// eviction and writeback passes in between. Before the fix the trims alone
// split the index past maxExt: checkpoints, Close and Open failed with
// "metadata corrupt".
//
// The second run caps the index at a tenth of that (testHooks.maxExt), so that
// the random phase works at the limit: GC moves, eviction, MarkClean and
// inserts refused for room.
func TestIndexNeverOutgrowsCheckpoint(t *testing.T) {
	seed := testseed.Get(t)
	t.Run("slot", func(t *testing.T) { indexCapacity(t, seed, 0) })
	t.Run("capped", func(t *testing.T) { indexCapacity(t, seed, 48) })
}

func indexCapacity(t *testing.T, seed uint64, maxExt int64) {
	r := rng(seed)
	const back = 4 << 20
	// 10 buckets of 64 KiB: 160 blocks of 4 KiB, 1280 sectors; a slot of
	// about 2*160+64 extents.
	d := formatMem(t, 8*64<<10+256<<10, back, FormatOptions{BlockSize: 4096, BucketSize: 64 << 10, JournalSize: 16 * metaBlock})
	c := openHooked(t, d, Options{Mode: Writeback, SequentialCutoff: -1}, testHooks{noBackground: true, maxExt: maxExt})
	model := make([]uint64, back/sectorSize) // write id per sector; 0 zero
	anyOld := make([]bool, back/sectorSize)  // trimmed: old data or zeroes
	var id uint64
	span := int64(c.CapacityBytes()) // the ops stay where the cache is full
	write := func(off, n int64) {
		id++
		if err := c.WriteAt(payload(off, n, id), off, 0); err != nil {
			t.Fatalf("write [%d+%d): %v", off, n, err)
		}
		for s := off / sectorSize; s < (off+n)/sectorSize; s++ {
			model[s], anyOld[s] = id, false
		}
	}
	for off := int64(0); off < span; off += 4096 {
		write(off, 4096)
	}
	// The worst case for trims: every other sector of every dirty block
	// (four pieces of each, were they split).
	for off := int64(0); off < span; off += 2 * sectorSize {
		if err := c.Trim(off+sectorSize, sectorSize, 0); err != nil {
			t.Fatalf("trim: %v", err)
		}
		anyOld[off/sectorSize+1] = true
	}
	if err := c.Checkpoint(); err != nil {
		t.Fatalf("checkpoint after the trims: %v (extents %d, capacity %d)", err, c.Stats().Extents, c.maxExtents())
	}
	maxSeen := 0
	for i := range 4000 {
		s := r.Int64N(span / sectorSize)
		off := s * sectorSize
		switch k := r.IntN(10); {
		case k < 4:
			if err := c.Trim(off, sectorSize, 0); err != nil {
				t.Fatalf("op %d trim: %v", i, err)
			}
			anyOld[s] = true
		case k < 5:
			if err := c.Zero(off, sectorSize, 0); err != nil {
				t.Fatalf("op %d zero: %v", i, err)
			}
			model[s], anyOld[s] = 0, false
		case k < 7:
			write(off, sectorSize)
		case k < 8 && r.IntN(10) == 0:
			if err := c.SetMode(context.Background(), []Mode{Writeback, Writeback, Writearound, Writethrough}[r.IntN(4)]); err != nil {
				t.Fatal(err)
			}
		default:
			switch r.IntN(3) {
			case 0:
				c.GCStep(true)
			case 1:
				if _, _, err := writebackStep(c, r.Int64N(span), 64<<10); err != nil {
					t.Fatal(err)
				}
			default:
				if err := c.Checkpoint(); err != nil {
					t.Fatalf("op %d: checkpoint: %v (extents %d, capacity %d)", i, err, c.Stats().Extents, c.maxExtents())
				}
			}
		}
		c.mu.Lock()
		n := c.mu.idx.Len()
		c.mu.Unlock()
		maxSeen = max(maxSeen, n)
		if int64(n) > c.maxExtents() {
			t.Fatalf("op %d: %d extents, a checkpoint holds %d", i, n, c.maxExtents())
		}
	}
	t.Logf("at most %d extents of %d (stats %+v)", maxSeen, c.maxExtents(), c.Stats())
	if err := c.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	if _, err := Check(d.cache, d.back); err != nil {
		t.Fatalf("check: %v", err)
	}
	c = openHooked(t, d, Options{Mode: Writeback}, testHooks{noBackground: true, maxExt: maxExt})
	defer c.Close()
	buf := make([]byte, span)
	if err := c.ReadAt(buf, 0); err != nil {
		t.Fatal(err)
	}
	for s := int64(0); s < span/sectorSize; s++ {
		got, err := sectorID(buf[s*sectorSize:(s+1)*sectorSize], s)
		if err != nil {
			t.Fatal(err)
		}
		if got != model[s] && !anyOld[s] {
			t.Fatalf("sector %d holds write %d, want %d", s, got, model[s])
		}
	}
}

// TestFitIndexAtOpen: a recovered index over a checkpoint's capacity
// (possible when replay drops records of an unsynced tail) is brought
// under it at Open by dropping clean extents and writing back dirty ones,
// with no data lost.
func TestFitIndexAtOpen(t *testing.T) {
	d := formatMem(t, 1<<20, 1<<20, FormatOptions{BlockSize: 512, BucketSize: 64 << 10, JournalSize: 32 * metaBlock})
	c := openStillT(t, d, Options{Mode: Writeback, SequentialCutoff: -1})
	for i := range int64(40) {
		if err := c.WriteAt(payload(i*1024, 512, uint64(i+1)), i*1024, 0); err != nil {
			t.Fatal(err)
		}
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	// Reopened with room for 10 extents: 40 dirty ones are written back.
	c = openHooked(t, d, Options{Mode: Writeback}, testHooks{noBackground: true, maxExt: 10})
	if got := c.Stats().Extents; got > 10 {
		t.Fatalf("%d extents after fitting into 10", got)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := Check(d.cache, d.back); err != nil {
		t.Fatal(err)
	}
	c = openStillT(t, d, Options{Mode: Writeback})
	defer c.Close()
	p := make([]byte, 512)
	for i := range int64(40) {
		if err := c.ReadAt(p, i*1024); err != nil {
			t.Fatal(err)
		}
		if id, err := sectorID(p, i*2); err != nil || id != uint64(i+1) {
			t.Fatalf("sector %d: write %d (%v), want %d", i*2, id, err, i+1)
		}
	}
}

// TestVerifyCatchesStaleClean: Verify (live) and CheckDeep (offline) report
// a clean extent whose bytes differ from the backing's, and pass otherwise.
func TestVerifyCatchesStaleClean(t *testing.T) {
	d := formatMem(t, 1<<20, 1<<20, FormatOptions{BucketSize: 64 << 10, JournalSize: 32 * metaBlock})
	c := openStillT(t, d, Options{Mode: Writethrough, SequentialCutoff: -1})
	if err := c.WriteAt(payload(4096, 4096, 1), 4096, 0); err != nil {
		t.Fatal(err)
	}
	if err := c.Verify(); err != nil {
		t.Fatalf("healthy cache: %v", err)
	}
	// The backing changes under the clean copy, as a lost race would.
	if err := d.back.WriteAt(payload(4096, 512, 2), 4096, 0); err != nil {
		t.Fatal(err)
	}
	if err := c.Verify(); !errors.Is(err, ErrInvariant) {
		t.Fatalf("Verify = %v, want ErrInvariant", err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := Check(d.cache, d.back); err != nil {
		t.Fatalf("Check does not compare data: %v", err)
	}
	if _, err := CheckDeep(d.cache, d.back); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("CheckDeep = %v, want ErrCorrupt", err)
	}
}

var errReplayRead = errors.New("injected read error")

// failDataReads fails every read of the data area.
type failDataReads struct {
	storage.Device
	dataOff int64
}

func (d *failDataReads) ReadAt(p []byte, off int64) error {
	if off >= d.dataOff {
		return errReplayRead
	}
	return d.Device.ReadAt(p, off)
}

// TestReplayReadErrorFailsOpen: a device error while replay reads the data
// of an unsynced record fails Open; before, the record was dropped as if
// its data had never reached the disk.
func TestReplayReadErrorFailsOpen(t *testing.T) {
	d := formatMem(t, 1<<20, 1<<20, FormatOptions{BucketSize: 64 << 10, JournalSize: 32 * metaBlock})
	c := openStillT(t, d, Options{Mode: Writeback, SequentialCutoff: -1})
	if err := c.WriteAt(payload(0, 4096, 1), 0, 0); err != nil { // published, not synced
		t.Fatal(err)
	}
	// The process dies here: no Close.
	_, err := openStill(&failDataReads{d.cache, c.sb.DataOff}, d.back, Options{BackingID: testBackingID})
	if !errors.Is(err, errReplayRead) {
		t.Fatalf("Open = %v, want the read error", err)
	}
}

// pauseRead is a cache device whose next ReadAt, once armed, stops until a
// WriteAt reaches the device or a short time has passed: long enough for
// a write that is not held back to land in the middle of the read.
type pauseRead struct {
	storage.Device
	armed  atomic.Bool
	paused chan struct{} // receives when the armed read stops
	wrote  chan struct{} // receives (without blocking) on every WriteAt
}

func (d *pauseRead) ReadAt(p []byte, off int64) error {
	if d.armed.CompareAndSwap(true, false) {
		d.paused <- struct{}{}
		select {
		case <-d.wrote:
		case <-time.After(200 * time.Millisecond): // the write is held back, rightly
		}
	}
	return d.Device.ReadAt(p, off)
}

func (d *pauseRead) WriteAt(p []byte, off int64, flags storage.Flags) error {
	select {
	case d.wrote <- struct{}{}:
	default:
	}
	return d.Device.WriteAt(p, off, flags)
}

// TestOverlappingUnalignedWrites: an unaligned write B reads the sectors it
// patches; an unaligned write A that covers those sectors whole starts
// meanwhile. B must not write back the bytes it read over A's: whichever
// order they take, the bytes only A covers hold A's data.
func TestOverlappingUnalignedWrites(t *testing.T) {
	d := formatMem(t, 4<<20, 8<<20, FormatOptions{BucketSize: 64 << 10, JournalSize: 64 << 10})
	dev := &pauseRead{Device: d.cache, paused: make(chan struct{}, 1), wrote: make(chan struct{}, 1)}
	c := openStillT(t, devPair{dev, d.back}, Options{})
	defer c.Close()
	if err := c.WriteAt(payload(0, 8192, 1), 0, 0); err != nil { // old data, dirty in the cache
		t.Fatal(err)
	}
	bOff, bData := int64(3000), bytes.Repeat([]byte{'B'}, 100) // within sectors 5 and 6
	aOff, aData := int64(1024), bytes.Repeat([]byte{'A'}, 4000-1024)
	select {
	case <-dev.wrote: // that write's signal
	default:
	}
	dev.armed.Store(true)
	bDone := make(chan error, 1)
	go func() { bDone <- c.WriteAt(bData, bOff, 0) }()
	select {
	case <-dev.paused: // B has read sectors 5 and 6 and is about to patch them
	case err := <-bDone:
		t.Fatalf("B's write returned (%v) without reading the cache device: the test steers nothing", err)
	}
	if err := c.WriteAt(aData, aOff, 0); err != nil {
		t.Fatal(err)
	}
	if err := <-bDone; err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(aData))
	if err := c.ReadAt(got, aOff); err != nil {
		t.Fatal(err)
	}
	for i, b := range got {
		off := aOff + int64(i)
		inB := off >= bOff && off < bOff+int64(len(bData))
		if b != 'A' && !(inB && b == 'B') {
			t.Fatalf("byte %d holds %q: A's write was undone by B's read-modify-write", off, b)
		}
	}
}
