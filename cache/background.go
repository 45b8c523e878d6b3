package cache

// background.go: the background loop (writeback kicks, free buckets,
// periodic checkpoints) and the early start of the kernel's writeback of
// the cache device.

import (
	"context"
	"errors"
	"time"

	"github.com/nbdcache/nbdcache/storage"
)

func (c *Cache) kickBackground() {
	c.flusher.Kick()
	select {
	case c.bg.kick <- struct{}{}:
	default:
	}
}

// earlyWriteback is how many bytes written into the cache ask for a
// startWriteback before a bucket fills: what a FLUSH finds left in the
// page cache to write (600 KiB of it cost the first FLUSH after a burst
// about 9 ms in the VM benchmark, bench/kernel-caches.sh).
const earlyWriteback = 128 << 10

// kickStartWriteback asks the background loop for a startWriteback.
func (c *Cache) kickStartWriteback() {
	select {
	case c.bg.startWB <- struct{}{}:
	default:
	}
}

// startWriteback starts the kernel writing the buckets filled since the
// last call, and what the open buckets hold so far, so that the sync of
// the next commit, checkpoint or FLUSH finds little left to write: that
// sync held up writers waiting for free buckets, and FLUSHes.
func (c *Cache) startWriteback() {
	ws, ok := c.dev.(storage.WritebackStarter)
	if !ok {
		return
	}
	c.mu.Lock()
	sealed := c.mu.space.takeSealed()
	var open [2][2]int64 // [from, to) of the open buckets
	for i, a := range []allocator{c.mu.space.fg, c.mu.space.gc} {
		if a.b >= 0 {
			open[i] = [2]int64{c.sb.bucketStart(a.b), a.wp}
		}
	}
	c.mu.Unlock()
	for _, b := range sealed {
		ws.StartWriteback(c.sb.bucketStart(b), c.sb.BucketSize)
	}
	for _, r := range open {
		if r[1] > r[0] {
			ws.StartWriteback(r[0], r[1]-r[0])
		}
	}
	// And the journal blocks published since: until the first commit
	// after a burst, they are all there is to sync (320 KiB of them
	// after 8000 writes). The kernel skips the ring's clean pages.
	ws.StartWriteback(c.sb.JournalOff, c.sb.JournalSize)
}

// armQuietCommit wakes the background loop for a quiet commit, if this is
// the first write acknowledged since it last looked. It costs the write
// path one atomic load.
func (c *Cache) armQuietCommit() {
	if c.bg.quietArmed.Load() || !c.bg.quietArmed.CompareAndSwap(false, true) {
		return
	}
	select {
	case c.bg.quiet <- struct{}{}:
	default:
	}
}

// quietCommitGap: quiet commits come at most this often, so that a client
// whose writes come one every QuietCommit and a bit does not get a sync
// of the cache device for each.
const quietCommitGap = 100 * time.Millisecond

// quietCommit is the background loop's state for quiet commits.
type quietCommit struct {
	after time.Duration // Options.QuietCommit
	timer *time.Timer
	seen  uint64    // records appended when the loop last looked
	last  time.Time // of the last quiet commit
}

// arm starts waiting for a quiet spell (on bg.quiet).
func (q *quietCommit) arm(c *Cache) {
	q.seen = c.appended()
	q.timer.Reset(q.after)
}

// fire is the timer's: commit if no record was appended since the last
// look, and the last quiet commit is quietCommitGap old; otherwise look
// again later. The arm is cleared before the look, so a write
// acknowledged after it arms again and none is left uncommitted.
func (q *quietCommit) fire(c *Cache) {
	c.bg.quietArmed.Store(false)
	if n := c.appended(); n != q.seen {
		q.seen = n
		c.bg.quietArmed.Store(true)
		q.timer.Reset(q.after)
		return
	}
	if wait := quietCommitGap - time.Since(q.last); wait > 0 {
		c.bg.quietArmed.Store(true)
		q.timer.Reset(wait)
		return
	}
	if !c.unsynced() {
		return // a FUA or FLUSH came last
	}
	q.last = time.Now()
	c.stats.quietCommits.Add(1)
	if err := c.commit(); err != nil && !errors.Is(err, ErrClosed) {
		c.log.Warn("cache: quiet commit", "err", err)
	}
}

