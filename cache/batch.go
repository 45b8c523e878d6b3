package cache

// batch.go: many writes in one go (WriteBatch), as a server hands them
// over after one socket read: one allocation, one data write per
// contiguous run, one hold of the lock for their inserts and records, one
// publish.

import (
	"fmt"
	"slices"
	"time"

	"github.com/nbdcache/nbdcache/storage"
)

// BatchWrite is one write of a batch: the storage package's.
type BatchWrite = storage.BatchWrite

// WriteBatch writes ws as WriteAt would write them one after another, in
// order, and sets each one's Err; they are acknowledged together (one
// publish, or one commit if one asks for FUA) before WriteBatch returns.
// What the write-back cache takes, it takes in one go: aligned writes of
// at most a bucket that the policy routes into the cache (decideLocked)
// get their space, then their data with one device write per contiguous
// run, then their inserts and journal records under one hold of the lock.
// The first write that cannot go that way (another route, unaligned, too
// long, no space, no index room) ends the run: it goes the single way,
// and a new run starts after it. The durability rules are the single
// path's: data on the device before the record that names it; a write is
// acknowledged only once published.
func (c *Cache) WriteBatch(ws []BatchWrite) {
	for i := 0; i < len(ws); {
		if c.bypassHint.Load() && c.batchable(&ws[i]) {
			// The last write decided went around a thrashing cache: so
			// most likely does this one. bypassRun decides it under its
			// own hold of the lock, and writeRun's journal slots and
			// hold are spared (a tenth of such a write's cost).
			i += c.bypassRun(ws[i:], nil)
			continue
		}
		n, stop := c.writeRun(ws[i:])
		switch {
		case stop != nil && stop.thrash:
			// A miss of a thrashing cache ended the run: it starts a
			// run of writes around the cache.
			n += c.bypassRun(ws[i+n:], stop)
		case stop != nil:
			// The write that ended the run was decided (the detectors
			// fed) but not written: it goes the single way as decided.
			w := &ws[i+n]
			w.Err = c.writeAs(w.P, w.Off, *stop)
			n++
		case n == 0:
			w := &ws[i]
			w.Err = c.writeUnacked(w.P, w.Off)
			n = 1
		}
		i += n
	}
	c.ackAll(ws)
}

// batchChunk is one allocation of a batch write: [off, off+n) of the
// virtual device, at loc in bucket b, holding p = ws[w].P[from:from+n]
// (its crc sum), and whether writing it failed (bad).
type batchChunk struct {
	w           int
	off, n, loc int64
	from        int64
	b           int64
	p           []byte
	sum         uint32
	bad         bool
}

// writeRun takes a run from the start of ws that can go in one go (see
// WriteBatch), writes it (WriteBatch acknowledges it), and returns how
// many writes it took (0 if the first cannot go that way: not
// batchable). If a write
// the policy sends elsewhere, or one there is no space for, ended the run,
// stop is its decision: the caller writes ws[n] with it, holding nothing
// (a run's journal slots are left before: two runs that each held half
// of them and waited for one more would wait for ever).
func (c *Cache) writeRun(ws []BatchWrite) (n int, stop *writeDecision) {
	// Every write of the run appends at most two records (a write no
	// longer than a bucket lies in at most two), and a run holds at most
	// maxBatchSlots slots: with a ring too small for that, no runs.
	k := min(len(ws), c.maxBatchSlots()/2)
	if k == 0 || !c.batchable(&ws[0]) {
		return 0, nil
	}
	start, inFlight := c.cachedStart()
	if err := c.enterN(2 * k); err != nil {
		c.cachedDone(start, inFlight, 0)
		for i := range k {
			ws[i].Err = err
		}
		return k, nil
	}
	var chunks []batchChunk
	c.mu.Lock()
	for ; n < k; n++ {
		w := &ws[n]
		if !c.batchable(w) {
			break
		}
		// Decide as the single path would; a write the policy sends
		// elsewhere ends the run. Its decision fed the detectors, so it
		// is not decided again: the caller writes it with this one.
		d := c.decideLocked(w.Off, int64(len(w.P)))
		if d.route() != routeDirty {
			stop = &d
			break
		}
		if chunks == nil {
			// A write makes one chunk, two where it crosses into the
			// next bucket: a few more than k is room for all but rare
			// runs. None for a run whose first write goes elsewhere (a
			// thrashing cache's miss, as every write while it sheds).
			chunks = make([]batchChunk, 0, k+k/8+2)
		}
		mark := len(chunks)
		for done := int64(0); done < int64(len(w.P)); {
			// The index room its insert needs (roomLocked) is
			// reserved now, so that the inserts, under a later hold of
			// mu, cannot find the index full.
			loc, got, b, ok := c.allocLocked(&c.mu.space.fg, int64(len(w.P))-done, c.fgReserve())
			if ok && !c.roomLocked(2) {
				c.mu.space.release(b)
				ok = false
			}
			if !ok {
				// No space: this write goes the single way, into the
				// cache as decided (writeDirty makes room or bypasses).
				for _, ch := range chunks[mark:] {
					c.mu.space.release(ch.b)
					c.mu.reservedExt -= 2
				}
				chunks = chunks[:mark]
				stop = &d
				break
			}
			c.mu.reservedExt += 2
			m := min(got, int64(len(w.P))-done)
			chunks = append(chunks, batchChunk{w: n, off: w.Off + done, n: m, loc: loc, from: done, b: b})
			done += m
		}
		if stop != nil {
			break
		}
	}
	c.mu.Unlock()
	var bytes int64
	if n > 0 {
		c.writeChunks(ws, chunks)
		bytes = c.insertChunks(ws[:n], chunks)
	}
	c.cachedDone(start, inFlight, bytes)
	c.leaveN(2 * k)
	return n, stop
}

