package main

import (
	"errors"
	"flag"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// runArgs runs the command line args and returns its exit status and
// what it printed.
func runArgs(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errb strings.Builder
	code = run(t.Context(), args, &out, &errb)
	return code, out.String(), errb.String()
}

// TestCommandLine: flags before and after positional arguments, "--",
// one-letter options, -name for --name, and short errors that name the
// nearest flag or command.
func TestCommandLine(t *testing.T) {
	sock := "unix:" + filepath.Join(t.TempDir(), "none.sock")
	// mode's argument and flags in any order: each reaches the dial
	// (no server there), so the parse succeeded.
	for _, args := range [][]string{
		{"mode", "writethrough", "--control", sock},
		{"mode", "--control=" + sock, "writethrough"},
		{"mode", "-C", sock, "writethrough"},
		{"mode", "-control", sock, "writethrough"},
		{"ctl", "--control", sock, "status"},
		{"ctl", "status", "--control", sock},
	} {
		if code, _, errs := runArgs(t, args...); code != exitError || !strings.Contains(errs, "none.sock") {
			t.Errorf("%q: exit %d, %q; want the dial to fail", args, code, errs)
		}
	}
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"mode", "x", "--contrl", sock}, "did you mean --control?"},
		{[]string{"stats", "--zzzzzzz"}, "(nbdcache stats -h lists the flags)"},
		{[]string{"stats", "--json", "stray"}, `unexpected argument "stray"`},
		{[]string{"mode", "--", "--control", sock}, "want one mode"},
		{[]string{"sevre"}, "did you mean serve?"},
		{[]string{"ctl", "powr-cut"}, "did you mean power-cut?"},
		{[]string{}, "want a command"},
		// Single-dash typos are typos, not bundles of one-letter options.
		{[]string{"serve", "-readonly"}, "unknown flag: --readonly; did you mean --read-only?"},
		{[]string{"serve", "-verbose"}, "unknown flag: --verbose"},
		{[]string{"stats", "-jsn"}, "did you mean --json?"},
		{[]string{"format", "-bakcing=b.img"}, "did you mean --backing?"},
		// A mistyped command is reported as that, flags or -h after it.
		{[]string{"sevre", "--backing", "b.img"}, "did you mean serve?"},
		{[]string{"versoin", "-h"}, "did you mean version?"},
		{[]string{"ctl", "--control", sock, "stauts"}, "did you mean status?"},
		{[]string{"ctl", "-C", sock, "stauts", "-h"}, "did you mean status?"},
		{[]string{"ctl", "--control", sock}, "want a command"},
		{[]string{"completion", "bogus"}, "unknown command"},
	} {
		code, _, errs := runArgs(t, tc.args...)
		if code != exitUsage || !strings.Contains(errs, tc.want) {
			t.Errorf("%q: exit %d, %q; want a usage error with %q", tc.args, code, errs, tc.want)
		}
		if len(tc.args) > 0 && strings.Contains(errs, "Flags:") {
			t.Errorf("%q printed the usage page: %q", tc.args, errs)
		}
	}
	if _, _, errs := runArgs(t, "stats", "--zzzzzzz"); strings.Contains(errs, "did you mean") {
		t.Errorf("a flag like no other got a suggestion: %q", errs)
	}
	// Help and the version exit 0, with one dash too.
	for _, args := range [][]string{{"-h"}, {"serve", "-h"}, {"ctl", "power-cut", "--help"}, {"help", "flush"}, {"format", "-help"}, {"ctl", "status", "-help"}} {
		if code, out, _ := runArgs(t, args...); code != exitOK || !strings.Contains(out, "Usage:") {
			t.Errorf("%q: exit %d, %q", args, code, out)
		}
	}
	for _, v := range []string{"--version", "-version", "-V", "-v"} {
		if code, out, _ := runArgs(t, v); code != exitOK || !strings.HasPrefix(out, "nbdcache ") {
			t.Errorf("%s: exit %d, %q", v, code, out)
		}
	}
	// Completion: cobra's protocol completes flag names.
	if code, out, _ := runArgs(t, "__complete", "serve", "--back"); code != exitOK || !strings.Contains(out, "--backing-timeout") {
		t.Errorf("__complete serve --back: exit %d, %q", code, out)
	}
	if code, out, _ := runArgs(t, "completion", "bash"); code != exitOK || !strings.Contains(out, "__start_nbdcache") {
		t.Errorf("completion bash: exit %d, %d bytes", code, len(out))
	}
	// One-letter options, and sizes printed as sizes.
	if _, out, _ := runArgs(t, "serve", "-h"); !strings.Contains(out, "-b, --backing") || !strings.Contains(out, "MiB") {
		t.Errorf("serve -h lacks -b, --backing or a size default:\n%s", out)
	}
}

