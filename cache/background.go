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

// earlyWritebackGap is the least time between two asks for a
// startWriteback. Each ask wakes the background loop, whose wake-up costs
// the writer's CPU more than the kernel's work it starts: at 150k 4 KiB
// writes a second (a fast device, ratio 0.25 in bench/pressure.sh) the
// asks came 4,000 times a second. A writer slower than
// earlyWriteback / earlyWritebackGap (25 MiB/s) is not held back by it;
// a faster one leaves at most a gap's worth of bytes unstarted.
// Measured there (3 alternating rounds): with no gap 94-103k IOPS and
// 0.24-0.30 context switches a write; with 1 ms 105-117k and 0.22-0.24;
// with 5 ms 110-120k and 0.13-0.15.
const earlyWritebackGap = 5 * time.Millisecond

// kickStartWriteback asks the background loop for a startWriteback, at
// most once an earlyWritebackGap: it reports whether it did. Writers that
// race may both ask; the loop runs once for both.
func (c *Cache) kickStartWriteback() bool {
	now := time.Since(c.bg.epoch)
	if last := time.Duration(c.bg.lastStartAsk.Load()); now-last < earlyWritebackGap {
		return false
	}
	c.bg.lastStartAsk.Store(int64(now))
	select {
	case c.bg.startWB <- struct{}{}:
	default:
	}
	return true
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

// armQuietCommit wakes quietLoop, if this is the first write acknowledged
// since it last looked. It costs the write path one atomic load.
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

// quietLoop makes what a FLUSH would make durable, once no write has been
// acknowledged for QuietCommit (Options.QuietCommit), at most every
// quietCommitGap. Quiet means no acknowledgement (journal.acked): the
// cache's own records (promotions, clean marks, GC) do not hold it off.
// It runs on its own goroutine, so that a slow backing flush (the
// writes that went around the cache) holds up nothing else.
//
// The arm is cleared before each look at acked, so a write acknowledged
// after the look arms again: none is left out.
func (c *Cache) quietLoop(ctx context.Context) {
	defer c.bg.done.Done()
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	defer timer.Stop()
	var seen uint64    // acked at the last look
	var last time.Time // of the last quiet commit
	for {
		select {
		case <-ctx.Done():
			return
		case <-c.bg.quiet:
			seen = c.quietMark()
			timer.Reset(c.opts.QuietCommit)
			continue
		case <-timer.C:
		}
		c.bg.quietArmed.Store(false)
		if n := c.quietMark(); n != seen {
			seen = n
			c.bg.quietArmed.Store(true)
			timer.Reset(c.opts.QuietCommit)
			continue
		}
		if wait := quietCommitGap - time.Since(last); wait > 0 {
			c.bg.quietArmed.Store(true)
			timer.Reset(wait)
			continue
		}
		if c.flushNeeded() {
			last = time.Now()
			err := c.writeJournal(jFlush)
			switch {
			case err == nil:
				c.stats.quietCommits.Add(1)
			case !errors.Is(err, ErrClosed):
				c.log.Warn("cache: quiet commit", "err", err)
			}
		}
	}
}

// makeRoomBackground is the background loop's turn at making room once
// free buckets run short: a GC pass unless a batch of emptied buckets is
// pending already (gcClean; gcStep with GCMove), then the checkpoint that
// frees them once enough are pending (reuseNowLocked). It returns the
// buckets the pass emptied, and the checkpoint's error (not ErrClosed).
func (c *Cache) makeRoomBackground(pending int) (freed int, err error) {
	if pending < c.reuseBatch() {
		if !c.opts.GCMove {
			freed = c.gcClean()
		} else {
			freed, _ = c.gcStep(true)
		}
	}
	c.mu.Lock()
	reuse := c.reuseNowLocked()
	c.mu.Unlock()
	if !reuse {
		return freed, nil
	}
	err = c.checkpointIf(func() bool {
		c.mu.Lock()
		defer c.mu.Unlock()
		return c.reuseNowLocked()
	}, true)
	if errors.Is(err, ErrClosed) {
		err = nil
	}
	return freed, err
}

// quietMark moves with every write the client makes: it is journal.acked
// (the records appended when the last acknowledgement began) plus the
// client's writes, counted as they start. Writes around a thrashing cache
// append no record, yet a FLUSH must flush the backing for them: counted
// by records alone, a cache that sent every write around looked quiet,
// and its quiet commits flushed the backing up to 10 times a second under
// a load that never paused (libnbd's parallel load shape, bench/parallel.sh:
// 126 quiet commits in 14 s). The cache's own records (promotions, clean
// marks, GC) move neither term: they do not hold a quiet commit off.
func (c *Cache) quietMark() uint64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.mu.j.acked + uint64(c.stats.writes.Load())
}

// flushNeeded reports whether a FLUSH now would write or sync anything
// (journal.flushed) on a cache that has not failed.
func (c *Cache) flushNeeded() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.errLocked() == nil && !c.mu.j.flushed()
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
				start := time.Now()
				freed, err := c.makeRoomBackground(pending)
				c.health.roomNanos.Add(int64(time.Since(start)))
				if err != nil {
					c.log.Warn("cache: background checkpoint", "err", err)
					break
				}
				worked = freed > 0
			}
			if !worked {
				break
			}
		}
	}
}
