package storage

// wrappers.go: small wrappers the server composes: DurableAcks (`serve
// --sync always`), and for fault mode a Gate (a power-on generation),
// a Switch (the device behind it can be replaced while requests wait) and
// a dead device (what is served when nothing came back).

import "sync"

// DurableAcks sends every write, trim and zero down with FUA (or follows
// it with a Flush when the device below has no FUA), so that a request is
// durable when it returns.
type DurableAcks struct {
	inner Device
	fua   bool
}

var (
	_ Device     = (*DurableAcks)(nil)
	_ Extenter   = (*DurableAcks)(nil)
	_ Prefetcher = (*DurableAcks)(nil)
)

// NewDurableAcks wraps inner.
func NewDurableAcks(inner Device) *DurableAcks {
	return &DurableAcks{inner: inner, fua: inner.Caps().FUA}
}

func (d *DurableAcks) Size() int64 { return d.inner.Size() }

// Caps are inner's, with FUA: every request has it.
func (d *DurableAcks) Caps() Caps {
	c := d.inner.Caps()
	c.FUA = true
	return c
}

func (d *DurableAcks) ReadAt(p []byte, off int64) error { return d.inner.ReadAt(p, off) }

func (d *DurableAcks) sync(do func(Flags) error, flags Flags) error {
	if d.fua {
		return do(flags | FUA)
	}
	if err := do(flags &^ FUA); err != nil {
		return err
	}
	return d.inner.Flush()
}

func (d *DurableAcks) WriteAt(p []byte, off int64, flags Flags) error {
	return d.sync(func(f Flags) error { return d.inner.WriteAt(p, off, f) }, flags)
}

func (d *DurableAcks) Trim(off, length int64, flags Flags) error {
	return d.sync(func(f Flags) error { return d.inner.Trim(off, length, f) }, flags)
}

func (d *DurableAcks) Zero(off, length int64, flags Flags) error {
	return d.sync(func(f Flags) error { return d.inner.Zero(off, length, f) }, flags)
}

func (d *DurableAcks) Flush() error { return d.inner.Flush() }

func (d *DurableAcks) Extents(off, length int64, fn func(Extent) bool) error {
	return extentsOf(d.inner, off, length, fn)
}

func (d *DurableAcks) Prefetch(off, length int64) error { return prefetchOf(d.inner, off, length) }

func (d *DurableAcks) Close() error { return d.inner.Close() }

// Gate is one power-on of a set of devices: every call through a device
// it wraps holds it shared, and Close takes it exclusively, waiting for
// the calls in flight; after that every call fails with ErrPoweredOff. So
// nothing of a closed generation (an abandoned cache, its writeback) can
// reach the devices below, now or later.
type Gate struct {
	mu     sync.RWMutex
	closed bool
}

// NewGate returns an open gate.
func NewGate() *Gate { return &Gate{} }

// Close waits for the calls in flight and shuts the gate for good.
func (g *Gate) Close() {
	g.mu.Lock()
	g.closed = true
	g.mu.Unlock()
}

// Wrap returns dev seen through the gate. Closing the returned device does
// nothing: dev outlives every gate.
func (g *Gate) Wrap(dev Device) Device { return &gated{gate: g, inner: dev} }

type gated struct {
	gate  *Gate
	inner Device
}

var (
	_ Device   = (*gated)(nil)
	_ Extenter = (*gated)(nil)
)

// enter takes the gate shared; on success the caller must call leave.
func (d *gated) enter() error {
	d.gate.mu.RLock()
	if d.gate.closed {
		d.gate.mu.RUnlock()
		return ErrPoweredOff
	}
	return nil
}

func (d *gated) leave() { d.gate.mu.RUnlock() }

func (d *gated) Size() int64 { return d.inner.Size() }
func (d *gated) Caps() Caps  { return d.inner.Caps() }

func (d *gated) ReadAt(p []byte, off int64) error {
	if err := d.enter(); err != nil {
		return err
	}
	defer d.leave()
	return d.inner.ReadAt(p, off)
}

func (d *gated) WriteAt(p []byte, off int64, flags Flags) error {
	if err := d.enter(); err != nil {
		return err
	}
	defer d.leave()
	return d.inner.WriteAt(p, off, flags)
}

func (d *gated) Flush() error {
	if err := d.enter(); err != nil {
		return err
	}
	defer d.leave()
	return d.inner.Flush()
}

func (d *gated) Trim(off, length int64, flags Flags) error {
	if err := d.enter(); err != nil {
		return err
	}
	defer d.leave()
	return d.inner.Trim(off, length, flags)
}

