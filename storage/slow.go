package storage

// slow.go: Slow, a wrapper that gives any Device the latency of a hard disk.

import (
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
	"sync"
	"time"
)

// ErrBadModel is returned by ParseDiskModel for a description it cannot
// read.
var ErrBadModel = errors.New("storage: bad disk model")

// DiskModel describes the mechanics of a hard disk. Slow charges every
// request the time such a disk would take:
//
//	cost = seek(d) + rotation + len/TransferRate      when d > 0 (seek 0 on the same track)
//	cost = len/TransferRate                           when d == 0 (sequential)
//
//	d        = |off - head|, the head being where the previous request ended
//	seek(d)  = Settle + (FullStroke-Settle) * sqrt(min(d, Span)/Span)
//	rotation = the wait, after the seek, until the platter brings the
//	           target under the head: the platter turns at RPM, and a byte
//	           at offset off sits at angle frac(off / TrackBytes), where
//	           TrackBytes = TransferRate * one revolution.
//
// Bytes are laid out on tracks of TrackBytes in address order. A request
// on the track the head is on needs no seek, only the rotation: a short
// skip forward costs about gap/TransferRate, a short step back almost a
// revolution. The rotation is deterministic from position and time, so it
// averages half a revolution for random requests and is reproducible under
// testing/synctest.
// A request that continues exactly where the previous one ended pays no
// positioning at all, as a disk with read-ahead and a write cache does. Flush
// costs FlushTime. Trim moves nothing and costs nothing; Zero costs what a write
// of the same length costs.
//
// For two positions drawn uniformly from the span, the average seek is
// Settle + 8/15 (FullStroke-Settle); see AvgSeek.
type DiskModel struct {
	Name         string
	RPM          int           // spindle speed; 0 means no rotational delay
	Settle       time.Duration // seek over the shortest nonzero distance
	FullStroke   time.Duration // seek across the whole span
	Span         int64         // bytes under a full stroke; 0 means the size of the device
	TransferRate int64         // media rate in bytes per second; must be > 0
	FlushTime    time.Duration // what a Flush (cache flush) costs
}

// HDDModel is a 7200 rpm desktop disk: 8.5 ms average seek (1 ms settle,
// 15.06 ms full stroke), 4.17 ms average rotational delay, 150 MB/s, 2 ms to
// flush its cache. A random 4 KiB write costs about 12.7 ms; a sequential
// 1 MiB write about 7 ms.
func HDDModel() DiskModel {
	return DiskModel{
		Name:         "hdd",
		RPM:          7200,
		Settle:       time.Millisecond,
		FullStroke:   15062500 * time.Nanosecond,
		TransferRate: 150_000_000,
		FlushTime:    2 * time.Millisecond,
	}
}

// AvgSeek is the model's average seek time between two positions drawn
// uniformly from the span.
func (m DiskModel) AvgSeek() time.Duration {
	return m.Settle + (m.FullStroke-m.Settle)*8/15
}

// AvgRotation is half a revolution.
func (m DiskModel) AvgRotation() time.Duration {
	if m.RPM <= 0 {
		return 0
	}
	return m.revolution() / 2
}

func (m DiskModel) revolution() time.Duration {
	return time.Duration(int64(time.Minute) / int64(m.RPM))
}

// Validate reports whether the model can be used.
func (m DiskModel) Validate() error {
	switch {
	case m.TransferRate <= 0:
		return fmt.Errorf("%w: transfer rate must be positive", ErrBadModel)
	case m.RPM < 0 || m.Settle < 0 || m.FullStroke < 0 || m.Span < 0 || m.FlushTime < 0:
		return fmt.Errorf("%w: negative parameter", ErrBadModel)
	case m.FullStroke < m.Settle:
		return fmt.Errorf("%w: full stroke %v shorter than settle %v", ErrBadModel, m.FullStroke, m.Settle)
	}
	return nil
}

// String gives the model in the form ParseDiskModel reads.
func (m DiskModel) String() string {
	name := m.Name
	if name == "" {
		name = "custom"
	}
	return fmt.Sprintf("%s,rpm=%d,settle=%v,stroke=%v,rate=%d,flush=%v,span=%d",
		name, m.RPM, m.Settle, m.FullStroke, m.TransferRate, m.FlushTime, m.Span)
}

