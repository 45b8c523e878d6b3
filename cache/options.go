package cache

// options.go: Options, FormatOptions, Mode and the sentinel errors.

import (
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/nbdcache/nbdcache/storage"
	"github.com/nbdcache/nbdcache/writeback"
)

// Sentinel errors. Callers check them with errors.Is.
var (
	ErrNotFormatted = errors.New("cache: device holds no cache superblock")
	ErrVersion      = errors.New("cache: unsupported on-disk format version")
	ErrCorrupt      = errors.New("cache: metadata corrupt")
	ErrDirty        = errors.New("cache: cache holds dirty data")
	ErrWrongBacking = errors.New("cache: cache belongs to another backing device")
	ErrTooSmall     = errors.New("cache: cache device too small")
	// ErrClosed is returned after Close. It wraps storage.ErrClosed, as
	// the Device contract asks.
	ErrClosed    = fmt.Errorf("cache: closed: %w", storage.ErrClosed)
	ErrFailed    = errors.New("cache: cache device failed; writes refused")
	ErrBadMode   = errors.New("cache: unknown mode")
	ErrBadOption = errors.New("cache: invalid option")
	// ErrStale is returned by ReadCached when the extent handed out is no
	// longer (wholly) current; writeback skips it. It wraps
	// writeback.ErrStale.
	ErrStale = fmt.Errorf("cache: extent no longer current: %w", writeback.ErrStale)
	// ErrBusy is returned by ReadCached when another writeback of an
	// overlapping range is in flight. It wraps writeback.ErrBusy.
	ErrBusy = fmt.Errorf("cache: overlapping writeback in flight: %w", writeback.ErrBusy)
)

// Mode is the cache mode.
type Mode int

const (
	Writeback    Mode = iota // writes land in the cache, dirty; written back later
	Writethrough             // writes land in the backing and the cache (clean)
	Writearound              // writes land in the backing only; reads are cached
	None                     // nothing new is cached; residual dirty data is still served
)

// String names the mode as ParseMode reads it.
func (m Mode) String() string {
	switch m {
	case Writeback:
		return "writeback"
	case Writethrough:
		return "writethrough"
	case Writearound:
		return "writearound"
	case None:
		return "none"
	}
	return fmt.Sprintf("mode(%d)", int(m))
}

// ParseMode reads "writeback", "writethrough", "writearound" or "none".
func ParseMode(s string) (Mode, error) {
	for m := Writeback; m <= None; m++ {
		if strings.EqualFold(s, m.String()) {
			return m, nil
		}
	}
	return 0, fmt.Errorf("%w: %q", ErrBadMode, s)
}

// FormatOptions configures Format.
type FormatOptions struct {
	BlockSize  int   // allocation unit in buckets; default 4096
	BucketSize int64 // default 1 MiB
	BackingID  [16]byte
	// BackingPath is recorded in the superblock as where the backing was
	// seen (a hint for messages; see Identity).
	BackingPath string
	Force       bool // overwrite a cache that still holds dirty data
	// JournalSize is the journal ring's size; 0 picks 1/32 of the data
	// area, between 4 MiB and 256 MiB (at most a quarter of the device).
	JournalSize int64
	Logger      *slog.Logger
}

// Options configures Open.
type Options struct {
	Mode      Mode
	BackingID [16]byte // must match the superblock, else ErrWrongBacking
	// BackingPath, if set, is recorded in the superblock as where the
	// backing was last seen (a hint for messages; see Identity).
	BackingPath string
	// SequentialCutoff: a stream of sequential requests longer than this
	// bypasses the cache. 0 means 4 MiB, < 0 turns it off.
	SequentialCutoff int64
	RAMCache         int64 // bytes of RAM tier; 0 turns it off
	// WritebackPercent is the dirty share of the cache the background
	// writeback aims at (default 10).
	WritebackPercent int
	Logger           *slog.Logger

	// Tuning knobs.

	// Writeback configures the background flusher (package writeback);
	// TargetPercent defaults to WritebackPercent.
	Writeback writeback.Config
	// CheckpointPercent: checkpoint when the journal ring is this full
	// (fraction in percent, default 50, max 50).
	CheckpointPercent int
	// CheckpointInterval: the background loop also checkpoints when the
	// last checkpoint is this old and the journal has grown by at least
	// checkpointMinBlocks since, so that a slow trickle of writes never
	// leaves a long journal to replay (default 60 s; negative: never).
	CheckpointInterval time.Duration
	// QuietCommit: once no write has been acknowledged for this long,
	// the cache makes durable what a FLUSH would (the journal, and the
	// backing's flush for writes that went around the cache), at most
	// once every quietCommitGap, as bcache writes its journal within
	// journal_delay_ms: a power cut then loses nothing acknowledged
	// before a quiet spell, and the FLUSH that often ends one (an fsync
	// after a burst) has nothing left to do (default 10 ms; at least
	// 1 ms; negative: never).
	QuietCommit time.Duration
	// GCPercent: when free buckets are short, GC compacts full buckets,
	// the emptiest first, whose live data is below this share of their
	// size (default 80).
	GCPercent int
	// GCMove makes GC move the dirty data of the buckets it empties into
	// other buckets, as without a flusher. By default (with background
	// work on) it writes that data back and drops it: the backing must
	// receive it anyway, and moving it costs the cache device a copy.
	GCMove bool
	// PromoteAll turns the read admission policy off: every miss is
	// promoted (unless bypassed by the cutoff).
	PromoteAll bool
}

func (o *Options) fill() error {
	if o.Mode < Writeback || o.Mode > None {
		return fmt.Errorf("%w: mode %d", ErrBadOption, o.Mode)
	}
	if o.SequentialCutoff == 0 {
		o.SequentialCutoff = 4 << 20
	}
	if o.WritebackPercent <= 0 || o.WritebackPercent > 100 {
		o.WritebackPercent = 10
	}
	if o.CheckpointPercent <= 0 || o.CheckpointPercent > 50 {
		o.CheckpointPercent = 50
	}
	if o.CheckpointInterval == 0 {
		o.CheckpointInterval = time.Minute
	}
	if o.QuietCommit == 0 {
		o.QuietCommit = 10 * time.Millisecond
	}
	if o.QuietCommit > 0 && o.QuietCommit < time.Millisecond {
		return fmt.Errorf("%w: quiet commit after %v: at least 1ms, or off", ErrBadOption, o.QuietCommit)
	}
	if o.GCPercent <= 0 || o.GCPercent >= 100 {
		o.GCPercent = 80
	}
	if o.RAMCache < 0 {
		return fmt.Errorf("%w: RAMCache %d", ErrBadOption, o.RAMCache)
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	return nil
}
