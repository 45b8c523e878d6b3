package storage

// crash.go: Crash, an in-memory Device that can lose power, and PowerCut.

import (
	"cmp"
	"errors"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"unsafe"
)

// ErrPoweredOff is returned by every call on a Crash device after PowerCut.
var ErrPoweredOff = errors.New("storage: device powered off")

// SectorSize is the unit at which a Crash device loses, keeps or tears
// unsynced data.
const SectorSize = 512

// CutReport says what a PowerCut did to the unsynced log.
type CutReport struct {
	Model LossModel
	// Ops is the number of operations in the unsynced log (writes, trims
	// and zeroes since the last Flush), Forced the number of them that
	// carried FUA and were kept whole.
	Ops, Forced int
	// Of the Ops-Forced unsynced operations: kept whole, kept in part,
	// dropped whole.
	OpsKept, OpsPartial, OpsDropped int
	// Bytes of unsynced operations kept and dropped (including the torn
	// part of the torn write).
	BytesKept, BytesDropped int64
	Tear
}

// CrashStats counts requests on a Crash device since it was made.
type CrashStats struct {
	Reads, Writes, Flushes, Trims, Zeros int64
	ReadBytes, WriteBytes                int64
	// FUA counts writes, trims and zeroes that carried FUA. Syncs is
	// Flushes + FUA: the number of times something had to reach the
	// medium.
	FUA, Syncs int64
	// Unsynced operations and bytes currently in the log.
	UnsyncedOps   int64
	UnsyncedBytes int64
}

// crashRecord is one entry of the unsynced log.
type crashRecord struct {
	seq    uint64
	kind   OpKind // OpWrite, OpTrim or OpZero
	off    int64
	length int64
	data   []byte // OpWrite only
	fua    bool   // durable: survives every cut
}

// Crash is an in-memory Device that can lose power. It keeps two sparse
// images and a log:
//
//   - visible: what reads return; every write, trim and zero lands here
//     at once;
//   - durable: the state at the last Flush;
//   - the unsynced log: every write, trim and zero since that Flush, in
//     order, each with a sequence number (writes with FUA are marked as
//     durable).
//
// Flush applies the log to the durable image and empties it. PowerCut
// builds a new, independent device from the durable image plus the part of
// the log that the LossModel lets survive; the old device then fails every
// call with ErrPoweredOff.
//
// Writes, trims, zeroes, flushes and the cut hold one exclusive lock, so
// the log order is the order in which the visible image changed; reads and
// Extents share the lock. An operation that races with PowerCut either
// completed before the cut (and is in the log it replays) or fails with
// ErrPoweredOff.
type Crash struct {
	size  int64
	down  atomic.Bool // set by PowerCut; a fast check before the lock
	ops   atomic.Int64
	hook  atomic.Pointer[func(Op)]
	stats crashCounters

	mu struct {
		sync.RWMutex
		poweredOff bool
		closed     bool
		visible    *Mem
		durable    *Mem
		log        []crashRecord
		logBytes   int64
		seq        uint64
	}
}

type crashCounters struct {
	reads, writes, flushes, trims, zeros atomic.Int64
	readBytes, writeBytes, fua           atomic.Int64
}

var (
	_ Device   = (*Crash)(nil)
	_ Extenter = (*Crash)(nil)
)

// NewCrash returns a zero-filled Crash device of size bytes, all of it
// durable.
func NewCrash(size int64) *Crash {
	return newCrash(NewMem(max(size, 0)))
}

// newCrash makes a device whose durable image is durable (taken over).
func newCrash(durable *Mem) *Crash {
	c := &Crash{size: durable.size}
	c.mu.durable = durable
	c.mu.visible = durable.clone()
	return c
}

// SetHook installs fn, called before every ReadAt, WriteAt, Flush, Trim,
// Zero and Extents that passed its range check, with the operation's index
// (0, 1, 2, ... on this device) — or removes the hook if fn is nil. fn runs
// on the caller's goroutine, outside every lock: it may call PowerCut, and
// the operation it was called for then fails with ErrPoweredOff. Calls may
// be concurrent when operations are.
func (c *Crash) SetHook(fn func(Op)) {
	if fn == nil {
		c.hook.Store(nil)
		return
	}
	c.hook.Store(&fn)
}

// Ops returns the number of operations started on this device (the index
// the next one will get).
func (c *Crash) Ops() int64 { return c.ops.Load() }

// Stats returns the request counters.
func (c *Crash) Stats() CrashStats {
	s := CrashStats{
		Reads:      c.stats.reads.Load(),
		Writes:     c.stats.writes.Load(),
		Flushes:    c.stats.flushes.Load(),
		Trims:      c.stats.trims.Load(),
		Zeros:      c.stats.zeros.Load(),
		ReadBytes:  c.stats.readBytes.Load(),
		WriteBytes: c.stats.writeBytes.Load(),
		FUA:        c.stats.fua.Load(),
	}
	s.Syncs = s.Flushes + s.FUA
	c.mu.RLock()
	s.UnsyncedOps = int64(len(c.mu.log))
	s.UnsyncedBytes = c.mu.logBytes
	c.mu.RUnlock()
	return s
}

