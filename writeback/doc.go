// Package writeback is the cache's background flusher: it writes dirty data
// from the cache device back to the backing device, sorted by address and
// merged into long writes, at a rate that keeps the dirty level near a
// target, and marks it clean only once the backing holds it durably.
//
// The cache implements Source and starts the Flusher (Run); this package
// never imports the cache.
//
// # A batch
//
// The flusher works in batches from a cursor on the virtual device:
//
//  1. Plan: list dirty extents with End() > cursor, ascending
//     (Source.DirtyExtents), and merge adjacent ones into spans of at most
//     MaxWrite bytes. An extent that does not fit is cut into pieces at the
//     span boundary; a piece is a sub-range of the extent with Loc moved by
//     the same amount and the same Ver and Gen, and the Source accepts it
//     wherever it accepts an extent (the index splits extents the same
//     way). If the Source is a Filler, a gap of at most MaxGap between a
//     span and the next dirty extent that clean cached extents cover whole
//     joins the span as clean pieces: they hold what the backing holds, so
//     writing them again changes nothing, and a fragmented dirty range
//     costs one long write instead of a seek per run. Clean pieces are
//     read and registered like dirty ones, then released, never marked
//     clean; the budget and the rate count dirty bytes only. A batch
//     takes at most BatchBytes at full speed, and about
//     rate*BatchTime when rate-limited; it issues no new write once it has
//     run for BatchTime.
//  2. Write: for each span, in ascending order, wait for the rate limiter,
//     plan the span's range again (clients may have overwritten some of
//     its extents while it waited: the newer versions, dirty too, take
//     their place, so the span stays one write; a part that became clean
//     meanwhile splits it), read its pieces from the cache
//     (Source.ReadCached) and write it to the backing with one WriteAt.
//     Off a disk, once a job may go at full speed, the rest of the batch
//     is planned again (not if it is the batch's first job and nothing
//     held it back: the batch was planned a moment ago) and its pieces
//     are read ahead (a Source that is a BatchReader and a Releaser), a
//     window at a time, one call a window. A window is a quarter of
//     BatchBytes, at least MaxWrite (a longer span is a window alone),
//     but the first is MaxWrite and each next one twice the one before,
//     up to that. The first is read before any write; as each window's
//     writes begin, the next is read beside them, into the arena of the
//     window before once its writes have completed: two arenas in use,
//     half a batch with the default sizes. Reading ahead stops when the backing turns
//     out to seek, or the batch leaves full speed. The pieces of the
//     windows the batch stops before writing are released. At most MaxInFlight
//     spans are under way, in a sliding window: span k+MaxInFlight is
//     not started before span k has completed. Spans are read concurrently, but a span's backing
//     write is issued only after the previous span's was. So within a pass
//     the backing sees writes in ascending order, except that a write may
//     be overtaken by writes of fewer than MaxInFlight later spans (the
//     goroutines race between issuing and the device call); with
//     MaxInFlight 1 the order is strict.
//  3. Flush: once every write of the batch has returned, one backing
//     Flush (skipped if the backing's Caps say Flush is not needed).
//  4. Mark clean: only then, Source.MarkClean for every piece whose write
//     succeeded. MarkClean is a compare-and-swap on Ver: a piece that a
//     newer write replaced in the meantime stays dirty (with the newer
//     data) and is counted as a collision, never an error.
//  5. The cursor moves to the end of the last span written. When the plan
//     reached the end of the device, the pass is complete and the cursor
//     wraps to 0.
//
// The ordering rule: the backing write of a piece is durable (written and
// then flushed) BEFORE MarkClean is called for it. A crash at any point
// leaves the piece dirty in the cache, so it is written again; it never
// leaves a piece marked clean whose data the backing could lose.
//
// Failures: a failed cache read or backing write leaves its pieces dirty;
// a failed Flush leaves the whole batch dirty. Each is counted in Stats,
// logged once per batch (log/slog), and retried on a later pass after a
// backoff that doubles from RetryMin to RetryMax. A piece that was read
// but not marked clean is handed to ReleaseCached if the Source implements
// Releaser. A ReadCached error that wraps ErrStale is a lost race, counted
// as a collision; one that wraps ErrBusy (someone else is writing that
// range back) is skipped and counted; neither causes a backoff. When the
// Source reports dirty bytes but lists nothing writable, Run waits for a
// Kick or the next controller step instead of spinning.
//
// # WriteBack: the same engine, on demand
//
// The Source's own writebacks (the cache's GC cleaning a victim bucket, a
// bypassed write whose range holds dirty data) call WriteBack with the
// extents they need clean now. It is steps 2 to 4 of a batch without the
// plan, the pace or the cursor (off a disk, its pieces read ahead by
// windows, as a full-speed batch's): the extents are sorted and adjacent ones
// merged up to MaxWrite (one longer than that is written whole, as
// cleaning part of an extent would cut it), written in the same sliding
// window, flushed once and marked clean, by the same code and ordering
// rule. There is one implementation of the rule in the module.
//
// # Modes
//
// Before each batch and each span, one pure predicate (decide) picks the
// mode. "dirty" there, and in the controller, is the dirty data not yet
// written back: Source.DirtyBytes less what the current batch has written
// and will mark clean after its flush (Stats.Pending), so a batch under way
// does not hold the flusher at full speed after it has in fact crossed a
// watermark. First match wins:
//
//	nothing dirty                         stopped
//	a Drain runs                          drain   (full speed)
//	the Source sheds its data (Shedder)   shed    (full speed)
//	dirty >= HighWatermark% of capacity   full    (full speed)
//	no NoteForeground for IdleAfter       idle    (full speed)
//	last complete pass began more than
//	  MaxDirtyAge ago                     age     (full speed, a fresh pass)
//	the Seeker says the backing seeks,
//	  fewer than trustTimes writes timed  probe   (full speed, about probeBytes a batch)
//	dirty < LowWatermark% of capacity     stopped
//	otherwise                             rate    (the controller's rate)
//
// MaxDirtyAge works by passes: after a pass that started at time t
// completes without errors, everything still dirty was dirtied after t. So
// when the last such pass began more than MaxDirtyAge ago, the flusher
// restarts the pass at full speed; no dirty byte stays much older than
// MaxDirtyAge plus the length of one full-speed pass.
//
// # The controller
//
// Every UpdateInterval, bcache's PI controller sets the rate (bytes,
// seconds; capacity from Source.CapacityBytes):
//
//	target    = capacity * TargetPercent / 100
//	error     = dirty - target
//	integral += error * dt    only if (error < 0 and integral > 0)
//	                          or (error > 0 and the limiter made the
//	                          flusher wait since the last update)
//	integral  = max(integral, 0)
//	rate      = clamp(error/PTermInverse + integral/ITermInverse,
//	                  MinRate, MaxRate)
//
// The integral winds up only while the rate is what holds writeback back;
// when the backing cannot keep up, more integral would only overshoot
// later. With a steady foreground write rate W and a backing that keeps up,
// the loop is
//
//	d(error)/dt = W - rate,   so   error'' + error'/P + error/I = 0
//
// (P = PTermInverse, I = ITermInverse): it settles with error -> 0 and
// rate -> W, overdamped when P < sqrt(I)/2 (the defaults, 40 s and
// 10000 s², give time constants of 50 s and 200 s).
//
// The limiter spaces spans at the rate: a span of n bytes may start at
// next, and moves next on by n/rate. next never lags now by more than a
// quarter of min(BatchTime, UpdateInterval) (no catch-up burst) and no
// single wait exceeds UpdateInterval. Full-speed modes skip it.
//
// # Concurrency
//
// Run and Drain share one token: a batch runs while holding it, so there
// is one cursor and never two batches at once. WriteBack takes no token:
// the Source's ReadCached refuses a piece another writeback holds
// (ErrBusy), and each call counts only its own writes in Stats.Pending. Drain sets a flag that makes
// every batch full speed and Kicks Run out of any wait; Run yields the
// token after its current batch. Waits are timers and channels (no
// polling), so testing/synctest runs the flusher in virtual time.
package writeback
