package cache

import (
	"errors"
	"testing"

	"github.com/nbdcache/nbdcache/storage"
)

// Crashes at the durable frontier, steered by hand: a first life flushes
// a few writes (A), then writes many more without a flush (B, eight
// sealed journal blocks, no open one: each block's durable field is what
// sealing wrote), and the process or the machine
// dies. The tests then damage one journal block or one record's data at
// an exact place relative to the frontier (the first block no sync
// covered, b0) and recover, some of them twice.

const (
	tcBucket = 64 << 10
	tcBlock  = 512
	tcJBlks  = 128
	tcNB     = 32
	tcBack   = 4 << 20
	tcA      = 3                     // flushed 4 KiB writes at 0, 4096, 8192
	tcB      = 8 * jRecsPerBlk       // unflushed 512-byte writes from tcBBase: 8 sealed blocks, none open
	tcBBase  = int64(1 << 20)        // where B writes
	tcIDA    = 1                     // ids tcIDA.. for A
	tcIDB    = 100                   // ids tcIDB.. for B
	tcAEnd   = int64(tcA * 4096)     // A covers [0, tcAEnd)
	tcBEnd   = tcBBase + tcB*tcBlock // B covers [tcBBase, tcBEnd)
)

// firstLife is what lifeOne leaves: the devices after the power cut (which
// kept everything), and where the frontier lay.
type firstLife struct {
	cdev, bdev *storage.Crash
	sb         *superblock
	b0         uint64 // the first journal block no sync covered (B's first)
	b0pos      int64  // its ring slot
	bLoc       int64  // cache location of the first B write's data (a record of block b0)
}

func tcOptions() Options {
	return Options{BackingID: testBackingID, Mode: Writeback, SequentialCutoff: -1}
}

// lifeOne formats a cache on two Crash devices, writes A (each flushed)
// and B (never flushed), and cuts the power keeping every unsynced write
// (as a process kill does; the caller then tears what a real cut would
// have lost).
func lifeOne(t *testing.T) firstLife {
	t.Helper()
	cdev := storage.NewCrash(tinyCacheSize(tcNB, tcBucket, tcBlock, tcJBlks))
	bdev := storage.NewCrash(tcBack)
	fo := FormatOptions{BackingID: testBackingID, BlockSize: tcBlock, BucketSize: tcBucket, JournalSize: tcJBlks * metaBlock}
	if err := Format(cdev, bdev, fo); err != nil {
		t.Fatal(err)
	}
	c, err := openStill(cdev, bdev, tcOptions())
	if err != nil {
		t.Fatal(err)
	}
	for i := range int64(tcA) {
		mustWrite(t, c, i*4096, 4096, uint64(tcIDA+i))
		mustFlush(t, c)
	}
	var l firstLife
	c.mu.Lock()
	l.b0, l.b0pos = c.mu.j.nextSeq, c.mu.j.head
	durable, n := c.mu.j.durable, c.mu.j.n
	c.mu.Unlock()
	if durable != l.b0 || n != 0 {
		t.Fatalf("after the flushes: blocks below %d durable, %d records open; want %d and 0", durable, n, l.b0)
	}
	for j := range int64(tcB) {
		mustWrite(t, c, tcBBase+j*tcBlock, tcBlock, uint64(tcIDB+j))
	}
	c.mu.Lock()
	sealed, jdurable, open := c.mu.j.nextSeq-l.b0, c.mu.j.durable, c.mu.j.n
	c.mu.idx.Lookup(tcBBase, tcBlock, func(e btreeExtent) bool { l.bLoc = e.Loc + (tcBBase - e.Off); return false })
	c.mu.Unlock()
	if sealed != 8 || open != 0 || jdurable != l.b0 {
		t.Fatalf("B sealed %d blocks and left %d records open (want 8 and 0), blocks below %d durable (want %d): a sync happened", sealed, open, jdurable, l.b0)
	}
	devs, _ := storage.PowerCutAll(storage.KeepUnsynced, nil, cdev, bdev)
	c.Close() // fails after the cut; stops nothing else (no background)
	l.cdev, l.bdev = devs[0], devs[1]
	if l.sb, err = readSuper(l.cdev); err != nil {
		t.Fatal(err)
	}
	return l
}

