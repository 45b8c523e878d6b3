package main

import (
	"strings"
	"testing"

	"github.com/nbdcache/nbdcache/control"
)

// TestPrintStatsSteppedAside: `nbdcache stats` says when the cache steps
// aside, and why: a working set that does not fit, or a cache slower than
// its backing, with both costs; a cache in the way says nothing of it.
func TestPrintStatsSteppedAside(t *testing.T) {
	for _, tc := range []struct {
		thrashing, slower bool
		want, not         string
	}{
		{false, false, "", "stepped aside"},
		{true, false, "its working set does not fit", "slower"},
		{true, true, "slower than the backing (12.5µs against 2.1µs a 4 KiB write)", "does not fit"},
	} {
		s := control.Stats{Mode: "writeback", CacheStats: &control.CacheStats{
			Thrashing: tc.thrashing, SlowerThanBacking: tc.slower, CachedWriteNanos: 12500, BackingWriteNanos: 2100,
		}, CacheFigures: &control.CacheFigures{}}
		var b strings.Builder
		printStats(&b, s, control.Stats{}, 0, false)
		out := b.String()
		aside := strings.Contains(out, "stepped aside")
		if aside != tc.thrashing || !strings.Contains(out, tc.want) || strings.Contains(out, tc.not) {
			t.Errorf("thrashing %v, slower %v: want %q and no %q in\n%s", tc.thrashing, tc.slower, tc.want, tc.not, out)
		}
	}
}
