package cache

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"sort"
	"strings"
	"testing"

	"github.com/nbdcache/nbdcache/storage"
	"github.com/nbdcache/nbdcache/test/testseed"
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
	c, oerr := openStill(d.cache, d.back, Options{BackingID: testBackingID})
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
	c := openStillT(t, d, Options{}) // checkpoint 2, slot 1
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
	c := openStillT(t, d, Options{})
	mustWrite(t, c, 0, 8192, 1)
	if err := c.Close(); err != nil { // the previous life ends with a checkpoint
		t.Fatal(err)
	}
	c = openStillT(t, d, Options{}) // this life's checkpoint
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
	c := openStillT(t, d, Options{})
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
	// Open says so too.
	var logged bytes.Buffer
	c, err = openStill(d.cache, d.back, Options{BackingID: testBackingID,
		Logger: slog.New(slog.NewTextHandler(&logged, &slog.HandlerOptions{Level: slog.LevelWarn}))})
	if err != nil {
		t.Fatal(err)
	}
	if out := logged.String(); !strings.Contains(out, "level=WARN") || !strings.Contains(out, region+" is invalid") {
		t.Fatalf("Open logged %q; want a warning naming %s", out, region)
	}
	closeChecked(t, c, d)
	if !expectIntactOrRefused(t, d, map[int64]uint64{0: 1, 8192: 2}, 8192, region) {
		t.Fatal("refused to open over a damaged older checkpoint")
	}
}

var flagDamages = flag.Int("damages", 0, "iterations of TestMetadataDamage (default 300; 1 with -seed replays one)")

// Damage regions of TestMetadataDamage.
const (
	dmgNewestCkpt = iota // the slot of the newest checkpoint
	dmgOlderCkpt         // the other slot
	dmgJournal           // a journal block below the durable frontier
	dmgSuper0            // superblock copy A
	dmgSuper1            // superblock copy B
	dmgRegions
)

var dmgNames = [dmgRegions]string{"newest checkpoint", "older checkpoint", "live journal block", "superblock copy A", "superblock copy B"}

// dmgResult is the outcome of one damage run.
type dmgResult struct {
	violations []string
	region     int
	closed     bool // the cache was closed before the damage (else killed)
	refused    bool // Open refused with ErrCorrupt
	reused     bool // some bucket emptied after a checkpoint holds data again
	chained    bool // dmgJournal: the block was on the replayed chain
}

