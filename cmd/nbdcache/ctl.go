package main

// ctl.go: the control socket's client commands: `nbdcache stats`, `flush`
// and `mode`.

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"text/tabwriter"
	"time"

	"github.com/schollz/progressbar/v3"
	"golang.org/x/term"

	"github.com/nbdcache/nbdcache/control"
)

// controlFlag registers --control and returns a func that dials it.
func controlFlag(fs *flag.FlagSet) func() (*control.Client, error) {
	addr := fs.String("control", "", "the server's control socket, `unix:PATH` (required)")
	return func() (*control.Client, error) {
		if *addr == "" {
			return nil, fmt.Errorf("%w: --control unix:PATH is required (the value given to `nbdcache serve --control`)", errUsage)
		}
		p, err := control.ParseAddr(*addr)
		if err != nil {
			return nil, fmt.Errorf("%w: %v", errUsage, err)
		}
		return control.Dial(p), nil
	}
}

func runStats(fs *flag.FlagSet) runner {
	dial := controlFlag(fs)
	asJSON := fs.Bool("json", false, "print the raw JSON snapshot (with --watch: JSON Lines, one object a line)")
	watch := fs.Duration("watch", 0, "print again every `INTERVAL` (e.g. 1s) until interrupted, with rates")
	return func(ctx context.Context, args []string, stdout, stderr io.Writer) error {
		c, err := dial()
		if err != nil {
			return err
		}
		var prev control.Stats
		var prevAt time.Time
		for {
			s, err := c.Stats(ctx)
			if err != nil {
				return err
			}
			now := time.Now()
			switch {
			case *asJSON && *watch > 0:
				json.NewEncoder(stdout).Encode(s) // JSON Lines
			case *asJSON:
				printJSON(stdout, s)
			default:
				printStats(stdout, s, prev, now.Sub(prevAt), !prevAt.IsZero())
			}
			if *watch <= 0 {
				return nil
			}
			prev, prevAt = s, now
			t := time.NewTimer(*watch)
			select {
			case <-ctx.Done():
				t.Stop()
				return nil
			case <-t.C:
			}
		}
	}
}

// printStats prints a snapshot; with rates, the rates since prev, taken
// dt before. The cache, writeback and remote lines appear only where the
// server has those parts.
func printStats(w io.Writer, s, prev control.Stats, dt time.Duration, rates bool) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	perSec := func(now, before int64) int64 { return int64(float64(now-before) / dt.Seconds()) }
	rates = rates && dt > 0
	fmt.Fprintf(tw, "mode\t%s\tuptime\t%.0fs\n", s.Mode, s.UptimeSeconds)
	c, f := s.CacheStats, s.CacheFigures
	cached := c != nil && f != nil
	if cached {
		fmt.Fprintf(tw, "dirty\t%s\tcached\t%s of %s (occupancy %.1f%%)\n", mibs(c.DirtyBytes), mibs(c.CachedBytes), mibs(c.CapacityBytes), 100*f.Occupancy)
		fmt.Fprintf(tw, "hit ratio\t%.3f\thits/misses/partial\t%d/%d/%d (RAM %d)\n", f.HitRatio, c.Hits, c.Misses, c.PartialHits, c.RAMHits)
		fmt.Fprintf(tw, "bypasses\t%d (%d thrashing)\tpromotions\t%d\n", c.Bypasses, c.ThrashBypasses, c.Promotions)
		if c.Thrashing {
			why := "its working set does not fit"
			if c.SlowerThanBacking {
				why = fmt.Sprintf("slower than the backing (%s against %s a 4 KiB write)",
					time.Duration(c.CachedWriteNanos), time.Duration(c.BackingWriteNanos))
			}
			fmt.Fprintf(tw, "stepped aside\t%s\n", why)
		}
	}
	if wb := s.WritebackStats; wb != nil {
		var total, flushes int64
		if cached {
			total, flushes = c.WritebackBytes, f.BackingFlushes
		}
		rate := wb.WrittenRate
		if rates && prev.CacheStats != nil {
			rate = perSec(total, prev.CacheStats.WritebackBytes)
		}
		fmt.Fprintf(tw, "writeback\t%s total (%s)\trate\t%s/s, target dirty %s\n", mibs(total), s.WritebackState, mibs(rate), mibs(wb.Target))
		fmt.Fprintf(tw, "collisions\t%d\tbacking writes\t%d (avg %s), %d flushes\n", wb.Collisions, wb.Writes, mibs(wb.AvgWrite), flushes)
		if wb.Errors > 0 {
			fmt.Fprintf(tw, "writeback errors\t%d\tlast\t%s\n", wb.Errors, s.WritebackLastError)
		}
	}
	if r := s.RemoteStats; r != nil {
		fmt.Fprintf(tw, "backing\t%s\toutages\t%d (down for %.0fs)\n", s.BackingState, r.Outages, r.DownSeconds)
	}
	n := s.ServerStats
	fmt.Fprintf(tw, "requests\t%d (errors %d)\tconnections\t%d open, %d total, %d refused, %d timed out\n", n.Requests, n.Errors, n.Active, n.Connections, n.Refused, n.TimedOut)
	fmt.Fprintf(tw, "buffers\t%s (peak %s)\twaits\t%d\n", mibs(n.BufferBytes), mibs(n.BufferPeak), n.BufferWaits)
	if rates {
		fmt.Fprintf(tw, "client I/O\tread %s/s\twrite\t%s/s\n",
			mibs(perSec(n.BytesRead, prev.ServerStats.BytesRead)), mibs(perSec(n.BytesWritten, prev.ServerStats.BytesWritten)))
	}
	if cached {
		fmt.Fprintf(tw, "gc runs\t%d (moved %s, write amplification %.2f; cleaned %s)\tevicted\t%s\n",
			c.GCRuns, mibs(c.GCMovedBytes), f.GCWriteAmp, mibs(c.GCCleanedBytes), mibs(c.EvictedBytes))
		if c.Failed {
			fmt.Fprintf(tw, "FAILED\tthe cache device failed; dirty data is at risk\t\t\n")
		}
	}
	tw.Flush()
	fmt.Fprintln(w)
}

