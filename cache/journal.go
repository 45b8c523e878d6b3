package cache

// journal.go: the journal's state (journal) and its writer: records are
// appended to an open block under Cache.mu, blocks are sealed into a ring
// of slots, and one writer at a time (the turn) publishes or commits them.

import (
	"errors"
	"fmt"
	"runtime"
	"slices"
	"sync"

	"github.com/nbdcache/nbdcache/storage"
)

// journal is the journal's state, Cache.mu.j. Cache.mu guards every field
// but turn, which belongs to the goroutine holding the writer's turn
// (writing), outside the lock.
//
// Invariants, under Cache.mu:
//   - open holds n records (n < jRecsPerBlk); its header is written when
//     it is sealed or published. Sealed blocks wait in sealed, in
//     sequence order, until a writer's turn writes them; nextSeq is the
//     sequence the open block will get and head its ring slot; prev is the
//     chain value (crc) of the last sealed block.
//   - startSeq <= durable <= nextSeq: the ring holds the blocks from
//     startSeq (the first the durable checkpoint does not cover) on, and
//     every block before durable is synced. synced <= visible <= appended
//     count records: written to the device and synced, written, appended.
//   - bFlushed <= bWrites: direct backing writes done, and of them those a
//     backing flush has covered. cleanDep is the last record appended that
//     depends on a backing write not flushed when it was appended;
//     cleanGone, where records that removed a clean extent lie (goneSet).
//     dropClean marks the index change being journaled as one such.
//   - At most one writer's turn (writing) at a time, and at most one sync
//     of the cache device (syncing); cond is signalled when either ends.
type journal struct {
	open      []byte // the open block: n records encoded, header not yet
	n         int
	sealed    []sealedBlock
	nextSeq   uint64 // seq the next sealed block gets
	prev      uint32 // chain value of the last sealed block
	head      int64  // ring slot of the next sealed block
	startSeq  uint64 // first block after the durable checkpoint
	durable   uint64 // every block with seq < durable is durable
	appended  uint64 // records appended since Open
	visible   uint64 // records written to the device (not all synced)
	synced    uint64 // every record appended before this count is durable
	cleanDep  uint64 // appended after the last record that depends on an unflushed backing write (a clean insert; directOver's drop of the dirty data it superseded)
	cleanGone goneSet
	dropClean bool // the index change being journaled removed a clean extent
	writing   bool // a journal writer holds the turn (writeJournal)
	syncing   bool // a commit is syncing the cache device
	cond      sync.Cond

	bWrites, bFlushed uint64 // backing writes done / covered by a flush

	// turn is the writer's own buffers, used only by the goroutine that
	// holds the turn: the blocks of the turn, and the copy of the open
	// block that a publish writes.
	turn struct {
		batch []sealedBlock
		pub   []byte
	}
}

// init makes j the journal of a ring that goes on after block seq-1 (at
// slot pos, with chain value prev), guarded by mu.
func (j *journal) init(mu *sync.Mutex, seq uint64, pos int64, prev uint32) {
	j.nextSeq, j.head, j.prev, j.startSeq, j.durable = seq, pos, prev, seq, seq
	j.open, j.turn.pub = make([]byte, metaBlock), make([]byte, metaBlock)
	j.cond.L = mu
}

// add encodes r into the open block and reports whether the block is full.
func (j *journal) add(r record) (full bool) {
	r.encode(j.open[jHdrSize+j.n*jRecSize:])
	j.n++
	j.appended++
	if r.Type == recInsert && !r.Dirty && j.backingUnflushed() {
		j.cleanDep = j.appended
	}
	if j.dropClean {
		j.cleanGone.add(r.Off, r.Len, j.appended)
		j.dropClean = false
	}
	return j.n >= jRecsPerBlk
}

// backingUnflushed reports whether a direct backing write is done that no
// backing flush has covered yet.
func (j *journal) backingUnflushed() bool { return j.bWrites > j.bFlushed }

// seal turns the open block into a sealed block with the next sequence
// number, chained to the block before; the ring has slots slots, and
// ckptSeq is the durable checkpoint the header names. It reports false
// when the open block is empty.
func (j *journal) seal(salt uint32, slots int64, ckptSeq uint64) bool {
	if j.n == 0 {
		return false
	}
	data := j.open
	sum := finishJBlock(data, salt, j.nextSeq, j.prev, j.n, j.durable, ckptSeq)
	j.sealed = append(j.sealed, sealedBlock{seq: j.nextSeq, pos: j.head, data: data})
	j.prev = sum
	j.nextSeq++
	j.head = (j.head + 1) % slots
	j.open, j.n = make([]byte, metaBlock), 0
	return true
}

