package main

// run.go: building a mutant's test binaries and running them per seed.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// ErrBaseline is returned when the tests fail on the unmutated tree.
var ErrBaseline = errors.New("mutate: baseline failed")

// Runner runs mutants. Its fields are set once, before the first run.
type Runner struct {
	Root    string        // the module root
	Work    string        // a scratch directory the runner owns
	Go      string        // the go command
	Seeds   []uint64      // each mutant runs once per seed
	Timeout time.Duration // per test binary run, unless the mutant sets one
	Log     io.Writer     // progress lines (nil: none)
	Verbose bool          // copy the output of killing runs to Log
}

// Verdict is what became of a mutant.
type Verdict int

const (
	Survived Verdict = iota
	Killed
	SeedDependent
	Invalid
)

func (v Verdict) String() string {
	return [...]string{"survived", "killed", "seed-dependent", "invalid"}[v]
}

// SeedRun is one run of a mutant's tests at one seed.
type SeedRun struct {
	Seed    uint64
	Killed  bool
	Timeout bool     // killed by a test timeout (a hang)
	Failed  []string // the failing tests, as "--- FAIL" names them
	Elapsed time.Duration
}

// Result is a mutant's outcome.
type Result struct {
	M       *Mutant
	Verdict Verdict
	Why     string // for Invalid: the build error or the missing tests
	Runs    []SeedRun
	Elapsed time.Duration // build and every run
}

// KilledBy names the first failing test of the first killing run.
func (r *Result) KilledBy() string {
	for _, s := range r.Runs {
		if s.Killed {
			switch {
			case len(s.Failed) > 0:
				return s.Failed[0]
			case s.Timeout:
				return "(timeout)"
			}
			return "(exit status)"
		}
	}
	return ""
}

func (r *Runner) logf(format string, args ...any) {
	if r.Log != nil {
		fmt.Fprintf(r.Log, format+"\n", args...)
	}
}

// pkgInfo is a package's directory and the name go test -c gives its
// binary.
type pkgInfo struct {
	Dir, Bin string
}

// packages resolves package patterns relative to the module root.
func (r *Runner) packages(ctx context.Context, pkgs []string) (map[string]pkgInfo, error) {
	args := append([]string{"list", "-f", "{{.ImportPath}}\t{{.Dir}}"}, pkgs...)
	cmd := exec.CommandContext(ctx, r.Go, args...)
	cmd.Dir = r.Root
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("mutate: go list %s: %w%s", strings.Join(pkgs, " "), err, stderrOf(err))
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(lines) != len(pkgs) {
		return nil, fmt.Errorf("mutate: go list %s: %d packages for %d patterns", strings.Join(pkgs, " "), len(lines), len(pkgs))
	}
	m := map[string]pkgInfo{}
	for i, l := range lines {
		imp, dir, _ := strings.Cut(l, "\t")
		m[pkgs[i]] = pkgInfo{Dir: dir, Bin: path.Base(imp) + ".test"}
	}
	return m, nil
}

func stderrOf(err error) string {
	var ee *exec.ExitError
	if errors.As(err, &ee) && len(ee.Stderr) > 0 {
		return ":\n" + string(ee.Stderr)
	}
	return ""
}

// build compiles the test binaries of pkgs into dir, with overlay (a
// file, or "" for none). A build failure is returned as the compiler's
// output, err nil; err is for failures of the runner itself.
func (r *Runner) build(ctx context.Context, dir, overlay string, pkgs []string) (failure string, err error) {
	args := []string{"test", "-c", "-o", dir + string(filepath.Separator)}
	if overlay != "" {
		args = append(args, "-overlay", overlay)
	}
	args = append(args, pkgs...)
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, r.Go, args...)
	cmd.Dir = r.Root
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		return "", fmt.Errorf("mutate: go %s: %w", strings.Join(args, " "), ctx.Err())
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return strings.TrimSpace(string(out)), nil
	}
	if err != nil {
		return "", fmt.Errorf("mutate: go %s: %w", strings.Join(args, " "), err)
	}
	return "", nil
}

