package storage

import (
	"errors"
	"testing"
	"time"
)

// TestDurableAcksSyncs: every write, trim and zero reaches the medium
// before it returns, with FUA when the device has it, else by a Flush.
func TestDurableAcksSyncs(t *testing.T) {
	for _, fua := range []bool{true, false} {
		c := NewCrash(1 << 20)
		var inner Device = c
		if !fua {
			inner = noFUA{c}
		}
		d := NewDurableAcks(inner)
		if !d.Caps().FUA {
			t.Fatal("DurableAcks does not offer FUA")
		}
		if err := d.WriteAt(fill(4096, 1), 0, 0); err != nil {
			t.Fatal(err)
		}
		if err := d.Zero(8192, 4096, 0); err != nil {
			t.Fatal(err)
		}
		if err := d.Trim(16384, 4096, 0); err != nil {
			t.Fatal(err)
		}
		if st := c.Stats(); st.UnsyncedOps != 0 || st.Syncs != 3 {
			t.Errorf("fua %v: %d operations unsynced, %d syncs; want 0 and 3", fua, st.UnsyncedOps, st.Syncs)
		}
	}
}

// noFUA hides a device's FUA.
type noFUA struct{ *Crash }

func (n noFUA) Caps() Caps { c := n.Crash.Caps(); c.FUA = false; return c }

// blocker is a Mem whose reads and writes, once armed, wait for release
// and report that they arrived.
type blocker struct {
	*Mem
	arrived chan struct{}
	release chan struct{}
}

func newBlocker(size int64) *blocker {
	return &blocker{Mem: NewMem(size), arrived: make(chan struct{}, 8), release: make(chan struct{})}
}

func (b *blocker) wait() {
	b.arrived <- struct{}{}
	<-b.release
}

func (b *blocker) ReadAt(p []byte, off int64) error { b.wait(); return b.Mem.ReadAt(p, off) }

func (b *blocker) WriteAt(p []byte, off int64, f Flags) error {
	b.wait()
	return b.Mem.WriteAt(p, off, f)
}

// stillWaiting fails the test with what if ch yields within 20 ms: the
// call it stands for should still be blocked.
func stillWaiting[T any](t *testing.T, ch <-chan T, what string) {
	t.Helper()
	select {
	case v := <-ch:
		t.Fatalf("%s (got %v)", what, v)
	case <-time.After(20 * time.Millisecond):
	}
}

// TestGateClose: Close waits for the calls in flight, and every later call
// fails with ErrPoweredOff without reaching the device.
func TestGateClose(t *testing.T) {
	g := NewGate()
	b := newBlocker(1 << 20)
	d := g.Wrap(b)
	inflight := make(chan error)
	go func() { inflight <- d.WriteAt(fill(4096, 2), 0, 0) }()
	<-b.arrived // the write is inside the gate
	closed := make(chan struct{})
	go func() { g.Close(); close(closed) }()
	stillWaiting(t, closed, "Close returned while a call was in flight")
	close(b.release)
	if err := <-inflight; err != nil {
		t.Fatalf("the write in flight: %v", err)
	}
	<-closed
	for name, call := range map[string]func() error{
		"read":  func() error { return d.ReadAt(make([]byte, 512), 0) },
		"write": func() error { return d.WriteAt(make([]byte, 512), 0, 0) },
		"flush": d.Flush,
		"trim":  func() error { return d.Trim(0, 512, 0) },
		"zero":  func() error { return d.Zero(0, 512, 0) },
	} {
		if err := call(); !errors.Is(err, ErrPoweredOff) {
			t.Errorf("%s after Close: %v, want ErrPoweredOff", name, err)
		}
	}
}

// TestSwitchHoldRelease: a held switch makes calls wait; Release sends them
// to the new device, and drained returns only once the old device's calls
// in flight are done.
func TestSwitchHoldRelease(t *testing.T) {
	oldDev := newBlocker(1 << 20)
	s := NewSwitch(oldDev)
	oldRead := make(chan error)
	go func() { oldRead <- s.ReadAt(make([]byte, 512), 0) }()
	<-oldDev.arrived // a read is in the old device

	s.Hold()
	held := make(chan error)
	go func() { held <- s.WriteAt(fill(4096, 3), 0, 0) }()
	stillWaiting(t, held, "a call went through a held switch")
	next := NewMem(1 << 20)
	drained := s.Release(next)
	if err := <-held; err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4096)
	if err := next.ReadAt(got, 0); err != nil || string(got) != string(fill(4096, 3)) {
		t.Fatalf("the held write did not reach the new device (%v)", err)
	}
	done := make(chan struct{})
	go func() { drained(); close(done) }()
	stillWaiting(t, done, "drained returned while the old device had a call in flight")
	close(oldDev.release)
	if err := <-oldRead; err != nil {
		t.Fatal(err)
	}
	<-done
	s.Release(nil)() // the device did not change: returns at once
}

// prefetchCounter is a Mem that counts the Prefetch calls reaching it.
type prefetchCounter struct {
	*Mem
	n int
}

func (p *prefetchCounter) Prefetch(off, length int64) error {
	if err := CheckRange(p.Size(), off, length); err != nil {
		return err
	}
	p.n++
	return nil
}

// TestWrappersForwardPrefetch: every wrapper that can sit above a cache
// in fault mode passes NBD CACHE down (a wrapper without Prefetch would
// silently drop it), and Faulty fails it as the read it is.
func TestWrappersForwardPrefetch(t *testing.T) {
	wrappers := map[string]func(Device) Device{
		"Faulty":      func(d Device) Device { return NewFaulty(d, 1) },
		"Delay":       func(d Device) Device { return NewDelay(d) },
		"DurableAcks": func(d Device) Device { return NewDurableAcks(d) },
		"Switch":      func(d Device) Device { return NewSwitch(d) },
	}
	for name, wrap := range wrappers {
		pc := &prefetchCounter{Mem: NewMem(1 << 16)}
		p, ok := wrap(pc).(Prefetcher)
		if !ok {
			t.Errorf("%s is not a Prefetcher", name)
			continue
		}
		if err := p.Prefetch(4096, 8192); err != nil || pc.n != 1 {
			t.Errorf("%s: Prefetch = %v, reached the device %d times; want nil, 1", name, err, pc.n)
		}
		if err := p.Prefetch(1<<16, 1); !errors.Is(err, ErrOutOfRange) {
			t.Errorf("%s: Prefetch past the end = %v, want ErrOutOfRange", name, err)
		}
	}
	pc := &prefetchCounter{Mem: NewMem(1 << 16)}
	f := NewFaulty(pc, 1)
	f.SetFaults(Fault{Ops: OpRead, Off: 0, Length: 4096})
	if err := f.Prefetch(0, 512); !errors.Is(err, ErrInjected) || pc.n != 0 {
		t.Errorf("Prefetch under a read fault = %v, reached %d times; want ErrInjected, 0", err, pc.n)
	}
	if err := f.Prefetch(8192, 512); err != nil || pc.n != 1 {
		t.Errorf("Prefetch outside the fault's range = %v, reached %d times; want nil, 1", err, pc.n)
	}
}
