package storage

import (
	"flag"
	"testing"

	"github.com/nbdcache/nbdcache/internal/testbytes"
)

var longFlag = flag.Bool("long", false, "run the long randomized tests")

var (
	newRand   = testbytes.NewRand
	fill      = testbytes.Fill
	firstDiff = testbytes.FirstDiff
)

// readAll reads the whole device.
func readAll(t testing.TB, d Device) []byte {
	t.Helper()
	p := make([]byte, d.Size())
	if err := d.ReadAt(p, 0); err != nil {
		t.Fatalf("read all: %v", err)
	}
	return p
}