// testFlags are the flags of go test that a binary takes as -test.NAME.
var testFlags = []string{"short", "v", "timeout", "count", "cpu", "parallel", "failfast", "shuffle", "skip", "run", "list"}

// binaryArgs turns go test flags into the binary's.
func binaryArgs(args []string) []string {
	out := make([]string, 0, len(args))
	for _, a := range args {
		if name, ok := strings.CutPrefix(a, "-"); ok {
			name = strings.TrimPrefix(name, "-")
			base, _, _ := strings.Cut(name, "=")
			if slices.Contains(testFlags, base) {
				a = "-test." + name
			}
		}
		out = append(out, a)
	}
	return out
}

var failRE = regexp.MustCompile(`^\s*--- FAIL: (\S+)`)

// runBinary runs one test binary in its package's directory at seed and
// reports whether it failed. The output goes to logPath.
func (r *Runner) runBinary(ctx context.Context, bin string, p pkgInfo, run string, args []string, seed uint64, timeout time.Duration, logPath string) (SeedRun, error) {
	res := SeedRun{Seed: seed}
	argv := append([]string{"-test.run", run, "-test.count=1", "-test.timeout=" + timeout.String()}, binaryArgs(args)...)
	// The binary's own timeout panics with a goroutine dump; this one is
	// for a binary that does not even manage that.
	ctx, cancel := context.WithTimeout(ctx, timeout+time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, argv...)
	cmd.Dir = p.Dir
	cmd.Env = append(withoutSeed(os.Environ()), "NBDCACHE_SEED="+strconv.FormatUint(seed, 10))
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	logf, err := os.Create(logPath)
	if err != nil {
		return res, fmt.Errorf("mutate: %w", err)
	}
	defer logf.Close()
	fmt.Fprintf(logf, "# cd %s && NBDCACHE_SEED=%d %s %s\n", p.Dir, seed, bin, strings.Join(argv, " "))
	pr, pw := io.Pipe()
	cmd.Stdout, cmd.Stderr = pw, pw
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return res, fmt.Errorf("mutate: start %s: %w", bin, err)
	}
	scanned := make(chan struct{})
	go func() {
		defer close(scanned)
		sc := bufio.NewScanner(pr)
		sc.Buffer(make([]byte, 64<<10), 16<<20)
		for sc.Scan() {
			line := sc.Text()
			fmt.Fprintln(logf, line)
			if m := failRE.FindStringSubmatch(line); m != nil {
				res.Failed = append(res.Failed, m[1])
			}
			if strings.HasPrefix(line, "panic: test timed out") {
				res.Timeout = true
			}
		}
		io.Copy(io.Discard, pr)
	}()
	werr := cmd.Wait()
	pw.Close()
	<-scanned
	res.Elapsed = time.Since(start)
	if ctx.Err() != nil {
		res.Killed, res.Timeout = true, true
		return res, nil
	}
	var ee *exec.ExitError
	switch {
	case werr == nil:
	case errors.As(werr, &ee):
		res.Killed = true
	default:
		return res, fmt.Errorf("mutate: run %s: %w", bin, werr)
	}
	// The most specific failure first: a subtest fails with its parent.
	slices.SortStableFunc(res.Failed, func(a, b string) int { return strings.Count(b, "/") - strings.Count(a, "/") })
	return res, nil
}

func withoutSeed(env []string) []string {
	return slices.DeleteFunc(slices.Clone(env), func(kv string) bool { return strings.HasPrefix(kv, "NBDCACHE_SEED=") })
}

// listTests returns the top-level tests of a binary that the first element
// of run selects (as go test's -run does).
func listTests(ctx context.Context, bin string, p pkgInfo, run string) ([]string, error) {
	top := splitRegexp(run)[0]
	cmd := exec.CommandContext(ctx, bin, "-test.list", top)
	cmd.Dir = p.Dir
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("mutate: %s -test.list %q: %w%s", bin, top, err, stderrOf(err))
	}
	var names []string
	for _, l := range strings.Split(string(out), "\n") {
		if l = strings.TrimSpace(l); strings.HasPrefix(l, "Test") || strings.HasPrefix(l, "Fuzz") || strings.HasPrefix(l, "Example") {
			names = append(names, l)
		}
	}
	return names, nil
}

