package main

// ctl_faults.go: `nbdcache ctl`, the client of fault mode (faults.go).

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/nbdcache/nbdcache/control"
	"github.com/nbdcache/nbdcache/faults"
)

// errCutFailed makes `ctl power-cut` exit 1 when the power-on or the
// check after the cut found a problem.
var errCutFailed = errors.New("the cache did not come back clean")

// ctlLong is `nbdcache ctl -h`'s text.
const ctlLong = `Drives a server started with ` + "`nbdcache serve --faults --control unix:PATH`" + `.
Every command takes --control unix:PATH, before or after its name.

commands:
  power-cut [--model unflushed|random|torn|keep] [--seed N] [--off] [--json]
        cut the power: drop every client connection, lose what a power
        failure loses on the cache and backing devices, power on again
        (recovery runs as at a real start) and print what was lost;
        with --off the power stays off (every request fails with EIO)
  power-on [--json]
        after power-cut --off: recovery runs, the state after the cut is served
  error --target export|cache|backing [--op read,write,flush,trim,zero,extents]
        [--errno EIO|EPERM|ENOSPC|EINVAL|ENOMEM|EOVERFLOW|ENOTSUP|ESHUTDOWN]
        [--offset N --length N] [--probability P] [--after N] [--times N]
        make matching requests fail (faults add up; error --clear removes them)
  error --clear [--target T]
  delay --target export|cache|backing [--op ...] --latency 5ms
  delay --clear [--target T]
  status [--json]
        installed errors and delays, errors injected, unsynced bytes, cuts`

// ctlShort are the one-letter options of ctl's commands.
var ctlShort = map[string]string{"control": "C", "json": "j"}

// ctlCommands are ctl's commands.
func ctlCommands() []command {
	return []command{
		{name: "power-cut", summary: "cut the power, power on again and print what was lost (--off: leave it off)", define: ctlPowerCut, short: ctlShort},
		{name: "power-on", summary: "after power-cut --off: recover and serve again", define: ctlPowerOn, short: ctlShort},
		{name: "error", summary: "make matching requests fail (--clear removes them)", define: ctlError, short: ctlShort},
		{name: "delay", summary: "add latency to matching requests (--clear removes it)", define: ctlDelay, short: ctlShort},
		{name: "status", summary: "installed errors and delays, errors injected, unsynced bytes, cuts", define: ctlStatus, short: ctlShort},
	}
}

type dialFunc func() (*control.Client, error)

func ctlPowerCut(fs *flag.FlagSet) runner {
	dial := controlFlag(fs)
	model := fs.String("model", "unflushed", "what the power failure loses: `MODEL` unflushed (every unsynced write), random (a random subset, per 512-byte sector), torn (random plus torn sectors), keep (nothing: a process crash)")
	seed := fs.String("seed", "", "seed of the random and torn models, `N` (default: a fresh one, printed)")
	off := fs.Bool("off", false, "leave the power off: every request fails with EIO until 'ctl power-on' (take a mounted filesystem down first)")
	asJSON := fs.Bool("json", false, "print the raw JSON report")
	return func(ctx context.Context, args []string, stdout, stderr io.Writer) error {
		q := url.Values{"model": {*model}}
		if *seed != "" {
			if _, err := strconv.ParseUint(*seed, 0, 64); err != nil {
				return fmt.Errorf("%w: --seed %q", errUsage, *seed)
			}
			q.Set("seed", *seed)
		}
		if *off {
			q.Set("off", "1")
		}
		return powerCall(ctx, dial, "/v1/fault/power-cut", q, *asJSON, stdout)
	}
}

func ctlPowerOn(fs *flag.FlagSet) runner {
	dial := controlFlag(fs)
	asJSON := fs.Bool("json", false, "print the raw JSON report")
	return func(ctx context.Context, args []string, stdout, stderr io.Writer) error {
		return powerCall(ctx, dial, "/v1/fault/power-on", nil, *asJSON, stdout)
	}
}

// powerCall posts a power-cut or power-on and prints the report.
func powerCall(ctx context.Context, dial dialFunc, path string, q url.Values, asJSON bool, stdout io.Writer) error {
	var res faults.PowerCutResult
	if err := call(ctx, dial, http.MethodPost, path, q, &res); err != nil {
		return err
	}
	if asJSON {
		printJSON(stdout, res)
	} else {
		printPowerCut(stdout, res)
	}
	if res.Error != "" || (res.Check != nil && !res.Check.OK) {
		return errCutFailed
	}
	return nil
}

