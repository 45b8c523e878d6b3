package cache

// recover.go: recovery: loading the newest checkpoint, replaying the journal
// after it (loadState), and telling a torn tail from corruption.

import (
	"errors"
	"fmt"
	"hash/crc32"
	"log/slog"
	"math/rand/v2"
	"sort"

	"github.com/nbdcache/nbdcache/btreeidx"
	"github.com/nbdcache/nbdcache/storage"
)

func crcSalted(salt uint32, p []byte) uint32 { return crc32.Update(salt, castagnoli(), p) }

func randSeed() uint32 { return rand.Uint32() }

// state is what recovery rebuilds: the index and bucket table as of the end
// of the valid journal.
type state struct {
	idx      *btreeidx.Index
	buckets  []bucket
	nextVer  uint64
	jseq     uint64 // seq of the next journal block
	jpos     int64  // its ring slot
	jprev    uint32 // chain value it must carry
	ckptSeq  uint64
	ckptSlot int
	replayed int64 // records applied
	dropped  int64 // records dropped (data checksum, stale generation)
	blocks   int64 // journal blocks replayed
	stopWhy  string
	problems []string // structural problems (Check reports them)
	warnings []string // states a power cut leaves legitimately (Check lists them)
	// otherBad says why the slot not loaded is invalid ("" when it is
	// valid or unused): the likely home of a lost checkpoint.
	otherBad string
}

// genOK reports whether every bucket under [loc, loc+n) has generation gen.
func genOK(sb *superblock, gens func(int64) uint8, loc, n int64, gen uint8) bool {
	ok := true
	sb.forBuckets(loc, n, func(b, _, _ int64) {
		if gens(b) != gen {
			ok = false
		}
	})
	return ok
}