// ParseDiskModel reads a model description: a preset name, optionally
// followed by comma-separated overrides, for example
//
//	hdd
//	hdd,rpm=5400,rate=100M
//	custom,rpm=0,settle=0,stroke=0,rate=500M,flush=100us
//
// Presets: "hdd" (HDDModel); "custom" starts from HDDModel with the name
// changed. Keys: rpm, settle, stroke (durations as time.ParseDuration reads
// them), rate (bytes/s, with an optional decimal suffix K, M or G), flush,
// span (bytes, same suffixes).
func ParseDiskModel(s string) (DiskModel, error) {
	parts := strings.Split(strings.TrimSpace(s), ",")
	var m DiskModel
	switch strings.ToLower(parts[0]) {
	case "hdd":
		m = HDDModel()
	case "custom":
		m = HDDModel()
		m.Name = "custom"
	default:
		return DiskModel{}, fmt.Errorf("%w: unknown preset %q", ErrBadModel, parts[0])
	}
	for _, kv := range parts[1:] {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			return DiskModel{}, fmt.Errorf("%w: %q is not key=value", ErrBadModel, kv)
		}
		var err error
		switch strings.ToLower(strings.TrimSpace(k)) {
		case "rpm":
			m.RPM, err = strconv.Atoi(v)
		case "settle":
			m.Settle, err = time.ParseDuration(v)
		case "stroke":
			m.FullStroke, err = time.ParseDuration(v)
		case "flush":
			m.FlushTime, err = time.ParseDuration(v)
		case "rate":
			m.TransferRate, err = parseDecimalSize(v)
		case "span":
			m.Span, err = parseDecimalSize(v)
		default:
			return DiskModel{}, fmt.Errorf("%w: unknown key %q", ErrBadModel, k)
		}
		if err != nil {
			return DiskModel{}, fmt.Errorf("%w: %s: %w", ErrBadModel, kv, err)
		}
	}
	if err := m.Validate(); err != nil {
		return DiskModel{}, err
	}
	return m, nil
}

