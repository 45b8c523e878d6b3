// Package storagetest is the storage.Device contract as a test suite:
// Run drives a device made by a constructor through range checks, every
// method, FastZero, Extents, a seeded random mix checked against a model,
// and Close, and fails on the first difference. Every Device of the
// project runs it: storage's own, and cache.Cache in each mode.
package storagetest

// storagetest.go: Run, the Device contract suite, and its Options.

import (
	"bytes"
	"errors"
	"fmt"
	"testing"

	"github.com/nbdcache/nbdcache/internal/testbytes"
	"github.com/nbdcache/nbdcache/storage"
	"github.com/nbdcache/nbdcache/test/testseed"
)

// readAll reads the whole device.
func readAll(t testing.TB, d storage.Device) []byte {
	t.Helper()
	p := make([]byte, d.Size())
	if err := d.ReadAt(p, 0); err != nil {
		t.Fatalf("read all: %v", err)
	}
	return p
}

// Size is the device size the contract tests use: not a multiple
// of 64 KiB, so that short last chunks are exercised.
const Size = 1<<20 + 8192

// Options describes what a device under testContract may do that the
// contract allows but the model does not assume.
type Options struct {
	// TrimKeeps: Trim may leave old data (a block device discards whole
	// blocks only, and may not zero them).
	TrimKeeps bool
}

