package writeback

// batch.go: one batch — collect dirty extents from the cursor, merge them
// into backing writes, write them (bounded in flight, issued in ascending
// order, paced by the limiter), flush the backing, and only then mark
// clean.

import (
	"cmp"
	"context"
	"errors"
	"log/slog"
	"math"
	"slices"
	"sync"
	"time"

	"github.com/nbdcache/nbdcache/btreeidx"
)

// span is one merged backing write: contiguous pieces of dirty extents,
// ascending, [off, off+n), with clean pieces filling small gaps; dirty
// counts the bytes of the dirty pieces, which the budget and the rate
// limit count.
type span struct {
	off, n, dirty int64
	ext           []btreeidx.Extent
}

func (s *span) end() int64 { return s.off + s.n }

// status is the fate of one piece in a batch.
type status uint8

const (
	pending status = iota
	written        // in the backing (not yet flushed)
	stale          // ReadCached said ErrStale: a newer write won
	failed         // ReadCached failed: nothing to release
	lost           // read, but its backing write or the flush failed: released
	busy           // ReadCached said ErrBusy: skipped, retried on a later pass
)

// batchResult is what one batch did.
type batchResult struct {
	pieces            int   // pieces written back and marked clean
	cleaned, collided int64 // MarkClean's sums
	errs              int
	lastErr           error // the flusher's last error, when errs > 0
	firstErr          error // the first failure of this batch's own pieces
	wrapped           bool  // the batch completed a pass
	empty             bool  // nothing dirty was listed, even from 0
	extents           int   // pieces collected
	busy              int   // pieces skipped as busy
}

// progressed reports whether the batch got anywhere: something was cleaned
// or lost a race to a newer write (which will be written in its turn).
func (r *batchResult) progressed() bool { return r.cleaned > 0 || r.collided > 0 }

// planRange merges the dirty extents listed in [from, end) into spans:
// adjacent pieces join one span up to maxWrite bytes; an extent longer
// than that, or one that would overflow the span it joins, is cut into
// pieces at the span boundary (a piece is a sub-range of the extent with
// Loc moved by the same amount, which Source accepts like the extent
// itself). It stops once budget bytes are planned and reports whether
// dirty extents remain beyond what it planned. An extent that starts
// before from or ends after end is clipped to them. With fill, a gap of
// at most maxGap between a span and the next dirty extent that clean
// extents cover whole joins the span as clean pieces.
func planRange(src Source, fill Filler, maxGap, from, end, budget, maxWrite int64) (spans []span, more bool) {
	var total int64
	src.DirtyExtents(from, func(e btreeidx.Extent) bool {
		if e.Off >= end {
			return false
		}
		if !e.Dirty || e.Len <= 0 || e.End() <= from {
			return true // not for us; the Source should not list it
		}
		if e.Off < from {
			k := from - e.Off
			e.Off, e.Loc, e.Len = from, e.Loc+k, e.Len-k
		}
		e.Len = min(e.Len, end-e.Off)
		if len(spans) > 0 && e.Off < spans[len(spans)-1].end() {
			// Overlaps what is planned (a Source bug, or a snapshot
			// torn by a concurrent change): leave it for the next batch
			// rather than write one range twice at once.
			more = true
			return false
		}
		if fill != nil && len(spans) > 0 {
			last := &spans[len(spans)-1]
			if gap := e.Off - last.end(); gap > 0 && gap <= maxGap && last.n+gap < maxWrite {
				if pieces := cleanCover(fill, last.end(), e.Off); pieces != nil {
					last.ext = append(last.ext, pieces...)
					last.n += gap
				}
			}
		}
		for e.Len > 0 {
			if total >= budget {
				more = true
				return false
			}
			var last *span
			if len(spans) > 0 {
				last = &spans[len(spans)-1]
			}
			if last == nil || last.end() != e.Off || last.n >= maxWrite {
				spans = append(spans, span{off: e.Off})
				last = &spans[len(spans)-1]
			}
			p := e
			p.Len = min(e.Len, maxWrite-last.n)
			last.ext = append(last.ext, p)
			last.n += p.Len
			last.dirty += p.Len
			total += p.Len
			e.Off, e.Loc, e.Len = e.Off+p.Len, e.Loc+p.Len, e.Len-p.Len
		}
		return true
	})
	return spans, more
}