func parseDecimalSize(v string) (int64, error) {
	mult := int64(1)
	if n := len(v); n > 0 {
		switch v[n-1] {
		case 'k', 'K':
			mult = 1e3
		case 'm', 'M':
			mult = 1e6
		case 'g', 'G':
			mult = 1e9
		}
		if mult != 1 {
			v = v[:n-1]
		}
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil {
		return 0, err
	}
	if n < 0 || n > math.MaxInt64/mult {
		return 0, fmt.Errorf("size %s out of range", v)
	}
	return n * mult, nil
}

// SlowStats counts what a Slow device did and where its time went.
type SlowStats struct {
	Requests int64         // reads, writes, zeroes and flushes charged
	Seeks    int64         // requests that moved the head
	Bytes    int64         // bytes transferred
	Seek     time.Duration // time spent seeking
	Rotation time.Duration // time spent waiting for the platter
	Transfer time.Duration // time spent transferring
	Flush    time.Duration // time spent in Flush
}

// Busy is the total modelled time.
func (s SlowStats) Busy() time.Duration { return s.Seek + s.Rotation + s.Transfer + s.Flush }

// Slow wraps a Device and makes every request take as long as it would on
// the disk its DiskModel describes. It has one head: requests are served one
// at a time, in the order they arrive, and each holds the head for its whole
// modelled time. The wait is a time.Timer, so tests run it in virtual time
// with testing/synctest.
type Slow struct {
	inner Device
	model DiskModel
	span  int64
	epoch time.Time // the platter is at angle 0 at epoch

	// head is a one-slot channel rather than a mutex, so that waiters queue
	// in arrival order and a goroutine waiting for the head is durably
	// blocked under testing/synctest.
	head chan struct{}
	mu   struct {
		sync.Mutex
		pos   int64     // where the previous request ended
		end   time.Time // when it ended, in the model's time
		stats SlowStats
	}
}

var _ Device = (*Slow)(nil)

// NewSlow wraps inner with the disk model m. It panics if m does not
// Validate: a model is configuration, checked by ParseDiskModel at the edge.
func NewSlow(inner Device, m DiskModel) *Slow {
	if err := m.Validate(); err != nil {
		panic(err)
	}
	s := &Slow{inner: inner, model: m, span: m.Span, epoch: time.Now(), head: make(chan struct{}, 1)}
	if s.span <= 0 {
		s.span = inner.Size()
	}
	if s.span <= 0 {
		s.span = 1
	}
	return s
}

// Model returns the disk model.
func (s *Slow) Model() DiskModel { return s.model }

// Stats returns the counters so far.
func (s *Slow) Stats() SlowStats {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.mu.stats
}

// Size is the inner device's size.
func (s *Slow) Size() int64 { return s.inner.Size() }

// Caps are the inner device's, marked rotational.
func (s *Slow) Caps() Caps {
	c := s.inner.Caps()
	c.Rotational = true
	return c
}

// ReadAt reads from the inner device and takes the modelled time.
func (s *Slow) ReadAt(p []byte, off int64) error {
	if err := CheckRange(s.inner.Size(), off, int64(len(p))); err != nil {
		return err
	}
	return s.serve(off, int64(len(p)), func() error { return s.inner.ReadAt(p, off) })
}

// WriteAt writes to the inner device and takes the modelled time.
func (s *Slow) WriteAt(p []byte, off int64, flags Flags) error {
	if err := CheckRange(s.inner.Size(), off, int64(len(p))); err != nil {
		return err
	}
	return s.serve(off, int64(len(p)), func() error { return s.inner.WriteAt(p, off, flags) })
}

// Zero zeroes on the inner device and takes the time of a write of the same
// length.
func (s *Slow) Zero(off, length int64, flags Flags) error {
	if err := CheckRange(s.inner.Size(), off, length); err != nil {
		return err
	}
	return s.serve(off, length, func() error { return s.inner.Zero(off, length, flags) })
}

// Trim passes straight to the inner device: it moves no head and costs no
// time. It still waits its turn behind the requests before it.
func (s *Slow) Trim(off, length int64, flags Flags) error {
	if err := CheckRange(s.inner.Size(), off, length); err != nil {
		return err
	}
	s.head <- struct{}{}
	defer func() { <-s.head }()
	return s.inner.Trim(off, length, flags)
}

// Flush flushes the inner device and costs the model's FlushTime.
func (s *Slow) Flush() error {
	arrival := time.Now()
	s.head <- struct{}{}
	defer func() { <-s.head }()
	err := s.inner.Flush()
	if !errors.Is(err, ErrNotSupported) {
		s.mu.Lock()
		s.mu.end = s.startLocked(arrival).Add(s.model.FlushTime)
		s.mu.stats.Requests++
		s.mu.stats.Flush += s.model.FlushTime
		end := s.mu.end
		s.mu.Unlock()
		waitUntil(end)
	}
	return err
}

// Close closes the inner device.
func (s *Slow) Close() error { return s.inner.Close() }

// serve holds the head for one request at off of length n: it does the inner
// I/O, then waits out whatever is left of the modelled time.
//
// A request that arrived while the head was busy starts the moment the
// request before it ended, in the model's time, not when its goroutine
// got the head: a disk serves its queue back to back, and the timer's
// late wake-up must not turn a short skip forward into a missed
// revolution. One that arrives to an idle head starts on arrival.
func (s *Slow) serve(off, n int64, io func() error) error {
	arrival := time.Now()
	s.head <- struct{}{}
	defer func() { <-s.head }()
	err := io()
	if errors.Is(err, ErrNotSupported) || errors.Is(err, ErrOutOfRange) {
		return err // nothing was touched, nothing moved
	}
	s.mu.Lock()
	start := s.startLocked(arrival)
	seek, rot, xfer := s.costLocked(off, n, start)
	s.mu.pos = off + n
	s.mu.end = start.Add(seek + rot + xfer)
	st := &s.mu.stats
	st.Requests++
	if seek > 0 || rot > 0 {
		st.Seeks++
	}
	st.Bytes += n
	st.Seek += seek
	st.Rotation += rot
	st.Transfer += xfer
	end := s.mu.end
	s.mu.Unlock()
	waitUntil(end)
	return err
}

// startLocked is when a request that arrived at arrival gets the head, in
// the model's time: on arrival, or when the request before it ends.
func (s *Slow) startLocked(arrival time.Time) time.Time {
	if s.mu.end.After(arrival) {
		return s.mu.end
	}
	return arrival
}

// costLocked splits the time of a request that starts at time now into seek,
// rotation and transfer.
func (s *Slow) costLocked(off, n int64, now time.Time) (seek, rot, xfer time.Duration) {
	m := s.model
	xfer = time.Duration(float64(n) / float64(m.TransferRate) * float64(time.Second))
	d := off - s.mu.pos
	if d < 0 {
		d = -d
	}
	if d == 0 {
		return 0, 0, xfer
	}
	var rev time.Duration
	var track float64 // bytes under the head per revolution
	if m.RPM > 0 {
		rev = m.revolution()
		track = float64(m.TransferRate) * rev.Seconds()
	}
	if m.RPM <= 0 || int64(float64(off)/track) != int64(float64(s.mu.pos)/track) {
		// Another track: move the arm.
		frac := math.Sqrt(float64(min(d, s.span)) / float64(s.span))
		seek = m.Settle + time.Duration(frac*float64(m.FullStroke-m.Settle))
	}
	if m.RPM > 0 {
		target := math.Mod(float64(off)/track, 1)
		at := math.Mod(float64(now.Add(seek).Sub(s.epoch))/float64(rev), 1)
		wait := target - at
		if wait < 0 {
			wait++
		}
		rot = time.Duration(wait * float64(rev))
	}
	return seek, rot, xfer
}

// waitUntil blocks until t on a timer (not a polling sleep: one wait for a
// known deadline).
func waitUntil(t time.Time) {
	d := time.Until(t)
	if d <= 0 {
		return
	}
	tm := time.NewTimer(d)
	<-tm.C
}
