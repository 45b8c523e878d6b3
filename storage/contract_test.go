package storage

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/nbdcache/nbdcache/test/testseed"
)

var longFlag = flag.Bool("long", false, "run the long randomized tests")

func newRand(seed uint64) *rand.Rand { return rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)) }

// fill returns n bytes that depend on tag, so that every write is told
// apart from every other.
func fill(n int, tag uint64) []byte {
	p := make([]byte, n)
	r := newRand(tag)
	for i := 0; i < n; i += 8 {
		v := r.Uint64()
		for j := 0; j < 8 && i+j < n; j++ {
			p[i+j] = byte(v >> (8 * j))
		}
	}
	return p
}

// readAll reads the whole device.
func readAll(t testing.TB, d Device) []byte {
	t.Helper()
	p := make([]byte, d.Size())
	if err := d.ReadAt(p, 0); err != nil {
		t.Fatalf("read all: %v", err)
	}
	return p
}

// firstDiff describes the first difference between got and want.
func firstDiff(got, want []byte) string {
	for i := range min(len(got), len(want)) {
		if got[i] != want[i] {
			return fmt.Sprintf("first difference at byte %d (sector %d): got %#x want %#x", i, i/512, got[i], want[i])
		}
	}
	return fmt.Sprintf("lengths %d and %d", len(got), len(want))
}

// contractSize is the device size the contract tests use: not a multiple
// of 64 KiB, so that short last chunks are exercised.
const contractSize = 1<<20 + 8192

// contractOpts describes what a device under testContract may do that the
// contract allows but the model does not assume.
type contractOpts struct {
	// trimKeeps: Trim may leave old data (a block device discards whole
	// blocks only, and may not zero them).
	trimKeeps bool
}