func printPowerCut(w io.Writer, r faults.PowerCutResult) {
	if r.Model == "" {
		fmt.Fprintf(w, "power on after cut %d\n", r.Cut)
	} else {
		fmt.Fprintf(w, "power cut %d: model %s, seed %d (replay: --model %s --seed %d); %d connection(s) dropped\n",
			r.Cut, r.Model, r.Seed, r.Model, r.Seed, r.Connections)
	}
	for _, d := range r.Devices {
		fmt.Fprintf(w, "  %-8s %d unsynced write(s): %d dropped, %d kept, %d partly; %s dropped, %s kept",
			d.Device+":", d.Entries, d.Dropped, d.Kept, d.Partial, mibs(d.BytesDropped), mibs(d.BytesKept))
		if len(d.Torn)+len(d.Garbage) > 0 {
			fmt.Fprintf(w, "; torn sectors at %v, garbage at %v", d.Torn, d.Garbage)
		}
		if d.Overflows+d.WriteThrough > 0 {
			fmt.Fprintf(w, " (write cache full %d times, %d requests written through, since the last power-on)", d.Overflows, d.WriteThrough)
		}
		fmt.Fprintln(w)
		if len(d.Undone) > 0 {
			rs := make([]string, len(d.Undone))
			for i, u := range d.Undone {
				rs[i] = fmt.Sprintf("%d+%d", u[0], u[1])
			}
			more := ""
			if d.UndoneMore > 0 {
				more = fmt.Sprintf(" and %d more", d.UndoneMore)
			}
			fmt.Fprintf(w, "           undone (offset+length): %s%s\n", strings.Join(rs, " "), more)
		}
	}
	if c := r.Check; c != nil {
		verdict := "clean"
		if !c.OK {
			verdict = "FAILED: " + c.Error
		}
		fmt.Fprintf(w, "  check:   %s (state %s, %d/2 superblocks, %d/2 checkpoints, %d journal blocks, %d records replayed, %d dropped: data never durable)\n",
			verdict, c.State, c.SuperblockCopies, c.CheckpointsValid, c.JournalBlocks, c.Replayed, c.Dropped)
		for _, p := range c.Warnings {
			fmt.Fprintf(w, "           warning: %s\n", p)
		}
	}
	if r.PoweredOff {
		fmt.Fprintf(w, "  the power stays off: every request fails with EIO until `nbdcache ctl power-on`\n")
	} else if rc := r.Recovery; rc != nil {
		fmt.Fprintf(w, "  powered on in %.0f ms: mode %s, %d extents, %s dirty\n", r.Millis, rc.Mode, rc.Extents, mibs(rc.DirtyBytes))
	} else if r.Error == "" {
		fmt.Fprintf(w, "  powered on in %.0f ms\n", r.Millis)
	}
	if r.Error != "" {
		fmt.Fprintf(w, "  ERROR: %s\n", r.Error)
	}
}

func ctlError(fs *flag.FlagSet) runner {
	dial := controlFlag(fs)
	target := fs.String("target", "", "`TARGET`: export (what clients see), cache or backing (the devices)")
	op := fs.String("op", "", "kinds of request that fail, `LIST` of read, write, flush, trim, zero, extents (default: all)")
	errno := fs.String("errno", "EIO", "`ERRNO` the request fails with: EIO, EPERM, ENOSPC, EINVAL, ENOMEM, EOVERFLOW, ENOTSUP or ESHUTDOWN")
	var off, length int64
	fs.Var(sizeFlag{&off}, "offset", "first byte of the affected range, `SIZE`")
	fs.Var(sizeFlag{&length}, "length", "bytes in the affected range, `SIZE` (default: to the end)")
	prob := fs.Float64("probability", 0, "a matching request fails with probability `P` (default: always)")
	after := fs.Int64("after", 0, "let the first `N` matching requests through")
	times := fs.Int64("times", 0, "fail at most `N` requests (default: no limit)")
	clear := fs.Bool("clear", false, "remove the errors (of --target, or of every target)")
	return func(ctx context.Context, args []string, stdout, stderr io.Writer) error {
		q := url.Values{"target": {*target}}
		if *clear {
			q.Set("clear", "1")
		} else {
			if *target == "" {
				return fmt.Errorf("%w: --target export, cache or backing is required", errUsage)
			}
			q.Set("op", *op)
			q.Set("errno", *errno)
			q.Set("offset", fmt.Sprint(off))
			q.Set("length", fmt.Sprint(length))
			q.Set("after", fmt.Sprint(*after))
			q.Set("times", fmt.Sprint(*times))
			if *prob != 0 {
				q.Set("probability", strconv.FormatFloat(*prob, 'g', -1, 64))
			}
		}
		return postFault(ctx, dial, "/v1/fault/error", q, stdout)
	}
}

