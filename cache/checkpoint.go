package cache

// checkpoint.go: writing the index to a checkpoint slot, which lets the
// journal ring move on and the emptied buckets become free.

import "fmt"

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