// cleanCover returns the clean extents that cover [off, end) whole, or
// nil if they leave a hole.
func cleanCover(fill Filler, off, end int64) []btreeidx.Extent {
	var pieces []btreeidx.Extent
	at := off
	fill.CleanExtents(off, end, func(e btreeidx.Extent) bool {
		if e.Dirty || e.Off != at || e.Len <= 0 || e.End() > end {
			return false
		}
		pieces = append(pieces, e)
		at = e.End()
		return true
	})
	if at != end {
		return nil
	}
	return pieces
}

// budgetLocked is how many dirty bytes a batch in mode m may take.
func (f *Flusher) budgetLocked(m Mode) int64 {
	if m == ModeProbe {
		return probeBytes
	}
	if m.FullSpeed() {
		return f.cfg.BatchBytes
	}
	b := int64(f.mu.ctl.rate * f.cfg.BatchTime.Seconds())
	return min(max(b, 1), f.cfg.BatchBytes)
}

// plan is planRange with the flusher's Source, Filler and limits.
func (f *Flusher) plan(from, end, budget int64) ([]span, bool) {
	return planRange(f.src, f.fill, f.cfg.MaxGap, from, end, budget, f.cfg.MaxWrite)
}

// batch runs one batch from the cursor. The caller holds the token.
func (f *Flusher) batch(ctx context.Context) batchResult {
	var res batchResult
	now := time.Now()
	f.mu.Lock()
	mode := f.modeLocked(now, true)
	budget := f.budgetLocked(mode)
	from := f.mu.cursor
	f.mu.Unlock()
	if mode == ModeStopped {
		return res
	}

	spans, more := f.plan(from, math.MaxInt64, budget)
	if len(spans) == 0 {
		// Nothing after the cursor: the pass is over; start the next.
		f.mu.Lock()
		if from > 0 {
			f.completePassLocked(now)
			res.wrapped = true
		}
		f.mu.Unlock()
		if from == 0 {
			res.empty = true
			return res
		}
		if spans, more = f.plan(0, math.MaxInt64, budget); len(spans) == 0 {
			res.empty = true
			return res
		}
	}
	for i := range spans {
		res.extents += len(spans[i].ext)
	}
	spans, outs := f.issue(ctx, spans, true, nil)
	complete := len(outs) == len(spans) && !more
	spans = spans[:len(outs)]
	f.settle(spans, outs, &res)

	f.mu.Lock()
	f.mu.stats.Batches++
	if res.errs > 0 {
		f.mu.passErrs = true
	}
	if n := len(spans); n > 0 {
		f.mu.cursor = spans[n-1].end()
		if complete {
			f.completePassLocked(time.Now())
			res.wrapped = true
		}
	}
	f.mu.Unlock()
	if res.errs > 0 {
		f.cfg.Logger.Warn("writeback: batch failed in part; its extents stay dirty",
			slog.Int("failed_pieces", res.errs),
			slog.Int64("from", spans[0].off),
			slog.Int64("to", spans[len(spans)-1].end()),
			slog.Any("error", res.lastErr))
	}
	return res
}

// WriteBack writes es back now, at full speed, by the rule a batch keeps:
// their backing writes, in ascending order, then one backing Flush, then
// MarkClean for each piece written. es are extents or pieces of extents
// (the Source accepts both), in any order, not overlapping; adjacent ones
// share a write of up to MaxWrite bytes, and one longer than that is
// written whole, never cut (cleaning part of an extent would cut it in
// the index). A piece the Source reports stale or busy is skipped. It
// takes no turn from Run or Drain: the Source's ReadCached keeps two
// writebacks off one range. observe, if not nil, is told the time and
// length of each backing write. It returns the bytes marked clean and
// the first failure; what failed stays dirty.
func (f *Flusher) WriteBack(es []btreeidx.Extent, observe func(took time.Duration, n int64)) (cleaned int64, err error) {
	if len(es) == 0 {
		return 0, nil
	}
	spans, outs := f.issue(context.Background(), spansOf(es, f.cfg.MaxWrite), false, observe)
	var res batchResult
	f.settle(spans, outs, &res)
	return res.cleaned, res.firstErr
}

// spansOf sorts es and merges adjacent ones into spans of at most maxWrite
// bytes; a longer one is a span of its own.
func spansOf(es []btreeidx.Extent, maxWrite int64) []span {
	es = slices.Clone(es)
	slices.SortFunc(es, func(a, b btreeidx.Extent) int { return cmp.Compare(a.Off, b.Off) })
	var spans []span
	for _, e := range es {
		var dirty int64
		if e.Dirty {
			dirty = e.Len
		}
		if k := len(spans) - 1; k >= 0 && spans[k].end() == e.Off && spans[k].n+e.Len <= maxWrite {
			spans[k].ext = append(spans[k].ext, e)
			spans[k].n += e.Len
			spans[k].dirty += dirty
			continue
		}
		spans = append(spans, span{off: e.Off, n: e.Len, dirty: dirty, ext: []btreeidx.Extent{e}})
	}
	return spans
}

