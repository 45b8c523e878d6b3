package cache

import (
	"fmt"
)

// appendLocked adds r to the open journal block, sealing it when full.
func (c *Cache) appendLocked(r record) {
	c.mu.jrecs = append(c.mu.jrecs, r)
	c.stats.journalRecords.Add(1)
	if len(c.mu.jrecs) >= jRecsPerBlk {
		c.sealLocked()
	}
}

// sealLocked turns the open block into a sealed block with the next
// sequence number, chained to the block before.
func (c *Cache) sealLocked() {
	if len(c.mu.jrecs) == 0 {
		return
	}
	data, sum := encodeJBlock(c.salt, c.mu.jnextSeq, c.mu.jprev, c.mu.jrecs)
	c.mu.jsealed = append(c.mu.jsealed, sealedBlock{seq: c.mu.jnextSeq, pos: c.mu.jhead, data: data})
	c.mu.jprev = sum
	c.mu.jnextSeq++
	c.mu.jhead = (c.mu.jhead + 1) % c.sb.journalSlots()
	c.mu.jrecs = c.mu.jrecs[:0]
	c.stats.journalBlocks.Add(1)
}

// usedSlotsLocked is the number of ring slots holding blocks the newest
// durable checkpoint does not cover, sealed or not.
func (c *Cache) usedSlotsLocked() int64 {
	return int64(c.mu.jnextSeq-c.mu.jstartSeq) + 1
}

func (c *Cache) errLocked() error {
	if c.mu.closed {
		return ErrClosed
	}
	return c.mu.failed
}

// enter admits an index-changing operation: it holds the gate shared and a
// slot of the semaphore that bounds how many records can be appended
// before the next checkpoint check. It checkpoints first when the journal
// is too full. Every enter is paired with leave.
func (c *Cache) enter() error {
	c.sem <- struct{}{}
	slots := c.sb.journalSlots()
	for {
		c.gate.RLock()
		c.mu.Lock()
		err := c.errLocked()
		need := c.usedSlotsLocked()*100 > slots*int64(c.opts.CheckpointPercent)
		c.mu.Unlock()
		if err != nil {
			c.gate.RUnlock()
			<-c.sem
			return err
		}
		if !need {
			return nil
		}
		c.gate.RUnlock()
		if err := c.checkpoint(); err != nil {
			<-c.sem
			return err
		}
	}
}

func (c *Cache) leave() {
	c.gate.RUnlock()
	<-c.sem
}

// commit makes every record appended before the call durable, and every
// backing write completed before the call: it seals the open block and
// group-commits. One committer at a time writes every sealed block, flushes
// the backing first if a bypass record may be among them, and syncs the
// cache device once; waiters whose records it covered return with it.
func (c *Cache) commit() error {
	c.mu.Lock()
	c.sealLocked()
	target, bTarget := c.mu.jnextSeq, c.mu.bWrites
	for {
		if c.mu.failed != nil {
			err := c.mu.failed
			c.mu.Unlock()
			return err
		}
		if c.mu.jdurable >= target && c.mu.bFlushed >= bTarget {
			c.mu.Unlock()
			return nil
		}
		if !c.mu.committing {
			break
		}
		c.stats.commitWaits.Add(1)
		c.mu.commitCond.Wait()
	}
	c.mu.committing = true
	// Seal again: records appended while we waited ride along.
	c.sealLocked()
	blocks := c.mu.jsealed
	c.mu.jsealed = nil
	durable, bNow := c.mu.jnextSeq, c.mu.bWrites
	needB := bNow > c.mu.bFlushed
	c.mu.Unlock()

	err := c.writeCommit(blocks, needB)

	c.mu.Lock()
	c.mu.committing = false
	if err != nil {
		c.mu.failed = fmt.Errorf("%w: %w", ErrFailed, err)
		c.log.Error("cache: journal commit failed; refusing writes", "err", err)
	} else {
		c.mu.jdurable = durable
		if needB {
			c.mu.bFlushed = bNow
		}
	}
	c.mu.commitCond.Broadcast()
	err = c.mu.failed
	c.mu.Unlock()
	return err
}

