package cache

import (
	"errors"
	"testing"
)

// The durable frontier (doc.go, "Recovery tests only the records beyond
// the durable frontier"): these cases write three journal blocks that are
// never synced, two sealed because they filled and the third published
// open, so every block says that only the blocks before the first were
// durable. Then the process dies with the devices keeping everything,
// except what an unsynced write may lose in a power cut.

// unsyncedBlocks writes 512-byte writes (write i+1 at sector i, one record
// each, never flushed) until two blocks have sealed and the open one holds
// some records, all published. It returns the cache and the sequence and
// ring slot of the first of those blocks.
func unsyncedBlocks(t *testing.T) (c *Cache, d devPair, seq uint64, slot int64, n int) {
	t.Helper()
	d = formatMem(t, 4<<20, 4<<20, FormatOptions{BlockSize: sectorSize, BucketSize: 64 << 10, JournalSize: 64 * metaBlock})
	c = openStillT(t, d, Options{SequentialCutoff: -1})
	c.mu.Lock()
	seq, slot = c.mu.j.nextSeq, c.mu.j.head
	c.mu.Unlock()
	n = 2*jRecsPerBlk + 20
	for i := range n {
		off := int64(i) * sectorSize
		if err := c.WriteAt(payload(off, sectorSize, uint64(i+1)), off, 0); err != nil {
			t.Fatal(err)
		}
	}
	c.mu.Lock()
	sealed, open, durable := c.mu.j.nextSeq-seq, c.mu.j.n, c.mu.j.durable
	c.mu.Unlock()
	if sealed != 2 || open == 0 || durable != seq {
		t.Fatalf("%d blocks sealed, %d records open, durable below %d; want 2, some, %d", sealed, open, durable, seq)
	}
	return c, d, seq, slot, n
}

// TestFrontierNotOverstated: the data of write 1, recorded in the first
// unsynced block, never reached the disk (its sector holds other data, as
// a torn write may leave it), though the journal blocks did. No block
// claims the first one durable, so replay tests that record's data and
// drops it. A block that overstated the frontier by one (sealed or
// published) would make replay trust it and serve the wrong data.
// (Mutants sealed-block-overstates-frontier,
// published-block-overstates-frontier.)
func TestFrontierNotOverstated(t *testing.T) {
	c, d, _, _, n := unsyncedBlocks(t)
	var loc int64 = -1
	c.mu.Lock()
	c.mu.idx.Lookup(0, sectorSize, func(e btreeExtent) bool { loc = e.Loc; return false })
	c.mu.Unlock()
	if loc < 0 {
		t.Fatal("write 1 is not cached")
	}
	// The process dies; the sector of write 1 holds another sector's data.
	if err := d.cache.WriteAt(payload(77*sectorSize, sectorSize, 5), loc, 0); err != nil {
		t.Fatal(err)
	}
	c2 := openStillT(t, d, Options{})
	defer c2.Close()
	p := make([]byte, int64(n)*sectorSize)
	if err := c2.ReadAt(p, 0); err != nil {
		t.Fatal(err)
	}
	for i := range int64(n) {
		id, err := sectorID(p[i*sectorSize:(i+1)*sectorSize], i)
		if err != nil || id != 0 && id != uint64(i+1) {
			t.Fatalf("sector %d after recovery: write %d (%v), want write %d or zeroes", i, id, err, i+1)
		}
	}
	if id, _ := sectorID(p[:sectorSize], 0); id != 0 {
		t.Fatalf("sector 0 reads as write %d; its data never reached the disk", id)
	}
}

// TestTornTailBeforeUndurableBlocks: the first unsynced block was lost
// (its slot never written), the two after it were kept. They say only
// the blocks before the lost one were durable, so it is a torn tail, not
// corruption: the cache opens, without the unflushed writes. (Mutant
// torn-tail-read-as-corruption.)
func TestTornTailBeforeUndurableBlocks(t *testing.T) {
	c, d, _, slot, n := unsyncedBlocks(t)
	if err := d.cache.WriteAt(make([]byte, metaBlock), c.sb.JournalOff+slot*metaBlock, 0); err != nil {
		t.Fatal(err)
	}
	c2, err := openStill(d.cache, d.back, Options{BackingID: testBackingID})
	if errors.Is(err, ErrCorrupt) {
		t.Fatalf("a torn tail followed by undurable blocks taken for corruption: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	p := make([]byte, int64(n)*sectorSize)
	if err := c2.ReadAt(p, 0); err != nil {
		t.Fatal(err)
	}
	for i := range int64(n) {
		if id, err := sectorID(p[i*sectorSize:(i+1)*sectorSize], i); err != nil || id != 0 {
			t.Fatalf("sector %d after recovery: write %d (%v), want zeroes: the journal ends before it", i, id, err)
		}
	}
}
