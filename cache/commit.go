package cache

// commit.go: the cache's journal writer: records appended under Cache.mu,
// published (written) before a write is acknowledged, committed (synced)
// for FUA and FLUSH, with the backing flushed first where a record
// depends on it.

import (
	"errors"
	"fmt"
	"runtime"

	"github.com/nbdcache/nbdcache/storage"
)

// appendLocked adds r to the open block, sealing it when full.
func (c *Cache) appendLocked(r record) {
	full := c.mu.j.add(r)
	if c.tracing() {
		c.tracef(r.Off, r.Len, "rec#%d %s [%d+%d)@%d v%d dirty=%v gen=%d blk=%d cleanGone=%d", c.mu.j.appended, recName(r.Type), r.Off, r.Len, r.Loc, r.Ver, r.Dirty, r.Gen, c.mu.j.nextSeq, c.mu.j.cleanGone.newest)
	}
	c.stats.journalRecords.Add(1)
	if full {
		c.sealLocked()
	}
}

// sealLocked seals the open block (journal.seal), if it holds records.
func (c *Cache) sealLocked() {
	if c.mu.j.seal(c.sb.salt(), c.sb.journalSlots(), c.mu.ckptSeq) {
		c.stats.journalBlocks.Add(1)
	}
}

// usedSlotsLocked is journal.usedSlots.
func (c *Cache) usedSlotsLocked() int64 { return c.mu.j.usedSlots() }

func (c *Cache) errLocked() error {
	if c.mu.closed {
		return ErrClosed
	}
	return c.mu.failed
}

// commit makes every record appended before the call durable: it seals
// the open block and group-commits (writeJournal). The backing is flushed
// first only if a record depends on a backing write (cleanDep).
func (c *Cache) commit() error { return c.writeJournal(jCommit) }

// commitBacking is commit, and makes every direct backing write completed
// before the call durable too: a client's FLUSH or FUA.
func (c *Cache) commitBacking() error { return c.writeJournal(jCommitBacking) }

// publish makes every record appended before the call visible: written to
// the cache device, open block included, but not synced. A process that
// opens the device after this one was killed replays it, so a write
// published before it is acknowledged survives kill -9 (the page cache
// outlives the process). Only a power cut loses what no FLUSH or FUA
// covered, as the design's contract allows. A filesystem mounted on
// /dev/nbdX across a server restart (attach --reconnect) depends on this:
// it never learns that the server died, so a write it was told had
// completed must still be there.
//
// It yields once first, so that writers completing at the same moment
// append their records and share the write: with fio 4k randwrite at QD32
// through the server, one publish covered six writes, and IOPS rose by
// about a tenth.
func (c *Cache) publish() error {
	runtime.Gosched()
	return c.writeJournal(jPublish)
}

// settleCleanGone makes durable, before a backing write over [off, off+n),
// every record that removed a clean extent (deleted it, or wrote over it)
// there: until then a crash can bring the clean extent back, over backing
// bytes that no longer equal it (goneSet). The commit it may need is
// shared with whatever commit runs.
func (c *Cache) settleCleanGone(off, n int64) error {
	c.mu.Lock()
	need := c.mu.j.cleanGone.pending(off, n, c.mu.j.synced) && c.test.brk != breakNoCleanGone
	c.mu.Unlock()
	if !need {
		return nil
	}
	return c.commit()
}

// ack completes an acknowledged request: a FUA makes it durable, any
// other is published.
func (c *Cache) ack(flags storage.Flags) error {
	defer c.armQuietCommit()
	if flags&storage.FUA != 0 {
		c.stats.fua.Add(1)
		return c.commitBacking()
	}
	return c.publish()
}

