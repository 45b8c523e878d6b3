package cache

// checkpoint.go: writing the index to a checkpoint slot, which lets the
// journal ring move on and the emptied buckets become free; and, at
// Open, choosing the checkpoint to recover from (recover.go replays the
// journal after it).

import (
	"errors"
	"fmt"
	"log/slog"

	"github.com/nbdcache/nbdcache/storage"
)

// Checkpoint writes the index to the checkpoint slot not holding the newest
// checkpoint; once it is durable, the journal before it is never replayed
// again and the buckets emptied before it become free.
func (c *Cache) Checkpoint() error { return c.checkpointIf(nil, true) }

// checkpointIf writes a checkpoint if need (nil: always), evaluated once
// this caller is the only checkpointer, still holds: callers that pile up
// behind a running checkpoint do not write another one for nothing. With
// wait false it returns at once when a checkpoint is already running.
func (c *Cache) checkpointIf(need func() bool, wait bool) error {
	if wait {
		c.ckpt.Lock()
	} else if !c.ckpt.TryLock() {
		return nil
	}
	defer c.ckpt.Unlock()
	if need != nil && !need() {
		c.stats.checkpointsSkipped.Add(1)
		return nil
	}
	return c.checkpointLocked(false)
}

// checkpointLocked writes one checkpoint; ckpt is held. Writes go on
// meanwhile: only the snapshot holds mu.
//
//  1. Under mu: seal the open block; the index, the bucket generations and
//     the pending list at this instant are exactly the effect of the
//     journal before the next block, JSeq. The chain goes on (Seed is the
//     crc of block JSeq-1), so the ring stays replayable from the older
//     checkpoint until this one is durable; with reseed (only while
//     nothing else runs: Open) it starts afresh from a random seed.
//  2. Commit: every block before JSeq, and the data of every extent in the
//     snapshot, is durable (one sync, often shared).
//  3. Write the slot not holding the durable checkpoint; sync.
//  4. Under mu: the ring starts at JSeq; the buckets pending at the
//     snapshot are free (no extent of the snapshot, and no record from
//     JSeq on, refers to their old contents).
//
// The ring cannot overrun the older checkpoint's blocks meanwhile: enter
// keeps the operations in flight within the free slots.
func (c *Cache) checkpointLocked(reseed bool) error {
	c.mu.Lock()
	if c.mu.failed != nil {
		err := c.mu.failed
		c.mu.Unlock()
		return err
	}
	c.sealLocked()
	next := int64(c.mu.idx.Len())
	if next > c.maxExtents() {
		c.mu.Unlock()
		return fmt.Errorf("%w: %d extents, checkpoint holds %d", ErrCorrupt, next, c.maxExtents())
	}
	h := &ckptHeader{Seq: c.mu.ckptSeq + 1, JSeq: c.mu.j.nextSeq, JPos: c.mu.j.head, Seed: c.mu.j.prev,
		NBuckets: uint32(len(c.mu.space.buckets)), NextVer: c.mu.nextVer, NExt: uint64(next)}
	if reseed {
		h.Seed = randSeed()
		c.mu.j.prev = h.Seed
	}
	buf := c.ckpt.buf[:0]
	buf = append(buf, make([]byte, ckptHdrSize)...)
	buf = appendCkptGens(buf, len(c.mu.space.buckets), func(i int) uint8 { return c.mu.space.buckets[i].gen })
	c.mu.idx.Ascend(0, func(e btreeExtent) bool {
		buf = appendCkptExtent(buf, ckptExtent{Off: e.Off, Len: e.Len, Loc: e.Loc, Ver: e.Ver, Gen: e.Gen, Dirty: e.Dirty})
		return true
	})
	slot := 1 - c.mu.ckptSlot
	npend := len(c.mu.space.pending)
	c.mu.Unlock()
	c.ckpt.buf = buf

	if err := c.commit(); err != nil {
		return err
	}
	h.BodyCRC = crcSalted(c.sb.salt(), buf[ckptHdrSize:])
	copy(buf, encodeCkptHeader(c.sb.salt(), h))
	if err := c.dev.WriteAt(buf, c.sb.CkptOff+int64(slot)*c.sb.CkptSize, 0); err != nil {
		return c.checkpointFailed(fmt.Errorf("write checkpoint: %w", err))
	}
	if c.test.brk != breakNoSync {
		if err := c.dev.Flush(); err != nil {
			return c.checkpointFailed(fmt.Errorf("sync checkpoint: %w", err))
		}
	}

	c.mu.Lock()
	if c.tracing() {
		c.tracef(-1, 0, "checkpoint %d durable (JSeq %d)", h.Seq, h.JSeq)
	}
	c.mu.ckptSeq, c.mu.ckptSlot = h.Seq, slot
	c.mu.j.startSeq = h.JSeq
	c.mu.space.freePending(npend)
	c.mu.Unlock()
	c.stats.checkpoints.Add(1)
	c.stats.checkpointBytes.Add(int64(len(buf)))
	return nil
}

