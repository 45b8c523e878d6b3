package writeback

// config.go: Config, the flusher's tuning, and its defaults.

import (
	"fmt"
	"log/slog"
	"time"
)

// Config tunes a Flusher. The zero value of every field means its default,
// shown in brackets.
type Config struct {
	// TargetPercent is the dirty level the controller aims at, in percent
	// of the Source's CapacityBytes [10] (bcache's writeback_percent).
	TargetPercent int
	// LowWatermark: below this percentage dirty, writeback stops, unless
	// the foreground is idle, dirty data is too old, or a Drain runs
	// [TargetPercent/2]. A negative value disables the stop.
	LowWatermark int
	// HighWatermark: at or above this percentage dirty, writeback runs at
	// full speed [max(70, TargetPercent)]. 70 is bcache's
	// CUTOFF_WRITEBACK_SYNC. Below it, the rate controller's integral
	// term brings dirty data down gently. A write working set of
	// half the cache is ordinary, and writing it back at full speed
	// mostly wastes work on blocks that are overwritten again soon.
	HighWatermark int

	// MaxInFlight bounds the backing writes in flight at once [8].
	MaxInFlight int
	// MaxWrite is the largest merged backing write, a multiple of 512
	// [1 MiB]. An extent longer than this is written in pieces.
	MaxWrite int64
	// MaxGap is the largest run of clean cached data between two dirty
	// extents that a backing write bridges (Filler), a multiple of 512
	// [64 KiB]; negative: never.
	MaxGap int64
	// BatchBytes bounds the dirty bytes in one batch at full speed
	// [2*MaxInFlight*MaxWrite]. A batch ends with one backing Flush,
	// then the MarkClean of everything it wrote.
	BatchBytes int64
	// BatchTime bounds a batch in time: it issues no new write after
	// running this long, and a rate-limited batch takes about
	// rate*BatchTime bytes. Data written back is marked clean within about
	// BatchTime plus one Flush [1 s].
	BatchTime time.Duration

	// MaxDirtyAge: when the last complete pass started longer ago than
	// this, a full-speed pass is forced, so no dirty byte stays dirty much
	// longer than MaxDirtyAge plus one pass [30 s]. Negative disables it.
	MaxDirtyAge time.Duration
	// IdleAfter: when no NoteForeground came for this long, the
	// foreground is idle and writeback runs at full speed [1 s].
	IdleAfter time.Duration

	// UpdateInterval is the controller's period [1 s].
	UpdateInterval time.Duration
	// PTermInverse, in seconds: the proportional term alone would retire
	// the error (dirty - target) in this many seconds [40].
	PTermInverse float64
	// ITermInverse, in seconds squared: the integral term adds the
	// accumulated error (byte-seconds) divided by this [10000].
	ITermInverse float64
	// MinRate and MaxRate clamp the controller's output, bytes/s
	// [4 KiB/s, 1 GiB/s]. Full speed ignores MaxRate.
	MinRate, MaxRate int64

	// RetryMin and RetryMax bound the backoff after a failed batch: it
	// starts at RetryMin and doubles up to RetryMax [100 ms, 30 s].
	RetryMin, RetryMax time.Duration

	// Logger receives one record per failed batch [slog.Default()].
	Logger *slog.Logger
}

// withDefaults fills in the defaults and checks the result.
func (c Config) withDefaults() (Config, error) {
	if c.TargetPercent == 0 {
		c.TargetPercent = 10
	}
	if c.LowWatermark == 0 {
		c.LowWatermark = c.TargetPercent / 2
	}
	if c.HighWatermark == 0 {
		c.HighWatermark = max(70, c.TargetPercent)
	}
	if c.MaxInFlight == 0 {
		c.MaxInFlight = 8
	}
	if c.MaxWrite == 0 {
		c.MaxWrite = 1 << 20
	}
	if c.MaxGap == 0 {
		c.MaxGap = 64 << 10
	}
	if c.BatchBytes == 0 {
		c.BatchBytes = 2 * int64(c.MaxInFlight) * c.MaxWrite
	}
	if c.BatchTime == 0 {
		c.BatchTime = time.Second
	}
	if c.MaxDirtyAge == 0 {
		c.MaxDirtyAge = 30 * time.Second
	}
	if c.IdleAfter == 0 {
		c.IdleAfter = time.Second
	}
	if c.UpdateInterval == 0 {
		c.UpdateInterval = time.Second
	}
	if c.PTermInverse == 0 {
		c.PTermInverse = 40
	}
	if c.ITermInverse == 0 {
		c.ITermInverse = 10000
	}
	if c.MinRate == 0 {
		c.MinRate = 4 << 10
	}
	if c.MaxRate == 0 {
		c.MaxRate = 1 << 30
	}
	if c.RetryMin == 0 {
		c.RetryMin = 100 * time.Millisecond
	}
	if c.RetryMax == 0 {
		c.RetryMax = 30 * time.Second
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	switch {
	case c.TargetPercent < 0 || c.TargetPercent > 100:
		return c, fmt.Errorf("%w: target %d%% outside 0..100", ErrConfig, c.TargetPercent)
	case c.LowWatermark > c.TargetPercent:
		return c, fmt.Errorf("%w: low watermark %d%% above target %d%%", ErrConfig, c.LowWatermark, c.TargetPercent)
	case c.HighWatermark < c.TargetPercent || c.HighWatermark > 100:
		return c, fmt.Errorf("%w: high watermark %d%% outside target..100", ErrConfig, c.HighWatermark)
	case c.MaxInFlight < 1:
		return c, fmt.Errorf("%w: MaxInFlight %d < 1", ErrConfig, c.MaxInFlight)
	case c.MaxGap > 0 && c.MaxGap%512 != 0:
		return c, fmt.Errorf("writeback: MaxGap %d is not a multiple of 512", c.MaxGap)
	case c.MaxWrite < 512 || c.MaxWrite%512 != 0:
		return c, fmt.Errorf("%w: MaxWrite %d is not a positive multiple of 512", ErrConfig, c.MaxWrite)
	case c.BatchBytes < c.MaxWrite:
		return c, fmt.Errorf("%w: BatchBytes %d < MaxWrite %d", ErrConfig, c.BatchBytes, c.MaxWrite)
	case c.BatchTime < 0 || c.IdleAfter < 0 || c.UpdateInterval <= 0:
		return c, fmt.Errorf("%w: negative interval", ErrConfig)
	case c.PTermInverse <= 0 || c.ITermInverse <= 0:
		return c, fmt.Errorf("%w: controller terms must be positive", ErrConfig)
	case c.MinRate <= 0 || c.MaxRate < c.MinRate:
		return c, fmt.Errorf("%w: rate bounds %d..%d", ErrConfig, c.MinRate, c.MaxRate)
	case c.RetryMin <= 0 || c.RetryMax < c.RetryMin:
		return c, fmt.Errorf("%w: retry bounds %v..%v", ErrConfig, c.RetryMin, c.RetryMax)
	}
	return c, nil
}
