package writeback

// flusher.go: Flusher and the Source it writes back from: its Run loop,
// Drain and Stats.

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nbdcache/nbdcache/btreeidx"
	"github.com/nbdcache/nbdcache/storage"
)

// Sentinel errors.
var (
	// ErrConfig is wrapped by Config.Validate's errors.
	ErrConfig = errors.New("writeback: bad config")
	// ErrRunning is returned by Run when another Run is under way.
	ErrRunning = errors.New("writeback: already running")
	// ErrStale may be wrapped by Source.ReadCached when the extent it was
	// given is no longer current (overwritten, its bucket reused). The
	// flusher counts it as a collision and moves on, with no backoff.
	// (A Source's own sentinel can wrap it: fmt.Errorf("cache: ...: %w",
	// writeback.ErrStale).)
	ErrStale = errors.New("writeback: extent no longer current")
	// ErrBusy may be wrapped by Source.ReadCached when the range is being
	// written back by someone else. The piece is skipped, stays dirty and
	// is retried on a later pass; it is neither an error nor a collision.
	ErrBusy = errors.New("writeback: range busy")
	// ErrDrain is wrapped by Drain when it cannot write everything back:
	// several passes in a row made no progress (writes failed, or the
	// Source reports dirty bytes that it does not list).
	ErrDrain = errors.New("writeback: drain incomplete")
	// ErrStalled is wrapped by Drain's ErrDrain when the passes without
	// progress saw no error: the Source reported dirty bytes that it did
	// not list, or listed only busy ranges. A Source that holds ranges for
	// a moment may drain again.
	ErrStalled = errors.New("writeback: dirty data not writable")
)

// Source is what the flusher needs from the cache.
type Source interface {
	// DirtyExtents calls fn for dirty extents with End() > from,
	// ascending (a snapshot; no lock held during fn's I/O).
	DirtyExtents(from int64, fn func(btreeidx.Extent) bool)
	// ReadCached reads the cache-device data of e (e as handed out by
	// DirtyExtents) into p (len(p) == e.Len).
	ReadCached(e btreeidx.Extent, p []byte) error
	// MarkClean is called only after the backing write of e is durable
	// (backing flushed). It does the CAS on e.Ver, journals the change,
	// and returns bytes cleaned and bytes that collided with a newer
	// write.
	MarkClean(e btreeidx.Extent) (cleaned, collided int64)
	DirtyBytes() int64
	CapacityBytes() int64
}

// Releaser is implemented by a Source that keeps state between ReadCached
// and MarkClean (for example, a range locked against a concurrent
// writeback). For every piece that ReadCached returned without error but
// that will not be marked clean, because its backing write or the flush
// after it failed, the flusher calls ReleaseCached once instead of
// MarkClean. A piece whose ReadCached failed gets neither.
type Releaser interface {
	ReleaseCached(e btreeidx.Extent)
}

// BatchReader is implemented by a Source that reads many pieces for less
// than a ReadCached each (the cache takes its lock once for all of them,
// and reads pieces that lie near each other on its device together). Off
// a disk, a full-speed batch and WriteBack hand it the pieces of a window
// of spans (a quarter of BatchBytes) before writing any of them, from a
// goroutine of their own, the next window's while one is written:
// ReadCachedBatch is ReadCached of each es[i] into ps[i], its result in
// errs[i]. The flusher uses it only with a Source that is also a
// Releaser.
type BatchReader interface {
	ReadCachedBatch(es []btreeidx.Extent, ps [][]byte, errs []error)
}

// Filler is implemented by a Source that can also list its clean extents.
// The flusher then bridges a small gap between two dirty extents (at most
// Config.MaxGap) that clean extents cover whole: it reads them with
// ReadCached like dirty pieces and writes them in the same backing write,
// so a fragmented dirty range costs one long write instead of a seek per
// run. A clean piece holds what the backing holds, so writing it again
// changes nothing; it is never marked clean, only released (the Source
// must also implement Releaser).
type Filler interface {
	// CleanExtents calls fn, ascending, for the clean extents that
	// overlap [off, end), clipped to it.
	CleanExtents(off, end int64, fn func(btreeidx.Extent) bool)
}

