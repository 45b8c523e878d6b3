package storage

// volatile.go: Volatile, a wrapper that gives a real device (a file, a disk)
// a volatile write cache that can lose power.

import (
	"cmp"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"unsafe"
)

// ErrAlreadyCut is returned by CutVolatile for a device whose power was
// already cut.
var ErrAlreadyCut = errors.New("storage: power already cut")

// DefaultMaxUndo is the undo log bound that VolatileOptions.MaxUndo 0 means.
const DefaultMaxUndo = 64 << 20

// VolatileOptions configures NewVolatile.
type VolatileOptions struct {
	// MaxUndo bounds the unsynced bytes the wrapper can take back, its
	// "write cache" (0: DefaultMaxUndo). A write that would pass it first
	// flushes the wrapped device and forgets the log, as a disk whose
	// write cache is full writes it out; a single request longer than
	// MaxUndo is written through the same way. Either makes data durable
	// earlier than the caller asked, which the contract allows.
	MaxUndo int64
}

// VolatileReport says what a power cut did to one Volatile device. An
// "entry" is one write, trim or zero made since the last Flush, without
// FUA; entries are judged per 512-byte sector (SectorSize).
type VolatileReport struct {
	Model LossModel
	// Entries in the undo log at the cut; of them, Dropped were undone
	// wholly, Kept not at all, Partial in some sectors only.
	Entries, Dropped, Kept, Partial int
	// Bytes of the entries undone and kept. A sector of an entry that a
	// newer surviving or FUA request covers counts as kept.
	BytesDropped, BytesKept int64
	// What LoseTorn did beyond LoseRandom.
	Tear
	// Undone holds the byte ranges whose unsynced contents the cut undid,
	// sorted and merged.
	Undone []ByteRange
	// Overflows and WriteThrough count, since the device was wrapped, the
	// times the undo log was full and flushed early, and the requests too
	// long for it that were written through.
	Overflows, WriteThrough int64
}

// ByteRange is the bytes [Off, Off+Len) of a device.
type ByteRange struct{ Off, Len int64 }

// mergeRanges sorts rs and merges the ones that overlap or touch.
func mergeRanges(rs []ByteRange) []ByteRange {
	slices.SortFunc(rs, func(a, b ByteRange) int { return cmp.Compare(a.Off, b.Off) })
	out := rs[:0]
	for _, r := range rs {
		if n := len(out); n > 0 && r.Off <= out[n-1].Off+out[n-1].Len {
			out[n-1].Len = max(out[n-1].Len, r.Off+r.Len-out[n-1].Off)
			continue
		}
		out = append(out, r)
	}
	return out
}

// VolatileStats is a snapshot of a Volatile device's counters.
type VolatileStats struct {
	UnsyncedEntries int   // writes, trims and zeroes that a cut may undo
	UnsyncedBytes   int64 // their length
	Pins            int   // FUA requests logged to protect their sectors
	Overflows       int64
	WriteThrough    int64
	PoweredOff      bool
}

// undoEntry is one request of the undo log.
type undoEntry struct {
	seq    uint64
	kind   OpKind // OpWrite, OpTrim or OpZero
	off, n int64
	old    []byte // what the range held before; nil: zeroes
	// pin marks a FUA request: it is durable, so no older entry may undo
	// its sectors. A pin has no old data and is never undone itself.
	pin bool
}

// Volatile wraps a Device whose writes are durable once they return (a
// file, after the cut syncs it) and gives it the volatile write cache of
// the Device contract: every write, trim and zero without FUA can be taken
// back by a power cut until a Flush returns.
//
// Before such a request reaches the wrapped device, Volatile reads the
// range's old contents into an undo log (bounded by MaxUndo); Flush
// flushes the wrapped device and then forgets the entries made before it
// began. CutVolatile freezes I/O, undoes entries under a LossModel, syncs
// the wrapped device and leaves the wrapper dead: every later call fails
// with ErrPoweredOff. The wrapped device then holds exactly what a disk
// with a volatile cache could hold after the power failed; wrap it again to
// "power on".
//
// Writes, trims and zeroes are serialized (one at a time, each with its
// old-data read), so the log order is the order the device saw; reads,
// extents and flushes run concurrently with them.
type Volatile struct {
	inner   Device
	maxUndo int64
	// gate is held shared by every call for its whole duration and
	// exclusively by a cut, which so waits for the calls in flight.
	gate sync.RWMutex
	dead atomic.Bool

	mu struct {
		// Held by a write, trim or zero from its old-data read until
		// its entry is logged; by Flush to read and trim the log.
		sync.Mutex
		log          []undoEntry
		bytes        int64 // sum of the data entries' n
		data         int   // data entries (not pins) in log
		pins         int
		seq          uint64
		overflows    int64
		writeThrough int64
	}
}