// parseConfig parses args as the command line, then applies --config.
func parseConfig(fs *flag.FlagSet, args ...string) error {
	if err := fs.Parse(args); err != nil {
		return err
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	return applyConfig(fs, fs.Lookup("config").Value.String(), func(name string) bool { return set[name] })
}

// TestConfigFile: --config sets the flags the command line did not, by
// their names; arrays repeat a flag; a key that is no flag is an error
// that names the nearest flag.
func TestConfigFile(t *testing.T) {
	newFS := func() (*flag.FlagSet, *string, *int64, *[]string) {
		fs := flag.NewFlagSet("test", flag.ContinueOnError)
		fs.SetOutput(io.Discard)
		configFlag(fs)
		backing := fs.String("backing", "", "")
		var size int64
		fs.Var(sizeFlag{&size}, "bucket-size", "")
		var listens []string
		fs.Func("listen", "", func(s string) error { listens = append(listens, s); return nil })
		return fs, backing, &size, &listens
	}
	path := filepath.Join(t.TempDir(), "c.toml")
	write := func(s string) {
		if err := os.WriteFile(path, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("backing = \"from-config.img\"\nbucket-size = \"2M\"\nlisten = [\"unix:/a\", \"127.0.0.1:0\"]\n")
	fs, backing, size, listens := newFS()
	if err := parseConfig(fs, "--config", path, "--backing", "cli.img"); err != nil {
		t.Fatal(err)
	}
	if *backing != "cli.img" || *size != 2<<20 || !slices.Equal(*listens, []string{"unix:/a", "127.0.0.1:0"}) {
		t.Errorf("backing %q (want the command line's), bucket size %d, listens %q", *backing, *size, *listens)
	}
	write("bakcing = \"x\"\n")
	fs, _, _, _ = newFS()
	if err := parseConfig(fs, "--config", path); !errors.Is(err, errUsage) || !strings.Contains(err.Error(), "did you mean backing?") {
		t.Errorf("a mistyped key: %v", err)
	}
	write("bucket-size = 1.3\n")
	fs, _, _, _ = newFS()
	if err := parseConfig(fs, "--config", path); !errors.Is(err, errUsage) {
		t.Errorf("a bad value: %v", err)
	}
	write("backing = [\n")
	fs, _, _, _ = newFS()
	if err := parseConfig(fs, "--config", path); !errors.Is(err, errUsage) {
		t.Errorf("a file that is no TOML: %v", err)
	}
}

// TestListenURIs: --listen takes the URIs clients are given, as well as
// unix:PATH and HOST:PORT.
func TestListenURIs(t *testing.T) {
	for in, want := range map[string]listenAddr{
		"unix:/run/a.sock":                {network: "unix", addr: "/run/a.sock"},
		"127.0.0.1:10810":                 {network: "tcp", addr: "127.0.0.1:10810"},
		"nbd://127.0.0.1":                 {network: "tcp", addr: "127.0.0.1:10809"},
		"nbd://[::1]:10810/vm1":           {network: "tcp", addr: "[::1]:10810", export: "vm1"},
		"nbd+unix:///?socket=/run/a.sock": {network: "unix", addr: "/run/a.sock"},
		"nbds+unix:///vm1?socket=/r/a":    {network: "unix", addr: "/r/a", export: "vm1", tls: true},
	} {
		if got, err := parseListen(in); err != nil || got != want {
			t.Errorf("parseListen(%q) = %+v, %v; want %+v", in, got, err, want)
		}
	}
	for _, in := range []string{"nbd://", "nbd://:10809", "nbd+unix:///x", "nbd+unix://host/?socket=/a", "nbdx://h", ":10809", "unix:"} {
		if got, err := parseListen(in); !errors.Is(err, errUsage) {
			t.Errorf("parseListen(%q) = %+v, %v; want a usage error", in, got, err)
		}
	}
}

// TestStalePIDFile: a pid file naming a live process of another program
// (a pid reused since a crash) does not stop a start; one naming a live
// nbdcache does.
func TestStalePIDFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "x.pid")
	// pid 1 is alive and is not this test binary.
	if err := os.WriteFile(path, []byte("1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	f := serviceFlags{pidFile: path}
	if err := f.check(); err != nil {
		t.Fatalf("a pid file naming another program's process: %v", err)
	}
}

// TestNormalize: -name becomes --name, but a flag's value is left as it
// is, however it looks.
func TestNormalize(t *testing.T) {
	root := newRoot(t.Context(), io.Discard, io.Discard)
	for _, tc := range []struct{ in, want []string }{
		{[]string{"serve", "-backing", "b.img", "-r"}, []string{"serve", "--backing", "b.img", "-r"}},
		{[]string{"serve", "--export", "-mode", "--run", "-listen"}, []string{"serve", "--export", "-mode", "--run", "-listen"}},
		{[]string{"serve", "-export", "-mode", "-b", "-cache"}, []string{"serve", "--export", "-mode", "-b", "-cache"}},
		{[]string{"serve", "-b=x.img", "-readonly"}, []string{"serve", "-b=x.img", "--readonly"}},
		{[]string{"ctl", "-control", "unix:/x", "status", "-json"}, []string{"ctl", "--control", "unix:/x", "status", "--json"}},
		{[]string{"mode", "--", "-control"}, []string{"mode", "--", "-control"}},
		{[]string{"-V"}, []string{"--version"}},
		{[]string{"ctl", "error", "--after", "-1"}, []string{"ctl", "error", "--after", "-1"}},
	} {
		if got := normalize(root, tc.in); !slices.Equal(got, tc.want) {
			t.Errorf("normalize(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}