// BackingFlusher is implemented by a Source that flushes the backing
// itself: the flusher then calls FlushBacking instead of the backing's
// Flush, so that the Source can share one flush among its own callers and
// the flusher's (the cache does: its commits and GC flush too).
type BackingFlusher interface {
	FlushBacking() error
}

// Shedder is implemented by a Source that may want its dirty data written
// back at full speed for a while (the cache, when it steps aside for a
// working set it cannot hold): while Shedding reports true, the flusher
// runs in ModeShed.
type Shedder interface {
	Shedding() bool
}

// Seeker is implemented by a Source that knows whether its backing is a
// disk now, where the head's position costs more than anything else
// (the cache measures it): each span is then written as a job of its
// own, so that MaxInFlight of them are queued at the disk. The flusher
// asks only until it has timed writes of its own (see writeTimes), and
// asks under its own mutex (the probe, ModeProbe): BackingSeeks must not
// block, take a lock, or call the Flusher but for TimedSeeks.
type Seeker interface {
	BackingSeeks() bool
}

// Stats is a snapshot of the flusher's counters.
type Stats struct {
	Mode         Mode    `json:"-"`                       // what the flusher is doing now
	Rate         int64   `json:"writeback_rate_limit"`    // controller output, bytes/s (the limit in ModeRate)
	Proportional float64 `json:"writeback_proportional"`  // controller's proportional term, bytes/s
	Integral     float64 `json:"writeback_integral"`      // controller's integral term, bytes/s
	Target       int64   `json:"writeback_target"`        // target dirty bytes
	Dirty        int64   `json:"writeback_dirty_bytes"`   // dirty bytes not yet written back, at the last look (Source.DirtyBytes - Pending)
	Pending      int64   `json:"writeback_pending_bytes"` // bytes of the current batch written to the backing, not yet flushed and marked clean
	WrittenRate  int64   `json:"writeback_rate"`          // bytes/s written back over the last controller interval

	BytesWritten  int64 `json:"writeback_written_bytes"` // bytes written to the backing
	FilledBytes   int64 `json:"writeback_filled_bytes"`  // of them, clean data that bridged gaps between dirty extents
	Writes        int64 `json:"backing_writes"`          // backing writes
	AvgWrite      int64 `json:"backing_write_avg"`       // BytesWritten / Writes
	Flushes       int64 `json:"writeback_flushes"`       // backing flushes asked for (a BackingFlusher may share them)
	Batches       int64 `json:"writeback_batches"`       // batches completed
	Passes        int64 `json:"writeback_passes"`        // passes over the whole device completed
	Cleaned       int64 `json:"writeback_cleaned_bytes"` // bytes marked clean
	Collisions    int64 `json:"collisions"`              // extents that lost the race with a newer write
	CollidedBytes int64 `json:"collided_bytes"`          // bytes of those
	Busy          int64 `json:"writeback_busy"`          // pieces skipped because ReadCached said ErrBusy
	Errors        int64 `json:"writeback_errors"`        // failed cache reads, backing writes and flushes
	LastError     error `json:"-"`                       // the most recent of those, or nil
}

// Flusher writes dirty data back from the cache to the backing device.
// See the package documentation for the order it keeps and the controller.
type Flusher struct {
	src     Source
	rel     Releaser     // src, if it is one
	breader BatchReader  // src, if it is one and a Releaser
	fill    Filler       // src, if it is one and a Releaser, and MaxGap >= 0
	doFlush func() error // src's FlushBacking if it is a BackingFlusher, else backing.Flush
	shed    Shedder      // src, if it is one
	seeks   Seeker       // src, if it is one
	times   writeTimes   // of the flusher's own backing writes
	backing storage.Device
	cfg     Config
	flush   bool // the backing needs Flush for durability

	wake     chan struct{} // Kick: re-evaluate now (one slot, never blocks)
	token    chan struct{} // held by whoever runs batches (Run or Drain)
	bufs     chan []byte   // free MaxWrite buffers: enough for a batch and a WriteBack beside it
	arenas   sync.Pool     // *[]byte: readAhead's arenas
	running  atomic.Bool
	draining atomic.Int32
	lastFG   atomic.Int64 // UnixNano of the last NoteForeground

	mu struct {
		sync.Mutex
		ctl      controller
		lim      limiter
		binding  bool  // the limiter made the flusher wait since the last update
		pending  int64 // bytes of the current batch written, not yet marked clean
		cursor   int64 // the next batch starts at the first dirty extent ending after it
		passFrom time.Time
		swept    time.Time // start of the last pass that completed without errors
		agePass  bool
		passErrs bool
		stats    Stats
	}
}

