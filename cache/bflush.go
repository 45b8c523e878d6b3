package cache

// bflush.go: the backing's flushes, shared. One runs at a time, and every
// caller that asks while one runs shares the next: the flusher's batches,
// GC's cleaning passes and the journal's commits no longer queue a flush
// each behind one another (each fdatasync of a file in the page cache
// also writes out every bypassed write since the last one).

import "sync"

// flushGroup serializes and shares the flushes of one device. A caller
// needs a flush that begins after its call: one already running may have
// begun before the writes it must cover completed. Every caller waiting
// when a flush begins is covered by it.
type flushGroup struct {
	mu           sync.Mutex
	cond         sync.Cond
	running      bool
	begun, ended uint64 // flushes begun and ended (equal unless running)
	failed       uint64 // the last flush that failed (0: none)
	err          error  // its error
	nwait        int    // callers waiting for a flush to end
}

// flush returns once a flush (do) that began after the call has ended.
// It fails if that flush failed, or one that was running at the call did
// (it may have covered the caller's writes, and lost them). A failure
// that ended before the call is not the caller's: where a failed flush
// can lose writes that a later one would not redo (a file: the kernel
// drops the pages it could not write), the device keeps failing every
// flush after it (storage.ErrSyncFailed), so the fresh one fails too.
func (g *flushGroup) flush(do func() error) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.cond.L == nil {
		g.cond.L = &g.mu
	}
	want, from := g.begun+1, g.begun+1
	if g.running {
		from = g.begun
	}
	for g.ended < want {
		if g.running {
			g.nwait++
			g.cond.Wait()
			g.nwait--
			continue
		}
		g.running = true
		g.begun++
		g.mu.Unlock()
		err := do()
		g.mu.Lock()
		g.running, g.ended = false, g.begun
		if err != nil {
			g.failed, g.err = g.ended, err
		}
		g.cond.Broadcast()
	}
	if g.failed >= from {
		return g.err
	}
	return nil
}