// splitRegexp splits a -run pattern at the slashes outside brackets and
// parentheses, as package testing does.
func splitRegexp(s string) []string {
	var out []string
	var cs, ps int // open brackets and parentheses
	start := 0
	for i := 0; i < len(s); i++ {
		switch s[i] {
		case '[':
			cs++
		case ']':
			if cs--; cs < 0 {
				cs = 0
			}
		case '(':
			if cs == 0 {
				ps++
			}
		case ')':
			if cs == 0 {
				ps--
			}
		case '\\':
			i++
		case '/':
			if cs == 0 && ps == 0 {
				out = append(out, s[start:i])
				start = i + 1
			}
		}
	}
	return append(out, s[start:])
}

// group is the mutants that share packages and flags: the baseline runs
// their tests together.
type group struct {
	pkgs, args []string
	ms         []*Mutant
}

func groups(ms []*Mutant) []*group {
	var gs []*group
	byKey := map[string]*group{}
	for _, m := range ms {
		k := strings.Join(m.Pkgs, " ") + "\x00" + strings.Join(m.Args, " ")
		g := byKey[k]
		if g == nil {
			g = &group{pkgs: m.Pkgs, args: m.Args}
			byKey[k] = g
			gs = append(gs, g)
		}
		g.ms = append(g.ms, m)
	}
	return gs
}

// timeoutOf is the per-run timeout of m.
func (r *Runner) timeoutOf(m *Mutant) time.Duration {
	if m.Timeout > 0 {
		return m.Timeout
	}
	return r.Timeout
}

// Baseline runs, on the unmutated tree and at every seed, the tests of
// every mutant in ms, grouped by packages and flags, and checks that each
// mutant's regexp selects a test. It returns the mutants whose regexp
// selects none (with why), and an error wrapping ErrBaseline if a test
// fails unmutated.
func (r *Runner) Baseline(ctx context.Context, ms []*Mutant) (map[*Mutant]string, error) {
	noTests := map[*Mutant]string{}
	for gi, g := range groups(ms) {
		dir := filepath.Join(r.Work, "baseline", strconv.Itoa(gi))
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, fmt.Errorf("mutate: %w", err)
		}
		infos, err := r.packages(ctx, g.pkgs)
		if err != nil {
			return nil, err
		}
		if fail, err := r.build(ctx, dir, "", g.pkgs); err != nil {
			return nil, err
		} else if fail != "" {
			return nil, fmt.Errorf("%w: the unmutated tree does not build (%s):\n%s", ErrBaseline, strings.Join(g.pkgs, " "), fail)
		}
		var res []string
		var timeout time.Duration
		for _, m := range g.ms {
			// The top level only: a union of subtest patterns would not
			// split at their slashes.
			res = append(res, "(?:"+splitRegexp(m.Run)[0]+")")
			timeout += r.timeoutOf(m)
			n := 0
			for _, pk := range m.Pkgs {
				names, err := listTests(ctx, filepath.Join(dir, infos[pk].Bin), infos[pk], m.Run)
				if err != nil {
					return nil, err
				}
				n += len(names)
			}
			if n == 0 {
				noTests[m] = fmt.Sprintf("run %q selects no test in %s", m.Run, strings.Join(m.Pkgs, " "))
			}
		}
		union := strings.Join(res, "|")
		if len(g.ms) == 1 {
			union = g.ms[0].Run // keeps its subtest selection
		}
		for _, seed := range r.Seeds {
			for _, pk := range g.pkgs {
				p := infos[pk]
				logPath := filepath.Join(dir, fmt.Sprintf("seed%d-%s.log", seed, strings.TrimSuffix(p.Bin, ".test")))
				sr, err := r.runBinary(ctx, filepath.Join(dir, p.Bin), p, union, g.args, seed, timeout, logPath)
				if err != nil {
					return nil, err
				}
				r.logf("baseline %-40s seed %-4d %-5s %6.1fs", strings.Join(g.pkgs, " ")+" "+strings.Join(g.args, " "), seed, passFail(sr.Killed), sr.Elapsed.Seconds())
				if sr.Killed {
					return nil, fmt.Errorf("%w: %s fails unmutated at seed %d (NBDCACHE_SEED=%d, -run %q %s): %s; every mutant would look killed. Output: %s\n%s",
						ErrBaseline, pk, seed, seed, union, strings.Join(g.args, " "), failedOrTimeout(sr), logPath, tail(logPath, 30))
				}
			}
		}
	}
	return noTests, nil
}