// Validate fills in Config's defaults and reports whether the result is
// usable. New panics on a Config that fails it; callers validate at their
// edge.
func (c Config) Validate() error {
	_, err := c.withDefaults()
	return err
}

// New returns a flusher that writes back src's dirty data to backing. It
// does nothing until Run or Drain is called.
func New(src Source, backing storage.Device, cfg Config) *Flusher {
	cfg, err := cfg.withDefaults()
	if err != nil {
		panic(err)
	}
	rel, _ := src.(Releaser)
	fill, _ := src.(Filler)
	breader, _ := src.(BatchReader)
	if rel == nil {
		breader = nil
	}
	if rel == nil || cfg.MaxGap < 0 {
		fill = nil
	}
	shed, _ := src.(Shedder)
	seeks, _ := src.(Seeker)
	doFlush := backing.Flush
	if bf, ok := src.(BackingFlusher); ok {
		doFlush = bf.FlushBacking
	}
	f := &Flusher{
		src:     src,
		rel:     rel,
		breader: breader,
		fill:    fill,
		backing: backing,
		cfg:     cfg,
		flush:   backing.Caps().Flush,
		doFlush: doFlush,
		shed:    shed,
		seeks:   seeks,
		wake:    make(chan struct{}, 1),
		token:   make(chan struct{}, 1),
		bufs:    make(chan []byte, 2*cfg.MaxInFlight),
	}
	now := time.Now()
	f.lastFG.Store(now.UnixNano())
	f.mu.ctl = newController(&cfg)
	f.mu.lim = limiter{next: now, lag: min(cfg.BatchTime, cfg.UpdateInterval) / 4, maxWait: cfg.UpdateInterval}
	f.mu.passFrom = now
	f.mu.swept = now
	f.mu.stats.Rate = int64(f.mu.ctl.rate)
	return f
}

// Kick makes the flusher re-evaluate now: new dirty data arrived, or the
// foreground went idle. It never blocks.
func (f *Flusher) Kick() {
	select {
	case f.wake <- struct{}{}:
	default:
	}
}

// NoteForeground records a client request; the foreground is idle when none
// came for Config.IdleAfter. It is one atomic store.
func (f *Flusher) NoteForeground() {
	f.lastFG.Store(time.Now().UnixNano())
}

// Stats returns a snapshot of the counters.
func (f *Flusher) Stats() Stats {
	f.mu.Lock()
	defer f.mu.Unlock()
	s := f.mu.stats
	if s.Writes > 0 {
		s.AvgWrite = s.BytesWritten / s.Writes
	}
	return s
}

// idleAt reports whether the foreground is idle at now, and when it will be
// if it is not.
func (f *Flusher) idleAt(now time.Time) (bool, time.Time) {
	at := time.Unix(0, f.lastFG.Load()).Add(f.cfg.IdleAfter)
	return !now.Before(at), at
}

// situationLocked gathers what decide needs. At a batch boundary
// (between batches, when the cursor is free) it starts an age pass when
// one is due; within a batch a due pass only makes the mode age, and the
// pass starts at the next boundary.
func (f *Flusher) situationLocked(now time.Time, boundary bool) situation {
	s := situation{
		dirty:    f.dirtyLocked(),
		capacity: f.src.CapacityBytes(),
		draining: f.draining.Load() > 0,
		shed:     f.shed != nil && f.shed.Shedding(),
	}
	s.idle, _ = f.idleAt(now)
	_, timed := f.TimedSeeks()
	s.probe = f.seeks != nil && !timed && f.seeks.BackingSeeks()
	if s.dirty <= 0 && f.mu.pending == 0 {
		// Nothing dirty: nothing is old.
		f.mu.swept, f.mu.agePass = now, false
	}
	due := f.cfg.MaxDirtyAge >= 0 && !f.mu.agePass && now.Sub(f.mu.swept) > f.cfg.MaxDirtyAge
	if due && boundary {
		// Restart the pass, so that when it completes everything dirty
		// now has been written back once.
		f.mu.agePass, due = true, false
		f.mu.cursor, f.mu.passFrom, f.mu.passErrs = 0, now, false
	}
	s.aged = f.mu.agePass || due
	f.mu.stats.Dirty = s.dirty
	return s
}