// spanOut is what became of one span's pieces.
type spanOut struct {
	st    []status // each piece's fate
	added int64    // dirty bytes written to the backing (counted in mu.pending)
	err   error    // the span's first failure
}

// jobBytes is how much a job of issue holds: consecutive spans written by
// one goroutine, one after another. A drain of scattered 4 KiB extents is
// thousands of spans of a few KiB each, and a goroutine each cost more in
// handoffs (futex and nanosleep calls, 6,200 in a 28 MiB drain against
// 12,600 reads and writes) than the writes. It is small, because the
// window's bytes in flight delay the next pace: with 256 KiB jobs a
// request took half a second to bring an idle full-speed writeback back
// to the controller's rate over a 4 MiB/s disk (TestIdleFastPath).
//
// Over a disk (the Source a Seeker that says so) a job is one span: a
// job's spans go one after the other, so jobs of many small spans kept
// about one write in flight, and each write, issued a little after the
// one before ended, missed its sector and waited most of a revolution
// (the hdd model, under a working set twice a 64 MiB cache: 206 IOPS
// against 2,329 before jobs). With a span a job, MaxInFlight writes wait
// at the disk in address order and each starts as the one before ends.
const jobBytes = 32 << 10

// writeTimes is the average time the flusher's own backing writes took
// (atomics). A write on a disk costs a seek or a rotation, a millisecond
// and more; on a file or a fast device it costs microseconds. A sample
// counts for at most 4 ms, so that one stall of a file (dirty throttling)
// does not make it a disk for long.
//
// A write's time includes its wait behind the others in flight: with a
// span a job, MaxInFlight of them queue, and a device that serves one
// write at a time in 300 us stays "a disk" (found by review). That costs
// handoffs, not speed: such a device is as busy either way. Dividing by
// the writes in flight would instead take a device of high latency that
// serves many at once (a remote) for a fast one, and its writeback in
// jobs, one write or two in flight, would crawl.
type writeTimes struct {
	mu  sync.Mutex // the count and the average move together (jobs note in parallel)
	avg int64      // nanoseconds a write
	n   int64      // writes timed
}

const (
	seekNanos = 1_000_000 // an average above it: a disk
	// trustTimes: writes timed before the average overrides the Seeker.
	trustTimes = 8
	// probeBytes is a batch's budget in ModeProbe: trustTimes writes of
	// 4 KiB where the dirty data is sparse; dense data takes a write a
	// batch. The budget is checked before each piece, and a batch takes
	// one piece at least: a probe over extents of up to MaxWrite writes
	// up to about trustTimes * MaxWrite in all.
	probeBytes = trustTimes * 4096
)

// Until it has timed trustTimes writes, the flusher has only the Seeker's
// word, and a Seeker that says the backing seeks may only repeat what the
// device claims (the cache starts from the rotational flag, and a virtio
// disk claims to rotate). So while the Seeker says so, the flusher probes
// (ModeProbe): it writes back a little dirty data at once, whatever the
// dirty level, to time it.
// Without the probe, a fast file on a virtio disk stayed a disk for the
// first 5-7 s under 4k random writes over half a 64 MiB cache
// (bench/pressure.sh, ratio 0.5): the flusher, paced at the controller's
// rate, wrote a few large spans a second, and until the age pass its
// batches held the turn that GC's cleaning waits for over a disk
// (Exclusive), so writers ran out of room and moved data themselves
// (83-90k writes a second, 20 MB/s moved, against 140-150k once the
// backing was timed). Over a real disk the probe costs trustTimes writes
// (and up to trustTimes batches, each with its backing flush), once per
// start. Sparse pieces go in flight together (a job each, as over a
// disk), so each write's time includes its wait behind the others: a
// device that serves one write at a time in a few hundred microseconds
// may still be taken for a disk, as writeTimes already accepts.