var (
	_ Device   = (*Volatile)(nil)
	_ Extenter = (*Volatile)(nil)
)

// NewVolatile wraps inner.
func NewVolatile(inner Device, opts VolatileOptions) *Volatile {
	if opts.MaxUndo <= 0 {
		opts.MaxUndo = DefaultMaxUndo
	}
	return &Volatile{inner: inner, maxUndo: opts.MaxUndo}
}

// Size returns the wrapped device's size.
func (v *Volatile) Size() int64 { return v.inner.Size() }

// Caps returns the wrapped device's capabilities, with Flush set: the
// wrapper has a volatile cache whatever the wrapped device has.
func (v *Volatile) Caps() Caps {
	c := v.inner.Caps()
	c.Flush = true
	return c
}

// enter takes the gate shared and fails after a cut.
func (v *Volatile) enter() error {
	v.gate.RLock()
	if v.dead.Load() {
		v.gate.RUnlock()
		return ErrPoweredOff
	}
	return nil
}

// ReadAt reads from the wrapped device.
func (v *Volatile) ReadAt(p []byte, off int64) error {
	if err := v.enter(); err != nil {
		return err
	}
	defer v.gate.RUnlock()
	return v.inner.ReadAt(p, off)
}

// Extents asks the wrapped device; a device that is not an Extenter is
// reported as all data.
func (v *Volatile) Extents(off, length int64, fn func(Extent) bool) error {
	if err := v.enter(); err != nil {
		return err
	}
	defer v.gate.RUnlock()
	return extentsOf(v.inner, off, length, fn)
}

// WriteAt writes p at off, logging the old contents unless flags has FUA.
func (v *Volatile) WriteAt(p []byte, off int64, flags Flags) error {
	return v.mutate(OpWrite, off, int64(len(p)), flags, func() error { return v.inner.WriteAt(p, off, flags) })
}

// Trim trims the range, logging its old contents unless flags has FUA.
func (v *Volatile) Trim(off, length int64, flags Flags) error {
	return v.mutate(OpTrim, off, length, flags, func() error { return v.inner.Trim(off, length, flags) })
}

// Zero zeroes the range, logging its old contents unless flags has FUA.
func (v *Volatile) Zero(off, length int64, flags Flags) error {
	return v.mutate(OpZero, off, length, flags, func() error { return v.inner.Zero(off, length, flags) })
}

