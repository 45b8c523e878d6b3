package cache

// ring.go: admission of index-changing operations against the room left
// in the journal ring, and the checkpoints that make room.

import "sync"

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
// records), paired with leaveN(k). k is at most maxBatchSlots, or 1.
func (c *Cache) enterN(k int) error {
	c.ops.acquire(k)
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

func (c *Cache) leaveN(k int) { c.ops.release(k) }

// slotSem counts the operations in flight against n slots. A batch takes
// its k slots in one call, or waits holding none, so no two batches each
// hold part of what they need. It is not first come, first served: a
// single operation takes a free slot even while a batch waits for k, as
// with the channel it replaced (a send a slot, k sends for a batch, which
// cost 8% of the server when every bypassed write of a thrashing cache's
// batches asked again for up to 128), so that nothing that holds a slot
// and enters again, or waits for someone who must enter, queues behind a
// batch that waits for that slot.
type slotSem struct {
	mu      sync.Mutex
	cond    sync.Cond
	used, n int
}

func (s *slotSem) init(n int) { s.n, s.cond.L = n, &s.mu }

func (s *slotSem) acquire(k int) {
	s.mu.Lock()
	for s.used+k > s.n {
		s.cond.Wait()
	}
	s.used += k
	s.mu.Unlock()
}

func (s *slotSem) release(k int) {
	s.mu.Lock()
	s.used -= k
	s.mu.Unlock()
	s.cond.Broadcast()
}

// maxBatchSlots is the most slots one batch may hold: half of them, so
// that single operations always find some (0 with a ring of fewer than
// 16 blocks: no batches).
func (c *Cache) maxBatchSlots() int { return c.ops.n / 2 }

// ringWantsCheckpointLocked: the ring is CheckpointPercent full.
func (c *Cache) ringWantsCheckpointLocked() bool {
	return c.usedSlotsLocked()*100 > c.sb.journalSlots()*int64(c.opts.CheckpointPercent)
}

// ringFullLocked: admitting one more operation could let the operations
// in flight (at most cap(sem), one record each, each record at most one
// new block) seal a block over a slot the durable checkpoint still needs.
func (c *Cache) ringFullLocked() bool {
	return c.usedSlotsLocked()+int64(c.ops.n)+1 > c.sb.journalSlots()
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