// checkpointFailed makes a failed checkpoint write or sync sticky, as a
// journal one is: the slot may be torn, the ring cannot move past the
// older checkpoint, and the buckets pending can never be freed, so writers
// that wait for room or retry a checkpoint would wait or spin for ever.
func (c *Cache) checkpointFailed(err error) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.failLocked("checkpoint", err)
	return c.mu.failed
}

// fitIndex makes a recovered index fit a checkpoint slot. Replay can
// rebuild more extents than the running cache ever held (records dropped
// from an unsynced tail leave older, more fragmented extents in place).
// Then clean extents are dropped, and if that is not enough, the dirty
// data is written back, the backing flushed, and it is dropped too. The
// checkpoint Open writes next makes that durable; a crash before it
// replays the same journal again.
func (c *Cache) fitIndex() error {
	idx := c.mu.idx
	if int64(idx.Len()) <= c.maxExtents() {
		return nil
	}
	c.log.Warn("cache: the recovered index exceeds a checkpoint; dropping clean extents", "extents", idx.Len(), "capacity", c.maxExtents())
	var clean, dirty []btreeExtent
	idx.Ascend(0, func(e btreeExtent) bool {
		if e.Dirty {
			dirty = append(dirty, e)
		} else {
			clean = append(clean, e)
		}
		return true
	})
	for _, e := range clean {
		idx.Delete(e.Off, e.Len, c.droppedLocked)
	}
	// No record carries these deletions: the checkpoint Open writes next
	// makes them durable, before any backing write.
	c.mu.j.dropClean = false
	if int64(idx.Len()) <= c.maxExtents() {
		return nil
	}
	c.log.Warn("cache: the recovered index still exceeds a checkpoint; writing back every dirty extent", "dirty_extents", len(dirty))
	for _, e := range dirty {
		p := make([]byte, e.Len)
		if err := c.dev.ReadAt(p, e.Loc); err != nil {
			return fmt.Errorf("cache: write back to fit the index: %w", err)
		}
		if err := c.back.WriteAt(p, e.Off, 0); err != nil {
			return fmt.Errorf("cache: write back to fit the index: %w", err)
		}
	}
	if err := c.flushBacking(); err != nil {
		return fmt.Errorf("cache: write back to fit the index: %w", err)
	}
	for _, e := range dirty {
		idx.Delete(e.Off, e.Len, c.droppedLocked)
	}
	return nil
}

// readCheckpoint reads and decodes slot i. Its errors do not name the
// slot; the caller does.
func readCheckpoint(dev storage.Device, sb *superblock, salt uint32, i int) (*checkpoint, error) {
	off := sb.CkptOff + int64(i)*sb.CkptSize
	hb := make([]byte, ckptHdrSize)
	if err := dev.ReadAt(hb, off); err != nil {
		return nil, err
	}
	h, err := decodeCkptHeader(salt, hb)
	if err != nil {
		return nil, err
	}
	if int64(h.NBuckets) != sb.NBuckets || ckptHdrSize+h.bodyLen() > sb.CkptSize ||
		h.JPos >= sb.journalSlots() {
		return nil, fmt.Errorf("%w: checkpoint header does not fit the superblock", ErrCorrupt)
	}
	body := make([]byte, h.bodyLen())
	if err := dev.ReadAt(body, off+ckptHdrSize); err != nil {
		return nil, err
	}
	return decodeCkptBody(salt, h, body)
}

// ckptSlot is what one checkpoint slot holds: a valid checkpoint, nothing
// yet (unused), or neither (err says why).
type ckptSlot struct {
	ck     *checkpoint
	err    error // not valid: wraps ErrCorrupt
	unused bool  // never written: see readCheckpointSlots
}

