// Package testbytes makes and compares test data: payloads that tell
// every write apart, a seeded generator, and a short description of the
// first difference between two images. It imports nothing of ours, so
// both a package's own tests and the test suites built on it can use it.
package testbytes

// testbytes.go: test payloads (Fill), a seeded generator (NewRand) and
// FirstDiff.

import (
	"fmt"
	"math/rand/v2"
)

// NewRand returns a generator seeded with seed.
func NewRand(seed uint64) *rand.Rand { return rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)) }

// Fill returns n bytes that depend on tag, so that every write is told
// apart from every other.
func Fill(n int, tag uint64) []byte {
	p := make([]byte, n)
	r := NewRand(tag)
	for i := 0; i < n; i += 8 {
		v := r.Uint64()
		for j := 0; j < 8 && i+j < n; j++ {
			p[i+j] = byte(v >> (8 * j))
		}
	}
	return p
}

// FirstDiff describes the first difference between got and want.
func FirstDiff(got, want []byte) string {
	for i := range min(len(got), len(want)) {
		if got[i] != want[i] {
			return fmt.Sprintf("first difference at byte %d (sector %d): got %#x want %#x", i, i/512, got[i], want[i])
		}
	}
	return fmt.Sprintf("lengths %d and %d", len(got), len(want))
}