// note adds a write that took d. The first trustTimes writes are averaged
// plainly (weight 1/n), later ones with weight 1/8: started from its first
// sample, one stall there (a 4 ms first write, then 7 of 10 us) left the
// average at 1.6 ms after the probe's 8 writes, a disk, where their mean
// is 0.5 ms.
func (t *writeTimes) note(d time.Duration) {
	ns := min(int64(d), 4*seekNanos)
	t.mu.Lock()
	defer t.mu.Unlock()
	t.n++
	w := min(t.n, trustTimes)
	t.avg += (ns - t.avg) / w
}

// get returns the average and the writes timed.
func (t *writeTimes) get() (avg, n int64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.avg, t.n
}

// TimedSeeks reports whether the flusher's own timed backing writes say
// the backing is a disk (an average over a millisecond), and ok once it
// has timed enough of them to say (trustTimes).
func (f *Flusher) TimedSeeks() (seeks, ok bool) {
	avg, n := f.times.get()
	if n < trustTimes {
		return false, false
	}
	return avg > seekNanos, true
}

// backingSeeks reports whether the backing behaves as a disk: by the
// flusher's own timed writes once it has trustTimes of them, else by the
// Source (a Seeker), else not. The cache's measure (a Seeker) starts from
// the device's rotational flag and times only the writes around the
// flusher; a virtio disk claims to rotate, and over one in the VM, with no
// bypassed write to correct it, every drain went a span a job (issue 22:
// drain CPU 1.7x). The flusher's writes say what the device is.
func (f *Flusher) backingSeeks() bool {
	if seeks, ok := f.TimedSeeks(); ok {
		return seeks
	}
	return f.seeks != nil && f.seeks.BackingSeeks()
}