func mibs(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.2f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}

func runFlush(fs *flag.FlagSet) runner {
	dial := controlFlag(fs)
	drain := fs.Bool("drain", false, "write back every dirty byte and sync the backing (required)")
	return func(ctx context.Context, args []string, stdout, stderr io.Writer) error {
		if !*drain {
			return fmt.Errorf("%w: only `flush --drain` exists: clients flush the cache themselves with NBD FLUSH", errUsage)
		}
		c, err := dial()
		if err != nil {
			return err
		}
		// On a terminal, a bar. Its text is ours: IEC units as everywhere
		// else, and the rate over the wall time since the drain began (the
		// bar's own rate, over its first updates, showed 129 GB/s for a
		// 1.2 MiB drain).
		var bar *progressbar.ProgressBar
		if f, ok := stderr.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
			bar = progressbar.NewOptions64(-1, progressbar.OptionSetWriter(stderr),
				progressbar.OptionSetDescription("draining"), progressbar.OptionSetPredictTime(true),
				progressbar.OptionThrottle(100*time.Millisecond))
		}
		start := time.Now()
		var last control.Progress
		err = c.Drain(ctx, func(p control.Progress) {
			last = p
			if bar != nil {
				rate := int64(float64(p.Done) / max(time.Since(start).Seconds(), 1e-3))
				bar.Describe(fmt.Sprintf("draining %s of %s, %s/s", mibs(p.Done), mibs(p.Total), mibs(rate)))
				bar.ChangeMax64(max(p.Total, 1))
				bar.Set64(p.Done)
				return
			}
			fmt.Fprintf(stdout, "drain: %d of %d bytes\n", p.Done, p.Total)
		})
		if bar != nil {
			bar.Exit()
			fmt.Fprintln(stderr)
		}
		elapsed := time.Since(start).Seconds()
		if errors.Is(err, context.Canceled) {
			return fmt.Errorf("drain interrupted after %.1fs: %s of %s were written back; the rest stays dirty, and safe, in the cache", elapsed, mibs(last.Done), mibs(last.Total))
		}
		if errors.Is(err, control.ErrStopped) {
			return fmt.Errorf("drain interrupted after %.1fs: %w; %s of %s were written back, the rest stays dirty, and safe, in the cache",
				elapsed, err, mibs(last.Done), mibs(last.Total))
		}
		if err != nil {
			var re *control.RemoteError
			if errors.As(err, &re) {
				return fmt.Errorf("drain failed: %s", re.Msg)
			}
			return err
		}
		fmt.Fprintf(stdout, "nbdcache: drained %s in %.1fs (%s/s); the backing is consistent and synced\n",
			mibs(last.Total), elapsed, mibs(int64(float64(last.Total)/max(elapsed, 1e-3))))
		return nil
	}
}

func runMode(fs *flag.FlagSet) runner {
	dial := controlFlag(fs)
	return func(ctx context.Context, args []string, stdout, stderr io.Writer) error {
		pos := args
		if len(pos) != 1 {
			return fmt.Errorf("%w: want one mode: writeback, writethrough, writearound or none", errUsage)
		}
		c, err := dial()
		if err != nil {
			return err
		}
		if err := c.SetMode(ctx, pos[0]); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "nbdcache: mode is now %s\n", pos[0])
		return nil
	}
}

// printJSON prints v as indented JSON, for the --json flags.
func printJSON(w io.Writer, v any) {
	b, _ := json.MarshalIndent(v, "", "  ")
	fmt.Fprintln(w, string(b))
}