// Size returns the device size in bytes.
func (c *Crash) Size() int64 { return c.size }

// Caps reports a device with a volatile cache that honours Flush, FUA,
// Trim and Zero.
func (c *Crash) Caps() Caps {
	return Caps{Flush: true, FUA: true, Trim: true, Zero: true, FastZero: true, BlockSize: SectorSize}
}

// begin checks the power and the range, counts the operation and calls
// the hook.
func (c *Crash) begin(kind OpKind, off, length int64, flags Flags) error {
	if c.down.Load() {
		return ErrPoweredOff
	}
	if kind != OpFlush {
		if err := CheckRange(c.size, off, length); err != nil {
			return err
		}
	}
	idx := c.ops.Add(1) - 1
	if h := c.hook.Load(); h != nil {
		(*h)(Op{Index: idx, Kind: kind, Off: off, Length: length, Flags: flags})
	}
	return nil
}

// usableLocked reports why the device cannot be used, or nil.
func (c *Crash) usableLocked() error {
	if c.mu.poweredOff {
		return ErrPoweredOff
	}
	if c.mu.closed {
		return ErrClosed
	}
	return nil
}

// ReadAt fills p from the visible image.
func (c *Crash) ReadAt(p []byte, off int64) error {
	if err := c.begin(OpRead, off, int64(len(p)), 0); err != nil {
		return err
	}
	c.mu.RLock()
	defer c.mu.RUnlock()
	if err := c.usableLocked(); err != nil {
		return err
	}
	c.mu.visible.read(p, off)
	c.stats.reads.Add(1)
	c.stats.readBytes.Add(int64(len(p)))
	return nil
}

// WriteAt writes p to the visible image and logs it; with FUA it is
// durable when WriteAt returns.
func (c *Crash) WriteAt(p []byte, off int64, flags Flags) error {
	if err := c.begin(OpWrite, off, int64(len(p)), flags); err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.usableLocked(); err != nil {
		return err
	}
	c.mu.visible.write(p, off)
	c.stats.writes.Add(1)
	c.stats.writeBytes.Add(int64(len(p)))
	if len(p) > 0 {
		c.logLocked(crashRecord{kind: OpWrite, off: off, length: int64(len(p)), data: append([]byte(nil), p...)}, flags)
	}
	return nil
}

// Flush makes every logged operation durable.
func (c *Crash) Flush() error {
	if err := c.begin(OpFlush, 0, 0, 0); err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.usableLocked(); err != nil {
		return err
	}
	for i := range c.mu.log {
		applyRecord(c.mu.durable, &c.mu.log[i], 0, c.mu.log[i].length)
	}
	clear(c.mu.log) // drop the data references
	c.mu.log = c.mu.log[:0]
	c.mu.logBytes = 0
	c.stats.flushes.Add(1)
	return nil
}

// Trim makes the range read back as zeroes.
func (c *Crash) Trim(off, length int64, flags Flags) error {
	return c.zeroOp(OpTrim, off, length, flags)
}

// Zero makes the range read back as zeroes. NoHole and FastZero need
// nothing special.
func (c *Crash) Zero(off, length int64, flags Flags) error {
	return c.zeroOp(OpZero, off, length, flags)
}

func (c *Crash) zeroOp(kind OpKind, off, length int64, flags Flags) error {
	if err := c.begin(kind, off, length, flags); err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.usableLocked(); err != nil {
		return err
	}
	c.mu.visible.zero(off, length, false)
	if kind == OpTrim {
		c.stats.trims.Add(1)
	} else {
		c.stats.zeros.Add(1)
	}
	if length > 0 {
		c.logLocked(crashRecord{kind: kind, off: off, length: length}, flags)
	}
	return nil
}

// logLocked appends r to the unsynced log. A FUA operation is applied to
// the durable image at once when the log is empty (nothing older can be
// replayed over it), else logged as durable so that a cut replays it in
// its place.
func (c *Crash) logLocked(r crashRecord, flags Flags) {
	c.mu.seq++
	r.seq = c.mu.seq
	if flags&FUA != 0 {
		c.stats.fua.Add(1)
		if len(c.mu.log) == 0 {
			applyRecord(c.mu.durable, &r, 0, r.length)
			return
		}
		r.fua = true
	}
	c.mu.log = append(c.mu.log, r)
	c.mu.logBytes += r.length
}

// Extents reports the visible image's allocation, as Mem does.
func (c *Crash) Extents(off, length int64, fn func(Extent) bool) error {
	if err := c.begin(OpExtents, off, length, 0); err != nil {
		return err
	}
	c.mu.RLock()
	defer c.mu.RUnlock()
	if err := c.usableLocked(); err != nil {
		return err
	}
	c.mu.visible.extents(off, length, fn)
	return nil
}