// writeJournal is commit or commitBacking (k.sync()) or publish. One journal writer at a
// time (journal.writing) writes every sealed block not yet written, and publish
// also the open block as it is (it stays open; a later write of it, longer,
// goes to the same slot; a block is never rewritten after a sync covered
// it, because commit seals before writing). Waiters whose records it
// covered return with it. A commit then syncs the cache device once
// (journal.syncing), while publishers may write again: the sync covers every
// block written before it began.
//
// The backing is flushed before the blocks are written when a backing
// write may be among the records a commit makes durable, or when a
// record that depends on an unflushed backing write is to be written
// (cleanDep): a clean extent must not outlive, in a crash, the backing
// data it claims to equal, nor the drop of dirty data the backing data
// that superseded it.
func (c *Cache) writeJournal(k jkind) error {
	sync := k.sync()
	c.mu.Lock()
	defer c.mu.Unlock()
	if k.acks() {
		c.mu.j.acked = c.mu.j.appended
	}
	if k == jFlush && c.mu.failed == nil && c.mu.j.flushed() {
		return nil
	}
	if sync {
		c.sealLocked()
	}
	g := c.mu.j.goal()
	for {
		if c.mu.failed != nil {
			return c.mu.failed
		}
		if c.mu.j.reached(g, k) {
			return nil
		}
		if c.mu.j.turnFree(sync) {
			break
		}
		if sync {
			c.stats.commitWaits.Add(1)
		}
		c.mu.j.cond.Wait()
	}
	if sync {
		c.sealLocked() // records appended while we waited ride along
	}
	t := c.mu.j.take(k, c.mu.ckptSeq)
	c.mu.Unlock()

	t.finishOpen(c.sb.salt())
	err := c.writeBlocks(t.blocks, t.needB && !c.backingCovered(t.bNow), sync)

	c.mu.Lock()
	if errors.Is(err, errBackingFlush) {
		// The backing failed its flush (a remote away, a disk error):
		// this commit fails, and its caller with it, but the cache
		// device is fine, so the failure is not sticky.
		c.mu.j.giveBack(&t)
		return err
	}
	c.mu.j.written(&t, err)
	if err == nil && !sync {
		c.stats.publishes.Add(1)
		if c.tracing() {
			c.tracef(-1, 0, "publish: records <=%d visible (open block %d with %d)", t.visible, t.openSeq, t.openN)
		}
	}
	if err != nil || !sync {
		return c.journalDoneLocked(err)
	}
	// The sync: publishers may write meanwhile.
	c.mu.j.cond.Broadcast()
	c.mu.Unlock()
	if t.needSync && c.test.brk != breakNoSync {
		err = c.dev.Flush()
		if err != nil {
			err = fmt.Errorf("sync cache: %w", err)
		}
	}
	c.mu.Lock()
	if c.mu.j.syncDone(&t, err) {
		c.stats.commits.Add(1)
		if c.tracing() {
			c.tracef(-1, 0, "commit: records <=%d durable, blocks <%d, backing flushed %v", t.visible, t.durable, t.needB)
		}
	}
	return c.journalDoneLocked(err)
}

// journalDoneLocked ends a journal writer's turn: a failure is sticky.
func (c *Cache) journalDoneLocked(err error) error {
	if err != nil {
		c.failLocked("journal", err)
	}
	c.mu.j.cond.Broadcast()
	return c.mu.failed
}

// failLocked makes a failed write of the cache's metadata (what, to the
// journal or a checkpoint) sticky: writes are refused from now on, and
// whoever waits for a range or for room gives up. The first failure is the
// one reported.
func (c *Cache) failLocked(what string, err error) {
	if c.mu.failed != nil {
		return
	}
	c.mu.failed = fmt.Errorf("%w: %w", ErrFailed, err)
	c.log.Error("cache: "+what+" write failed; refusing writes", "err", err)
	c.mu.wbCond.Broadcast()
	c.mu.space.cond.Broadcast()
}

// errBackingFlush marks a commit that failed because the backing failed
// its flush, before any journal block was written.
var errBackingFlush = errors.New("cache: flush backing")

// writeBlocks does the I/O of one journal writer's turn before any sync:
// the backing flush if needB, then the blocks.
func (c *Cache) writeBlocks(blocks []sealedBlock, needB, sync bool) error {
	if needB && c.test.brk != breakSkipBFlush {
		if err := c.flushBacking(); err != nil {
			return fmt.Errorf("%w: %w", errBackingFlush, err)
		}
	}
	if len(blocks) == 0 {
		return nil
	}
	if sync && c.test.twoSyncs {
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
	return c.writeJournal(jFlush)
}

// FlushNoWait is Flush when it has nothing to do (storage.NoWaitFlusher):
// every acknowledged write durable, the backing's direct writes flushed.
func (c *Cache) FlushNoWait() bool {
	c.mu.Lock()
	ok := c.errLocked() == nil && c.mu.j.flushed()
	c.mu.Unlock()
	if ok {
		c.stats.flushes.Add(1)
	}
	return ok
}

// backingCovered reports whether a backing flush has covered the first n
// direct backing writes already (one shared with the flusher or GC).
func (c *Cache) backingCovered(n uint64) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.mu.j.bFlushed >= n
}
