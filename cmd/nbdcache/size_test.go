package main

import (
	"errors"
	"testing"
)

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{
		"0": 0, "512": 512, "4k": 4096, "4K": 4096, "4KiB": 4096, "4kb": 4096,
		"4M": 4 << 20, "1G": 1 << 30, "2T": 2 << 40, "100B": 100, " 8m ": 8 << 20,
	} {
		got, err := parseSize(in)
		if err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "M", "-1", "1.5G", "4X", "99999999999T"} {
		if _, err := parseSize(in); !errors.Is(err, errUsage) {
			t.Errorf("parseSize(%q) accepted (%v)", in, err)
		}
	}
}