// dirtyLocked is the dirty data not yet written back: what the Source
// reports, less what the current batch has written and will mark clean
// after its flush. Modes and the controller look at this, so that a batch
// under way does not count twice and the level they see moves smoothly.
func (f *Flusher) dirtyLocked() int64 {
	return max(f.src.DirtyBytes()-f.mu.pending, 0)
}

// modeLocked decides what to do at now; boundary as for situationLocked.
func (f *Flusher) modeLocked(now time.Time, boundary bool) Mode {
	m := decide(f.situationLocked(now, boundary), &f.cfg)
	f.mu.stats.Mode = m
	return m
}

// updateLocked runs one controller step, dt after the previous one.
func (f *Flusher) updateLocked(dt time.Duration, written int64) {
	st := &f.mu.stats
	st.Pending = f.mu.pending
	dirty := f.dirtyLocked()
	st.Target = int64(float64(f.src.CapacityBytes()) * float64(f.cfg.TargetPercent) / 100)
	f.mu.ctl.update(dirty, st.Target, dt.Seconds(), f.mu.binding)
	f.mu.binding = false
	st.Dirty = dirty
	st.Rate = int64(f.mu.ctl.rate)
	st.Proportional, st.Integral = f.mu.ctl.p, f.mu.ctl.i
	if dt > 0 {
		st.WrittenRate = int64(float64(written) / dt.Seconds())
	}
}

