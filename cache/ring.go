package cache

// ring.go: admission of index-changing operations against the room left
// in the journal ring, and the checkpoints that make room.

import "context"

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
	_ = c.ops.sem.Acquire(context.Background(), int64(k)) // fails only when its context ends
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

func (c *Cache) leaveN(k int) { c.ops.sem.Release(int64(k)) }

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