// Run runs the storage.Device contract against devices made by mk, which
// must return a zero-filled device of the given size.
func Run(t *testing.T, mk func(t *testing.T, size int64) storage.Device, optional ...Options) {
	var opts Options
	if len(optional) > 0 {
		opts = optional[0]
	}
	// trimmed updates model after a successful Trim of [off, off+length):
	// the range must read back as zeroes, or (TrimKeeps) zeroes or old
	// data byte by byte.
	trimmed := func(t *testing.T, d storage.Device, model []byte, off, length int64) {
		t.Helper()
		if !opts.TrimKeeps {
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
		d := mk(t, Size)
		if got := d.Size(); got != Size {
			t.Fatalf("Size() = %d, want %d", got, Size)
		}
		want := testbytes.Fill(Size, 1)
		if err := d.WriteAt(want, 0, 0); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 4096)
		bad := []struct{ off, length int64 }{
			{-1, 10}, {Size, 1}, {Size - 10, 11}, {0, Size + 1},
			{-4096, 4096}, {1 << 62, 4096}, {Size + 4096, 0}, {10, -1},
		}
		for _, b := range bad {
			name := fmt.Sprintf("off=%d,len=%d", b.off, b.length)
			if b.length >= 0 && b.length <= int64(len(buf)) {
				if err := d.ReadAt(buf[:b.length], b.off); !errors.Is(err, storage.ErrOutOfRange) {
					t.Errorf("%s: ReadAt: %v, want ErrOutOfRange", name, err)
				}
				if err := d.WriteAt(buf[:b.length], b.off, 0); !errors.Is(err, storage.ErrOutOfRange) {
					t.Errorf("%s: WriteAt: %v, want ErrOutOfRange", name, err)
				}
				if err := d.WriteAt(buf[:b.length], b.off, storage.FUA); !errors.Is(err, storage.ErrOutOfRange) {
					t.Errorf("%s: WriteAt FUA: %v, want ErrOutOfRange", name, err)
				}
			}
			if err := d.Trim(b.off, b.length, 0); !errors.Is(err, storage.ErrOutOfRange) {
				t.Errorf("%s: Trim: %v, want ErrOutOfRange", name, err)
			}
			for _, fl := range []storage.Flags{0, storage.NoHole, storage.FastZero, storage.FUA} {
				if err := d.Zero(b.off, b.length, fl); !errors.Is(err, storage.ErrOutOfRange) {
					t.Errorf("%s: Zero(%d): %v, want ErrOutOfRange", name, fl, err)
				}
			}
			if e, ok := d.(storage.Extenter); ok {
				err := e.Extents(b.off, b.length, func(storage.Extent) bool { t.Errorf("%s: Extents called fn", name); return true })
				if !errors.Is(err, storage.ErrOutOfRange) {
					t.Errorf("%s: Extents: %v, want ErrOutOfRange", name, err)
				}
			}
		}
		if got := readAll(t, d); !bytes.Equal(got, want) {
			t.Fatalf("a rejected request touched data: %s", testbytes.FirstDiff(got, want))
		}
		// Requests that end exactly at the end of the device are fine.
		if err := d.WriteAt(buf[:10], Size-10, 0); err != nil {
			t.Errorf("write at the end: %v", err)
		}
		if err := d.ReadAt(buf[:10], Size-10); err != nil {
			t.Errorf("read at the end: %v", err)
		}
		if err := d.ReadAt(nil, Size); err != nil {
			t.Errorf("empty read at the end: %v", err)
		}
	})

	t.Run("Methods", func(t *testing.T) {
		d := mk(t, Size)
		model := make([]byte, Size)
		check := func(what string) {
			t.Helper()
			if got := readAll(t, d); !bytes.Equal(got, model) {
				t.Fatalf("after %s: %s", what, testbytes.FirstDiff(got, model))
			}
		}
		check("open")
		type step struct {
			name   string
			kind   storage.OpKind
			off    int64
			length int64
			flags  storage.Flags
		}
		steps := []step{
			{"aligned write", storage.OpWrite, 0, 65536, 0},
			{"unaligned write", storage.OpWrite, 70001, 9999, 0},
			{"write across chunks", storage.OpWrite, 65536 - 700, 140000, 0},
			{"FUA write", storage.OpWrite, 300000, 4096, storage.FUA},
			{"tail write", storage.OpWrite, Size - 5000, 5000, 0},
			{"flush", storage.OpFlush, 0, 0, 0},
			{"trim whole chunk", storage.OpTrim, 65536, 65536, 0},
			{"trim unaligned", storage.OpTrim, 3, 1000, 0},
			{"trim FUA", storage.OpTrim, 200000, 8192, storage.FUA},
			{"write", storage.OpWrite, 400000, 300000, 0},
			{"zero hole", storage.OpZero, 400000, 131072, 0},
			{"zero no-hole", storage.OpZero, 600000, 50000, storage.NoHole},
			{"zero unaligned", storage.OpZero, 650001, 333, 0},
			{"zero FUA", storage.OpZero, 0, 512, storage.FUA},
			{"zero tail", storage.OpZero, Size - 3000, 3000, 0},
			{"empty write", storage.OpWrite, 100, 0, 0},
			{"empty trim", storage.OpTrim, 100, 0, 0},
			{"empty zero", storage.OpZero, 100, 0, 0},
			{"whole write", storage.OpWrite, 0, Size, 0},
			{"whole trim", storage.OpTrim, 0, Size, 0},
		}
		for i, s := range steps {
			var err error
			switch s.kind {
			case storage.OpWrite:
				p := testbytes.Fill(int(s.length), uint64(100+i))
				err = d.WriteAt(p, s.off, s.flags)
				copy(model[s.off:], p)
			case storage.OpFlush:
				err = d.Flush()
			case storage.OpTrim:
				if err = d.Trim(s.off, s.length, s.flags); err == nil {
					trimmed(t, d, model, s.off, s.length)
				}
			case storage.OpZero:
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
		d := mk(t, Size)
		p := testbytes.Fill(8192, 7)
		if err := d.WriteAt(p, 4096, 0); err != nil {
			t.Fatal(err)
		}
		err := d.Zero(4096, 8192, storage.FastZero)
		switch {
		case err == nil:
			p = make([]byte, 8192)
		case errors.Is(err, storage.ErrNotSupported):
		default:
			t.Fatalf("Zero FastZero: %v", err)
		}
		got := make([]byte, 8192)
		if err := d.ReadAt(got, 4096); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, p) {
			t.Fatalf("after FastZero (err %v): %s", err, testbytes.FirstDiff(got, p))
		}
	})

	t.Run("Extents", func(t *testing.T) {
		d := mk(t, Size)
		e, ok := d.(storage.Extenter)
		if !ok {
			t.Skip("not an Extenter")
		}
		if err := d.WriteAt(testbytes.Fill(100000, 3), 200000, 0); err != nil {
			t.Fatal(err)
		}
		if err := d.Zero(500000, 100000, 0); err != nil {
			t.Fatal(err)
		}
		data := readAll(t, d)
		for _, r := range []struct{ off, length int64 }{{0, Size}, {1, 100}, {199999, 3}, {Size - 1, 1}, {123456, 400000}} {
			pos := r.off
			err := e.Extents(r.off, r.length, func(x storage.Extent) bool {
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
			if pos == r.off { // a short answer is allowed, an empty one is not
				t.Errorf("range %v: no extent", r)
			}
		}
		calls := 0
		if err := e.Extents(0, Size, func(storage.Extent) bool { calls++; return false }); err != nil {
			t.Fatal(err)
		}
		if calls != 1 {
			t.Errorf("Extents went on after fn returned false: %d calls", calls)
		}
	})

	t.Run("Random", func(t *testing.T) {
		seed := testseed.Get(t)
		rng := testbytes.NewRand(seed)
		d := mk(t, Size)
		model := make([]byte, Size)
		for i := range 300 {
			off := rng.Int64N(Size)
			length := rng.Int64N(min(Size-off, 200000) + 1)
			if rng.IntN(2) == 0 { // sector-aligned half the time
				off &^= 511
				length &^= 511
			}
			var flags storage.Flags
			if rng.IntN(4) == 0 {
				flags |= storage.FUA
			}
			var err error
			switch k := rng.IntN(10); {
			case k < 5:
				p := testbytes.Fill(int(length), seed+uint64(i))
				err = d.WriteAt(p, off, flags)
				copy(model[off:], p)
			case k < 7:
				p := make([]byte, length)
				if err = d.ReadAt(p, off); err == nil && !bytes.Equal(p, model[off:off+length]) {
					t.Fatalf("op %d: read %d+%d: %s", i, off, length, testbytes.FirstDiff(p, model[off:off+length]))
				}
			case k < 8:
				if err = d.Trim(off, length, flags); err == nil {
					trimmed(t, d, model, off, length)
				}
			case k < 9:
				if rng.IntN(2) == 0 {
					flags |= storage.NoHole
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
			t.Fatalf("final image: %s", testbytes.FirstDiff(got, model))
		}
	})

	t.Run("Batch", func(t *testing.T) {
		d := mk(t, Size)
		bw, ok := d.(storage.BatchWriter)
		if !ok {
			t.Skip("not a storage.BatchWriter")
		}
		seed := testseed.Get(t)
		rng := testbytes.NewRand(seed)
		model := make([]byte, Size)
		for round := range 40 {
			// Small writes, overlapping each other in a narrow window
			// half the time: the batch must apply them in order.
			ws := make([]storage.BatchWrite, 1+rng.IntN(64))
			window := int64(Size)
			if rng.IntN(2) == 0 {
				window = 64 << 10
			}
			for i := range ws {
				off := rng.Int64N(window)
				length := 1 + rng.Int64N(min(window-off, 32<<10))
				if rng.IntN(3) != 0 { // 4 KiB-aligned, as NBD clients mostly send
					off &^= 4095
					length = max(4096, length&^4095)
					length = min(length, Size-off)
				}
				var flags storage.Flags
				if rng.IntN(8) == 0 {
					flags = storage.FUA
				}
				ws[i] = storage.BatchWrite{P: testbytes.Fill(int(length), seed+uint64(round*100+i)), Off: off, Flags: flags}
			}
			bw.WriteBatch(ws)
			for i, w := range ws {
				if w.Err != nil {
					t.Fatalf("round %d: write %d of %d (%d+%d): %v", round, i, len(ws), w.Off, len(w.P), w.Err)
				}
				copy(model[w.Off:], w.P)
			}
			if got := readAll(t, d); !bytes.Equal(got, model) {
				t.Fatalf("round %d, after a batch of %d: %s", round, len(ws), testbytes.FirstDiff(got, model))
			}
		}
		// An invalid write fails alone; the writes around it land.
		ws := []storage.BatchWrite{{P: []byte{1}, Off: 0}, {P: []byte{2}, Off: Size}, {P: []byte{3}, Off: 1}}
		bw.WriteBatch(ws)
		if ws[0].Err != nil || ws[1].Err == nil || ws[2].Err != nil {
			t.Fatalf("a batch with a write past the end: errors %v, %v, %v", ws[0].Err, ws[1].Err, ws[2].Err)
		}
		if p := readAll(t, d)[:2]; p[0] != 1 || p[1] != 3 {
			t.Fatalf("the writes around the invalid one: %v", p)
		}
	})

	t.Run("Close", func(t *testing.T) {
		d := mk(t, Size)
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
			if !errors.Is(err, storage.ErrClosed) {
				t.Errorf("%s after Close: %v, want ErrClosed", name, err)
			}
		}
	})
}