// usedSlots is the number of ring slots holding blocks the newest durable
// checkpoint does not cover, sealed or not.
func (j *journal) usedSlots() int64 { return int64(j.nextSeq-j.startSeq) + 1 }

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

// enter admits an index-changing operation. It holds a slot of the
// semaphore that bounds how many admitted operations may still append
// records (each appends at most one record, so at most one journal block).
// When the ring is CheckpointPercent full, the first operation to notice
// writes a checkpoint itself while the others carry on; only when the
// ring is so full that the operations in flight could overflow it does an
// operation wait for a checkpoint (ringFullLocked). Every enter is paired
// with leave.
func (c *Cache) enter() error { return c.enterN(1) }

// enterN is enter for k operations at once (a batch appends up to k
// records), paired with leaveN(k). Batches take their slots one batch at
// a time (ops.batch): two that each held part of what they need could
// wait for each other for ever. k is at most maxBatchSlots, or 1.
func (c *Cache) enterN(k int) error {
	if k == 1 {
		c.ops.sem <- struct{}{}
	} else {
		c.ops.batch.Lock()
		for range k {
			c.ops.sem <- struct{}{}
		}
		c.ops.batch.Unlock()
	}
	triedSoft := false
	for {
		c.mu.Lock()
		err := c.errLocked()
		full, want := c.ringFullLocked(), c.ringWantsCheckpointLocked()
		c.mu.Unlock()
		switch {
		case err != nil:
			c.leaveN(k)
			return err
		case full:
			if err := c.checkpointIf(c.ringFull, true); err != nil {
				c.leaveN(k)
				return err
			}
		case want && !triedSoft:
			triedSoft = true
			if err := c.checkpointIf(c.ringWantsCheckpoint, false); err != nil {
				c.leaveN(k)
				return err
			}
		default:
			return nil
		}
	}
}

func (c *Cache) leave() { c.leaveN(1) }

func (c *Cache) leaveN(k int) {
	for range k {
		<-c.ops.sem
	}
}

// maxBatchSlots is the most slots one batch may hold: half of them, so
// that single operations always find some (0 with a ring of fewer than
// 16 blocks: no batches).
func (c *Cache) maxBatchSlots() int { return cap(c.ops.sem) / 2 }

// ringWantsCheckpointLocked: the ring is CheckpointPercent full.
func (c *Cache) ringWantsCheckpointLocked() bool {
	return c.usedSlotsLocked()*100 > c.sb.journalSlots()*int64(c.opts.CheckpointPercent)
}

// ringFullLocked: admitting one more operation could let the operations
// in flight (at most cap(sem), one record each, each record at most one
// new block) seal a block over a slot the durable checkpoint still needs.
func (c *Cache) ringFullLocked() bool {
	return c.usedSlotsLocked()+int64(cap(c.ops.sem))+1 > c.sb.journalSlots()
}

func (c *Cache) ringWantsCheckpoint() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.ringWantsCheckpointLocked()
}

func (c *Cache) ringFull() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.ringFullLocked()
}

// commit makes every record appended before the call durable, and every
// backing write completed before the call: it seals the open block and
// group-commits (writeJournal).
func (c *Cache) commit() error { return c.writeJournal(true) }

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
	return c.writeJournal(false)
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
	if flags&storage.FUA != 0 {
		c.stats.fua.Add(1)
		return c.commit()
	}
	return c.publish()
}