func (d *gated) Zero(off, length int64, flags Flags) error {
	if err := d.enter(); err != nil {
		return err
	}
	defer d.leave()
	return d.inner.Zero(off, length, flags)
}

func (d *gated) Extents(off, length int64, fn func(Extent) bool) error {
	if err := d.enter(); err != nil {
		return err
	}
	defer d.leave()
	return extentsOf(d.inner, off, length, fn)
}

func (d *gated) Close() error { return nil }

// Switch forwards every call to the device it holds now. Hold makes new
// calls wait; Release lets them go, to a new device if one is given. Size
// and Caps are those of the first device: every device it ever holds must
// have that size.
type Switch struct {
	size int64
	caps Caps

	mu struct {
		sync.Mutex
		cur  *switchGen
		held chan struct{} // non-nil while held; closed on release
	}
}

// switchGen is one device behind the switch, with its calls in flight.
type switchGen struct {
	dev      Device
	inflight sync.WaitGroup
}

var (
	_ Device     = (*Switch)(nil)
	_ Extenter   = (*Switch)(nil)
	_ Prefetcher = (*Switch)(nil)
)

// NewSwitch returns a switch holding dev.
func NewSwitch(dev Device) *Switch {
	s := &Switch{size: dev.Size(), caps: dev.Caps()}
	s.mu.cur = &switchGen{dev: dev}
	return s
}

// Hold makes new calls wait until Release.
func (s *Switch) Hold() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.mu.held == nil {
		s.mu.held = make(chan struct{})
	}
}

// Release points the switch at dev (if not nil) and lets the held calls
// go. When the device changed, drained waits for the calls still in
// flight on the previous one; otherwise it returns at once.
func (s *Switch) Release(dev Device) (drained func()) {
	s.mu.Lock()
	defer s.mu.Unlock()
	drained = func() {}
	if dev != nil {
		old := s.mu.cur
		s.mu.cur = &switchGen{dev: dev}
		drained = old.inflight.Wait
	}
	if s.mu.held != nil {
		close(s.mu.held)
		s.mu.held = nil
	}
	return drained
}

// acquire returns the current generation with one more call in flight.
func (s *Switch) acquire() *switchGen {
	s.mu.Lock()
	for s.mu.held != nil {
		ch := s.mu.held
		s.mu.Unlock()
		<-ch
		s.mu.Lock()
	}
	g := s.mu.cur
	g.inflight.Add(1)
	s.mu.Unlock()
	return g
}

func (s *Switch) Size() int64 { return s.size }
func (s *Switch) Caps() Caps  { return s.caps }

func (s *Switch) ReadAt(p []byte, off int64) error {
	g := s.acquire()
	defer g.inflight.Done()
	return g.dev.ReadAt(p, off)
}

func (s *Switch) WriteAt(p []byte, off int64, flags Flags) error {
	g := s.acquire()
	defer g.inflight.Done()
	return g.dev.WriteAt(p, off, flags)
}

func (s *Switch) Flush() error {
	g := s.acquire()
	defer g.inflight.Done()
	return g.dev.Flush()
}

func (s *Switch) Trim(off, length int64, flags Flags) error {
	g := s.acquire()
	defer g.inflight.Done()
	return g.dev.Trim(off, length, flags)
}

func (s *Switch) Zero(off, length int64, flags Flags) error {
	g := s.acquire()
	defer g.inflight.Done()
	return g.dev.Zero(off, length, flags)
}

func (s *Switch) Extents(off, length int64, fn func(Extent) bool) error {
	g := s.acquire()
	defer g.inflight.Done()
	return extentsOf(g.dev, off, length, fn)
}

func (s *Switch) Prefetch(off, length int64) error {
	g := s.acquire()
	defer g.inflight.Done()
	return prefetchOf(g.dev, off, length)
}

// Close does nothing: whoever put the devices in closes them.
func (s *Switch) Close() error { return nil }

// dead is a device on which every call fails with err.
type dead struct {
	size int64
	caps Caps
	err  error
}

// NewDead returns a device of the given size and capabilities on which
// every call fails with err: what is served when a device could not be
// brought back, rather than a guess.
func NewDead(size int64, caps Caps, err error) Device { return dead{size, caps, err} }

func (d dead) Size() int64                        { return d.size }
func (d dead) Caps() Caps                         { return d.caps }
func (d dead) ReadAt([]byte, int64) error         { return d.err }
func (d dead) WriteAt([]byte, int64, Flags) error { return d.err }
func (d dead) Flush() error                       { return d.err }
func (d dead) Trim(int64, int64, Flags) error     { return d.err }
func (d dead) Zero(int64, int64, Flags) error     { return d.err }
func (d dead) Close() error                       { return nil }