// loadState runs recovery without changing the device: the newest valid
// checkpoint (pickCheckpoint: ErrCorrupt when a newer one is proven lost),
// then the journal from there until the first block that fails its
// checksum, sequence or chain. Insert and replace records whose data
// fails its checksum are dropped (that data never became durable); a
// record of another bucket generation than the checkpoint's is ErrCorrupt.
// With full (Check), the data of records in blocks known durable is tested
// too.
func loadState(dev storage.Device, sb *superblock, brk breakMode, log *slog.Logger, full bool) (*state, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	salt := sb.salt()
	st := &state{}
	ck, err := pickCheckpoint(dev, sb, salt, st, log)
	if err != nil {
		return nil, err
	}
	st.ckptSeq = ck.Seq
	st.nextVer = max(ck.NextVer, 1)
	if testReplayTrace != nil {
		testReplayTrace(-1, 0, fmt.Sprintf("recovery from checkpoint %d (slot %d, JSeq %d)", ck.Seq, st.ckptSlot, ck.JSeq))
		for _, e := range ck.Ext {
			testReplayTrace(e.Off, e.Len, fmt.Sprintf("  checkpoint extent [%d+%d)@%d v%d dirty=%v", e.Off, e.Len, e.Loc, e.Ver, e.Dirty))
		}
	}
	gens := append([]uint8(nil), ck.Gens...)
	genOf := func(b int64) uint8 { return gens[b] }
	st.idx = btreeidx.New()
	for i, e := range ck.Ext {
		if !sb.inData(e.Loc, e.Len) || e.Off+e.Len > sb.BackingSize {
			return nil, fmt.Errorf("%w: checkpoint %d extent %d [%d+%d)@%d outside the device", ErrCorrupt, ck.Seq, i, e.Off, e.Len, e.Loc)
		}
		if !genOK(sb, genOf, e.Loc, e.Len, e.Gen) {
			return nil, fmt.Errorf("%w: checkpoint %d extent %d [%d+%d)@%d has generation %d, bucket has another", ErrCorrupt, ck.Seq, i, e.Off, e.Len, e.Loc, e.Gen)
		}
		st.idx.Insert(btreeidx.Extent{Off: e.Off, Len: e.Len, Loc: e.Loc, Ver: e.Ver, Gen: e.Gen, Dirty: e.Dirty}, nil)
		st.nextVer = max(st.nextVer, e.Ver+1)
	}

	// Journal replay, in two passes over the valid journal. The first
	// finds the durable frontier: the blocks below it were synced, and so
	// was the data of their records, written before the records were. The
	// second applies the records, and reads the data of an insert or
	// replace record to test its checksum only beyond the frontier, where
	// the data may never have reached the disk (or, when full, in every
	// block: there a mismatch is damage, and a problem).
	var frontier uint64
	if _, err := walkJournal(dev, sb, salt, ck, func(jb *jblock) { frontier = max(frontier, jb.Durable) }); err != nil {
		return nil, err
	}
	var seq uint64
	var genErr error  // the first record of another generation
	var readErr error // the first record whose data could not be read
	verify := func(r *record) bool {
		if !sb.inData(r.Loc, r.Len) || sb.bucketOf(r.Loc) != sb.bucketOf(r.Loc+r.Len-1) || r.Off+r.Len > sb.BackingSize {
			st.problems = append(st.problems, fmt.Sprintf("journal block %d: record [%d+%d)@%d outside the device", seq, r.Off, r.Len, r.Loc))
			return false
		}
		if b := sb.bucketOf(r.Loc); gens[b] != r.Gen {
			// Buckets are reused only after a checkpoint that no longer
			// refers to them is durable, so replay from the newest
			// durable checkpoint never meets another generation: that
			// checkpoint is lost, and the record is a flushed write.
			if genErr == nil {
				lost := "is lost"
				if st.otherBad != "" {
					lost = "is lost: " + st.otherBad
				}
				genErr = fmt.Errorf("%w: journal block %d: record [%d+%d)@%d has generation %d of bucket %d, but checkpoint %d (slot %d) gives it generation %d: the bucket was reused after a newer checkpoint than the one loaded, which %s; the write would be dropped",
					ErrCorrupt, seq, r.Off, r.Len, r.Loc, r.Gen, b, ck.Seq, st.ckptSlot, gens[b], lost)
			}
			return false
		}
		durable := seq < frontier
		if brk == breakNoDataCRC || durable && !full {
			return true
		}
		data := make([]byte, r.Len)
		if err := dev.ReadAt(data, r.Loc); err != nil {
			// The device failed, not the data: dropping the record
			// could lose a flushed write without a word.
			if readErr == nil {
				readErr = fmt.Errorf("cache: read the data of journal block %d's record [%d+%d)@%d: %w", seq, r.Off, r.Len, r.Loc, err)
			}
			return false
		}
		if crc(data) == r.CRC {
			return true
		}
		if durable {
			st.problems = append(st.problems, fmt.Sprintf("journal block %d (durable): the data of record [%d+%d)@%d fails its checksum", seq, r.Off, r.Len, r.Loc))
		}
		return false
	}
	end, err := walkJournal(dev, sb, salt, ck, func(jb *jblock) {
		seq = jb.Seq
		for _, r := range jb.Recs {
			if testReplayTrace != nil {
				testReplayTrace(r.Off, r.Len, fmt.Sprintf("replay block %d (frontier %d): %s [%d+%d)@%d v%d dirty=%v", seq, frontier, recName(r.Type), r.Off, r.Len, r.Loc, r.Ver, r.Dirty))
			}
			if r.Off+r.Len > sb.BackingSize {
				st.problems = append(st.problems, fmt.Sprintf("journal block %d: record [%d+%d) beyond the backing", seq, r.Off, r.Len))
				st.dropped++
				continue
			}
			switch r.Type {
			case recInsert:
				if !verify(&r) {
					st.dropped++
					if testReplayTrace != nil {
						testReplayTrace(r.Off, r.Len, "  dropped")
					}
					continue
				}
				st.idx.Insert(btreeidx.Extent{Off: r.Off, Len: r.Len, Loc: r.Loc, Ver: r.Ver, Gen: r.Gen, Dirty: r.Dirty}, nil)
			case recDelete:
				st.idx.Delete(r.Off, r.Len, nil)
			case recClean:
				st.idx.MarkClean(r.Off, r.Len, r.Ver)
			case recReplace:
				if !verify(&r) {
					st.dropped++
					if testReplayTrace != nil {
						testReplayTrace(r.Off, r.Len, "  dropped")
					}
					continue
				}
				st.idx.Replace(r.Off, r.Len, r.Ver, r.Loc, r.Gen)
			}
			st.replayed++
			st.nextVer = max(st.nextVer, r.Ver+1)
		}
	})
	if err != nil {
		return nil, err
	}
	if genErr != nil {
		return nil, genErr
	}
	if readErr != nil {
		return nil, readErr
	}
	st.blocks, st.stopWhy = end.blocks, end.stopWhy
	st.jseq, st.jpos, st.jprev = end.seq, end.pos, end.prev
	if st.stopWhy != "" {
		if err := durableAfterStop(dev, sb, salt, end.seq, end.pos, st.stopWhy); err != nil {
			return nil, err
		}
	}

	// Buckets: generations from the checkpoint, live bytes from the index.
	st.buckets = make([]bucket, sb.NBuckets)
	for b := range st.buckets {
		st.buckets[b].gen = gens[b]
	}
	var bad []btreeidx.Extent
	st.idx.Ascend(0, func(e btreeidx.Extent) bool {
		if !sb.inData(e.Loc, e.Len) || !genOK(sb, genOf, e.Loc, e.Len, e.Gen) {
			bad = append(bad, e)
			return true
		}
		sb.forBuckets(e.Loc, e.Len, func(b, loc, n int64) { st.buckets[b].account(e.Off+loc-e.Loc, n, e.Dirty, 1) })
		return true
	})
	for _, e := range bad {
		st.problems = append(st.problems, fmt.Sprintf("extent %v points at a bucket of another generation", e))
		log.Error("cache: dropping an extent with a stale generation", "extent", e.String())
		st.idx.Delete(e.Off, e.Len, nil)
	}
	if err := st.idx.Check(); err != nil {
		return nil, fmt.Errorf("%w: index after replay: %w", ErrCorrupt, err)
	}
	return st, nil
}

