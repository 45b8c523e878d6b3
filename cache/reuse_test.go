package cache

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/nbdcache/nbdcache/storage"
)

// Bucket reuse steered by hand: a bucket whose only extent is trimmed goes
// pending, a checkpoint frees it, writes take every other free bucket,
// and a GC pass moves another bucket's live data into it (the GC
// allocator may take the last free bucket, the foreground may not).

const (
	ruBucket = 64 << 10
	ruNB     = 8
	ruX      = int64(0)       // E, a whole bucket, lives here
	ruS      = int64(1 << 20) // a bucket left 1/4 live: GC's victim
	ruFill   = int64(2 << 20) // where the fill writes go
)

// readHookDev is a Device wrapper that calls a hook once, before the first
// read at a chosen offset reaches the wrapped device.
type readHookDev struct {
	inner storage.Device
	at    int64
	hook  func() // called once, then cleared; set before the read races
}

func (d *readHookDev) Size() int64        { return d.inner.Size() }
func (d *readHookDev) Caps() storage.Caps { return d.inner.Caps() }
func (d *readHookDev) Flush() error       { return d.inner.Flush() }
func (d *readHookDev) Close() error       { return d.inner.Close() }
func (d *readHookDev) ReadAt(p []byte, off int64) error {
	if h := d.hook; h != nil && off == d.at {
		d.hook = nil
		h()
	}
	return d.inner.ReadAt(p, off)
}
func (d *readHookDev) WriteAt(p []byte, off int64, f storage.Flags) error {
	return d.inner.WriteAt(p, off, f)
}
func (d *readHookDev) Trim(off, n int64, f storage.Flags) error { return d.inner.Trim(off, n, f) }
func (d *readHookDev) Zero(off, n int64, f storage.Flags) error { return d.inner.Zero(off, n, f) }

// reuseSetup formats a cache of ruNB buckets on dev (wrapping the cache
// device with wrap, if set) and writes E (id 1, a whole bucket at ruX) and
// the future GC victim at ruS (a bucket of which 3/4 is overwritten). It
// returns E's bucket.
func reuseSetup(t *testing.T, wrap func(storage.Device) storage.Device) (c *Cache, d devPair, b int64) {
	t.Helper()
	d = formatMem(t, tinyCacheSize(ruNB, ruBucket, 4096, 32), 4<<20,
		FormatOptions{BlockSize: 4096, BucketSize: ruBucket, JournalSize: 32 * metaBlock})
	cd := d.cache
	if wrap != nil {
		cd = wrap(cd)
	}
	c = openStillT(t, devPair{cd, d.back}, Options{Mode: Writeback, SequentialCutoff: -1})
	mustWrite(t, c, ruX, ruBucket, 1)
	mustWrite(t, c, ruS, ruBucket, 2)
	mustWrite(t, c, ruS+ruBucket/4, ruBucket*3/4, 3)
	b = bucketOfSector(c, ruX)
	c.mu.Lock()
	defer c.mu.Unlock()
	if bk := c.mu.space.buckets[b]; bk.state != bFull || bk.live != ruBucket {
		t.Fatalf("E's bucket %d: state %d, %d live bytes; want full and whole", b, bk.state, bk.live)
	}
	return c, d, b
}

// reuseBucket empties bucket b (E's) by a trim, frees it by a checkpoint,
// takes every other free bucket with writes, and runs GC, which moves the
// victim's live data into b. It returns b's generation before and after it
// was emptied.
func reuseBucket(t *testing.T, c *Cache, b int64) (oldGen, newGen uint8) {
	t.Helper()
	c.mu.Lock()
	oldGen = c.mu.space.buckets[b].gen
	c.mu.Unlock()
	if err := c.Trim(ruX, ruBucket, 0); err != nil {
		t.Fatal(err)
	}
	c.mu.Lock()
	st, newGen := c.mu.space.buckets[b].state, c.mu.space.buckets[b].gen
	c.mu.Unlock()
	if st != bPending {
		t.Fatalf("bucket %d is %d after its only extent was trimmed; want pending", b, st)
	}
	if err := c.Checkpoint(); err != nil {
		t.Fatal(err)
	}
	for i := int64(0); ; i++ {
		c.mu.Lock()
		nfree := len(c.mu.space.free)
		c.mu.Unlock()
		if nfree <= 1 {
			break
		}
		mustWrite(t, c, ruFill+i*(16<<10), 16<<10, uint64(100+i))
	}
	c.mu.Lock()
	free := append([]int64(nil), c.mu.space.free...)
	c.mu.Unlock()
	if len(free) != 1 || free[0] != b {
		t.Fatalf("free buckets %v; want only %d", free, b)
	}
	c.GCStep(false)
	if got := bucketOfSector(c, ruS); got != b {
		t.Fatalf("GC moved the victim's live data to bucket %d; want %d", got, b)
	}
	return oldGen, newGen
}

// TestReadRacingBucketReuse: a read looks E up, and before its read of
// E's bucket reaches the cache device, E is trimmed, its bucket freed and
// reused by GC for other data (the victim's). The read must notice (the
// bucket's epoch changed) and look again: it returns E's data or the
// zeroes the trim left, never the other data now in the bucket.
//
// It fails if the read does not re-check the epoch after its cache read,
// and if emptying a bucket does not bump its epoch.
func TestReadRacingBucketReuse(t *testing.T) {
	var hd *readHookDev
	c, _, b := reuseSetup(t, func(dev storage.Device) storage.Device {
		hd = &readHookDev{inner: dev}
		return hd
	})
	defer c.Close()
	hd.at = c.sb.bucketStart(b)
	ran := false
	hd.hook = func() {
		ran = true
		reuseBucket(t, c, b)
	}
	got := make([]byte, 4096)
	if err := c.ReadAt(got, ruX); err != nil {
		t.Fatal(err)
	}
	if !ran {
		t.Fatal("the read never reached E's bucket")
	}
	if !bytes.Equal(got, payload(ruX, 4096, 1)) && !bytes.Equal(got, make([]byte, 4096)) {
		_, err := sectorID(got[:sectorSize], ruX/sectorSize)
		t.Fatalf("a read that raced with the reuse of its bucket returned other data: %v", err)
	}
	if err := c.Verify(); err != nil {
		t.Fatal(err)
	}
}