// issue writes spans to the backing, in ascending order, in a sliding
// window of jobs: runs of consecutive spans of up to jobBytes (a longer
// span is a job alone), each written by one goroutine in order; job k+w
// (w = MaxInFlight) is not issued before job k has completed. A batch's
// jobs are paced: each waits for the limiter, and its spans are planned
// again just before it goes (at full speed, the rest of the batch at
// once, and read ahead by windows; not at the first job if pace did not
// wait); the batch stops where pace says so. observe,
// if not nil, is told each write's time and length. It returns the spans
// (as planned again) and the outcomes of those issued, a prefix of them.
func (f *Flusher) issue(ctx context.Context, spans []span, paced bool, observe func(time.Duration, int64)) ([]span, []*spanOut) {
	outs := make([]*spanOut, 0, len(spans))
	var done []chan struct{} // one a job
	var wg sync.WaitGroup
	prev := make(chan struct{})
	close(prev)
	var sent int64
	start := time.Now()
	// ahead holds spans[aheadFrom:aheadTo] read at once (readAhead), at
	// most windowBytes of them: windows of WriteBack's (GC's cleaning
	// takes a sixteenth of the cache at once), or of a batch's once a
	// job may go at full speed; a job never straddles two windows. While
	// ahead's jobs write, next reads the window after it, so that reads
	// and writes overlap (one window read before its writes, in the VM's
	// drain, took a third of the drain's time). Never over a disk: a few
	// hundred writes fill BatchTime there, and holding a window's pieces
	// through its seeks would hold up the writes over them.
	var ahead, next *readAhead
	aheadFrom, aheadTo := 0, 0
	var spare *[]byte // the arena of the window before ahead
	jobEnd := func(n int) int {
		jb := int64(jobBytes)
		if f.backingSeeks() {
			jb = 0 // a span a job: MaxInFlight of them queued at the disk
		}
		m, bytes := n+1, spans[n].n
		for m < len(spans) && bytes+spans[m].n <= jb && (ahead == nil || n >= aheadTo || m < aheadTo) {
			bytes += spans[m].n
			m++
		}
		return m
	}
	// A window is windowBytes, but the first is MaxWrite and each next
	// one twice the one before, up to windowBytes: nothing is written
	// while the first is read (a quarter of a batch, 1,000 preads, was
	// about 0.1 s of the VM's drain, twice a drain), and each next one is
	// read while the one before is written.
	wlimit := f.cfg.MaxWrite
	windowEnd := func(n int) int {
		limit := wlimit
		wlimit = min(2*wlimit, f.windowBytes())
		k, bytes := n+1, spans[n].n
		for k < len(spans) && bytes+spans[k].n <= limit {
			bytes += spans[k].n
			k++
		}
		return k
	}
	mayReadAhead := func() bool { return f.breader != nil && !f.backingSeeks() }
	// dropNext waits for next, releases every piece it read (none was
	// written) and puts its arena back.
	dropNext := func() {
		next.wait()
		f.releaseUnwritten(next, 0)
		f.arenas.Put(&next.arena)
		next = nil
	}
	// retire makes ahead's arena the spare: its window is written, or
	// being written by jobs that every later read of the arena waits for.
	// (spare is only ever set beside ahead.)
	retire := func() {
		if spare != nil {
			f.arenas.Put(spare)
		}
		spare, ahead = &ahead.arena, nil
	}
	// window makes spans[n:] the window ahead: the one next read, if it
	// begins there, else one read now (once every job issued has
	// completed, if an arena of theirs is reused). Then, while reading
	// ahead still pays (not over a disk; in a paced batch, at full
	// speed), it starts next, reading the window after it into spare's
	// arena once the jobs issued so far have completed. It reports
	// whether it did (not if ctx ended).
	window := func(n int) bool {
		if next != nil && next.from != n { // a guard: next begins where ahead ends
			dropNext()
		}
		if next == nil {
			if ahead != nil { // its arena is read into now: its jobs must be done
				for _, fin := range done {
					select {
					case <-fin:
					case <-ctx.Done():
						return false
					}
				}
				retire()
			}
			next = f.startReadAhead(spans[n:windowEnd(n)], n, spare, nil)
			spare = nil
		}
		select {
		case <-next.ready:
		case <-ctx.Done():
			return false
		}
		if ahead != nil {
			retire()
		}
		ahead, next = next, nil
		aheadFrom, aheadTo = ahead.from, ahead.from+len(ahead.spans)
		if aheadTo < len(spans) && mayReadAhead() && (!paced || f.fullSpeed()) {
			next = f.startReadAhead(spans[aheadTo:windowEnd(aheadTo)], aheadTo, spare, done)
			spare = nil
		}
		return true
	}
dispatch:
	for n := 0; n < len(spans); {
		if w := f.cfg.MaxInFlight; len(done) >= w {
			select {
			case <-done[len(done)-w]:
			case <-ctx.Done():
				break dispatch
			}
		}
		// (A window read ahead is taken even if the backing has since
		// turned out to seek: its pieces are held, and a job reading
		// them again would find them busy.)
		if !paced && (ahead == nil || n >= aheadTo) && (next != nil || mayReadAhead()) && !window(n) {
			break
		}
		m := jobEnd(n)
		if paced {
			var dirty int64
			for _, s := range spans[n:m] {
				dirty += s.dirty
			}
			ok, waited := f.pace(ctx, dirty, sent, start)
			if !ok {
				break
			}
			switch {
			case ahead != nil && n < aheadTo:
				// Planned and read with its window.
			case next != nil && next.from == n:
				// Planned with the window before, and read (or being
				// read) while its jobs wrote.
				if !window(n) {
					break dispatch
				}
				m = jobEnd(n)
			case mayReadAhead() && f.fullSpeed():
				// Nothing will hold the rest back: plan it again
				// (once) and read it a window at a time.
				// What clients rewrite from here on is written back
				// in its old version and collides at MarkClean, as
				// in WriteBack.
				// The batch's first job, not held back, goes as the
				// batch was planned a moment ago: planning it again
				// was a third of the drain's planning (VM profile).
				if n == 0 && !waited {
					if !window(n) {
						break dispatch
					}
					m = jobEnd(n)
					break
				}
				end := spans[len(spans)-1].end()
				if again, more := f.plan(spans[n].off, end, end-spans[n].off); len(again) > 0 && !more {
					spans = slices.Replace(spans, n, len(spans), again...)
					if !window(n) {
						break dispatch
					}
					m = jobEnd(n)
					break
				}
				fallthrough
			default:
				// Plan the job again now that it may go: the pace may
				// have waited long enough for clients to overwrite some
				// of its extents, and a stale piece would cut its
				// backing write in two, where the newer version, as
				// dirty, can take its place. Parts that became clean
				// meanwhile leave gaps: each contiguous part is a span
				// of its own.
				again, _ := f.plan(spans[n].off, spans[m-1].end(), spans[m-1].end()-spans[n].off)
				if len(again) == 0 {
					again = []span{{off: spans[n].off}} // nothing left: an empty span keeps the order chain
				}
				spans = slices.Replace(spans, n, m, again...)
				m = n + len(again)
			}
		}
		job := spans[n:m:m] // a later Replace moves only spans after m, or copies
		jobOuts := make([]*spanOut, len(job))
		starts := make([]chan struct{}, len(job))
		var data [][]byte // the job's spans as read ahead, or nil
		inAhead := ahead != nil && n >= aheadFrom && n < aheadTo
		for i := range job {
			if inAhead {
				jobOuts[i] = ahead.outs[n-aheadFrom+i]
			} else {
				jobOuts[i] = &spanOut{st: make([]status, len(job[i].ext))}
			}
			starts[i] = make(chan struct{})
			sent += job[i].dirty
		}
		if inAhead {
			data = ahead.data[n-aheadFrom : m-aheadFrom]
		}
		outs = append(outs, jobOuts...)
		fin := make(chan struct{})
		done = append(done, fin)
		p := prev
		wg.Go(func() {
			defer close(fin)
			for i := range job {
				var d []byte
				if data != nil {
					d = data[i]
				}
				f.writeSpan(&job[i], jobOuts[i], d, p, starts[i], observe)
				p = starts[i]
			}
		})
		prev = starts[len(job)-1]
		n = m
	}
	wg.Wait()
	// Pieces read ahead and never written (ctx ended, or pace stopped
	// the batch) are registered, and nothing else will release them.
	if ahead != nil {
		f.releaseUnwritten(ahead, len(outs)-aheadFrom)
		f.arenas.Put(&ahead.arena)
	}
	if next != nil {
		dropNext()
	}
	if spare != nil {
		f.arenas.Put(spare)
	}
	return spans, outs
}