// journalEnd is where a walk of the journal stopped.
type journalEnd struct {
	seq     uint64 // the block that failed, the next to write
	pos     int64  // its slot
	prev    uint32 // the chain value it must carry
	blocks  int64  // valid blocks walked
	stopWhy string
}

// walkJournal calls fn for each valid journal block after checkpoint ck, in
// order, until the first that fails its checksum, sequence or chain: the
// end of the journal, which stopWhy describes. A block on the chain that
// was written when a newer checkpoint than ck was durable is ErrCorrupt
// (ck is not the newest durable checkpoint).
func walkJournal(dev storage.Device, sb *superblock, salt uint32, ck *checkpoint, fn func(*jblock)) (journalEnd, error) {
	slots := sb.journalSlots()
	e := journalEnd{seq: ck.JSeq, pos: ck.JPos, prev: ck.Seed}
	blk := make([]byte, metaBlock)
	for n := int64(0); n < slots; n++ {
		if err := dev.ReadAt(blk, sb.JournalOff+e.pos*metaBlock); err != nil {
			return e, fmt.Errorf("cache: read journal slot %d: %w", e.pos, err)
		}
		jb, err := decodeJBlock(salt, blk)
		if err != nil {
			e.stopWhy = stopReason(e.pos, e.seq, blk, err)
			break
		}
		if jb.Seq != e.seq || jb.Prev != e.prev {
			switch {
			case jb.Seq < e.seq:
				e.stopWhy = fmt.Sprintf("slot %d holds block %d, of an earlier lap of the ring (block %d would be next)", e.pos, jb.Seq, e.seq)
			case jb.Seq == e.seq:
				e.stopWhy = fmt.Sprintf("slot %d holds block %d of another chain (prev %08x, want %08x): an earlier life of the journal", e.pos, jb.Seq, jb.Prev, e.prev)
			default:
				e.stopWhy = fmt.Sprintf("slot %d holds block %d, want block %d", e.pos, jb.Seq, e.seq)
			}
			break
		}
		if jb.Ckpt > ck.Seq {
			return e, fmt.Errorf("%w: journal block %d (slot %d) was written when checkpoint %d was durable, but the newest valid checkpoint is %d: a newer one is lost",
				ErrCorrupt, jb.Seq, e.pos, jb.Ckpt, ck.Seq)
		}
		fn(jb)
		e.blocks++
		e.prev = jb.CRC
		e.seq++
		e.pos = (e.pos + 1) % slots
	}
	return e, nil
}