// writeJournal is commit (sync) or publish (!sync). One journal writer at a
// time (jwriting) writes every sealed block not yet written, and publish
// also the open block as it is (it stays open; a later write of it, longer,
// goes to the same slot; a block is never rewritten after a sync covered
// it, because commit seals before writing). Waiters whose records it
// covered return with it. A commit then syncs the cache device once
// (jsyncing), while publishers may write again: the sync covers every
// block written before it began.
//
// The backing is flushed before the blocks are written when a backing
// write may be among the records a commit makes durable, or when a
// record that depends on an unflushed backing write is to be written
// (cleanDep): a clean extent must not outlive, in a crash, the backing
// data it claims to equal, nor the drop of dirty data the backing data
// that superseded it.
func (c *Cache) writeJournal(sync bool) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if sync {
		c.sealLocked()
	}
	target, visTarget, bTarget := c.mu.j.nextSeq, c.mu.j.appended, c.mu.j.bWrites
	for {
		if c.mu.failed != nil {
			return c.mu.failed
		}
		if c.mu.j.visible >= visTarget && (!sync || c.mu.j.durable >= target && c.mu.j.bFlushed >= bTarget) {
			return nil
		}
		if !c.mu.j.writing && !(sync && c.mu.j.syncing) {
			break
		}
		if sync {
			c.stats.commitWaits.Add(1)
		}
		c.mu.j.cond.Wait()
	}
	c.mu.j.writing = true
	if sync {
		c.mu.j.syncing = true
		// Seal again: records appended while we waited ride along.
		c.sealLocked()
	}
	// The turn's own buffers: sealed blocks are copied out (jsealed keeps
	// its array for the appenders), the open block into pubBuf, whose
	// header and checksum are finished outside the lock.
	blocks := append(c.mu.j.turn.batch[:0], c.mu.j.sealed...)
	clear(c.mu.j.sealed)
	c.mu.j.sealed = c.mu.j.sealed[:0]
	openN, openSeq, openPrev, openDurable, openCkpt := 0, c.mu.j.nextSeq, c.mu.j.prev, c.mu.j.durable, c.mu.ckptSeq
	if !sync && c.mu.j.n > 0 {
		openN = c.mu.j.n
		copy(c.mu.j.turn.pub, c.mu.j.open)
		blocks = append(blocks, sealedBlock{seq: openSeq, pos: c.mu.j.head, data: c.mu.j.turn.pub})
	}
	durable, visible, bNow := c.mu.j.nextSeq, c.mu.j.appended, c.mu.j.bWrites
	needB := bNow > c.mu.j.bFlushed && (sync || c.mu.j.cleanDep > c.mu.j.visible)
	needSync := sync && durable > c.mu.j.durable
	c.mu.Unlock()

	if openN > 0 {
		finishJBlock(c.mu.j.turn.pub, c.sb.salt(), openSeq, openPrev, openN, openDurable, openCkpt)
	}
	err := c.writeBlocks(blocks, needB, sync)
	var unwritten []sealedBlock
	if errors.Is(err, errBackingFlush) {
		// Nothing was written: the sealed blocks go back (the open one
		// is still open), ahead of any sealed meanwhile.
		unwritten = slices.Clone(blocks[:len(blocks)-min(openN, 1)])
	}
	clear(blocks)
	c.mu.j.turn.batch = blocks[:0]

	c.mu.Lock()
	c.mu.j.writing = false
	if unwritten != nil {
		// The backing failed its flush (a remote away, a disk error):
		// this commit fails, and its caller with it, but the cache
		// device is fine, so the failure is not sticky.
		c.mu.j.sealed = append(unwritten, c.mu.j.sealed...)
		if sync {
			c.mu.j.syncing = false
		}
		c.mu.j.cond.Broadcast()
		return err
	}
	if err == nil {
		c.mu.j.visible = visible
		if needB {
			c.mu.j.bFlushed = bNow
		}
		if !sync {
			c.stats.publishes.Add(1)
			if c.tracing() {
				c.tracef(-1, 0, "publish: records <=%d visible (open block %d with %d)", visible, openSeq, openN)
			}
		}
	}
	if err != nil || !sync {
		if sync {
			c.mu.j.syncing = false
		}
		return c.journalDoneLocked(err)
	}
	// The sync: publishers may write meanwhile.
	c.mu.j.cond.Broadcast()
	c.mu.Unlock()
	if needSync && c.test.brk != breakNoSync {
		err = c.dev.Flush()
		if err != nil {
			err = fmt.Errorf("sync cache: %w", err)
		}
	}
	c.mu.Lock()
	c.mu.j.syncing = false
	if err == nil {
		c.mu.j.durable = durable
		c.mu.j.synced = max(c.mu.j.synced, visible)
		c.stats.commits.Add(1)
		if c.tracing() {
			c.tracef(-1, 0, "commit: records <=%d durable, blocks <%d, backing flushed %v", visible, durable, needB)
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
	return c.commit()
}