// runDamage runs one seeded damage case: a workload on a tiny cache (so
// that buckets are emptied and reused), a final Flush, a Close or a kill,
// then bytes flipped in one metadata region under their checksum. Then
// either Open succeeds and every sector holds what the oracle allows (a
// kill on a device that keeps every write loses nothing acknowledged), or
// Open and Check fail with ErrCorrupt and Check's problems name the
// region. Whichever, Check names the damage (as a problem or a warning),
// and after a successful Open and Close, Check is clean again.
func runDamage(seed uint64) (res dmgResult) {
	r := rng(seed)
	fail := func(format string, a ...any) {
		if len(res.violations) < 8 {
			res.violations = append(res.violations, fmt.Sprintf(format, a...))
		}
	}
	block := []int64{512, 4096}[r.IntN(2)]
	bucket := int64(16 << 10 << r.IntN(2))
	nb := int64(minBuckets + r.IntN(8))
	jblocks := int64(16 + r.IntN(24))
	cfg := pcConfig{
		fo:   FormatOptions{BlockSize: int(block), BucketSize: bucket, JournalSize: jblocks * metaBlock, BackingID: testBackingID},
		back: int64(256<<10) << r.IntN(3),
		ops:  80 + r.IntN(200),
		opts: Options{BackingID: testBackingID, SequentialCutoff: -1, PromoteAll: r.IntN(2) == 0,
			Mode: []Mode{Writeback, Writeback, Writeback, Writethrough}[r.IntN(4)]},
	}
	cfg.cache = tinyCacheSize(nb, bucket, block, jblocks)
	d := devPair{storage.NewMem(cfg.cache), storage.NewMem(cfg.back)}
	if err := Format(d.cache, d.back, cfg.fo); err != nil {
		fail("format: %v", err)
		return res
	}
	c, err := openStill(d.cache, d.back, cfg.opts)
	if err != nil {
		fail("open: %v", err)
		return res
	}
	o := newOracle(cfg.back / sectorSize)
	o.ackDurable = true // a kill on a device that keeps every write
	var pr pcResult
	workload(c, r, cfg, o, &pr, fail, false)
	if err := c.Flush(); err != nil {
		fail("flush: %v", err)
	}
	if r.IntN(2) == 0 { // one more write, published: its block says the ones before were durable
		off := r.Int64N(cfg.back/sectorSize) * sectorSize
		n := min(int64(1+r.IntN(16))*sectorSize, cfg.back-off)
		p := pend{id: 1 << 40}
		o.begin(off, n, p)
		if err := c.WriteAt(payload(off, n, p.id), off, 0); err != nil {
			fail("last write: %v", err)
		}
		o.done(off, n, p, false)
	}
	c.mu.Lock()
	for _, b := range c.mu.space.buckets {
		res.reused = res.reused || b.gen > 0 && b.live > 0
	}
	c.mu.Unlock()
	if res.closed = r.IntN(3) == 0; res.closed {
		if err := c.Close(); err != nil {
			fail("close: %v", err)
		}
	} // else the process dies here: the devices keep everything
	if len(res.violations) > 0 {
		return res
	}
	if rep, err := Check(d.cache, d.back); err != nil || len(rep.Warnings) > 0 {
		fail("check before the damage: %v, warnings %q", err, rep.Warnings)
		return res
	}

	// The damage.
	sb, err := readSuper(d.cache)
	if err != nil {
		fail("%v", err)
		return res
	}
	salt := sb.salt()
	slots, err := readCheckpointSlots(d.cache, sb, salt)
	if err != nil || slots[0].ck == nil || slots[1].ck == nil {
		fail("checkpoint slots before the damage: %v %v %v", err, slots[0].err, slots[1].err)
		return res
	}
	newest := 0
	if slots[1].ck.Seq > slots[0].ck.Seq {
		newest = 1
	}
	flip := func(base, size int64) {
		for range 1 + r.IntN(3) {
			off := base + r.Int64N(size)
			b := make([]byte, 1)
			d.cache.ReadAt(b, off)
			b[0] ^= byte(1 + r.IntN(255))
			d.cache.WriteAt(b, off, 0)
		}
	}
	res.region = r.IntN(dmgRegions)
	var name string
	switch res.region {
	case dmgNewestCkpt, dmgOlderCkpt:
		i := newest
		if res.region == dmgOlderCkpt {
			i = 1 - newest
		}
		name = fmt.Sprintf("checkpoint slot %d", i)
		flip(sb.CkptOff+int64(i)*sb.CkptSize, ckptHdrSize+slots[i].ck.bodyLen())
	case dmgJournal:
		// A block of the replayed chain below the durable frontier (a
		// later block says it was durable), else a valid block off the
		// chain (dead). Not the chain's blocks from the frontier on: the
		// last synced block, damaged with no block written after it,
		// reads as a torn tail (doc.go's known limits).
		type jb struct {
			seq uint64
			pos int64
		}
		var chain, below []jb
		var frontier uint64
		onChain := map[int64]bool{}
		walkJournal(d.cache, sb, salt, slots[newest].ck, func(b *jblock) {
			chain = append(chain, jb{b.Seq, (slots[newest].ck.JPos + int64(len(chain))) % sb.journalSlots()})
			frontier = max(frontier, b.Durable)
		})
		for _, b := range chain {
			onChain[b.pos] = true
			if b.seq < frontier {
				below = append(below, b)
			}
		}
		var target jb
		if len(below) > 0 {
			target, res.chained = below[r.IntN(len(below))], true
		} else {
			var valid []jb
			for pos := range sb.journalSlots() {
				b := make([]byte, metaBlock)
				d.cache.ReadAt(b, sb.JournalOff+pos*metaBlock)
				if j, err := decodeJBlock(salt, b); err == nil && !onChain[pos] {
					valid = append(valid, jb{j.Seq, pos})
				}
			}
			if len(valid) == 0 {
				res.region = dmgSuper0 // no block to damage
				name = "superblock copy at 0"
				flip(0, sbUsed+4)
				break
			}
			target = valid[r.IntN(len(valid))]
		}
		name = fmt.Sprintf("journal block %d (slot %d)", target.seq, target.pos)
		flip(sb.JournalOff+target.pos*metaBlock, metaBlock)
	case dmgSuper0, dmgSuper1:
		off := int64(res.region-dmgSuper0) * metaBlock
		name = fmt.Sprintf("superblock copy at %d", off)
		flip(off, sbUsed+4)
	}

	// The verdict.
	rep, cerr := Check(d.cache, d.back)
	said := strings.Join(append(append([]string(nil), rep.Problems...), rep.Warnings...), "\n")
	// A journal block off the replayed chain is dead: nothing reads it,
	// and its damage cannot be told from a torn block of an earlier lap.
	if dead := res.region == dmgJournal && !res.chained; !dead && !strings.Contains(said, name) {
		fail("Check (%v) does not name the damaged %s: problems %q, warnings %q", cerr, name, rep.Problems, rep.Warnings)
	}
	c2, oerr := openStill(d.cache, d.back, cfg.opts)
	mustOpen := res.region == dmgOlderCkpt || res.region == dmgSuper0 || res.region == dmgSuper1 ||
		res.region == dmgJournal && !res.chained || res.region == dmgNewestCkpt && res.closed
	if oerr != nil {
		res.refused = true
		switch {
		case !errors.Is(oerr, ErrCorrupt) || !errors.Is(cerr, ErrCorrupt):
			fail("Open: %v; Check: %v; want ErrCorrupt from both", oerr, cerr)
		case !strings.Contains(strings.Join(rep.Problems, "\n"), name):
			fail("Open refused (%v), but Check's problems do not name the damaged %s: %q", oerr, name, rep.Problems)
		case mustOpen:
			fail("Open refused over damage that loses nothing (%s): %v", name, oerr)
		}
		return res
	}
	if res.region == dmgJournal && res.chained {
		fail("opened over damaged %s, below the durable frontier", name)
	}
	buf := make([]byte, 64<<10)
	for off := int64(0); off < cfg.back; off += int64(len(buf)) {
		if err := c2.ReadAt(buf, off); err != nil {
			fail("read at %d: %v", off, err)
			break
		}
		for i := int64(0); i < int64(len(buf)); i += sectorSize {
			s := (off + i) / sectorSize
			id, err := sectorID(buf[i:i+sectorSize], s)
			if err != nil {
				fail("opened over damaged %s: %v", name, err)
			} else if a := o.allowedAfterCrash(s); !contains(a, id) {
				fail("opened over damaged %s: sector %d holds write %d; allowed %v", name, s, id, a)
			}
		}
	}
	if err := c2.Close(); err != nil {
		fail("close after the damage: %v", err)
	}
	if rep, err := Check(d.cache, d.back); err != nil || len(rep.Warnings) > 0 {
		fail("check after reopening over damaged %s: %v, warnings %q", name, err, rep.Warnings)
	}
	return res
}