// mutate performs one write, trim or zero under the log lock.
func (v *Volatile) mutate(kind OpKind, off, n int64, flags Flags, do func() error) error {
	if err := v.enter(); err != nil {
		return err
	}
	defer v.gate.RUnlock()
	if err := CheckRange(v.inner.Size(), off, n); err != nil {
		return err
	}
	if n == 0 {
		return do()
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if flags&FUA != 0 {
		err := do()
		// Durable at once (or failed, and maybe half there: the old
		// data is not kept either way). Older entries must not undo it.
		if v.mu.data > 0 {
			v.appendLocked(undoEntry{kind: kind, off: off, n: n, pin: true})
		}
		return err
	}
	if n > v.maxUndo {
		// Longer than the whole cache: written through.
		if err := v.flushLogLocked(); err != nil {
			return err
		}
		v.mu.writeThrough++
		return do()
	}
	if v.mu.bytes+n > v.maxUndo {
		if err := v.flushLogLocked(); err != nil {
			return err
		}
		v.mu.overflows++
	}
	old := make([]byte, n)
	if err := v.inner.ReadAt(old, off); err != nil {
		return fmt.Errorf("storage: volatile: reading the old data at %d+%d: %w", off, n, err)
	}
	if allZero(old) {
		old = nil
	}
	err := do()
	// Logged even when the request failed: part of it may have landed,
	// and a cut may then take it back like any unsynced write.
	v.appendLocked(undoEntry{kind: kind, off: off, n: n, old: old})
	return err
}

func (v *Volatile) appendLocked(e undoEntry) {
	v.mu.seq++
	e.seq = v.mu.seq
	v.mu.log = append(v.mu.log, e)
	if e.pin {
		v.mu.pins++
	} else {
		v.mu.data++
		v.mu.bytes += e.n
	}
}

// flushLogLocked flushes the wrapped device and forgets the whole log;
// every logged request has completed, since each holds mu.
func (v *Volatile) flushLogLocked() error {
	if err := v.inner.Flush(); err != nil {
		return err
	}
	v.mu.log, v.mu.bytes, v.mu.data, v.mu.pins = nil, 0, 0, 0
	return nil
}

// Flush flushes the wrapped device, then forgets the entries logged
// before it began. Requests that complete during the flush stay in the
// log.
func (v *Volatile) Flush() error {
	if err := v.enter(); err != nil {
		return err
	}
	defer v.gate.RUnlock()
	v.mu.Lock()
	upto := v.mu.seq
	v.mu.Unlock()
	if err := v.inner.Flush(); err != nil {
		return err
	}
	if v.dead.Load() {
		// The power failed while the flush ran: it covers nothing.
		return ErrPoweredOff
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	i, _ := slices.BinarySearchFunc(v.mu.log, upto+1, func(e undoEntry, seq uint64) int { return cmp.Compare(e.seq, seq) })
	for _, e := range v.mu.log[:i] {
		if e.pin {
			v.mu.pins--
		} else {
			v.mu.data--
			v.mu.bytes -= e.n
		}
	}
	v.mu.log = slices.Clone(v.mu.log[i:])
	return nil
}

// Stats returns a snapshot of the counters.
func (v *Volatile) Stats() VolatileStats {
	v.mu.Lock()
	defer v.mu.Unlock()
	return VolatileStats{
		UnsyncedEntries: v.mu.data, UnsyncedBytes: v.mu.bytes, Pins: v.mu.pins,
		Overflows: v.mu.overflows, WriteThrough: v.mu.writeThrough, PoweredOff: v.dead.Load(),
	}
}

// Close closes the wrapped device. After a cut it does nothing: the
// wrapped device outlives the power failure, for the next wrapper.
func (v *Volatile) Close() error {
	if v.dead.Load() {
		return nil
	}
	return v.inner.Close()
}

// Cut cuts the power of v alone; see CutVolatile.
func (v *Volatile) Cut(model LossModel, rng *rand.Rand) (VolatileReport, error) {
	reps, err := CutVolatile(model, rng, v)
	return reps[0], err
}

// CutVolatile cuts the power of several devices (a cache and its backing)
// at one instant: it marks them all dead, so that every call made from
// then on fails with ErrPoweredOff, and a Flush in flight returns
// ErrPoweredOff and covers nothing. It then takes every device's gate,
// waiting for the calls in flight (a write in flight completes and is
// logged, for the model to judge), and, for each device, undoes unsynced
// entries under model, newest first, and syncs the wrapped device:
//
// what planCut drops: the same decision a Crash device makes (see
// LossModel), reached by undoing instead of replaying. LoseUnsynced undoes
// every entry, KeepUnsynced none (a crash of the process alone).
//
// Sectors written with FUA are never undone, nor touched by older
// entries. Every device is dead afterwards, even when an undo failed; the
// error is then the first failure. rng drives the draws (nil: seed 1).
func CutVolatile(model LossModel, rng *rand.Rand, devs ...*Volatile) ([]VolatileReport, error) {
	if rng == nil {
		rng = rand.New(rand.NewPCG(1, 2))
	}
	order := slices.Clone(devs)
	slices.SortFunc(order, func(a, b *Volatile) int {
		return cmp.Compare(uintptr(unsafe.Pointer(a)), uintptr(unsafe.Pointer(b)))
	})
	order = slices.Compact(order)
	if len(order) != len(devs) {
		panic("storage: CutVolatile: a device is listed twice")
	}
	for i, v := range order {
		if !v.dead.CompareAndSwap(false, true) {
			for _, u := range order[:i] {
				u.dead.Store(false)
			}
			return make([]VolatileReport, len(devs)), ErrAlreadyCut
		}
	}
	// That was the instant of the cut. Wait for the calls in flight.
	for _, v := range order {
		v.gate.Lock()
	}
	defer func() {
		for _, v := range order {
			v.gate.Unlock()
		}
	}()
	reps := make([]VolatileReport, len(devs))
	var first error
	for i, v := range devs {
		rep, err := v.cutLocked(model, rng)
		reps[i] = rep
		if err != nil && first == nil {
			first = err
		}
	}
	return reps, first
}

// cutLocked undoes what planCut drops of the log, newest entry first;
// the caller holds the gate. A sector an entry loses has lost every newer
// entry's data too (planCut), so restoring each lost sector's old data in
// that order leaves what planCut's forward replay would.
func (v *Volatile) cutLocked(model LossModel, rng *rand.Rand) (VolatileReport, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	log := v.mu.log
	v.mu.log, v.mu.bytes, v.mu.data, v.mu.pins = nil, 0, 0, 0
	ops := make([]cutOp, len(log))
	for i, e := range log {
		ops[i] = cutOp{kind: e.kind, off: e.off, n: e.n, forced: e.pin}
	}
	plan := planCut(ops, model, rng)
	rep := VolatileReport{Model: model, Tear: plan.Tear, Overflows: v.mu.overflows, WriteThrough: v.mu.writeThrough}

	var firstErr error
	for i := len(log) - 1; i >= 0; i-- {
		e := &log[i]
		if e.pin {
			continue
		}
		rep.Entries++
		var dropped, kept int64
		first, n := e.off/SectorSize, sectorsOf(e.off, e.n)
		for s := 0; s < n; {
			k := plan.kept(i, s)
			end := s + 1
			for end < n && plan.kept(i, end) == k {
				end++
			}
			a, b := max((first+int64(s))*SectorSize, e.off), min((first+int64(end))*SectorSize, e.off+e.n)
			if k {
				kept += b - a
			} else {
				dropped += b - a
				rep.Undone = append(rep.Undone, ByteRange{a, b - a})
				if err := v.restore(e, a, b); err != nil && firstErr == nil {
					firstErr = err
				}
			}
			s = end
		}
		rep.BytesDropped += dropped
		rep.BytesKept += kept
		switch {
		case kept == 0:
			rep.Dropped++
		case dropped == 0:
			rep.Kept++
		default:
			rep.Partial++
		}
	}
	rep.Undone = mergeRanges(rep.Undone)
	if plan.Garbage {
		// No newer entry keeps the garbage sector (planCut), so it stays.
		junk := plan.junk[:min(SectorSize, v.inner.Size()-plan.GarbageOff)]
		if err := v.inner.WriteAt(junk, plan.GarbageOff, 0); err != nil {
			firstErr = cmp.Or(firstErr, err)
		}
	}
	if err := v.inner.Flush(); err != nil && firstErr == nil {
		firstErr = err
	}
	if firstErr != nil {
		firstErr = fmt.Errorf("storage: volatile: power cut: %w", firstErr)
	}
	return rep, firstErr
}

// restore writes back e's old data over [a, b).
func (v *Volatile) restore(e *undoEntry, a, b int64) error {
	if e.old == nil {
		return v.inner.WriteAt(make([]byte, b-a), a, 0)
	}
	return v.inner.WriteAt(e.old[a-e.off:b-e.off], a, 0)
}

func allZero(p []byte) bool {
	for len(p) >= 8 {
		if p[0]|p[1]|p[2]|p[3]|p[4]|p[5]|p[6]|p[7] != 0 {
			return false
		}
		p = p[8:]
	}
	for _, b := range p {
		if b != 0 {
			return false
		}
	}
	return true
}
