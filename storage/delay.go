package storage

// delay.go: Delay, a wrapper that adds a fixed latency to chosen kinds of
// request, settable while it runs.

import (
	"math/bits"
	"sync"
	"sync/atomic"
	"time"
)

// delayTable is one latency per operation kind, indexed by the kind's bit.
type delayTable [8]time.Duration

// Delay wraps a Device and makes each request of a chosen kind wait a
// fixed time before it is passed on, like nbdkit's delay filter. Requests
// wait independently (concurrent requests overlap their waits). With no
// latency set, a request costs one atomic load more than the wrapped
// device.
type Delay struct {
	inner Device
	table atomic.Pointer[delayTable] // nil: no latency at all
	setMu sync.Mutex                 // serializes Set and Clear
}

var (
	_ Device   = (*Delay)(nil)
	_ Extenter = (*Delay)(nil)
)

// NewDelay wraps inner with no latency set.
func NewDelay(inner Device) *Delay { return &Delay{inner: inner} }

// Set gives every request whose kind is in ops (0: every kind) the
// latency d; 0 removes it. Other kinds keep theirs.
func (d *Delay) Set(ops OpKind, latency time.Duration) {
	if ops == 0 {
		ops = OpAll
	}
	d.setMu.Lock()
	defer d.setMu.Unlock()
	var t delayTable
	if old := d.table.Load(); old != nil {
		t = *old
	}
	any := false
	for i := range t {
		if ops&(1<<i) != 0 {
			t[i] = max(latency, 0)
		}
		any = any || t[i] > 0
	}
	if !any {
		d.table.Store(nil)
		return
	}
	d.table.Store(&t)
}

// Clear removes every latency.
func (d *Delay) Clear() {
	d.setMu.Lock()
	defer d.setMu.Unlock()
	d.table.Store(nil)
}

// Latency returns the latency set for one kind.
func (d *Delay) Latency(kind OpKind) time.Duration {
	t := d.table.Load()
	if t == nil || kind == 0 {
		return 0
	}
	return t[bits.TrailingZeros8(uint8(kind))]
}

// wait sleeps the latency of kind, if any.
func (d *Delay) wait(kind OpKind) {
	if d.table.Load() == nil {
		return
	}
	if l := d.Latency(kind); l > 0 {
		time.Sleep(l)
	}
}

// Size returns the wrapped device's size.
func (d *Delay) Size() int64 { return d.inner.Size() }

// Caps returns the wrapped device's capabilities.
func (d *Delay) Caps() Caps { return d.inner.Caps() }

// ReadAt waits, then reads.
func (d *Delay) ReadAt(p []byte, off int64) error {
	d.wait(OpRead)
	return d.inner.ReadAt(p, off)
}

// WriteAt waits, then writes.
func (d *Delay) WriteAt(p []byte, off int64, flags Flags) error {
	d.wait(OpWrite)
	return d.inner.WriteAt(p, off, flags)
}

// Flush waits, then flushes.
func (d *Delay) Flush() error {
	d.wait(OpFlush)
	return d.inner.Flush()
}

// Trim waits, then trims.
func (d *Delay) Trim(off, length int64, flags Flags) error {
	d.wait(OpTrim)
	return d.inner.Trim(off, length, flags)
}

// Zero waits, then zeroes.
func (d *Delay) Zero(off, length int64, flags Flags) error {
	d.wait(OpZero)
	return d.inner.Zero(off, length, flags)
}

// Extents waits, then asks the wrapped device; a device that is not an
// Extenter is reported as all data.
func (d *Delay) Extents(off, length int64, fn func(Extent) bool) error {
	d.wait(OpExtents)
	return extentsOf(d.inner, off, length, fn)
}

// Prefetch (NBD CACHE) waits as a read does, then warms the wrapped
// device; a device that is not a Prefetcher does nothing.
func (d *Delay) Prefetch(off, length int64) error {
	d.wait(OpRead)
	return prefetchOf(d.inner, off, length)
}

// Close closes the wrapped device at once.
func (d *Delay) Close() error { return d.inner.Close() }