// bypassRun writes around a thrashing cache the writes from ws[0] on that
// miss it, as writeAs would one after another: ws[0] was decided so
// (first), under an earlier hold of the lock, or is decided here (first
// nil: it must be batchable), and each next one is decided under the same
// hold of the lock that starts them all. Each is
// checked there as passthrough checks a direct write: nothing cached over
// it (for the first: that decision is void by now), no writeback or
// direct write in flight over it (the run's own earlier writes included),
// and no record that removed clean data there still to be made durable
// (settleCleanGone). A miss holds no extent, so starting one appends no
// record and takes no journal slot. Each is registered as written
// directly, their backing writes are issued in order, and one more hold
// of the lock ends them all. The first write that cannot join, once
// decided, goes the single way after them; one not batchable is left to
// the caller. It returns how many of ws it wrote.
func (c *Cache) bypassRun(ws []BatchWrite, first *writeDecision) int {
	var d writeDecision
	k, decided := 0, true
	c.mu.Lock()
	err := c.errLocked()
	for err == nil && k < len(ws) {
		w := &ws[k]
		n := int64(len(w.P))
		switch {
		case k == 0 && first != nil:
			d = *first
		case k > 0 && !c.batchable(w):
			decided = false
		default:
			d = c.decideLocked(w.Off, n)
		}
		if !decided {
			break
		}
		// A first decided under an earlier hold of the lock: its range
		// may hold an extent by now (a write of the batch before it,
		// inserted since; a promotion; a writeback in flight), and then
		// it goes the single way, which checks again and deletes.
		if !d.thrash || k == 0 && first != nil && c.cachedLocked(w.Off, n) || c.directLocked(w.Off, n) || c.mu.j.cleanGone.pending(w.Off, n, c.mu.j.synced) {
			break
		}
		c.mu.direct = append(c.mu.direct, byteRange{w.Off, w.Off + n})
		c.backingWriteLocked(w.Off, w.Off+n)
		k++
	}
	c.mu.Unlock()
	if err != nil {
		ws[0].Err = err
		return 1
	}
	if k == 0 {
		// The first cannot go around (a stale hint's, or one an earlier
		// decision no longer holds for): the single way, as decided now,
		// with none of the run's bookkeeping.
		ws[0].Err = c.writeAs(ws[0].P, ws[0].Off, d)
		return 1
	}
	var bytes int64
	for i := range ws[:k] {
		bytes += int64(len(ws[i].P))
	}
	c.noteWrites(int64(k), bytes, false)
	c.stats.bypasses.Add(int64(k))
	start := time.Now()
	for i := range ws[:k] {
		w := &ws[i]
		err := c.back.WriteAt(w.P, w.Off, 0)
		end := time.Now() // one clock read a write: the next write starts now
		if err != nil {
			w.Err = fmt.Errorf("cache: write backing: %w", err)
			start = end
			continue
		}
		c.noteBacking(end.Sub(start), int64(len(w.P))) // what diskLike measures, as in writeAs
		start = end
		c.stats.backingWriteBytes.Add(int64(len(w.P)))
		c.stats.thrashBypasses.Add(1)
	}
	// Their ranges end; no two ranges in direct overlap.
	ours := make(map[byteRange]bool, k)
	for i := range ws[:k] {
		ours[byteRange{ws[i].Off, ws[i].Off + int64(len(ws[i].P))}] = true
	}
	c.mu.Lock()
	c.mu.direct = slices.DeleteFunc(c.mu.direct, func(r byteRange) bool { return ours[r] })
	c.mu.holdsEnded += uint64(k)
	for i := range ws[:k] {
		if ws[i].Err == nil {
			c.mu.j.bWrites++
		}
	}
	c.mu.wbCond.Broadcast()
	c.mu.Unlock()
	for i := range ws[:k] {
		if w := &ws[i]; w.Err != nil && c.noteUnavailable(w.Err) {
			w.Err = c.writeDirty(w.P, w.Off) // the backing is away: cache it after all
		}
	}
	if k < len(ws) && decided {
		w := &ws[k]
		w.Err = c.writeAs(w.P, w.Off, d)
		k++
	}
	return k
}

