package main

import (
	"errors"
	"flag"
	"io"
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
