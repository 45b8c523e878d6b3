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

func TestParseArgs(t *testing.T) {
	newFS := func() (*flag.FlagSet, *string, *bool) {
		fs := newFlagSet("test", io.Discard)
		return fs, fs.String("control", "", ""), fs.Bool("json", false, "")
	}
	for _, tc := range []struct {
		args         []string
		interspersed bool
		pos          []string
		control      string
		json         bool
	}{
		{[]string{"writethrough", "--control", "unix:/x"}, true, []string{"writethrough"}, "unix:/x", false},
		{[]string{"--control=unix:/x", "a", "--json", "b"}, true, []string{"a", "b"}, "unix:/x", true},
		{[]string{"--json", "a", "--", "--control", "b"}, true, []string{"a", "--control", "b"}, "", true},
		{[]string{"--control", "--json"}, true, nil, "--json", false}, // a value that looks like a flag
		{[]string{"--control", "unix:/x", "power-cut", "--model", "torn"}, false, []string{"power-cut", "--model", "torn"}, "unix:/x", false},
	} {
		fs, control, json := newFS()
		pos, err := parseArgs(fs, tc.args, tc.interspersed)
		if err != nil || !slices.Equal(pos, tc.pos) || *control != tc.control || *json != tc.json {
			t.Errorf("%q (interspersed %v): %q, control %q, json %v, %v; want %q, %q, %v", tc.args, tc.interspersed,
				pos, *control, *json, err, tc.pos, tc.control, tc.json)
		}
	}
	fs, _, _ := newFS()
	if _, err := parseArgs(fs, []string{"x", "--contrl", "unix:/x"}, true); !errors.Is(err, errUsage) || !strings.Contains(err.Error(), "did you mean --control?") {
		t.Errorf("a mistyped flag: %v", err)
	}
	fs, _, _ = newFS()
	if _, err := parseArgs(fs, []string{"--zzzzzzz"}, true); !errors.Is(err, errUsage) || strings.Contains(err.Error(), "did you mean") {
		t.Errorf("a flag like no other: %v", err)
	}
	fs, _, _ = newFS()
	if err := parseFlags(fs, []string{"--json", "stray"}); !errors.Is(err, errUsage) || !strings.Contains(err.Error(), `"stray"`) {
		t.Errorf("a stray argument: %v", err)
	}
}

func TestUnknownCommandSuggests(t *testing.T) {
	var out strings.Builder
	if code := run(t.Context(), []string{"sevre"}, io.Discard, &out); code != exitUsage || !strings.Contains(out.String(), "did you mean serve?") || strings.Contains(out.String(), "commands:") {
		t.Errorf("nbdcache sevre: exit %d:\n%s", code, out.String())
	}
}

// TestConfigFile: --config sets the flags the command line did not, by
// their names; arrays repeat a flag; a key that is no flag is an error
// that names the nearest flag.
func TestConfigFile(t *testing.T) {
	newFS := func() (*flag.FlagSet, *string, *int64, *[]string) {
		fs := newFlagSet("test", io.Discard)
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
	if err := parseFlags(fs, []string{"--config", path, "--backing", "cli.img"}); err != nil {
		t.Fatal(err)
	}
	if *backing != "cli.img" || *size != 2<<20 || !slices.Equal(*listens, []string{"unix:/a", "127.0.0.1:0"}) {
		t.Errorf("backing %q (want the command line's), bucket size %d, listens %q", *backing, *size, *listens)
	}
	write("bakcing = \"x\"\n")
	fs, _, _, _ = newFS()
	if err := parseFlags(fs, []string{"--config", path}); !errors.Is(err, errUsage) || !strings.Contains(err.Error(), "did you mean backing?") {
		t.Errorf("a mistyped key: %v", err)
	}
	write("bucket-size = 1.3\n")
	fs, _, _, _ = newFS()
	if err := parseFlags(fs, []string{"--config", path}); !errors.Is(err, errUsage) {
		t.Errorf("a bad value: %v", err)
	}
	write("backing = [\n")
	fs, _, _, _ = newFS()
	if err := parseFlags(fs, []string{"--config", path}); !errors.Is(err, errUsage) {
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
