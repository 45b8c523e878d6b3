package main

import "testing"

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{
		"0": 0, "512": 512, "100B": 100, " 8m ": 8 << 20,
		"4k": 4096, "4K": 4096, "4KiB": 4096, "4ki": 4096, "4M": 4 << 20, "1G": 1 << 30, "2T": 2 << 40,
		"4kB": 4000, "4kb": 4000, "8mb": 8_000_000, "1GB": 1_000_000_000, "2 TB": 2_000_000_000_000,
		"1.5G": 3 << 29, "1.5GiB": 3 << 29, "0.5K": 512, "1.5kB": 1500, "2.": 2, "3E": 3 << 60,
	} {
		got, err := parseSize(in)
		if err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "M", "-1", "1.3B", "0.1K", "4X", "4Mi B", "1.2.3M", ".", "99999999999T", "8E"} {
		if n, err := parseSize(in); err == nil {
			t.Errorf("parseSize(%q) = %d; want an error", in, n)
		}
	}
}

func TestFormatSize(t *testing.T) {
	for n, want := range map[int64]string{0: "0", 512: "512", 4096: "4KiB", 4 << 20: "4MiB", 3 << 29: "1536MiB", 1<<30 + 1: "1073741825"} {
		if got := formatSize(n); got != want {
			t.Errorf("formatSize(%d) = %q, want %q", n, got, want)
		}
		if n > 0 {
			if back, err := parseSize(formatSize(n)); err != nil || back != n {
				t.Errorf("parseSize(formatSize(%d)) = %d, %v", n, back, err)
			}
		}
	}
}