// windowBytes bounds a window read ahead (a span longer than it is a
// window alone): a quarter of a batch, so that the first window's read,
// before any write, is short, and the two arenas in use (the window being
// written, the next being read) hold half a batch; at least MaxWrite.
func (f *Flusher) windowBytes() int64 { return max(f.cfg.BatchBytes/4, f.cfg.MaxWrite) }

// readAhead is a window of an issue's spans read at once (BatchReader):
// spans[i], spans[from+i] of the issue, is read into data[i], in one
// arena; outs[i] holds the fates of its pieces, read or not. ready is
// closed once they are read.
type readAhead struct {
	from  int
	spans []span
	arena []byte
	data  [][]byte
	outs  []*spanOut
	ready chan struct{}
}

func (ra *readAhead) wait() { <-ra.ready }

// startReadAhead reads every piece of spans (a window, from the issue's
// span from on) with one ReadCachedBatch, in a goroutine of its own, once
// every job in after has completed: into the arena ap (whose window's
// jobs are among them) or one of the pool's.
func (f *Flusher) startReadAhead(spans []span, from int, ap *[]byte, after []chan struct{}) *readAhead {
	ra := &readAhead{from: from, spans: spans[:len(spans):len(spans)], ready: make(chan struct{})}
	after = after[:len(after):len(after)]
	go func() {
		defer close(ra.ready)
		for _, fin := range after {
			<-fin // a job always completes, whatever ctx says
		}
		f.readAhead(ra, ap)
	}()
	return ra
}

// releaseUnwritten releases the pieces read ahead in ra that no job
// took, those of its spans from the i'th on.
func (f *Flusher) releaseUnwritten(ra *readAhead, i int) {
	for i = max(i, 0); i < len(ra.spans); i++ {
		for j, st := range ra.outs[i].st {
			if st == pending {
				f.rel.ReleaseCached(ra.spans[i].ext[j])
			}
		}
	}
}

// readAhead reads every piece of ra.spans with one ReadCachedBatch, into
// the arena ap or, if it is too small or nil, one of the pool's.
func (f *Flusher) readAhead(ra *readAhead, ap *[]byte) {
	var total int64
	pieces := 0
	for _, s := range ra.spans {
		total += s.n
		pieces += len(s.ext)
	}
	ra.data, ra.outs = make([][]byte, len(ra.spans)), make([]*spanOut, len(ra.spans))
	if ap == nil || int64(cap(*ap)) < total {
		ap, _ = f.arenas.Get().(*[]byte)
	}
	if ap != nil && int64(cap(*ap)) >= total {
		ra.arena = (*ap)[:total]
	} else {
		ra.arena = make([]byte, total)
	}
	es := make([]btreeidx.Extent, 0, pieces)
	ps := make([][]byte, 0, pieces)
	var pos int64
	for i, s := range ra.spans {
		d := ra.arena[pos : pos+s.n]
		pos += s.n
		ra.data[i] = d
		ra.outs[i] = &spanOut{st: make([]status, len(s.ext))}
		for _, e := range s.ext {
			es = append(es, e)
			ps = append(ps, d[e.Off-s.off:e.End()-s.off])
		}
	}
	errs := make([]error, len(es))
	f.breader.ReadCachedBatch(es, ps, errs)
	k := 0
	for _, out := range ra.outs {
		for j := range out.st {
			out.st[j] = f.readFate(errs[k], out)
			k++
		}
	}
}