// TestGenerationBumpOnReuse: a bucket emptied (here by a trim) gets a new
// generation at once, and the data GC then moves into it carries the new
// one. If the checkpoint that freed it is lost later (damaged, with the
// journal blocks' checkpoint fields gone, as an older build wrote them),
// recovery from the older checkpoint, which still gives the bucket its
// old generation, meets the records of the new contents: corruption, and
// Open and Check must say so rather than replay them as if the bucket
// still held the old ones.
//
// It fails if emptying a bucket does not bump its generation.
func TestGenerationBumpOnReuse(t *testing.T) {
	c, d, b := reuseSetup(t, nil)
	oldGen, newGen := reuseBucket(t, c, b)
	if newGen != oldGen+1 {
		t.Fatalf("bucket %d emptied: generation %d -> %d; want %d", b, oldGen, newGen, oldGen+1)
	}
	var moved []btreeExtent
	c.mu.Lock()
	c.mu.idx.Lookup(ruS, ruBucket, func(e btreeExtent) bool { moved = append(moved, e); return true })
	c.mu.Unlock()
	for _, e := range moved {
		if c.sb.bucketOf(e.Loc) == b && e.Gen != newGen {
			t.Fatalf("extent %v moved into bucket %d has generation %d; want %d", e, b, e.Gen, newGen)
		}
	}
	if err := c.Verify(); err != nil {
		t.Fatal(err)
	}
	mustFlush(t, c)
	newest := c.mu.ckptSlot
	// The process dies here (no Close); then the newest checkpoint, the
	// one that freed b, is lost.
	forgetCkptFields(t, d)
	damageSlot(t, d, newest)
	_, cerr := Check(d.cache, d.back)
	c2, oerr := openStill(d.cache, d.back, Options{BackingID: testBackingID})
	if oerr == nil {
		c2.Close()
	}
	if !errors.Is(oerr, ErrCorrupt) || !errors.Is(cerr, ErrCorrupt) {
		t.Fatalf("recovery past a lost checkpoint that freed bucket %d: Open %v, Check %v; want ErrCorrupt from both", b, oerr, cerr)
	}
	if !strings.Contains(oerr.Error(), fmt.Sprintf("generation %d of bucket %d", newGen, b)) {
		t.Fatalf("Open: %v; want it to name generation %d of bucket %d", oerr, newGen, b)
	}
}

// TestBucketEmptiedDuringCheckpointStaysPending: a checkpoint frees only
// the buckets that were pending when it took its snapshot. A bucket
// emptied while it writes its slot is still referred to by that snapshot:
// freed and reused, a crash that recovers from this checkpoint would read
// other data as those extents. (Mutant checkpoint-frees-late-pending,
// which the power-cut tests caught at some seeds only.)
func TestBucketEmptiedDuringCheckpointStaysPending(t *testing.T) {
	cdev, bdev := storage.NewCrash(1<<20), storage.NewMem(4<<20)
	if err := Format(cdev, bdev, FormatOptions{BackingID: testBackingID, BucketSize: 32 << 10, JournalSize: 16 * metaBlock}); err != nil {
		t.Fatal(err)
	}
	c, err := openStill(cdev, bdev, Options{BackingID: testBackingID, SequentialCutoff: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for off := int64(0); off < 32<<10; off += 4096 {
		if err := c.WriteAt(payload(off, 4096, 1), off, 0); err != nil {
			t.Fatal(err)
		}
	}
	var e btreeExtent
	c.mu.Lock()
	c.mu.idx.Lookup(0, 4096, func(x btreeExtent) bool { e = x; return false })
	b := c.sb.bucketOf(e.Loc)
	c.mu.Unlock()
	slots := [2]int64{c.sb.CkptOff, c.sb.CkptOff + c.sb.CkptSize}
	trimmed := false
	cdev.SetHook(func(op storage.Op) {
		if op.Kind != storage.OpWrite || (op.Off != slots[0] && op.Off != slots[1]) || trimmed {
			return
		}
		trimmed = true // after the snapshot, before the slot is durable
		if err := c.Trim(0, 32<<10, 0); err != nil {
			t.Error(err)
		}
	})
	if err := c.Checkpoint(); err != nil {
		t.Fatal(err)
	}
	cdev.SetHook(nil)
	c.mu.Lock()
	state, live := c.mu.space.buckets[b].state, c.mu.space.buckets[b].live
	c.mu.Unlock()
	if !trimmed || live != 0 {
		t.Fatalf("the trim during the checkpoint did not empty bucket %d (trimmed %v, live %d)", b, trimmed, live)
	}
	if state != bPending {
		t.Fatalf("bucket %d, emptied after the checkpoint's snapshot, is %v after it, not pending", b, state)
	}
	if err := c.Checkpoint(); err != nil {
		t.Fatal(err)
	}
	c.mu.Lock()
	state = c.mu.space.buckets[b].state
	c.mu.Unlock()
	if state != bFree {
		t.Fatalf("bucket %d is %v after the next checkpoint, not free", b, state)
	}
}
