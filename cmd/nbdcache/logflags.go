package main

// logflags.go: the log flags of serve and attach, and the logger they make.

import (
	"flag"
	"fmt"
	"io"
	"log/slog"
	"strings"
	"time"

	"github.com/nbdcache/nbdcache/internal/ratelog"
)

// logFlags configure the log of the long-running commands (serve,
// attach): slog to stderr, as text or JSON, at a level; warnings of one
// kind are rate-limited (internal/ratelog).
type logFlags struct {
	verbose bool
	level   string
	format  string
}

func (f *logFlags) register(fs *flag.FlagSet) {
	fs.BoolVar(&f.verbose, "v", false, "log connection events (--log-level info)")
	fs.StringVar(&f.level, "log-level", "warn", "`LEVEL` debug, info (connections opened and closed), warn or error")
	fs.StringVar(&f.format, "log-format", "text", "`FORMAT` text (key=value) or json (one object a line)")
}

// logger builds the logger the flags describe, writing to w.
func (f *logFlags) logger(w io.Writer) (*slog.Logger, error) {
	var level slog.Level
	if err := level.UnmarshalText([]byte(f.level)); err != nil {
		return nil, fmt.Errorf("%w: --log-level %q: want debug, info, warn or error", errUsage, f.level)
	}
	if f.verbose {
		level = min(level, slog.LevelInfo)
	}
	opts := &slog.HandlerOptions{Level: level}
	var h slog.Handler
	switch strings.ToLower(f.format) {
	case "text":
		h = slog.NewTextHandler(w, opts)
	case "json":
		h = slog.NewJSONHandler(w, opts)
	default:
		return nil, fmt.Errorf("%w: --log-format %q: want text or json", errUsage, f.format)
	}
	return slog.New(ratelog.New(h, logBurst, time.Second)), nil
}

// logBurst is how many warnings of one kind a second reach stderr; the
// rest are counted and reported with the next one (internal/ratelog).
const logBurst = 5