func passFail(failed bool) string {
	if failed {
		return "FAIL"
	}
	return "ok"
}

func failedOrTimeout(sr SeedRun) string {
	switch {
	case len(sr.Failed) > 0:
		return strings.Join(sr.Failed, ", ")
	case sr.Timeout:
		return "timeout"
	}
	return "nonzero exit"
}

// tail returns the last n lines of the file at p.
func tail(p string, n int) string {
	b, err := os.ReadFile(p)
	if err != nil {
		return ""
	}
	lines := bytes.Split(bytes.TrimRight(b, "\n"), []byte("\n"))
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return string(bytes.Join(lines, []byte("\n")))
}

// RunMutant builds m's test binaries with the mutation and runs them at
// every seed. An error is a failure of the runner, not of the mutant.
func (r *Runner) RunMutant(ctx context.Context, m *Mutant) (*Result, error) {
	start := time.Now()
	res := &Result{M: m}
	defer func() { res.Elapsed = time.Since(start) }()
	src, err := m.Apply(r.Root)
	if err != nil {
		return nil, err
	}
	dir := filepath.Join(r.Work, m.ID)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("mutate: %w", err)
	}
	mutated := filepath.Join(dir, path.Base(m.File))
	if err := os.WriteFile(mutated, src, 0o644); err != nil {
		return nil, fmt.Errorf("mutate: %w", err)
	}
	ov, _ := json.Marshal(map[string]map[string]string{"Replace": {filepath.Join(r.Root, filepath.FromSlash(m.File)): mutated}})
	overlay := filepath.Join(dir, "overlay.json")
	if err := os.WriteFile(overlay, ov, 0o644); err != nil {
		return nil, fmt.Errorf("mutate: %w", err)
	}
	infos, err := r.packages(ctx, m.Pkgs)
	if err != nil {
		return nil, err
	}
	bin := filepath.Join(dir, "bin")
	fail, err := r.build(ctx, bin, overlay, m.Pkgs)
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(bin)
	if fail != "" {
		res.Verdict, res.Why = Invalid, "does not build: "+firstLines(fail, 4)
		return res, nil
	}
	kills := 0
	for _, seed := range r.Seeds {
		sr := SeedRun{Seed: seed}
		for _, pk := range m.Pkgs {
			p := infos[pk]
			logPath := filepath.Join(dir, fmt.Sprintf("seed%d-%s.log", seed, strings.TrimSuffix(p.Bin, ".test")))
			one, err := r.runBinary(ctx, filepath.Join(bin, p.Bin), p, m.Run, m.Args, seed, r.timeoutOf(m), logPath)
			if err != nil {
				return nil, err
			}
			sr.Elapsed += one.Elapsed
			if one.Killed {
				sr.Killed, sr.Timeout, sr.Failed = true, one.Timeout, one.Failed
				if r.Verbose {
					r.logf("%s seed %d killed by %s:\n%s", m.ID, seed, failedOrTimeout(one), tail(logPath, 20))
				}
				break // one failing package kills the run
			}
		}
		if sr.Killed {
			kills++
		}
		res.Runs = append(res.Runs, sr)
	}
	switch kills {
	case 0:
		res.Verdict = Survived
	case len(r.Seeds):
		res.Verdict = Killed
	default:
		res.Verdict = SeedDependent
	}
	return res, nil
}

func firstLines(s string, n int) string {
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = append(lines[:n], "...")
	}
	return strings.Join(lines, " / ")
}