// testContract runs the Device contract against devices made by mk, which
// must return a zero-filled device of the given size.
func testContract(t *testing.T, mk func(t *testing.T, size int64) Device, optional ...contractOpts) {
	var opts contractOpts
	if len(optional) > 0 {
		opts = optional[0]
	}
	// trimmed updates model after a successful Trim of [off, off+length):
	// the range must read back as zeroes, or (trimKeeps) zeroes or old
	// data byte by byte.
	trimmed := func(t *testing.T, d Device, model []byte, off, length int64) {
		t.Helper()
		if !opts.trimKeeps {
			clear(model[off : off+length])
			return
		}
		got := make([]byte, length)
		if err := d.ReadAt(got, off); err != nil {
			t.Fatal(err)
		}
		for i, b := range got {
			if b != 0 && b != model[off+int64(i)] {
				t.Fatalf("after trim at %d+%d: byte %d is %#x, neither zero nor old %#x", off, length, off+int64(i), b, model[off+int64(i)])
			}
		}
		copy(model[off:], got)
	}
	t.Run("Ranges", func(t *testing.T) {
		d := mk(t, contractSize)
		if got := d.Size(); got != contractSize {
			t.Fatalf("Size() = %d, want %d", got, contractSize)
		}
		want := fill(contractSize, 1)
		if err := d.WriteAt(want, 0, 0); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 4096)
		bad := []struct{ off, length int64 }{
			{-1, 10}, {contractSize, 1}, {contractSize - 10, 11}, {0, contractSize + 1},
			{-4096, 4096}, {1 << 62, 4096}, {contractSize + 4096, 0}, {10, -1},
		}
		for _, b := range bad {
			name := fmt.Sprintf("off=%d,len=%d", b.off, b.length)
			if b.length >= 0 && b.length <= int64(len(buf)) {
				if err := d.ReadAt(buf[:b.length], b.off); !errors.Is(err, ErrOutOfRange) {
					t.Errorf("%s: ReadAt: %v, want ErrOutOfRange", name, err)
				}
				if err := d.WriteAt(buf[:b.length], b.off, 0); !errors.Is(err, ErrOutOfRange) {
					t.Errorf("%s: WriteAt: %v, want ErrOutOfRange", name, err)
				}
				if err := d.WriteAt(buf[:b.length], b.off, FUA); !errors.Is(err, ErrOutOfRange) {
					t.Errorf("%s: WriteAt FUA: %v, want ErrOutOfRange", name, err)
				}
			}
			if err := d.Trim(b.off, b.length, 0); !errors.Is(err, ErrOutOfRange) {
				t.Errorf("%s: Trim: %v, want ErrOutOfRange", name, err)
			}
			for _, fl := range []Flags{0, NoHole, FastZero, FUA} {
				if err := d.Zero(b.off, b.length, fl); !errors.Is(err, ErrOutOfRange) {
					t.Errorf("%s: Zero(%d): %v, want ErrOutOfRange", name, fl, err)
				}
			}
			if e, ok := d.(Extenter); ok {
				err := e.Extents(b.off, b.length, func(Extent) bool { t.Errorf("%s: Extents called fn", name); return true })
				if !errors.Is(err, ErrOutOfRange) {
					t.Errorf("%s: Extents: %v, want ErrOutOfRange", name, err)
				}
			}
		}
		if got := readAll(t, d); !bytes.Equal(got, want) {
			t.Fatalf("a rejected request touched data: %s", firstDiff(got, want))
		}
		// Requests that end exactly at the end of the device are fine.
		if err := d.WriteAt(buf[:10], contractSize-10, 0); err != nil {
			t.Errorf("write at the end: %v", err)
		}
		if err := d.ReadAt(buf[:10], contractSize-10); err != nil {
			t.Errorf("read at the end: %v", err)
		}
		if err := d.ReadAt(nil, contractSize); err != nil {
			t.Errorf("empty read at the end: %v", err)
		}
	})

	t.Run("Methods", func(t *testing.T) {
		d := mk(t, contractSize)
		model := make([]byte, contractSize)
		check := func(what string) {
			t.Helper()
			if got := readAll(t, d); !bytes.Equal(got, model) {
				t.Fatalf("after %s: %s", what, firstDiff(got, model))
			}
		}
		check("open")
		type step struct {
			name   string
			kind   OpKind
			off    int64
			length int64
			flags  Flags
		}
		steps := []step{
			{"aligned write", OpWrite, 0, 65536, 0},
			{"unaligned write", OpWrite, 70001, 9999, 0},
			{"write across chunks", OpWrite, 65536 - 700, 140000, 0},
			{"FUA write", OpWrite, 300000, 4096, FUA},
			{"tail write", OpWrite, contractSize - 5000, 5000, 0},
			{"flush", OpFlush, 0, 0, 0},
			{"trim whole chunk", OpTrim, 65536, 65536, 0},
			{"trim unaligned", OpTrim, 3, 1000, 0},
			{"trim FUA", OpTrim, 200000, 8192, FUA},
			{"write", OpWrite, 400000, 300000, 0},
			{"zero hole", OpZero, 400000, 131072, 0},
			{"zero no-hole", OpZero, 600000, 50000, NoHole},
			{"zero unaligned", OpZero, 650001, 333, 0},
			{"zero FUA", OpZero, 0, 512, FUA},
			{"zero tail", OpZero, contractSize - 3000, 3000, 0},
			{"empty write", OpWrite, 100, 0, 0},
			{"empty trim", OpTrim, 100, 0, 0},
			{"empty zero", OpZero, 100, 0, 0},
			{"whole write", OpWrite, 0, contractSize, 0},
			{"whole trim", OpTrim, 0, contractSize, 0},
		}
		for i, s := range steps {
			var err error
			switch s.kind {
			case OpWrite:
				p := fill(int(s.length), uint64(100+i))
				err = d.WriteAt(p, s.off, s.flags)
				copy(model[s.off:], p)
			case OpFlush:
				err = d.Flush()
			case OpTrim:
				if err = d.Trim(s.off, s.length, s.flags); err == nil {
					trimmed(t, d, model, s.off, s.length)
				}
			case OpZero:
				err = d.Zero(s.off, s.length, s.flags)
				clear(model[s.off : s.off+s.length])
			}
			if err != nil {
				t.Fatalf("%s: %v", s.name, err)
			}
			check(s.name)
		}
		if err := d.Flush(); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("FastZero", func(t *testing.T) {
		d := mk(t, contractSize)
		p := fill(8192, 7)
		if err := d.WriteAt(p, 4096, 0); err != nil {
			t.Fatal(err)
		}
		err := d.Zero(4096, 8192, FastZero)
		switch {
		case err == nil:
			p = make([]byte, 8192)
		case errors.Is(err, ErrNotSupported):
		default:
			t.Fatalf("Zero FastZero: %v", err)
		}
		got := make([]byte, 8192)
		if err := d.ReadAt(got, 4096); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, p) {
			t.Fatalf("after FastZero (err %v): %s", err, firstDiff(got, p))
		}
	})

	t.Run("Extents", func(t *testing.T) {
		d := mk(t, contractSize)
		e, ok := d.(Extenter)
		if !ok {
			t.Skip("not an Extenter")
		}
		if err := d.WriteAt(fill(100000, 3), 200000, 0); err != nil {
			t.Fatal(err)
		}
		if err := d.Zero(500000, 100000, 0); err != nil {
			t.Fatal(err)
		}
		data := readAll(t, d)
		for _, r := range []struct{ off, length int64 }{{0, contractSize}, {1, 100}, {199999, 3}, {contractSize - 1, 1}, {123456, 400000}} {
			pos := r.off
			err := e.Extents(r.off, r.length, func(x Extent) bool {
				if x.Length <= 0 || pos+x.Length > r.off+r.length {
					t.Errorf("range %v: extent %+v at %d out of range", r, x, pos)
					return false
				}
				if x.Hole && !x.Zero {
					t.Errorf("range %v: hole that is not zero at %d", r, pos)
				}
				if x.Zero && !bytes.Equal(data[pos:pos+x.Length], make([]byte, x.Length)) {
					t.Errorf("range %v: zero extent %+v at %d holds data", r, x, pos)
				}
				pos += x.Length
				return true
			})
			if err != nil {
				t.Fatalf("Extents %v: %v", r, err)
			}
			if pos != r.off+r.length {
				t.Errorf("range %v: extents cover up to %d", r, pos)
			}
		}
		calls := 0
		if err := e.Extents(0, contractSize, func(Extent) bool { calls++; return false }); err != nil {
			t.Fatal(err)
		}
		if calls != 1 {
			t.Errorf("Extents went on after fn returned false: %d calls", calls)
		}
	})

	t.Run("Random", func(t *testing.T) {
		seed := testseed.Get(t)
		rng := newRand(seed)
		d := mk(t, contractSize)
		model := make([]byte, contractSize)
		for i := range 300 {
			off := rng.Int64N(contractSize)
			length := rng.Int64N(min(contractSize-off, 200000) + 1)
			if rng.IntN(2) == 0 { // sector-aligned half the time
				off &^= 511
				length &^= 511
			}
			var flags Flags
			if rng.IntN(4) == 0 {
				flags |= FUA
			}
			var err error
			switch k := rng.IntN(10); {
			case k < 5:
				p := fill(int(length), seed+uint64(i))
				err = d.WriteAt(p, off, flags)
				copy(model[off:], p)
			case k < 7:
				p := make([]byte, length)
				if err = d.ReadAt(p, off); err == nil && !bytes.Equal(p, model[off:off+length]) {
					t.Fatalf("op %d: read %d+%d: %s", i, off, length, firstDiff(p, model[off:off+length]))
				}
			case k < 8:
				if err = d.Trim(off, length, flags); err == nil {
					trimmed(t, d, model, off, length)
				}
			case k < 9:
				if rng.IntN(2) == 0 {
					flags |= NoHole
				}
				err = d.Zero(off, length, flags)
				clear(model[off : off+length])
			default:
				err = d.Flush()
			}
			if err != nil {
				t.Fatalf("op %d: %v", i, err)
			}
		}
		if got := readAll(t, d); !bytes.Equal(got, model) {
			t.Fatalf("final image: %s", firstDiff(got, model))
		}
	})

	t.Run("Close", func(t *testing.T) {
		d := mk(t, contractSize)
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 512)
		for name, err := range map[string]error{
			"ReadAt":  d.ReadAt(buf, 0),
			"WriteAt": d.WriteAt(buf, 0, 0),
			"Flush":   d.Flush(),
			"Trim":    d.Trim(0, 512, 0),
			"Zero":    d.Zero(0, 512, 0),
		} {
			if !errors.Is(err, ErrClosed) {
				t.Errorf("%s after Close: %v, want ErrClosed", name, err)
			}
		}
	})
}