// stopReason says why the journal ends at slot pos (block seq), whose
// bytes blk failed to decode with err: never written, torn, or damaged.
// Which of the last two, only the blocks after it can tell
// (durableAfterStop).
func stopReason(pos int64, seq uint64, blk []byte, err error) string {
	switch {
	case allZero(blk):
		return fmt.Sprintf("slot %d (block %d) is empty: never written", pos, seq)
	case errors.Is(err, errJBlockMagic):
		return fmt.Sprintf("slot %d (block %d) holds no journal block", pos, seq)
	case errors.Is(err, errJBlockChecksum):
		return fmt.Sprintf("slot %d (block %d) fails its checksum: a torn write, or a block of an earlier format", pos, seq)
	}
	return fmt.Sprintf("slot %d (block %d) is not a valid block: %v", pos, seq, err)
}

// overlapsLoc reports the first pair of extents that share cache space.
func overlapsLoc(idx *btreeidx.Index) (a, b btreeidx.Extent, found bool) {
	var all []btreeidx.Extent
	idx.Ascend(0, func(e btreeidx.Extent) bool { all = append(all, e); return true })
	sort.Slice(all, func(i, j int) bool { return all[i].Loc < all[j].Loc })
	for i := 1; i < len(all); i++ {
		if all[i].Loc < all[i-1].Loc+all[i-1].Len {
			return all[i-1], all[i], true
		}
	}
	return a, b, false
}

// corruptScan bounds how many ring slots past the end of the replay
// durableAfterStop reads.
const corruptScan = 256

// durableAfterStop tells a torn tail from corruption. Replay stopped at
// block seq (slot pos). That is the end of the journal when the block was
// never durable: a power cut may drop or tear any block not yet synced,
// and blocks after it with it. But if a valid block after it says that,
// when it was written, every block up to seq or beyond was durable, then
// block seq was durable and has been damaged since, and the flushed
// writes recorded from it on would be lost without a word: that is
// corruption (ErrCorrupt). The scan ends at a block of an earlier lap of
// the ring (a lower sequence) or after corruptScan slots.
func durableAfterStop(dev storage.Device, sb *superblock, salt uint32, seq uint64, pos int64, why string) error {
	slots := sb.journalSlots()
	blk := make([]byte, metaBlock)
	for k := int64(1); k < min(slots, corruptScan+1); k++ {
		p := (pos + k) % slots
		if err := dev.ReadAt(blk, sb.JournalOff+p*metaBlock); err != nil {
			return fmt.Errorf("cache: read journal slot %d: %w", p, err)
		}
		jb, err := decodeJBlock(salt, blk)
		if err != nil {
			continue // torn or never written: says nothing
		}
		if jb.Seq <= seq {
			return nil // an earlier lap: nothing newer lies beyond
		}
		if jb.Durable > seq {
			return fmt.Errorf("%w: journal block %d (slot %d) is damaged (%s), but block %d (slot %d) was written when every block before %d was durable: the flushed writes recorded from block %d on cannot be replayed",
				ErrCorrupt, seq, pos, why, jb.Seq, p, jb.Durable, seq)
		}
	}
	return nil
}