// readFate is the status of a piece whose ReadCached returned err, for a
// span whose outcome is out.
func (f *Flusher) readFate(err error, out *spanOut) status {
	switch {
	case err == nil:
		return pending
	case errors.Is(err, ErrStale):
		return stale
	case errors.Is(err, ErrBusy):
		f.count(func(s *Stats) { s.Busy++ })
		return busy
	default:
		f.spanFailed(out, err)
		return failed
	}
}

// spanFailed records err as the span's first failure, if it is, and as
// the flusher's.
func (f *Flusher) spanFailed(out *spanOut, err error) {
	if out.err == nil {
		out.err = err
	}
	f.fail(err)
}

// settle makes what issue wrote durable, then marks it clean: one backing
// Flush for all of it (if the backing needs one), then MarkClean for each
// dirty piece written, ReleaseCached for each clean piece written and for
// each piece whose write or the flush failed. It adds to res and takes
// the pieces out of mu.pending.
func (f *Flusher) settle(spans []span, outs []*spanOut, res *batchResult) {
	anyWritten := false
	var added int64
	for i, out := range outs {
		added += out.added
		if out.err != nil && res.firstErr == nil {
			res.firstErr = out.err
		}
		for j, st := range out.st {
			switch st {
			case written:
				anyWritten = true
			case stale:
				if e := spans[i].ext[j]; e.Dirty {
					res.collided += e.Len
					f.count(func(s *Stats) { s.Collisions++; s.CollidedBytes += e.Len })
				}
			}
		}
	}
	if anyWritten && f.flush {
		if err := f.backingFlush(); err != nil {
			if res.firstErr == nil {
				res.firstErr = err
			}
			for _, out := range outs {
				for j := range out.st {
					if out.st[j] == written {
						out.st[j] = lost
					}
				}
			}
		}
	}
	var sum Stats // what the loop adds to the flusher's, under one hold of its lock
	for i, out := range outs {
		for j, st := range out.st {
			switch st {
			case failed:
				res.errs++
			case busy:
				res.busy++
			case lost:
				res.errs++
				if f.rel != nil {
					f.rel.ReleaseCached(spans[i].ext[j])
				}
			case written:
				if e := spans[i].ext[j]; !e.Dirty {
					// A clean piece that bridged a gap: nothing to mark.
					if f.rel != nil {
						f.rel.ReleaseCached(e)
					}
					sum.FilledBytes += e.Len
					continue
				}
				cleaned, collided := f.src.MarkClean(spans[i].ext[j])
				res.pieces++
				res.cleaned += cleaned
				res.collided += collided
				sum.Cleaned += cleaned
				if collided > 0 {
					sum.Collisions++
					sum.CollidedBytes += collided
				}
			}
		}
	}
	f.mu.Lock()
	f.mu.stats.FilledBytes += sum.FilledBytes
	f.mu.stats.Cleaned += sum.Cleaned
	f.mu.stats.Collisions += sum.Collisions
	f.mu.stats.CollidedBytes += sum.CollidedBytes
	f.mu.pending -= added
	f.mu.stats.Pending = f.mu.pending
	if res.errs > 0 {
		res.lastErr = f.mu.stats.LastError
	}
	f.mu.Unlock()
}

// completePassLocked ends a pass: the cursor wraps to 0.
func (f *Flusher) completePassLocked(now time.Time) {
	f.mu.stats.Passes++
	if !f.mu.passErrs {
		f.mu.swept = f.mu.passFrom
	}
	f.mu.agePass = false
	f.mu.passFrom, f.mu.passErrs, f.mu.cursor = now, false, 0
}

// fullSpeed reports whether the flusher runs at full speed now.
func (f *Flusher) fullSpeed() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.modeLocked(time.Now(), false).FullSpeed()
}