// acquire takes the batch token.
func (f *Flusher) acquire(ctx context.Context) error {
	select {
	case f.token <- struct{}{}:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (f *Flusher) release() { <-f.token }

// Exclusive runs fn between two batches: no batch of Run or Drain is under
// way while it runs. The Source uses it for a writeback of its own that
// must not share the backing's head with the flusher's pass: on a disk,
// two sorted streams interleaved make every write of both a seek. It waits
// for the batch under way (at most about Config.BatchTime), and fails
// only if ctx ends first.
func (f *Flusher) Exclusive(ctx context.Context, fn func()) error {
	if err := f.acquire(ctx); err != nil {
		return err
	}
	defer f.release()
	fn()
	return nil
}

// wait blocks for d, or until ctx is done or Kick is called. It reports
// false when ctx is done.
func (f *Flusher) wait(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-f.wake:
	case <-t.C:
	}
	return true
}

// Run writes back in the background until ctx is done, then returns nil
// (ErrRunning if another Run is under way). Batches already started finish
// first: their backing writes are flushed and marked clean.
func (f *Flusher) Run(ctx context.Context) error {
	if !f.running.CompareAndSwap(false, true) {
		return ErrRunning
	}
	defer f.running.Store(false)

	lastUpdate := time.Now()
	var lastWritten int64
	backoff := time.Duration(0)
	for ctx.Err() == nil {
		now := time.Now()
		f.mu.Lock()
		if dt := now.Sub(lastUpdate); dt >= f.cfg.UpdateInterval {
			w := f.mu.stats.BytesWritten
			f.updateLocked(dt, w-lastWritten)
			lastUpdate, lastWritten = now, w
		}
		mode := f.modeLocked(now, true)
		f.mu.Unlock()

		if mode == ModeStopped {
			// Sleep until the next controller step, or the moment the
			// foreground turns idle or dirty data turns old, or a Kick.
			next := lastUpdate.Add(f.cfg.UpdateInterval)
			if idle, at := f.idleAt(now); !idle && at.Before(next) {
				next = at
			}
			f.mu.Lock()
			if f.cfg.MaxDirtyAge >= 0 {
				if at := f.mu.swept.Add(f.cfg.MaxDirtyAge + time.Nanosecond); at.Before(next) {
					next = at
				}
			}
			f.mu.Unlock()
			f.wait(ctx, next.Sub(now))
			continue
		}

		if err := f.acquire(ctx); err != nil {
			break
		}
		res := f.batch(ctx)
		f.release()
		switch {
		case errors.Is(res.firstErr, storage.ErrSyncFailed):
			// The backing lost writes and fails every flush until it is
			// opened again: nothing written back can be marked clean any
			// more, and each batch would be written for nothing. The
			// dirty data stays in the cache.
			f.cfg.Logger.Error("writeback: the backing lost writes and fails every flush until nbdcache is restarted; writeback stops, dirty data stays in the cache", "err", res.firstErr)
			<-ctx.Done()
			return nil
		case res.errs > 0:
			backoff = min(max(2*backoff, f.cfg.RetryMin), f.cfg.RetryMax)
			f.wait(ctx, backoff)
		case !res.progressed():
			// Nothing listed, or all of it busy elsewhere, though the
			// Source reports dirty data: wait for a Kick or the next
			// controller step rather than spin.
			backoff = 0
			f.wait(ctx, lastUpdate.Add(f.cfg.UpdateInterval).Sub(time.Now()))
		default:
			backoff = 0
		}
	}
	return nil
}

// drainPasses is how many passes in a row may fail without cleaning a byte
// before Drain gives up. Between them it backs off as Run does.
const drainPasses = 5

// Drain writes back everything dirty at full speed, then flushes the
// backing. progress, if not nil, is called with the bytes cleaned so far
// and the total to clean (which grows if new dirty data arrives). It is
// safe to call while Run runs: Run yields to it. It returns nil once
// DirtyBytes is 0 and the backing is flushed, ctx's error if ctx ends
// first, or an error wrapping ErrDrain (and the last error, if any) when
// drainPasses passes in a row make no progress: every write failed, or the
// Source lists nothing (or only busy ranges) while it reports dirty bytes.
// Between such passes it backs off as Run does.
//
// Drain ends only when nothing is dirty: the caller stops new dirty writes
// first (switching the cache to writethrough), or the drain chases them.
func (f *Flusher) Drain(ctx context.Context, progress func(done, total int64)) error {
	f.draining.Add(1)
	defer f.draining.Add(-1)
	f.Kick() // a rate-limited wait in Run ends now
	if err := f.acquire(ctx); err != nil {
		return err
	}
	defer f.release()

	total := max(f.src.DirtyBytes(), 0)
	var done int64
	report := func() {
		if progress != nil {
			progress(done, total)
		}
	}
	report()
	backoff := time.Duration(0)
	passProgress := false // some batch since the last pass boundary cleaned or collided
	fruitless := 0        // passes in a row without progress
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		if f.src.DirtyBytes() <= 0 {
			break
		}
		res := f.batch(ctx)
		done += res.cleaned
		total = max(total, done+f.src.DirtyBytes())
		report()
		if errors.Is(res.firstErr, storage.ErrSyncFailed) {
			return fmt.Errorf("%w: %w", ErrDrain, res.firstErr) // see Run
		}
		progressed := res.progressed()
		passProgress = passProgress || progressed
		if res.wrapped || res.empty {
			if passProgress {
				fruitless = 0
			} else if fruitless++; fruitless >= drainPasses {
				if res.lastErr != nil {
					return fmt.Errorf("%w: %d passes in a row without progress: %w", ErrDrain, fruitless, res.lastErr)
				}
				return fmt.Errorf("%w: %w: %d passes in a row without progress, %d bytes dirty", ErrDrain, ErrStalled, fruitless, f.src.DirtyBytes())
			}
			passProgress = false
		}
		if progressed {
			backoff = 0
			continue
		}
		// Errors, or nothing listed or everything busy: wait and retry.
		backoff = min(max(2*backoff, f.cfg.RetryMin), f.cfg.RetryMax)
		if !f.wait(ctx, backoff) {
			return ctx.Err()
		}
	}
	if f.flush {
		if err := f.backingFlush(); err != nil {
			return fmt.Errorf("%w: final flush: %w", ErrDrain, err)
		}
	}
	report()
	return nil
}