// damageJSlot flips a byte inside journal slot (b0pos+k), as a torn write
// or later damage would: the block then fails its checksum.
func (l firstLife) damageJSlot(t *testing.T, k int64) {
	t.Helper()
	slot := (l.b0pos + k + l.sb.journalSlots()) % l.sb.journalSlots()
	flipAt(t, devPair{l.cdev, l.bdev}, l.sb.JournalOff+slot*metaBlock+200, 0x08)
}

// readSectors reads [off, end) from c and returns the write id of every
// sector, failing on garbage.
func readSectors(t *testing.T, c *Cache, off, end int64) map[int64]uint64 {
	t.Helper()
	buf := make([]byte, end-off)
	if err := c.ReadAt(buf, off); err != nil {
		t.Fatal(err)
	}
	ids := map[int64]uint64{}
	for i := int64(0); i < int64(len(buf)); i += sectorSize {
		s := (off + i) / sectorSize
		id, err := sectorID(buf[i:i+sectorSize], s)
		if err != nil {
			t.Fatalf("after recovery: %v", err)
		}
		ids[s] = id
	}
	return ids
}

// checkA requires every sector of A to hold its flushed write.
func checkA(t *testing.T, c *Cache, when string) {
	t.Helper()
	for s, id := range readSectors(t, c, 0, tcAEnd) {
		if want := uint64(tcIDA + s*sectorSize/4096); id != want {
			t.Fatalf("%s: sector %d holds write %d; the flushed write %d is lost", when, s, id, want)
		}
	}
}

// TestTwoCrashesShorterJournal: a power cut tears the first unflushed
// journal block (b0) and keeps the blocks after it; recovery ends the
// journal at b0 (a torn tail: no later block says b0 was durable). The
// second life starts a new journal chain at b0, writes less than the first
// (one flushed block, then one published block), and the power fails
// again, losing the unsynced block: the slot after the second life's
// flushed block holds the first life's block of exactly the sequence
// expected there, valid but of the earlier chain. The second recovery
// must stop there: every flushed write of both lives reads back, and no
// write of the first life beyond its torn tail comes back.
//
// It fails if replay drops the chain check (the first life's blocks are
// replayed and their writes reappear), and if a sealed block overstates
// the durable frontier (b0's successors then prove b0 durable, and the
// first recovery refuses a torn tail as corruption).
func TestTwoCrashesShorterJournal(t *testing.T) {
	l := lifeOne(t)
	l.damageJSlot(t, 0) // b0 torn
	if _, err := Check(l.cdev, l.bdev); err != nil {
		t.Fatalf("first recovery, Check: %v (a torn tail after unsynced blocks)", err)
	}
	c, err := openStill(l.cdev, l.bdev, tcOptions())
	if err != nil {
		t.Fatalf("first recovery: %v (a torn tail after unsynced blocks)", err)
	}
	checkA(t, c, "first recovery")
	base := readSectors(t, c, tcBBase, tcBEnd)
	for s, id := range base {
		if id != 0 {
			// Every B record lies in b0 or after it: none is replayed.
			t.Fatalf("first recovery: sector %d holds write %d of the journal beyond the torn tail", s, id)
		}
	}
	// The second life: C, flushed (one block, at b0), over some of B's
	// sectors; then D, published only.
	const nC, nD = 5, 3
	want := map[int64]uint64{}
	for j := range int64(nC) {
		off := tcBBase + j*tcBlock
		mustWrite(t, c, off, tcBlock, uint64(2000+j))
		want[off/sectorSize] = uint64(2000 + j)
	}
	mustFlush(t, c)
	c.mu.Lock()
	next := c.mu.j.nextSeq
	c.mu.Unlock()
	if next != l.b0+1 {
		t.Fatalf("the second life's flushed block is %d; want %d (the first life's torn one)", next-1, l.b0)
	}
	maybe := map[int64]uint64{}
	for k := range int64(nD) {
		off := tcBBase + (20+k)*tcBlock
		mustWrite(t, c, off, tcBlock, uint64(3000+k))
		maybe[off/sectorSize] = uint64(3000 + k)
	}
	devs, _ := storage.PowerCutAll(storage.LoseUnsynced, nil, l.cdev, l.bdev)
	c.Close()
	cdev, bdev := devs[0], devs[1]

	// The setup holds: the slot after the second life's flushed block
	// holds the first life's block b0+1, valid.
	blk := make([]byte, metaBlock)
	slot := (l.b0pos + 1) % l.sb.journalSlots()
	if err := cdev.ReadAt(blk, l.sb.JournalOff+slot*metaBlock); err != nil {
		t.Fatal(err)
	}
	if jb, err := decodeJBlock(l.sb.salt(), blk); err != nil || jb.Seq != l.b0+1 {
		t.Fatalf("slot %d does not hold the first life's block %d: %v", slot, l.b0+1, err)
	}

	if rep, err := Check(cdev, bdev); err != nil {
		t.Fatalf("second recovery, Check: %v (%+v)", err, rep)
	}
	c2, err := openStill(cdev, bdev, tcOptions())
	if err != nil {
		t.Fatalf("second recovery: %v", err)
	}
	checkA(t, c2, "second recovery")
	for s, id := range readSectors(t, c2, tcBBase, tcBEnd) {
		switch w, ok := want[s]; {
		case ok && id != w:
			t.Fatalf("second recovery: sector %d holds write %d; the flushed write %d is lost", s, id, w)
		case ok:
		case id == base[s] || id == maybe[s]:
		default:
			t.Fatalf("second recovery: sector %d holds write %d, replayed from the first life's journal beyond its torn tail (want %d)", s, id, base[s])
		}
	}
	closeChecked(t, c2, devPair{cdev, bdev})
}