// pace blocks until the next span of n bytes may be issued. It reports
// false when the batch should stop here: ctx is done, the mode turned to
// stopped, the batch has run for BatchTime, or it has used its budget (in
// rate mode, about BatchTime's worth at the current rate; at full speed,
// BatchBytes). A batch always issues its first span. waited reports
// whether it waited for the limiter.
func (f *Flusher) pace(ctx context.Context, n, sent int64, start time.Time) (ok, waited bool) {
	for {
		if ctx.Err() != nil {
			return false, waited
		}
		now := time.Now()
		f.mu.Lock()
		mode := f.modeLocked(now, false)
		if mode == ModeStopped || (sent > 0 && (sent+n > f.budgetLocked(mode) || now.Sub(start) >= f.cfg.BatchTime)) {
			f.mu.Unlock()
			return false, waited
		}
		if mode.FullSpeed() {
			f.mu.lim.reset(now)
			f.mu.Unlock()
			return true, waited
		}
		d := f.mu.lim.delay(now)
		if d <= 0 {
			f.mu.lim.charge(n, f.mu.ctl.rate)
			f.mu.Unlock()
			return true, waited
		}
		f.mu.binding = true
		f.mu.Unlock()
		if _, at := f.idleAt(now); at.Sub(now) < d {
			d = max(at.Sub(now), time.Nanosecond) // wake up to go full speed when idle comes
		}
		if !f.wait(ctx, d) {
			return false, true
		}
		waited = true
	}
}

// writeSpan reads the pieces of s from the cache (unless data holds them,
// read ahead, their fates already in out) and writes them to the
// backing, recording each piece's fate in out. It issues its first backing
// write only after the span before it has issued its last (prev closed),
// and closes started just before its own last write: backing writes leave
// in ascending order. observe, if not nil, is told each write's time.
func (f *Flusher) writeSpan(s *span, out *spanOut, data []byte, prev <-chan struct{}, started chan<- struct{}, observe func(time.Duration, int64)) {
	st := out.st
	buf := data
	if buf == nil {
		buf = f.getBuf(s.n)
		defer f.putBuf(buf)
		for j, e := range s.ext {
			st[j] = f.readFate(f.src.ReadCached(e, buf[e.Off-s.off:e.End()-s.off]), out)
		}
	}
	// Runs of readable pieces, each one backing write.
	type run struct{ a, b int } // pieces [a, b)
	var runs []run
	for j := 0; j < len(st); {
		if st[j] != pending {
			j++
			continue
		}
		k := j
		for k < len(st) && st[k] == pending {
			k++
		}
		runs = append(runs, run{j, k})
		j = k
	}
	<-prev
	if len(runs) == 0 {
		close(started)
		return
	}
	for i, r := range runs {
		if i == len(runs)-1 {
			close(started)
		}
		off := s.ext[r.a].Off
		end := s.ext[r.b-1].End()
		t0 := time.Now()
		err := f.backing.WriteAt(buf[off-s.off:end-s.off], off, 0)
		took := time.Since(t0)
		f.times.note(took)
		if observe != nil {
			observe(took, end-off)
		}
		fate := written
		if err != nil {
			fate = lost
			f.spanFailed(out, err)
		} else {
			var dirty int64
			for _, e := range s.ext[r.a:r.b] {
				if e.Dirty {
					dirty += e.Len
				}
			}
			out.added += dirty
			f.mu.Lock()
			f.mu.pending += dirty
			f.mu.stats.Pending = f.mu.pending
			f.mu.stats.Writes++
			f.mu.stats.BytesWritten += end - off
			f.mu.Unlock()
		}
		for j := r.a; j < r.b; j++ {
			st[j] = fate
		}
	}
}

// backingFlush flushes the backing and counts it.
func (f *Flusher) backingFlush() error {
	err := f.doFlush()
	if err != nil {
		f.fail(err)
		return err
	}
	f.count(func(s *Stats) { s.Flushes++ })
	return nil
}

func (f *Flusher) fail(err error) {
	f.count(func(s *Stats) { s.Errors++; s.LastError = err })
}

func (f *Flusher) count(fn func(*Stats)) {
	f.mu.Lock()
	fn(&f.mu.stats)
	f.mu.Unlock()
}

// getBuf returns a buffer of at least n bytes: a MaxWrite buffer, pooled
// (up to 2*MaxInFlight of them: a batch's spans and those of a WriteBack
// beside it, GC's, find one free), or for an extent longer than MaxWrite
// (WriteBack) one of its own.
func (f *Flusher) getBuf(n int64) []byte {
	if n > f.cfg.MaxWrite {
		return make([]byte, n)
	}
	select {
	case b := <-f.bufs:
		return b
	default:
		return make([]byte, f.cfg.MaxWrite)
	}
}

// putBuf returns a MaxWrite buffer to the pool.
func (f *Flusher) putBuf(b []byte) {
	if int64(len(b)) != f.cfg.MaxWrite {
		return
	}
	select {
	case f.bufs <- b:
	default:
	}
}