// readCheckpointSlots reads both checkpoint slots. A slot is unused, rather
// than invalid, when its first block is all zeroes and the other slot holds
// checkpoint 1: that is slot 1 of a cache not opened since Format (which
// writes checkpoint 1 to slot 0 and zeroes slot 1), or whose first Open
// died before its checkpoint reached the slot. Checkpoints alternate
// between the slots, so once checkpoint 2 was written no slot is ever
// zeroes again. The error is a device error; damage is in the slots.
func readCheckpointSlots(dev storage.Device, sb *superblock, salt uint32) ([2]ckptSlot, error) {
	var sl [2]ckptSlot
	for i := range sl {
		ck, err := readCheckpoint(dev, sb, salt, i)
		if err != nil && !errors.Is(err, ErrCorrupt) {
			return sl, fmt.Errorf("cache: read checkpoint slot %d: %w", i, err)
		}
		sl[i].ck, sl[i].err = ck, err
	}
	for i := range sl {
		if sl[i].ck != nil || sl[1-i].ck == nil || sl[1-i].ck.Seq != 1 {
			continue
		}
		b := make([]byte, metaBlock)
		if err := dev.ReadAt(b, sb.CkptOff+int64(i)*sb.CkptSize); err != nil {
			return sl, fmt.Errorf("cache: read checkpoint slot %d: %w", i, err)
		}
		sl[i].unused = allZero(b)
	}
	return sl, nil
}

func allZero(b []byte) bool {
	for _, v := range b {
		if v != 0 {
			return false
		}
	}
	return true
}

// newerCheckpointProof looks in the whole journal ring for a valid block
// written when a checkpoint newer than seq was durable (its ckpt field).
// Such a block proves that checkpoint seq is not the newest durable one:
// the newer one was damaged after it was synced. It returns what it found
// ("" for nothing).
func newerCheckpointProof(dev storage.Device, sb *superblock, salt uint32, seq uint64) (string, error) {
	const chunk = 256 // blocks per read
	slots := sb.journalSlots()
	buf := make([]byte, chunk*metaBlock)
	for first := int64(0); first < slots; first += chunk {
		n := min(chunk, slots-first)
		if err := dev.ReadAt(buf[:n*metaBlock], sb.JournalOff+first*metaBlock); err != nil {
			return "", fmt.Errorf("cache: read journal slots %d-%d: %w", first, first+n-1, err)
		}
		for i := range n {
			jb, err := decodeJBlock(salt, buf[i*metaBlock:(i+1)*metaBlock])
			if err == nil && jb.Ckpt > seq {
				return fmt.Sprintf("journal block %d (slot %d) was written when checkpoint %d was durable", jb.Seq, first+i, jb.Ckpt), nil
			}
		}
	}
	return "", nil
}

// pickCheckpoint chooses the checkpoint to recover from: the newest valid
// one. When the other slot is invalid (not unused), that is either a
// checkpoint write torn by a power cut or damaged older checkpoint, and
// recovery goes on with a warning, or a newer checkpoint that was durable
// and has been damaged since: then the journal may have moved on past the
// loaded one, buckets it freed may hold new data, and recovering from the
// older one would lose flushed writes. A journal block that says a newer
// checkpoint was durable tells the two apart: then it is ErrCorrupt.
func pickCheckpoint(dev storage.Device, sb *superblock, salt uint32, st *state, log *slog.Logger) (*checkpoint, error) {
	sl, err := readCheckpointSlots(dev, sb, salt)
	if err != nil {
		return nil, err
	}
	var ck *checkpoint
	for i, s := range sl {
		if s.ck != nil && (ck == nil || s.ck.Seq > ck.Seq) {
			ck, st.ckptSlot = s.ck, i
		}
	}
	if ck == nil {
		return nil, fmt.Errorf("%w: no valid checkpoint: slot 0: %v; slot 1: %v", ErrCorrupt, sl[0].err, sl[1].err)
	}
	o := 1 - st.ckptSlot
	if other := sl[o]; other.ck == nil && !other.unused {
		proof, err := newerCheckpointProof(dev, sb, salt, ck.Seq)
		if err != nil {
			return nil, err
		}
		if proof != "" {
			return nil, fmt.Errorf("%w: checkpoint slot %d is damaged (%v), and %s: checkpoint %d in slot %d is not the newest durable one, and recovering from it would lose the writes made since",
				ErrCorrupt, o, other.err, proof, ck.Seq, st.ckptSlot)
		}
		w := fmt.Sprintf("checkpoint slot %d is invalid (%v); recovered from slot %d (checkpoint %d); no journal block proves a newer checkpoint was durable (a checkpoint write torn by a power cut, or damage to the older one)",
			o, other.err, st.ckptSlot, ck.Seq)
		st.warnings = append(st.warnings, w)
		st.otherBad = fmt.Sprintf("checkpoint slot %d is invalid (%v)", o, other.err)
		log.Warn("cache: "+w, "slot", o, "err", other.err)
	}
	return ck, nil
}