// batchable reports whether w may join a run: in range, aligned, and no
// longer than a bucket (so in at most two).
func (c *Cache) batchable(w *BatchWrite) bool {
	n := int64(len(w.P))
	return n > 0 && n <= c.sb.BucketSize && w.Off%sectorSize == 0 && n%sectorSize == 0 &&
		storage.CheckRange(c.Size(), w.Off, n) == nil
}

// writeChunks writes the chunks' data to the cache device as the group
// writer writes a batch of its own (groupWriter.flush: runs of adjacent
// locations joined into one write each), and marks the writes whose data
// failed.
func (c *Cache) writeChunks(ws []BatchWrite, chunks []batchChunk) {
	reqs := make([]groupReq, len(chunks))
	for i := range chunks {
		ch := &chunks[i]
		ch.p = ws[ch.w].P[ch.from : ch.from+ch.n]
		ch.sum = crc(ch.p)
		reqs[i] = groupReq{p: ch.p, off: ch.loc}
	}
	c.dw.flush(reqs)
	for i, r := range reqs {
		if r.err == nil {
			continue
		}
		chunks[i].bad = true
		c.stats.cacheWriteErrors.Add(1)
		if w := &ws[chunks[i].w]; w.Err == nil {
			w.Err = fmt.Errorf("cache: write cache device: %w", r.err)
		}
	}
}

// insertChunks inserts, under one hold of mu, the chunks whose data is on
// the device, in order (a later write over the same range wins, as it
// would one after another), in the index room writeRun reserved for them,
// and releases every allocation. It returns the bytes of ws.
func (c *Cache) insertChunks(ws []BatchWrite, chunks []batchChunk) (bytes int64) {
	c.mu.Lock()
	for _, ch := range chunks {
		c.mu.reservedExt -= 2
		if !ch.bad {
			c.insertNewLocked(ch.off, ch.n, ch.loc, ch.b, true, ch.sum, "batch write")
			c.stats.cachedBytes.Add(ch.n)
		}
		c.mu.space.release(ch.b)
	}
	c.mu.Unlock()
	for i := range ws {
		bytes += int64(len(ws[i].P))
	}
	c.noteWrites(int64(len(ws)), bytes, true)
	c.stats.batched.Add(int64(len(ws)))
	return bytes
}

// ackAll acknowledges the writes of a batch: one publish, or one commit if
// one asked for FUA, for all of them. Unlike ack it does not yield first:
// every write it covers is already in hand.
func (c *Cache) ackAll(ws []BatchWrite) {
	fua := storage.Flags(0)
	for i := range ws {
		fua |= ws[i].Flags & storage.FUA
	}
	var err error
	if fua != 0 {
		c.stats.fua.Add(1)
		err = c.commitBacking()
	} else {
		err = c.writeJournal(jPublish)
	}
	for i := range ws {
		if ws[i].Err == nil {
			ws[i].Err = err
		}
	}
	c.armQuietCommit()
}