// Close makes later calls fail with ErrClosed. It does not flush, and the
// device can still be cut: PowerCut after Close models a crash after a
// clean shutdown. Close after PowerCut returns nil.
func (c *Crash) Close() error {
	c.mu.Lock()
	c.mu.closed = true
	c.mu.Unlock()
	return nil
}

// PowerCut cuts the power. It waits for the operations in flight, then
// makes this device fail every later call with ErrPoweredOff, and returns
// a new, independent device (no hook, counters at zero, everything
// durable) holding the durable image plus what model keeps of the
// unsynced log. rng drives LoseRandom and LoseTorn; nil means a fixed
// seed. PowerCut panics if the device is already powered off.
func (c *Crash) PowerCut(model LossModel, rng *rand.Rand) (*Crash, CutReport) {
	devs, reps := PowerCutAll(model, rng, c)
	return devs[0], reps[0]
}

// PowerCutAll cuts the power of several devices at one instant, as a
// machine's power cut hits its cache and its backing disk together: every
// device stops between two of its operations, and no operation on any of
// them runs after the cut of another. It returns the new devices and the
// reports in the order of devs. The draws of rng are made device by
// device, in that order.
func PowerCutAll(model LossModel, rng *rand.Rand, devs ...*Crash) ([]*Crash, []CutReport) {
	// Lock in address order, so that concurrent cuts of overlapping sets
	// cannot deadlock; operations only ever hold one device's lock.
	order := slices.Clone(devs)
	slices.SortFunc(order, func(a, b *Crash) int {
		return cmp.Compare(uintptr(unsafe.Pointer(a)), uintptr(unsafe.Pointer(b)))
	})
	order = slices.Compact(order)
	if len(order) != len(devs) {
		panic("storage: PowerCutAll: a device is listed twice")
	}
	for _, c := range order {
		c.mu.Lock()
	}
	type detached struct {
		durable *Mem
		log     []crashRecord
	}
	parts := make(map[*Crash]detached, len(devs))
	for _, c := range order {
		if c.mu.poweredOff {
			for _, c := range order {
				c.mu.Unlock()
			}
			panic("storage: PowerCut on a device that is already powered off")
		}
		c.mu.poweredOff = true
		c.down.Store(true)
		parts[c] = detached{c.mu.durable, c.mu.log}
		c.mu.durable, c.mu.visible, c.mu.log, c.mu.logBytes = nil, nil, nil, 0
	}
	for _, c := range order {
		c.mu.Unlock()
	}

	if rng == nil {
		rng = rand.New(rand.NewPCG(1, 2))
	}
	out := make([]*Crash, len(devs))
	reps := make([]CutReport, len(devs))
	for i, c := range devs {
		p := parts[c]
		reps[i] = replayCut(p.durable, p.log, model, rng)
		out[i] = newCrash(p.durable)
	}
	return out, reps
}

// replayCut applies to img the records of log that model keeps.
func replayCut(img *Mem, log []crashRecord, model LossModel, rng *rand.Rand) CutReport {
	ops := make([]cutOp, len(log))
	for i, r := range log {
		ops[i] = cutOp{kind: r.kind, off: r.off, n: r.length, forced: r.fua}
	}
	plan := planCut(ops, model, rng)
	rep := CutReport{Model: model, Ops: len(log), Tear: plan.Tear}
	for i := range log {
		r := &log[i]
		if plan.keep[i] == nil {
			rep.Forced++
			applyRecord(img, r, 0, r.length)
		} else {
			applySectors(img, r, plan.keep[i], &rep)
		}
		if i == plan.torn && plan.Garbage {
			img.write(plan.junk[:min(SectorSize, img.size-plan.GarbageOff)], plan.GarbageOff)
		}
	}
	return rep
}

// applySectors applies the kept sectors of r, run by run.
func applySectors(img *Mem, r *crashRecord, bits []uint64, rep *CutReport) {
	n := sectorsOf(r.off, r.length)
	first := r.off / SectorSize
	// pieceStart is the record-relative start of sector s's piece.
	pieceStart := func(s int) int64 {
		return max(r.off, (first+int64(s))*SectorSize) - r.off
	}
	kept, dropped := 0, 0
	for s := 0; s < n; {
		k := getBit(bits, s)
		e := s + 1
		for e < n && getBit(bits, e) == k {
			e++
		}
		from := pieceStart(s)
		to := r.length
		if e < n {
			to = pieceStart(e)
		}
		if k {
			applyRecord(img, r, from, to-from)
			rep.BytesKept += to - from
			kept += e - s
		} else {
			rep.BytesDropped += to - from
			dropped += e - s
		}
		s = e
	}
	switch {
	case dropped == 0:
		rep.OpsKept++
	case kept == 0:
		rep.OpsDropped++
	default:
		rep.OpsPartial++
	}
}

// applyRecord applies bytes [from, from+length) of r (record-relative) to
// img.
func applyRecord(img *Mem, r *crashRecord, from, length int64) {
	switch r.kind {
	case OpWrite:
		img.write(r.data[from:from+length], r.off+from)
	case OpTrim, OpZero:
		img.zero(r.off+from, length, false)
	}
}
