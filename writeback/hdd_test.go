package writeback

import (
	"context"
	"fmt"
	"testing"
	"testing/synctest"
	"time"

	"github.com/nbdcache/nbdcache/storage"
	"github.com/nbdcache/nbdcache/test/testseed"
)

// TestHDDDrainVersusRandom measures, in virtual time on the hdd model, what
// writeback buys: N random 4 KiB writes written straight to the disk, against
// the same N blocks dirty in the cache and drained by the flusher (sorted,
// merged). The ratio depends on density: the drain still sweeps the region at
// the media rate and pays a rotation per gap, so sparse blocks gain less.
func TestHDDDrainVersusRandom(t *testing.T) {
	seed := testseed.Get(t)
	for _, tc := range []struct {
		region   int64 // bytes
		n        int   // random writes
		minRatio float64
	}{
		{region: 1 << 30, n: 4000, minRatio: 4},     // sparse: 1.5% of the blocks
		{region: 128 << 20, n: 20000, minRatio: 50}, // denser: about half the blocks
		{region: 32 << 20, n: 40000, minRatio: 500}, // dense: every block, several times over
	} {
		t.Run(fmt.Sprintf("%dMiB,n=%d", tc.region>>20, tc.n), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) {
				rng := newRand(seed)
				blocks := int(tc.region / 4096)
				offs := make([]int, tc.n)
				for i := range offs {
					offs[i] = rng.IntN(blocks)
				}

				// Straight to the disk, in random order.
				disk := storage.NewSlow(nullDev{tc.region}, storage.HDDModel())
				buf := make([]byte, 4096)
				start := time.Now()
				for _, b := range offs {
					if err := disk.WriteAt(buf, int64(b)*4096, 0); err != nil {
						t.Fatal(err)
					}
				}
				if err := disk.Flush(); err != nil {
					t.Fatal(err)
				}
				direct := time.Since(start)

				// Dirty in the cache, drained.
				src := newFakeSource(blocks, 4096, 1<<40)
				for _, b := range offs {
					src.write(b, 1)
				}
				disk = storage.NewSlow(nullDev{tc.region}, storage.HDDModel())
				f := New(src, disk, Config{Logger: quiet})
				start = time.Now()
				if err := f.Drain(context.Background(), nil); err != nil {
					t.Fatal(err)
				}
				drain := time.Since(start)
				st := f.Stats()
				ratio := direct.Seconds() / drain.Seconds()
				t.Logf("%d random 4 KiB writes over %d MiB (%d distinct blocks): direct %.2fs (%.0f IOPS); drain %.2fs in %d writes of %d KiB average, %d flushes: %.1fx faster",
					tc.n, tc.region>>20, st.Cleaned/4096, direct.Seconds(), float64(tc.n)/direct.Seconds(), drain.Seconds(), st.Writes, st.AvgWrite>>10, st.Flushes, ratio)
				if ratio < tc.minRatio {
					t.Errorf("drain only %.1fx faster than random writes, want at least %.0fx", ratio, tc.minRatio)
				}
			})
		})
	}
}
