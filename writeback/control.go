package writeback

// control.go: the rate controller, the rate limiter and the mode predicate.
// All three are pure (time comes in as an argument), so they are tested
// without a clock.

import (
	"time"
)

// Mode is what the flusher is doing.
type Mode uint8

const (
	// ModeStopped: nothing dirty, or less than the low watermark.
	ModeStopped Mode = iota
	// ModeRate: writing back at the controller's rate.
	ModeRate
	// ModeFull: at or above the high watermark, full speed.
	ModeFull
	// ModeIdle: the foreground is idle, full speed.
	ModeIdle
	// ModeAge: dirty data is older than MaxDirtyAge, full speed until a
	// pass completes.
	ModeAge
	// ModeDrain: a Drain runs, full speed.
	ModeDrain
	// ModeShed: the Source sheds its data (Shedder), full speed.
	ModeShed
	// ModeProbe: the Seeker says the backing seeks, and the flusher has
	// timed too few writes of its own to say (trustTimes): it writes back
	// about probeBytes a batch at full speed, to time them.
	ModeProbe
)

var modeNames = [...]string{"stopped", "rate", "full", "idle", "age", "drain", "shed", "probe"}

func (m Mode) String() string {
	if int(m) < len(modeNames) {
		return modeNames[m]
	}
	return "mode?"
}

// FullSpeed reports whether the mode ignores the rate limit.
func (m Mode) FullSpeed() bool { return m >= ModeFull }

// situation is what decide looks at.
type situation struct {
	dirty, capacity int64
	draining        bool
	shed            bool // the Source sheds its data (Shedder)
	idle            bool // no foreground request for IdleAfter
	aged            bool // an age pass is due or under way
	probe           bool // the Seeker says the backing seeks, and the flusher has not timed it (ModeProbe)
}

// decide is the writeback policy, bcache's should_writeback for the
// flusher: one pure predicate, checked in this order.
func decide(s situation, c *Config) Mode {
	switch {
	case s.dirty <= 0:
		return ModeStopped
	case s.draining:
		return ModeDrain
	case s.shed:
		return ModeShed
	case percentAtLeast(s.dirty, s.capacity, c.HighWatermark):
		return ModeFull
	case s.idle:
		return ModeIdle
	case s.aged:
		return ModeAge
	case s.probe:
		return ModeProbe
	case c.LowWatermark >= 0 && !percentAtLeast(s.dirty, s.capacity, c.LowWatermark):
		return ModeStopped
	}
	return ModeRate
}

// percentAtLeast reports dirty >= pct% of capacity, in integers.
func percentAtLeast(dirty, capacity int64, pct int) bool {
	if capacity <= 0 {
		return true
	}
	// dirty*100 >= capacity*pct, without overflow for any realistic size.
	return float64(dirty)*100 >= float64(capacity)*float64(pct)
}

// controller is bcache's PI writeback-rate controller, in bytes and
// seconds:
//
//	error     = dirty - target
//	integral += error * dt     only if (error < 0 and integral > 0)
//	                           or (error > 0 and the rate was binding)
//	integral  = max(integral, 0)
//	rate      = clamp(error/PTermInverse + integral/ITermInverse, MinRate, MaxRate)
//
// "The rate was binding" means the flusher had to wait for the rate
// limiter during the last interval: when the backing cannot keep up anyway,
// winding up the integral would only make it overshoot later.
type controller struct {
	pInv, iInv       float64
	minRate, maxRate float64

	integral float64 // byte-seconds
	p, i     float64 // last terms, bytes/s
	rate     float64 // last output, bytes/s
}

func newController(c *Config) controller {
	return controller{
		pInv: c.PTermInverse, iInv: c.ITermInverse,
		minRate: float64(c.MinRate), maxRate: float64(c.MaxRate),
		rate: float64(c.MinRate),
	}
}

// update advances the controller by dt seconds and returns the new rate.
func (c *controller) update(dirty, target int64, dt float64, binding bool) float64 {
	e := float64(dirty - target)
	if (e < 0 && c.integral > 0) || (e > 0 && binding) {
		c.integral = max(c.integral+e*dt, 0)
	}
	c.p = e / c.pInv
	c.i = c.integral / c.iInv
	c.rate = min(max(c.p+c.i, c.minRate), c.maxRate)
	return c.rate
}

// limiter spaces writes to a rate: a write of n bytes may start at next,
// and moves next on by n/rate. next never falls more than lag behind now
// (no burst to catch up an old debt) and a single wait is capped at
// maxWait (so a rate that rises is noticed soon), as bcache's
// bch_next_delay does.
type limiter struct {
	next         time.Time
	lag, maxWait time.Duration
}

// delay is how long to wait before a write at the given rate may start.
func (l *limiter) delay(now time.Time) time.Duration {
	if l.next.Before(now.Add(-l.lag)) {
		l.next = now.Add(-l.lag)
	}
	if d := l.next.Sub(now); d > 0 {
		if d > l.maxWait {
			l.next = now.Add(l.maxWait)
			return l.maxWait
		}
		return d
	}
	return 0
}

// charge accounts a write of n bytes at rate bytes/s.
func (l *limiter) charge(n int64, rate float64) {
	l.next = l.next.Add(time.Duration(float64(n) / rate * float64(time.Second)))
}

// reset forgets the schedule: the next write may start at now.
func (l *limiter) reset(now time.Time) { l.next = now }
