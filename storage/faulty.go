package storage

// faulty.go: Faulty, a wrapper that injects errors.

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// ErrInjected marks every error Faulty makes up; the error also wraps the
// Fault's Err (unix.EIO by default), so errors.Is works for both.
var ErrInjected = errors.New("storage: injected fault")

// Fault describes errors to inject. A request matches a Fault when its kind
// is in Ops and its range overlaps [Off, Off+Length).
type Fault struct {
	// Ops is the set of kinds that fail (OpRead|OpWrite, ...); 0 means
	// every kind.
	Ops OpKind
	// Off and Length bound the affected range. Length 0 means the whole
	// device; Flush, which has no range, matches only such a Fault.
	Off, Length int64
	// Prob is the probability that a matching request fails, drawn from
	// the Faulty's seeded generator; 0 means always.
	Prob float64
	// After lets the first After matching requests through.
	After int64
	// Times caps the number of failures; 0 means no cap.
	Times int64
	// Err is the error returned (wrapped); nil means unix.EIO.
	Err error
	// Apply performs the request on the wrapped device before failing it:
	// the data may have landed though the caller sees an error.
	Apply bool
}

// faultState is a Fault with its counters.
type faultState struct {
	Fault
	seen, fired int64
}

// faultSet is the installed faults, guarded by mu with the generator.
type faultSet struct {
	mu     sync.Mutex
	faults []faultState
}

// Faulty wraps a Device and makes requests fail on demand. With no faults
// set, a request costs one atomic load more than the wrapped device.
type Faulty struct {
	inner    Device
	set      atomic.Pointer[faultSet]
	injected atomic.Int64

	rngMu sync.Mutex
	rng   *rand.Rand
}

var (
	_ Device   = (*Faulty)(nil)
	_ Extenter = (*Faulty)(nil)
)

// NewFaulty wraps inner; seed drives the Prob draws.
func NewFaulty(inner Device, seed uint64) *Faulty {
	return &Faulty{inner: inner, rng: rand.New(rand.NewPCG(seed, seed^0x5851f42d4c957f2d))}
}

// SetFaults replaces the installed faults (and their counters) with these.
func (f *Faulty) SetFaults(faults ...Fault) {
	if len(faults) == 0 {
		f.set.Store(nil)
		return
	}
	s := &faultSet{faults: make([]faultState, len(faults))}
	for i, ft := range faults {
		if ft.Ops == 0 {
			ft.Ops = OpAll
		}
		if ft.Err == nil {
			ft.Err = unix.EIO
		}
		s.faults[i].Fault = ft
	}
	f.set.Store(s)
}

// Clear removes every fault.
func (f *Faulty) Clear() { f.set.Store(nil) }

// Injected returns the number of requests failed so far.
func (f *Faulty) Injected() int64 { return f.injected.Load() }

// fault returns the fault a request meets, if any.
func (f *Faulty) fault(kind OpKind, off, length int64) (Fault, bool) {
	s := f.set.Load()
	if s == nil {
		return Fault{}, false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	for i := range s.faults {
		st := &s.faults[i]
		if st.Ops&kind == 0 {
			continue
		}
		if st.Length > 0 && (kind == OpFlush || off >= st.Off+st.Length || off+max(length, 1) <= st.Off) {
			continue
		}
		st.seen++
		if st.seen <= st.After || (st.Times > 0 && st.fired >= st.Times) {
			continue
		}
		if st.Prob > 0 {
			f.rngMu.Lock()
			hit := f.rng.Float64() < st.Prob
			f.rngMu.Unlock()
			if !hit {
				continue
			}
		}
		st.fired++
		f.injected.Add(1)
		return st.Fault, true
	}
	return Fault{}, false
}

// intercept decides the fate of a request while faults are set. It returns
// done with the error to return when the request fails; apply is called
// first for an Apply fault.
func (f *Faulty) intercept(kind OpKind, off, length int64, apply func() error) (done bool, err error) {
	if kind != OpFlush {
		if err := CheckRange(f.inner.Size(), off, length); err != nil {
			return true, err
		}
	}
	ft, ok := f.fault(kind, off, length)
	if !ok {
		return false, nil
	}
	if ft.Apply {
		if err := apply(); err != nil {
			return true, err
		}
	}
	return true, fmt.Errorf("%w: %v at %d+%d: %w", ErrInjected, kind, off, length, ft.Err)
}

// Size returns the wrapped device's size.
func (f *Faulty) Size() int64 { return f.inner.Size() }

// Caps returns the wrapped device's capabilities.
func (f *Faulty) Caps() Caps { return f.inner.Caps() }

// ReadAt reads from the wrapped device unless a fault hits.
func (f *Faulty) ReadAt(p []byte, off int64) error {
	if f.set.Load() != nil {
		if done, err := f.intercept(OpRead, off, int64(len(p)), func() error { return f.inner.ReadAt(p, off) }); done {
			return err
		}
	}
	return f.inner.ReadAt(p, off)
}

// WriteAt writes to the wrapped device unless a fault hits.
func (f *Faulty) WriteAt(p []byte, off int64, flags Flags) error {
	if f.set.Load() != nil {
		if done, err := f.intercept(OpWrite, off, int64(len(p)), func() error { return f.inner.WriteAt(p, off, flags) }); done {
			return err
		}
	}
	return f.inner.WriteAt(p, off, flags)
}

// Flush flushes the wrapped device unless a fault hits.
func (f *Faulty) Flush() error {
	if f.set.Load() != nil {
		if done, err := f.intercept(OpFlush, 0, 0, f.inner.Flush); done {
			return err
		}
	}
	return f.inner.Flush()
}

// Trim trims the wrapped device unless a fault hits.
func (f *Faulty) Trim(off, length int64, flags Flags) error {
	if f.set.Load() != nil {
		if done, err := f.intercept(OpTrim, off, length, func() error { return f.inner.Trim(off, length, flags) }); done {
			return err
		}
	}
	return f.inner.Trim(off, length, flags)
}

// Zero zeroes the wrapped device unless a fault hits.
func (f *Faulty) Zero(off, length int64, flags Flags) error {
	if f.set.Load() != nil {
		if done, err := f.intercept(OpZero, off, length, func() error { return f.inner.Zero(off, length, flags) }); done {
			return err
		}
	}
	return f.inner.Zero(off, length, flags)
}

// Extents asks the wrapped device unless a fault hits; a device that is
// not an Extenter is reported as all data.
func (f *Faulty) Extents(off, length int64, fn func(Extent) bool) error {
	ext := func() error { return extentsOf(f.inner, off, length, fn) }
	if f.set.Load() != nil {
		if done, err := f.intercept(OpExtents, off, length, ext); done {
			return err
		}
	}
	return ext()
}

// Prefetch (NBD CACHE) warms the wrapped device unless a read fault
// hits: a prefetch is a read. A device that is not a Prefetcher does
// nothing.
func (f *Faulty) Prefetch(off, length int64) error {
	pre := func() error { return prefetchOf(f.inner, off, length) }
	if f.set.Load() != nil {
		if done, err := f.intercept(OpRead, off, length, pre); done {
			return err
		}
	}
	return pre()
}

// Close closes the wrapped device. Faults do not apply.
func (f *Faulty) Close() error { return f.inner.Close() }
