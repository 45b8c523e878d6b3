package storage

import (
	"bytes"
	"fmt"
	"sync"
	"testing"
)

// collectExtents returns the extents of [off, off+length) as "H<len>" and
// "D<len>" tokens.
func collectExtents(t *testing.T, e Extenter, off, length int64) string {
	t.Helper()
	var s string
	err := e.Extents(off, length, func(x Extent) bool {
		kind := "D"
		if x.Hole {
			kind = "H"
		}
		s += fmt.Sprintf("%s%d ", kind, x.Length)
		return true
	})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestMemSparse(t *testing.T) {
	const k64 = 65536
	m := NewMem(10 * k64)
	if got := m.allocatedBytes(); got != 0 {
		t.Fatalf("new Mem holds %d bytes", got)
	}
	steps := []struct {
		name    string
		do      func() error
		extents string
		alloc   int64
	}{
		{"empty", func() error { return nil }, "H655360 ", 0},
		{"write in chunk 2", func() error { return m.WriteAt([]byte{1}, 2*k64+5, 0) }, "H131072 D65536 H458752 ", k64},
		{"write chunks 4-5", func() error { return m.WriteAt(make([]byte, 2), 5*k64-1, 0) }, "H131072 D65536 H65536 D131072 H262144 ", 3 * k64},
		{"zero part of chunk 4", func() error { return m.Zero(4*k64, 100, 0) }, "H131072 D65536 H65536 D131072 H262144 ", 3 * k64},
		{"trim chunk 4 whole", func() error { return m.Trim(4*k64, k64, 0) }, "H131072 D65536 H131072 D65536 H262144 ", 2 * k64},
		{"zero NoHole chunk 8", func() error { return m.Zero(8*k64, k64, NoHole) }, "H131072 D65536 H131072 D65536 H131072 D65536 H65536 ", 3 * k64},
		{"zero everything", func() error { return m.Zero(0, 10*k64, 0) }, "H655360 ", 0},
	}
	for _, s := range steps {
		if err := s.do(); err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
		if got := collectExtents(t, m, 0, m.Size()); got != s.extents {
			t.Errorf("%s: extents %q, want %q", s.name, got, s.extents)
		}
		if got := m.allocatedBytes(); got != s.alloc {
			t.Errorf("%s: %d bytes allocated, want %d", s.name, got, s.alloc)
		}
	}
	// A partial range starts and ends where asked.
	if err := m.WriteAt([]byte{1}, 3*k64, 0); err != nil {
		t.Fatal(err)
	}
	if got, want := collectExtents(t, m, 3*k64-10, 20), "H10 D10 "; got != want {
		t.Errorf("partial range: %q, want %q", got, want)
	}
}

func TestMemLarge(t *testing.T) {
	// A sparse terabyte costs only its leaf table.
	m := NewMem(1 << 40)
	p := []byte("hello")
	if err := m.WriteAt(p, 1<<40-5, FUA); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 10)
	if err := m.ReadAt(got, 1<<40-10); err != nil {
		t.Fatal(err)
	}
	if want := append(make([]byte, 5), p...); !bytes.Equal(got, want) {
		t.Fatalf("got %q want %q", got, want)
	}
}

// TestMemConcurrent has writers hammer adjacent, interleaved ranges of the
// same chunks; each writer then checks its own bytes. Run with -race.
func TestMemConcurrent(t *testing.T) {
	const writers = 8
	const stripe = 1000 // bytes per writer per round, interleaved
	m := NewMem(writers * stripe * 64)
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for round := range 200 {
				for i := range 64 {
					off := int64((i*writers + w) * stripe)
					p := bytes.Repeat([]byte{byte(w*31 + round)}, stripe)
					if err := m.WriteAt(p, off, 0); err != nil {
						errs <- err
						return
					}
					got := make([]byte, stripe)
					if err := m.ReadAt(got, off); err != nil {
						errs <- err
						return
					}
					if !bytes.Equal(got, p) {
						errs <- fmt.Errorf("writer %d round %d: read back other data at %d", w, round, off)
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
}