// TestDurableFrontierBoundary damages the first life's journal exactly at
// the durable frontier, one place at a time, after a cut that kept
// everything:
//
//   - the last synced block (b0-1), which the blocks after it say was
//     durable: corruption; Open and Check fail with ErrCorrupt, since
//     replaying up to it would silently lose A's last flushed write;
//   - the first unsynced block (b0): a torn tail; the cache opens with
//     every flushed write;
//   - the data of a record in b0 (its journal block whole): the record is
//     beyond the frontier, so replay tests its data, drops it, and the
//     sector reads as before the write, never as the damaged bytes.
//
// The first fails if the frontier is understated by one block, the second
// if it is overstated by one, the third if replay trusts the data of the
// block at the frontier.
func TestDurableFrontierBoundary(t *testing.T) {
	t.Run("last-synced-block", func(t *testing.T) {
		l := lifeOne(t)
		l.damageJSlot(t, -1)
		_, cerr := Check(l.cdev, l.bdev)
		_, oerr := openStill(l.cdev, l.bdev, tcOptions())
		if !errors.Is(cerr, ErrCorrupt) || !errors.Is(oerr, ErrCorrupt) {
			t.Fatalf("damaged block %d, below the frontier: Check %v, Open %v; want ErrCorrupt from both", l.b0-1, cerr, oerr)
		}
	})
	t.Run("first-unsynced-block", func(t *testing.T) {
		l := lifeOne(t)
		l.damageJSlot(t, 0)
		if _, err := Check(l.cdev, l.bdev); err != nil {
			t.Fatalf("torn block %d, at the frontier: Check %v", l.b0, err)
		}
		c, err := openStill(l.cdev, l.bdev, tcOptions())
		if err != nil {
			t.Fatalf("torn block %d, at the frontier: Open %v", l.b0, err)
		}
		checkA(t, c, "after a torn tail")
		closeChecked(t, c, devPair{l.cdev, l.bdev})
	})
	t.Run("data-of-first-unsynced-block", func(t *testing.T) {
		l := lifeOne(t)
		flipAt(t, devPair{l.cdev, l.bdev}, l.bLoc+100, 0x01)
		c, err := openStill(l.cdev, l.bdev, tcOptions())
		if err != nil {
			t.Fatalf("Open: %v", err)
		}
		checkA(t, c, "after lost data beyond the frontier")
		// readSectors fails on the damaged bytes; the B writes whose
		// data is whole may come back (they were never flushed).
		ids := readSectors(t, c, tcBBase, tcBEnd)
		if id := ids[tcBBase/sectorSize]; id != 0 {
			t.Fatalf("sector %d holds write %d, whose data was damaged", tcBBase/sectorSize, id)
		}
		if id := ids[tcBBase/sectorSize+1]; id != tcIDB+1 {
			t.Fatalf("sector %d holds write %d; want %d (its data and record are whole)", tcBBase/sectorSize+1, id, tcIDB+1)
		}
		closeChecked(t, c, devPair{l.cdev, l.bdev})
	})
}

