package cache

import "testing"

// TestRingFullLeavesRoomForInFlight: enter admits an operation only while
// the operations that may be in flight (cap(sem), each sealing at most one
// block) cannot seal a block over a slot the durable checkpoint still
// needs: whenever the ring is not full at u used slots, u + cap(sem) must
// still fit the ring. (Mutant ring-full-ignores-inflight: the randomized
// tests rarely have every slot of the semaphore sealing a block at once
// while a checkpoint is slow.)
func TestRingFullLeavesRoomForInFlight(t *testing.T) {
	d := formatMem(t, 4<<20, 4<<20, FormatOptions{BucketSize: 64 << 10, JournalSize: 64 * metaBlock})
	c := openStillT(t, d, Options{})
	defer c.Close()
	slots, inFlight := c.sb.journalSlots(), int64(c.ops.n)
	c.mu.Lock()
	next, start := c.mu.j.nextSeq, c.mu.j.startSeq
	for u := int64(1); u <= slots; u++ {
		c.mu.j.nextSeq = 1 << 20
		c.mu.j.startSeq = c.mu.j.nextSeq - uint64(u-1) // u used slots, the open block's included
		if got := c.usedSlotsLocked(); got != u {
			t.Fatalf("usedSlotsLocked = %d, want %d", got, u)
		}
		full := c.ringFullLocked()
		switch {
		case u == 1 && full:
			t.Errorf("an empty ring (1 slot used) counts as full")
		case u == slots && !full:
			t.Errorf("a ring with every slot used does not count as full")
		case !full && u+inFlight > slots:
			t.Errorf("%d of %d slots used, %d operations may be in flight: admitted, though they could overrun the ring by %d blocks", u, slots, inFlight, u+inFlight-slots)
		}
	}
	c.mu.j.nextSeq, c.mu.j.startSeq = next, start
	c.mu.Unlock()
}
