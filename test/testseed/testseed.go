// Package testseed gives the randomized tests of every package one way to
// pick, print and replay a seed: the -seed flag, else $NBDCACHE_SEED, else
// the clock. A test logs the seed with the command that replays it, so a
// failure in CI is reproduced from its log.
package testseed

import (
	"flag"
	"os"
	"strconv"
	"testing"
	"time"
)

var seedFlag = flag.Uint64("seed", 0, "seed of the randomized tests (0: $NBDCACHE_SEED, else a fresh one)")

// Get returns the seed for t and logs how to replay it. A malformed
// $NBDCACHE_SEED fails the test rather than being ignored.
func Get(t testing.TB) uint64 {
	t.Helper()
	seed := *seedFlag
	if s := os.Getenv("NBDCACHE_SEED"); seed == 0 && s != "" {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("NBDCACHE_SEED=%q: %v", s, err)
		}
		seed = v
	}
	if seed == 0 {
		seed = uint64(time.Now().UnixNano())
	}
	t.Logf("seed %d (replay: go test -run '^%s$' -seed %d, or NBDCACHE_SEED=%d)", seed, t.Name(), seed, seed)
	return seed
}