// flushHookDev is a Device wrapper that calls a hook once, before the
// next Flush reaches the wrapped device.
type flushHookDev struct {
	inner storage.Device
	hook  func() // called once, then cleared
}

func (d *flushHookDev) Size() int64                      { return d.inner.Size() }
func (d *flushHookDev) Caps() storage.Caps               { return d.inner.Caps() }
func (d *flushHookDev) Close() error                     { return d.inner.Close() }
func (d *flushHookDev) ReadAt(p []byte, off int64) error { return d.inner.ReadAt(p, off) }
func (d *flushHookDev) Flush() error {
	if h := d.hook; h != nil {
		d.hook = nil
		h()
	}
	return d.inner.Flush()
}
func (d *flushHookDev) WriteAt(p []byte, off int64, f storage.Flags) error {
	return d.inner.WriteAt(p, off, f)
}
func (d *flushHookDev) Trim(off, n int64, f storage.Flags) error { return d.inner.Trim(off, n, f) }
func (d *flushHookDev) Zero(off, n int64, f storage.Flags) error { return d.inner.Zero(off, n, f) }

// TestFrontierNotClaimedBeforeSync: a commit has written block k and is
// syncing the cache device; meanwhile a write publishes block k+1, and the
// power fails before the sync completed (the commit fails: the FLUSH that
// asked for it is never acknowledged). Block k was never durable, so
// block k+1 must not say it was: with k torn, recovery ends at k (a torn
// tail) and opens with every write flushed before. It fails if the
// journal counts a commit's blocks durable before its sync returned.
func TestFrontierNotClaimedBeforeSync(t *testing.T) {
	cdev := storage.NewCrash(tinyCacheSize(tcNB, tcBucket, tcBlock, tcJBlks))
	bdev := storage.NewCrash(tcBack)
	fo := FormatOptions{BackingID: testBackingID, BlockSize: tcBlock, BucketSize: tcBucket, JournalSize: tcJBlks * metaBlock}
	if err := Format(cdev, bdev, fo); err != nil {
		t.Fatal(err)
	}
	hd := &flushHookDev{inner: cdev}
	c, err := openStill(hd, bdev, tcOptions())
	if err != nil {
		t.Fatal(err)
	}
	mustWrite(t, c, 0, 4096, tcIDA)
	mustFlush(t, c)
	mustWrite(t, c, 4096, 4096, tcIDA+1) // in block k, which the next commit seals
	c.mu.Lock()
	k, kpos := c.mu.j.nextSeq, c.mu.j.head
	c.mu.Unlock()
	var devs []*storage.Crash
	hd.hook = func() {
		// The commit of block k is syncing: block k is written, not durable.
		mustWrite(t, c, tcBBase, tcBlock, tcIDB) // published in block k+1
		devs, _ = storage.PowerCutAll(storage.KeepUnsynced, nil, cdev, bdev)
	}
	if err := c.Flush(); !errors.Is(err, storage.ErrPoweredOff) {
		t.Fatalf("a FLUSH whose sync lost power: %v; want ErrPoweredOff", err)
	}
	c.Close()
	l := firstLife{cdev: devs[0], bdev: devs[1], b0: k, b0pos: kpos}
	if l.sb, err = readSuper(l.cdev); err != nil {
		t.Fatal(err)
	}
	l.damageJSlot(t, 0) // block k torn
	if _, err := Check(l.cdev, l.bdev); err != nil {
		t.Fatalf("block %d, torn during its commit's sync: Check %v", k, err)
	}
	c2, err := openStill(l.cdev, l.bdev, tcOptions())
	if err != nil {
		t.Fatalf("block %d, torn during its commit's sync: Open %v", k, err)
	}
	for s, id := range readSectors(t, c2, 0, 4096) {
		if id != tcIDA {
			t.Fatalf("sector %d holds write %d; the flushed write %d is lost", s, id, tcIDA)
		}
	}
	closeChecked(t, c2, devPair{l.cdev, l.bdev})
}