// TestMetadataDamage is issue 14's "metadata damage, not just torn
// tails": bytes flipped in each checkpoint slot, in journal blocks below
// the durable frontier and in each superblock copy, after seeded
// workloads on a tiny cache (so that buckets are emptied and reused). See
// runDamage for what must hold.
func TestMetadataDamage(t *testing.T) {
	n := *flagDamages
	if n <= 0 {
		n = 300
		if testing.Short() {
			n = 60
		}
	}
	master := testseed.Get(t)
	var opened, refused [dmgRegions + 1]int // + dead journal blocks
	reused := 0
	for i := range n {
		seed := master
		if i > 0 {
			seed = mix(master, 0xda3a6e, uint64(i))
		}
		res := runDamage(seed)
		if len(res.violations) > 0 {
			t.Fatalf("iteration %d, %s damaged (closed %v; seed %d; replay: go test ./cache -run '^TestMetadataDamage$' -seed %d -damages 1):\n%s",
				i, dmgNames[res.region], res.closed, seed, seed, strings.Join(res.violations, "\n"))
		}
		k := res.region
		if k == dmgJournal && !res.chained {
			k = dmgRegions
		}
		if res.refused {
			refused[k]++
		} else {
			opened[k]++
		}
		if res.reused {
			reused++
		}
	}
	names := append(dmgNames[:], "dead journal block")
	for k, name := range names {
		t.Logf("%-19s opened intact %4d, refused %4d", name+":", opened[k], refused[k])
	}
	t.Logf("%d of %d runs ended with a reused bucket holding data", reused, n)
}
