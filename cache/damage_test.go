package cache

import (
	"bytes"
	"errors"
	"fmt"
	"sort"
	"strings"
	"testing"
)

// Metadata damage (issue 14): bytes flipped in synced metadata. The cache
// must then open with every flushed write intact, or refuse to open while
// Check names what is damaged and fails with ErrCorrupt. It must never
// serve old data silently.

// tinyCacheSize is the size of a cache device with nb buckets of bucket
// bytes, blocks of block bytes and a journal of jblocks blocks: the
// metadata plus exactly the data area (as randomConfig sizes it).
func tinyCacheSize(nb, bucket, block, jblocks int64) int64 {
	return nb*bucket + 2*metaBlock + jblocks*metaBlock +
		2*alignUp(ckptHdrSize+align8(nb)+(2*nb*bucket/block+64)*ckptExtSize, metaBlock)
}

// flipAt xors b into the byte at off of dev.
func flipAt(t testing.TB, d devPair, off int64, b byte) {
	t.Helper()
	p := make([]byte, 1)
	if err := d.cache.ReadAt(p, off); err != nil {
		t.Fatal(err)
	}
	p[0] ^= b
	if err := d.cache.WriteAt(p, off, 0); err != nil {
		t.Fatal(err)
	}
}

// damageSlot flips a byte of checkpoint slot i's header (its checksum then
// fails).
func damageSlot(t testing.TB, d devPair, i int) {
	t.Helper()
	sb, err := readSuper(d.cache)
	if err != nil {
		t.Fatal(err)
	}
	flipAt(t, d, sb.CkptOff+int64(i)*sb.CkptSize+9, 0x20)
}

// mustWrite writes payload id over [off, off+n).
func mustWrite(t testing.TB, c *Cache, off, n int64, id uint64) {
	t.Helper()
	if err := c.WriteAt(payload(off, n, id), off, 0); err != nil {
		t.Fatal(err)
	}
}

func mustFlush(t testing.TB, c *Cache) {
	t.Helper()
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
}

// bucketOfSector is the bucket the extent over byte off lives in (-1: none).
func bucketOfSector(c *Cache, off int64) int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	b := int64(-1)
	c.mu.idx.Lookup(off, sectorSize, func(e btreeExtent) bool { b = c.sb.bucketOf(e.Loc); return false })
	return b
}

// expectIntactOrRefused opens the damaged devices and requires either
// every range in want to read back as its write, or Open and Check both to
// fail with ErrCorrupt, Check's problems naming region.
func expectIntactOrRefused(t *testing.T, d devPair, want map[int64]uint64, n int64, region string) (opened bool) {
	t.Helper()
	rep, cerr := Check(d.cache, d.back)
	c, oerr := Open(d.cache, d.back, Options{BackingID: testBackingID, NoBackground: true})
	if oerr != nil {
		if !errors.Is(oerr, ErrCorrupt) || !errors.Is(cerr, ErrCorrupt) {
			t.Fatalf("Open: %v; Check: %v; want ErrCorrupt from both", oerr, cerr)
		}
		if !strings.Contains(strings.Join(rep.Problems, "\n"), region) {
			t.Fatalf("Check's problems do not name %q: %q", region, rep.Problems)
		}
		t.Logf("refused: Open: %v", oerr)
		return false
	}
	defer c.Close()
	got := make([]byte, n)
	for off, id := range want {
		if err := c.ReadAt(got, off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, payload(off, n, id)) {
			gid, err := sectorID(got[:sectorSize], off/sectorSize)
			t.Fatalf("opened over damaged %s, but [%d+%d) lost flushed write %d: it holds write %d (%v); Check said %v, warnings %q",
				region, off, n, id, gid, err, cerr, rep.Warnings)
		}
	}
	return true
}

// reuseAfterCheckpoint leaves a killed cache whose newest checkpoint
// (slot newest) freed two buckets, one of which a flushed write then
// reused; the older checkpoint's journal chain runs on through the newer
// one. want maps the offsets of the flushed writes (of n bytes each) made
// after the newest checkpoint to their ids.
func reuseAfterCheckpoint(t *testing.T) (d devPair, want map[int64]uint64, n int64, newest int) {
	const bkt = 16 << 10
	d = formatMem(t, tinyCacheSize(4, bkt, 4096, 16), 1<<20, FormatOptions{BlockSize: 4096, BucketSize: bkt, JournalSize: 16 * metaBlock})
	c := openT(t, d, Options{NoBackground: true}) // checkpoint 2, slot 1
	want = map[int64]uint64{}
	// Two buckets filled, then emptied by trims: pending.
	mustWrite(t, c, 0, bkt, 1)
	mustWrite(t, c, bkt, bkt, 2)
	emptied := map[int64]bool{bucketOfSector(c, 0): true, bucketOfSector(c, bkt): true}
	for _, off := range []int64{0, bkt} {
		if err := c.Trim(off, bkt, 0); err != nil {
			t.Fatal(err)
		}
	}
	mustFlush(t, c)
	if err := c.Checkpoint(); err != nil { // checkpoint 3, slot 0: they are free
		t.Fatal(err)
	}
	newest = c.mu.ckptSlot
	reused := false
	for i := int64(2); i < 8 && !reused; i++ {
		mustWrite(t, c, i*bkt, bkt, uint64(i+1))
		want[i*bkt] = uint64(i + 1)
		reused = emptied[bucketOfSector(c, i*bkt)]
	}
	if !reused {
		t.Fatal("no write reused an emptied bucket")
	}
	mustFlush(t, c)
	// The process dies here (no Close); the devices keep everything.
	return d, want, bkt, newest
}