func ctlDelay(fs *flag.FlagSet) runner {
	dial := controlFlag(fs)
	target := fs.String("target", "", "`TARGET`: export, cache or backing")
	op := fs.String("op", "", "kinds of request delayed, `LIST` of read, write, flush, trim, zero, extents (default: all)")
	latency := fs.String("latency", "", "added latency per request, `DURATION` such as 5ms (0 removes it)")
	clear := fs.Bool("clear", false, "remove the delays (of --target, or of every target)")
	return func(ctx context.Context, args []string, stdout, stderr io.Writer) error {
		q := url.Values{"target": {*target}}
		if *clear {
			q.Set("clear", "1")
		} else {
			if *target == "" || *latency == "" {
				return fmt.Errorf("%w: --target and --latency are required (or --clear)", errUsage)
			}
			q.Set("op", *op)
			q.Set("latency", *latency)
		}
		return postFault(ctx, dial, "/v1/fault/delay", q, stdout)
	}
}

func ctlStatus(fs *flag.FlagSet) runner {
	dial := controlFlag(fs)
	asJSON := fs.Bool("json", false, "print the raw JSON")
	return func(ctx context.Context, args []string, stdout, stderr io.Writer) error {
		var st faults.Status
		if err := call(ctx, dial, http.MethodGet, "/v1/fault", nil, &st); err != nil {
			return err
		}
		if *asJSON {
			printJSON(stdout, st)
			return nil
		}
		printFaultStatus(stdout, st)
		return nil
	}
}

func printFaultStatus(w io.Writer, st faults.Status) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	targets := make([]string, 0, len(st.Failed))
	for t := range st.Failed {
		targets = append(targets, t)
	}
	sort.Strings(targets)
	for _, t := range targets {
		var fs []string
		for _, f := range st.Faults[t] {
			s := fmt.Sprintf("%s→%s", f.Ops, f.Errno)
			if f.Length > 0 {
				s += fmt.Sprintf(" at %d+%d", f.Offset, f.Length)
			}
			if f.Probability > 0 {
				s += fmt.Sprintf(" p=%g", f.Probability)
			}
			if f.After > 0 {
				s += fmt.Sprintf(" after %d", f.After)
			}
			if f.Times > 0 {
				s += fmt.Sprintf(" %d times", f.Times)
			}
			fs = append(fs, s)
		}
		errs := "no errors"
		if len(fs) > 0 {
			errs = strings.Join(fs, "; ")
		}
		delay := st.Delays[t]
		if delay == "" {
			delay = "no delay"
		}
		line := fmt.Sprintf("%s\t%s (%d injected)\t%s", t, errs, st.Failed[t], delay)
		if p, ok := st.Pending[t]; ok {
			line += fmt.Sprintf("\t%s unsynced", mibs(p))
		}
		fmt.Fprintln(tw, line)
	}
	tw.Flush()
	fmt.Fprintf(w, "power cuts so far: %d\n", st.Cuts)
	if st.Off {
		fmt.Fprintln(w, "the power is off: every request fails with EIO until `nbdcache ctl power-on`")
	}
}

// postFault sends one fault command and prints the resulting fault state.
func postFault(ctx context.Context, dial dialFunc, path string, q url.Values, stdout io.Writer) error {
	var st faults.Status
	if err := call(ctx, dial, http.MethodPost, path, q, &st); err != nil {
		return err
	}
	printFaultStatus(stdout, st)
	return nil
}

// call dials the control socket and sends one request, decoding the
// answer into out.
func call(ctx context.Context, dial dialFunc, method, path string, q url.Values, out any) error {
	c, err := dial()
	if err != nil {
		return err
	}
	return c.Do(ctx, method, path, q, out)
}