// appended is how many journal records were appended since Open.
func (c *Cache) appended() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.mu.j.appended
}

// unsynced reports whether a record appended is not yet durable.
func (c *Cache) unsynced() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.mu.j.synced < c.mu.j.appended
}

// checkpointMinBlocks: a periodic checkpoint is skipped while the journal
// since the last one is this short (about 100 records a block).
const checkpointMinBlocks = 8

// background kicks the flusher above the dirty target or when free
// buckets run short (the flusher itself writes everything back when the
// device is idle), keeps free buckets available, and checkpoints every
// CheckpointInterval while the journal grows; as the cache is written it
// starts the kernel writing it out (bg.startWB: that alone). It runs only
// with a flusher.
func (c *Cache) background(ctx context.Context) {
	defer c.bg.done.Done()
	t := time.NewTicker(200 * time.Millisecond)
	defer t.Stop()
	q := quietCommit{after: c.opts.QuietCommit, timer: time.NewTimer(time.Hour)}
	q.timer.Stop()
	defer q.timer.Stop()
	lastCkpt, ckpts := time.Now(), c.stats.checkpoints.Load()
	for {
		select {
		case <-ctx.Done():
			return
		case <-c.bg.kick:
		case <-t.C:
		case <-c.bg.startWB:
			c.startWriteback()
			continue
		case <-c.bg.quiet:
			if q.after > 0 {
				q.arm(c)
			}
			continue
		case <-q.timer.C:
			q.fire(c)
			continue
		}
		c.startWriteback()
		c.mu.Lock()
		full := c.indexFullLocked()
		c.mu.Unlock()
		if full {
			c.shrinkIndex()
		}
		if n := c.stats.checkpoints.Load(); n != ckpts {
			lastCkpt, ckpts = time.Now(), n
		}
		if iv := c.opts.CheckpointInterval; iv > 0 && time.Since(lastCkpt) >= iv {
			grown := func() bool {
				c.mu.Lock()
				defer c.mu.Unlock()
				return c.usedSlotsLocked() > checkpointMinBlocks
			}
			if err := c.checkpointIf(grown, false); err != nil && !errors.Is(err, ErrClosed) {
				c.log.Warn("cache: periodic checkpoint", "err", err)
			}
			lastCkpt = time.Now() // a journal too short to checkpoint waits another interval
		}
		for ctx.Err() == nil {
			c.mu.Lock()
			dirty := c.mu.idx.DirtyBytes()
			free := int64(len(c.mu.space.free))
			pending := len(c.mu.space.pending)
			c.mu.Unlock()
			lowFree := free < int64(c.lowFree())
			target := c.CapacityBytes() * int64(c.opts.WritebackPercent) / 100
			worked := false
			if lowFree || dirty > target {
				c.flusher.Kick()
			}
			if lowFree {
				if pending < c.reuseBatch() {
					var freed int
					if !c.opts.GCMove {
						freed = c.gcClean()
					} else {
						freed, _ = c.gcStep(true)
					}
					if freed > 0 {
						worked = true
					}
				}
				c.mu.Lock()
				reuse := c.reuseNowLocked()
				c.mu.Unlock()
				if reuse {
					err := c.checkpointIf(func() bool {
						c.mu.Lock()
						defer c.mu.Unlock()
						return c.reuseNowLocked()
					}, true)
					if err != nil && !errors.Is(err, ErrClosed) {
						c.log.Warn("cache: background checkpoint", "err", err)
						break
					}
				}
			}
			if !worked {
				break
			}
		}
	}
}
