package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

func main() {
	os.Exit(run())
}

// run is main, returning the exit status: 0 all well, 1 a mutant invalid
// or the score below -min-score, 2 the list, the baseline or the runner
// failed.
func run() int {
	var (
		listFile = flag.String("file", "", "the mutant list (default test/mutate/mutants.txt in the module)")
		seedList = flag.String("seeds", "1,2,3", "comma-separated seeds; each mutant runs once per seed (NBDCACHE_SEED)")
		only     = flag.String("only", "", "comma-separated mutant ids to run (default all)")
		list     = flag.Bool("list", false, "list the mutants and exit")
		check    = flag.Bool("check", false, "check that every mutant applies (its snippet occurs once) and exit")
		minScore = flag.Float64("min-score", -1, "fail (exit 1) when the share of mutants killed at every seed is below this percentage")
		timeout  = flag.Duration("timeout", 5*time.Minute, "per test binary run, unless a mutant sets its own")
		work     = flag.String("work", "", "scratch directory (default a new temporary one, removed at the end)")
		keep     = flag.Bool("keep", false, "keep the scratch directory (mutated files, overlays, logs)")
		mdFile   = flag.String("md", "", "also write the results as a Markdown table to this file")
		noBase   = flag.Bool("no-baseline", false, "skip the unmutated baseline run (the tests must pass unmutated: else every mutant looks killed)")
		verbose  = flag.Bool("v", false, "print the tail of the output of every killing run")
	)
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: go run ./test/mutate [flags]\n\nRuns the mutants of test/mutate/mutants.txt against the tests (see doc.go).\n\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() > 0 {
		flag.Usage()
		return 2
	}
	fail := func(err error) int {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}

	goCmd, err := exec.LookPath("go")
	if err != nil {
		return fail(fmt.Errorf("mutate: %w", err))
	}
	root, err := moduleRoot(goCmd)
	if err != nil {
		return fail(err)
	}
	if *listFile == "" {
		*listFile = filepath.Join(root, "test", "mutate", "mutants.txt")
	}
	seeds, err := parseSeeds(*seedList)
	if err != nil {
		return fail(err)
	}
	all, err := LoadList(*listFile)
	if err != nil {
		return fail(err)
	}
	ms, err := Select(all, splitList(*only))
	if err != nil {
		return fail(err)
	}
	if *list {
		WriteList(os.Stdout, ms)
		return 0
	}
	if err := CheckAll(root, ms); err != nil {
		return fail(err)
	}
	if *check {
		fmt.Printf("%d mutants apply\n", len(ms))
		return 0
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if *work == "" {
		*work, err = os.MkdirTemp("", "nbdcache-mutate-")
		if err != nil {
			return fail(fmt.Errorf("mutate: %w", err))
		}
		if !*keep {
			defer os.RemoveAll(*work)
		}
	}
	r := &Runner{Root: root, Work: *work, Go: goCmd, Seeds: seeds, Timeout: *timeout, Log: os.Stderr, Verbose: *verbose}

	var results []*Result
	if !*noBase {
		start := time.Now()
		noTests, err := r.Baseline(ctx, ms)
		if err != nil {
			return fail(err)
		}
		r.logf("baseline passed at seeds %s in %v", *seedList, time.Since(start).Round(time.Second))
		for _, m := range ms {
			if why, ok := noTests[m]; ok {
				results = append(results, &Result{M: m, Verdict: Invalid, Why: why})
			}
		}
	}
	invalid := map[*Mutant]bool{}
	for _, res := range results {
		invalid[res.M] = true
	}
	for i, m := range ms {
		if invalid[m] {
			continue
		}
		res, err := r.RunMutant(ctx, m)
		if err != nil {
			if ctx.Err() != nil {
				fmt.Fprintln(os.Stderr, "mutate: interrupted; results so far:")
				break
			}
			return fail(err)
		}
		results = append(results, res)
		r.logf("[%d/%d] %-40s %-14s %6.1fs %s", i+1, len(ms), m.ID, res.Verdict, res.Elapsed.Seconds(), noteOf(res))
	}
	results = inListOrder(ms, results)

	fmt.Println()
	WriteTable(os.Stdout, results, seeds)
	if *mdFile != "" {
		f, err := os.Create(*mdFile)
		if err != nil {
			return fail(fmt.Errorf("mutate: %w", err))
		}
		WriteMarkdown(f, results, seeds)
		if err := f.Close(); err != nil {
			return fail(fmt.Errorf("mutate: %w", err))
		}
	}
	if ctx.Err() != nil {
		return 2
	}
	s := Scored(results, seeds)
	status := 0
	if s.Invalid > 0 {
		fmt.Fprintf(os.Stderr, "mutate: %d invalid mutants: fix the list\n", s.Invalid)
		status = 1
	}
	if *minScore >= 0 && s.Percent() < *minScore {
		fmt.Fprintf(os.Stderr, "mutate: score %.1f%% is below -min-score %.1f%%\n", s.Percent(), *minScore)
		status = 1
	}
	return status
}

func noteOf(r *Result) string {
	if r.Verdict == Invalid {
		return r.Why
	}
	return r.KilledBy()
}

// inListOrder orders rs as the mutants are in ms.
func inListOrder(ms []*Mutant, rs []*Result) []*Result {
	by := map[*Mutant]*Result{}
	for _, r := range rs {
		by[r.M] = r
	}
	var out []*Result
	for _, m := range ms {
		if r, ok := by[m]; ok {
			out = append(out, r)
		}
	}
	return out
}

// moduleRoot is the directory of the main module's go.mod.
func moduleRoot(goCmd string) (string, error) {
	out, err := exec.Command(goCmd, "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("mutate: go env GOMOD: %w", err)
	}
	mod := strings.TrimSpace(string(out))
	if mod == "" || mod == os.DevNull {
		return "", errors.New("mutate: not inside a module: run from the nbdcache tree")
	}
	return filepath.Dir(mod), nil
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

func parseSeeds(s string) ([]uint64, error) {
	var seeds []uint64
	for _, f := range splitList(s) {
		v, err := strconv.ParseUint(f, 10, 64)
		if err != nil || v == 0 {
			return nil, fmt.Errorf("mutate: -seeds: %q is not a seed (a positive integer)", f)
		}
		seeds = append(seeds, v)
	}
	if len(seeds) == 0 {
		return nil, errors.New("mutate: -seeds: none given")
	}
	return seeds, nil
}