// TestDamagedNewestCheckpointAfterReuse is issue 14's bug 4. The newest
// checkpoint is damaged after a bucket it freed was reused by a flushed
// write. Recovery from the older checkpoint met that write's record with a
// generation that did not match the older checkpoint's, took it for stale
// and skipped it: the flushed write was gone, and nothing said so. The
// blocks written since the newest checkpoint say it was durable.
func TestDamagedNewestCheckpointAfterReuse(t *testing.T) {
	d, want, n, newest := reuseAfterCheckpoint(t)
	damageSlot(t, d, newest)
	if expectIntactOrRefused(t, d, want, n, fmt.Sprintf("checkpoint slot %d", newest)) {
		t.Fatal("opened over a damaged newest checkpoint that journal blocks prove was durable")
	}
}

// TestStaleGenerationIsCorruption: the same, with journal blocks that do
// not say which checkpoint was durable (as an older build wrote them).
// Replay from the older checkpoint meets the reused bucket's record with
// another generation: corruption, not a stale record to skip.
func TestStaleGenerationIsCorruption(t *testing.T) {
	d, want, n, newest := reuseAfterCheckpoint(t)
	forgetCkptFields(t, d)
	damageSlot(t, d, newest)
	if expectIntactOrRefused(t, d, want, n, "generation") {
		t.Fatal("opened over a damaged newest checkpoint after bucket reuse")
	}
}

// forgetCkptFields zeroes the ckpt field of every valid journal block,
// re-chaining the blocks (and so breaking the chain into any checkpoint
// that continues it, which the caller damages anyway).
func forgetCkptFields(t *testing.T, d devPair) {
	t.Helper()
	sb, err := readSuper(d.cache)
	if err != nil {
		t.Fatal(err)
	}
	salt := sb.salt()
	type blk struct {
		pos int64
		jb  *jblock
		b   []byte
	}
	var all []blk
	for pos := range sb.journalSlots() {
		b := make([]byte, metaBlock)
		if err := d.cache.ReadAt(b, sb.JournalOff+pos*metaBlock); err != nil {
			t.Fatal(err)
		}
		if jb, err := decodeJBlock(salt, b); err == nil {
			all = append(all, blk{pos, jb, b})
		}
	}
	sort.Slice(all, func(i, j int) bool { return all[i].jb.Seq < all[j].jb.Seq })
	newCRC := map[uint32]uint32{}
	for _, x := range all {
		prev := x.jb.Prev
		if p, ok := newCRC[prev]; ok {
			prev = p
		}
		newCRC[x.jb.CRC] = finishJBlock(x.b, salt, x.jb.Seq, prev, len(x.jb.Recs), x.jb.Durable, 0)
		if err := d.cache.WriteAt(x.b, sb.JournalOff+x.pos*metaBlock, 0); err != nil {
			t.Fatal(err)
		}
	}
}

// TestDamagedCheckpointOfThisLife: Open's checkpoint starts a new journal
// chain. If it is damaged later, the older slot holds the previous life's
// checkpoint, whose chain ends where this life's journal begins: replay
// from it would stop there, silently dropping every write of this life.
func TestDamagedCheckpointOfThisLife(t *testing.T) {
	d := formatMem(t, 4<<20, 1<<20, FormatOptions{BucketSize: 64 << 10, JournalSize: 64 << 10})
	c := openT(t, d, Options{NoBackground: true})
	mustWrite(t, c, 0, 8192, 1)
	if err := c.Close(); err != nil { // the previous life ends with a checkpoint
		t.Fatal(err)
	}
	c = openT(t, d, Options{NoBackground: true}) // this life's checkpoint
	newest := c.mu.ckptSlot
	mustWrite(t, c, 8192, 8192, 2)
	mustFlush(t, c)
	// The process dies; then this life's checkpoint is damaged.
	damageSlot(t, d, newest)
	want := map[int64]uint64{0: 1, 8192: 2}
	if expectIntactOrRefused(t, d, want, 8192, fmt.Sprintf("checkpoint slot %d", newest)) {
		t.Fatal("opened over a damaged newest checkpoint that journal blocks prove was durable")
	}
}

// TestDamagedOlderCheckpointIsHarmless: the older slot is not needed; the
// cache opens with its data, and Check warns about the slot.
func TestDamagedOlderCheckpointIsHarmless(t *testing.T) {
	d := formatMem(t, 4<<20, 1<<20, FormatOptions{BucketSize: 64 << 10, JournalSize: 64 << 10})
	c := openT(t, d, Options{NoBackground: true})
	mustWrite(t, c, 0, 8192, 1)
	if err := c.Checkpoint(); err != nil {
		t.Fatal(err)
	}
	mustWrite(t, c, 8192, 8192, 2)
	mustFlush(t, c)
	older := 1 - c.mu.ckptSlot
	// The process dies; then the older checkpoint is damaged.
	damageSlot(t, d, older)
	rep, err := Check(d.cache, d.back)
	if err != nil {
		t.Fatalf("Check: %v", err)
	}
	region := fmt.Sprintf("checkpoint slot %d", older)
	if !strings.Contains(strings.Join(rep.Warnings, "\n"), region) {
		t.Fatalf("Check's warnings do not name %q: %q", region, rep.Warnings)
	}
	t.Logf("Check warns: %q", rep.Warnings)
	if !expectIntactOrRefused(t, d, map[int64]uint64{0: 1, 8192: 2}, 8192, region) {
		t.Fatal("refused to open over a damaged older checkpoint")
	}
}