// writeCommit does the I/O of one group commit.
func (c *Cache) writeCommit(blocks []sealedBlock, needB bool) error {
	if needB && c.opts.testBreak != breakSkipBFlush {
		if err := c.back.Flush(); err != nil {
			return fmt.Errorf("flush backing: %w", err)
		}
		c.stats.backingFlushes.Add(1)
	}
	if len(blocks) == 0 {
		return nil
	}
	if c.opts.twoSyncs {
		if err := c.dev.Flush(); err != nil {
			return fmt.Errorf("sync data: %w", err)
		}
	}
	// Contiguous runs of the ring go out as one write each.
	for i := 0; i < len(blocks); {
		j := i + 1
		for j < len(blocks) && blocks[j].pos == blocks[j-1].pos+1 {
			j++
		}
		buf := blocks[i].data
		if j-i > 1 {
			buf = make([]byte, 0, (j-i)*metaBlock)
			for _, b := range blocks[i:j] {
				buf = append(buf, b.data...)
			}
		}
		if err := c.dev.WriteAt(buf, c.sb.JournalOff+blocks[i].pos*metaBlock, 0); err != nil {
			return fmt.Errorf("write journal: %w", err)
		}
		i = j
	}
	if c.opts.testBreak != breakNoSync {
		if err := c.dev.Flush(); err != nil {
			return fmt.Errorf("sync cache: %w", err)
		}
	}
	c.stats.commits.Add(1)
	return nil
}

// Flush makes every write acknowledged before it durable: in the cache
// (journal group commit, one sync of the cache device) and, for writes that
// went to the backing, in the backing.
func (c *Cache) Flush() error {
	c.mu.Lock()
	err := c.errLocked()
	c.mu.Unlock()
	if err != nil {
		return err
	}
	c.stats.flushes.Add(1)
	return c.commit()
}

// Checkpoint writes the index to the checkpoint slot not holding the newest
// checkpoint, after which the journal starts over.
func (c *Cache) Checkpoint() error { return c.checkpoint() }

func (c *Cache) checkpoint() error {
	c.ckMu.Lock()
	defer c.ckMu.Unlock()
	c.gate.Lock()
	defer c.gate.Unlock()
	// 1. Everything in the index is durable, data included.
	if err := c.commit(); err != nil {
		return err
	}
	// 2. Snapshot. No record can be appended while we hold the gate.
	c.mu.Lock()
	exts := make([]ckptExtent, 0, c.mu.idx.Len())
	c.mu.idx.Ascend(0, func(e btreeExtent) bool {
		exts = append(exts, ckptExtent{Off: e.Off, Len: e.Len, Loc: e.Loc, Ver: e.Ver, Gen: e.Gen, Dirty: e.Dirty})
		return true
	})
	gens := make([]uint8, len(c.mu.buckets))
	for i := range c.mu.buckets {
		gens[i] = c.mu.buckets[i].gen
	}
	h := &ckptHeader{Seq: c.mu.ckptSeq + 1, JSeq: c.mu.jnextSeq, JPos: c.mu.jhead, Seed: randSeed(),
		NBuckets: uint32(len(gens)), NextVer: c.mu.nextVer, NExt: uint64(len(exts))}
	slot := 1 - c.mu.ckptSlot
	npend := len(c.mu.pending)
	c.mu.Unlock()
	if int64(len(exts)) > c.maxExt {
		return fmt.Errorf("%w: %d extents, checkpoint holds %d", ErrCorrupt, len(exts), c.maxExt)
	}
	// 3. Write and sync the checkpoint.
	body := encodeCkptBody(gens, exts)
	h.BodyCRC = crcSalted(c.salt, body)
	buf := append(encodeCkptHeader(c.salt, h), body...)
	if err := c.dev.WriteAt(buf, c.sb.CkptOff+int64(slot)*c.sb.CkptSize, 0); err != nil {
		return fmt.Errorf("cache: write checkpoint: %w", err)
	}
	if c.opts.testBreak != breakNoSync {
		if err := c.dev.Flush(); err != nil {
			return fmt.Errorf("cache: sync checkpoint: %w", err)
		}
	}
	// 4. The journal restarts after the checkpoint; emptied buckets may be
	// reused, since no durable record refers to their old contents now.
	c.mu.Lock()
	c.mu.ckptSeq, c.mu.ckptSlot = h.Seq, slot
	c.mu.jstartSeq, c.mu.jprev = h.JSeq, h.Seed
	for _, b := range c.mu.pending[:npend] {
		c.mu.buckets[b].state = bFree
		c.mu.free = append(c.mu.free, b)
	}
	c.mu.pending = append(c.mu.pending[:0], c.mu.pending[npend:]...)
	c.mu.spaceCond.Broadcast()
	c.mu.Unlock()
	c.stats.checkpoints.Add(1)
	c.stats.checkpointBytes.Add(int64(len(buf)))
	return nil
}
