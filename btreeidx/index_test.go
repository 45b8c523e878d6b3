package btreeidx

import (
	"errors"
	"slices"
	"strings"
	"testing"
)

// x builds an extent from sector units: offset, length, location, version;
// dirty unless clean is called on it.
func x(off, length, loc int64, ver uint64) Extent {
	return Extent{Off: off * SectorSize, Len: length * SectorSize, Loc: loc * SectorSize, Ver: ver, Dirty: true}
}

func (e Extent) clean() Extent      { e.Dirty = false; return e }
func (e Extent) gen(g uint8) Extent { e.Gen = g; return e }
func sec(n int64) int64             { return n * SectorSize }

// build returns an index holding exactly es.
func build(t *testing.T, es ...Extent) *Index {
	t.Helper()
	ix := New()
	for _, e := range es {
		ix.Insert(e, func(d Extent) { t.Fatalf("building: %v displaced %v", e, d) })
	}
	return ix
}

// all lists every extent of ix and checks the invariants on the way.
func all(t *testing.T, ix *Index) []Extent {
	t.Helper()
	if err := ix.Check(); err != nil {
		t.Fatal(err)
	}
	var out []Extent
	ix.Ascend(-1, func(e Extent) bool { out = append(out, e); return true })
	return out
}

func same(t *testing.T, what string, got, want []Extent) {
	t.Helper()
	if !slices.Equal(got, want) {
		t.Errorf("%s:\n got  %v\n want %v", what, got, want)
	}
}

func TestInsertDelete(t *testing.T) {
	base := []Extent{x(10, 10, 100, 1)}
	three := []Extent{x(10, 10, 100, 1), x(20, 10, 200, 3).clean(), x(35, 5, 300, 4).gen(7)}
	nw := x(0, 0, 500, 9) // new data: Off and Len set per case
	at := func(off, length int64) Extent { e := nw; e.Off, e.Len = sec(off), sec(length); return e }
	tests := []struct {
		name     string
		before   []Extent
		off, len int64    // sectors
		after    []Extent // after Insert of at(off, len)
		dropped  []Extent // by both Insert and Delete
	}{
		{
			name: "inside", before: base, off: 12, len: 3,
			after:   []Extent{x(10, 2, 100, 1), at(12, 3), x(15, 5, 105, 1)},
			dropped: []Extent{x(12, 3, 102, 1)},
		},
		{
			name: "over the start", before: base, off: 5, len: 7,
			after:   []Extent{at(5, 7), x(12, 8, 102, 1)},
			dropped: []Extent{x(10, 2, 100, 1)},
		},
		{
			name: "over the end", before: base, off: 15, len: 10,
			after:   []Extent{x(10, 5, 100, 1), at(15, 10)},
			dropped: []Extent{x(15, 5, 105, 1)},
		},
		{
			name: "exact match", before: base, off: 10, len: 10,
			after:   []Extent{at(10, 10)},
			dropped: []Extent{x(10, 10, 100, 1)},
		},
		{
			name: "same start, shorter", before: base, off: 10, len: 4,
			after:   []Extent{at(10, 4), x(14, 6, 104, 1)},
			dropped: []Extent{x(10, 4, 100, 1)},
		},
		{
			name: "same end, shorter", before: base, off: 16, len: 4,
			after:   []Extent{x(10, 6, 100, 1), at(16, 4)},
			dropped: []Extent{x(16, 4, 106, 1)},
		},
		{
			name: "covering it", before: base, off: 0, len: 40,
			after:   []Extent{at(0, 40)},
			dropped: []Extent{x(10, 10, 100, 1)},
		},
		{
			name: "covering several", before: three, off: 15, len: 22,
			after:   []Extent{x(10, 5, 100, 1), at(15, 22), x(37, 3, 302, 4).gen(7)},
			dropped: []Extent{x(15, 5, 105, 1), x(20, 10, 200, 3).clean(), x(35, 2, 300, 4).gen(7)},
		},
		{
			name: "gap between", before: three, off: 30, len: 5,
			after: []Extent{x(10, 10, 100, 1), x(20, 10, 200, 3).clean(), at(30, 5), x(35, 5, 300, 4).gen(7)},
		},
		{
			name: "adjacent before", before: base, off: 5, len: 5,
			after: []Extent{at(5, 5), x(10, 10, 100, 1)},
		},
		{
			name: "adjacent after", before: base, off: 20, len: 1,
			after: []Extent{x(10, 10, 100, 1), at(20, 1)},
		},
		{
			name: "one sector at each edge", before: three, off: 19, len: 2,
			after:   []Extent{x(10, 9, 100, 1), at(19, 2), x(21, 9, 201, 3).clean(), x(35, 5, 300, 4).gen(7)},
			dropped: []Extent{x(19, 1, 109, 1), x(20, 1, 200, 3).clean()},
		},
		{
			name: "empty index", off: 3, len: 3,
			after: []Extent{at(3, 3)},
		},
	}
	for _, tc := range tests {
		t.Run("Insert/"+tc.name, func(t *testing.T) {
			ix := build(t, tc.before...)
			var dropped []Extent
			ix.Insert(at(tc.off, tc.len), func(e Extent) { dropped = append(dropped, e) })
			same(t, "extents", all(t, ix), tc.after)
			same(t, "dropped", dropped, tc.dropped)
		})
		t.Run("Delete/"+tc.name, func(t *testing.T) {
			ix := build(t, tc.before...)
			var dropped []Extent
			ix.Delete(sec(tc.off), sec(tc.len), func(e Extent) { dropped = append(dropped, e) })
			// After a Delete: what Insert left, minus the new extent.
			want := slices.DeleteFunc(slices.Clone(tc.after), func(e Extent) bool { return e.Ver == nw.Ver })
			same(t, "extents", all(t, ix), want)
			same(t, "dropped", dropped, tc.dropped)
		})
	}
}

func TestMarkClean(t *testing.T) {
	base := []Extent{x(10, 10, 100, 1)}
	two := []Extent{x(10, 10, 100, 1), x(20, 10, 200, 3)}
	tests := []struct {
		name              string
		before            []Extent
		off, len          int64 // sectors
		ver               uint64
		cleaned, collided int64 // sectors
		after             []Extent
	}{
		{"exact, matching", base, 10, 10, 1, 10, 0, []Extent{x(10, 10, 100, 1).clean()}},
		{"exact, other version", base, 10, 10, 2, 0, 10, base},
		{"inside", base, 12, 3, 1, 3, 0, []Extent{x(10, 2, 100, 1), x(12, 3, 102, 1).clean(), x(15, 5, 105, 1)}},
		{"over the start", base, 5, 10, 1, 5, 5, []Extent{x(10, 5, 100, 1).clean(), x(15, 5, 105, 1)}},
		{"over the end", base, 15, 10, 1, 5, 5, []Extent{x(10, 5, 100, 1), x(15, 5, 105, 1).clean()}},
		{"nothing there", base, 30, 4, 1, 0, 4, base},
		{"two versions, first", two, 10, 20, 1, 10, 10, []Extent{x(10, 10, 100, 1).clean(), x(20, 10, 200, 3)}},
		{"two versions, second", two, 15, 10, 3, 5, 5, []Extent{x(10, 10, 100, 1), x(20, 5, 200, 3).clean(), x(25, 5, 205, 3)}},
		{"already clean", []Extent{x(10, 10, 100, 1).clean()}, 10, 10, 1, 10, 0, []Extent{x(10, 10, 100, 1).clean()}},
		{"zero length", base, 12, 0, 1, 0, 0, base},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ix := build(t, tc.before...)
			cleaned, collided := ix.MarkClean(sec(tc.off), sec(tc.len), tc.ver)
			if cleaned != sec(tc.cleaned) || collided != sec(tc.collided) {
				t.Errorf("MarkClean = (%d, %d), want (%d, %d)", cleaned, collided, sec(tc.cleaned), sec(tc.collided))
			}
			same(t, "extents", all(t, ix), tc.after)
			var dirty int64
			for _, e := range tc.after {
				if e.Dirty {
					dirty += e.Len
				}
			}
			if ix.DirtyBytes() != dirty {
				t.Errorf("DirtyBytes = %d, want %d", ix.DirtyBytes(), dirty)
			}
		})
	}
}

func TestReplace(t *testing.T) {
	base := []Extent{x(10, 10, 100, 1)}
	tests := []struct {
		name     string
		before   []Extent
		off, len int64 // sectors
		ver      uint64
		moved    int64 // sectors
		after    []Extent
	}{
		{"exact, matching", base, 10, 10, 1, 10, []Extent{x(10, 10, 900, 1).gen(7)}},
		{"exact, other version", base, 10, 10, 2, 0, base},
		{"inside", base, 12, 3, 1, 3, []Extent{x(10, 2, 100, 1), x(12, 3, 900, 1).gen(7), x(15, 5, 105, 1)}},
		// The part is placed at newLoc + (partOff - off).
		{"wider than the extent", base, 5, 20, 1, 10, []Extent{x(10, 10, 905, 1).gen(7)}},
		{"over the end", base, 18, 4, 1, 2, []Extent{x(10, 8, 100, 1), x(18, 2, 900, 1).gen(7)}},
		{"clean stays clean", []Extent{x(10, 10, 100, 1).clean()}, 10, 10, 1, 10, []Extent{x(10, 10, 900, 1).gen(7).clean()}},
		{"other version beside", []Extent{x(10, 10, 100, 1), x(20, 5, 300, 2)}, 10, 15, 2, 5,
			[]Extent{x(10, 10, 100, 1), x(20, 5, 910, 2).gen(7)}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ix := build(t, tc.before...)
			if moved := ix.Replace(sec(tc.off), sec(tc.len), tc.ver, sec(900), 7); moved != sec(tc.moved) {
				t.Errorf("Replace moved %d, want %d", moved, sec(tc.moved))
			}
			same(t, "extents", all(t, ix), tc.after)
		})
	}
}

// TestMerge shows pieces of one write joined back together, and pieces
// that must stay apart.
func TestMerge(t *testing.T) {
	t.Run("MarkClean in halves", func(t *testing.T) {
		ix := build(t, x(10, 10, 100, 1))
		ix.MarkClean(sec(12), sec(3), 1)
		if ix.Len() != 3 {
			t.Fatalf("Len = %d after a partial clean, want 3", ix.Len())
		}
		ix.MarkClean(sec(10), sec(10), 1)
		same(t, "extents", all(t, ix), []Extent{x(10, 10, 100, 1).clean()})
	})
	t.Run("Replace in halves, contiguous", func(t *testing.T) {
		ix := build(t, x(10, 10, 100, 1))
		ix.Replace(sec(10), sec(4), 1, sec(900), 2)
		ix.Replace(sec(14), sec(6), 1, sec(904), 2)
		same(t, "extents", all(t, ix), []Extent{x(10, 10, 900, 1).gen(2)})
	})
	t.Run("Replace in halves, not contiguous", func(t *testing.T) {
		ix := build(t, x(10, 10, 100, 1))
		ix.Replace(sec(10), sec(4), 1, sec(900), 2)
		ix.Replace(sec(14), sec(6), 1, sec(800), 2)
		same(t, "extents", all(t, ix), []Extent{x(10, 4, 900, 1).gen(2), x(14, 6, 800, 1).gen(2)})
	})
	t.Run("different generation", func(t *testing.T) {
		ix := build(t, x(10, 10, 100, 1))
		ix.Replace(sec(10), sec(4), 1, sec(100), 2)
		same(t, "extents", all(t, ix), []Extent{x(10, 4, 100, 1).gen(2), x(14, 6, 104, 1)})
	})
	t.Run("different versions never merge", func(t *testing.T) {
		ix := build(t, x(10, 10, 100, 1).clean(), x(20, 10, 110, 2))
		ix.MarkClean(sec(20), sec(10), 2)
		same(t, "extents", all(t, ix), []Extent{x(10, 10, 100, 1).clean(), x(20, 10, 110, 2).clean()})
	})
	t.Run("across batches", func(t *testing.T) {
		// 3*batch pieces of one write, every other one cleaned, then the
		// rest: one extent again.
		n := int64(3 * batch)
		ix := build(t, x(0, 2*n, 1000, 5))
		for i := int64(0); i < n; i++ {
			ix.MarkClean(sec(2*i), sec(1), 5)
		}
		if ix.Len() != int(2*n) {
			t.Fatalf("Len = %d, want %d", ix.Len(), 2*n)
		}
		ix.MarkClean(0, sec(2*n), 5)
		same(t, "extents", all(t, ix), []Extent{x(0, 2*n, 1000, 5).clean()})
	})
}

func TestLookup(t *testing.T) {
	ix := build(t, x(10, 10, 100, 1), x(20, 10, 200, 3).clean(), x(35, 5, 300, 4))
	tests := []struct {
		name      string
		off, len  int64 // bytes
		stopAfter int
		want      []Extent
	}{
		{"all", 0, sec(100), 0, []Extent{x(10, 10, 100, 1), x(20, 10, 200, 3).clean(), x(35, 5, 300, 4)}},
		{"clipped both sides", sec(15), sec(22), 0, []Extent{x(15, 5, 105, 1), x(20, 10, 200, 3).clean(), x(35, 2, 300, 4)}},
		{"in a gap", sec(30), sec(5), 0, nil},
		{"before everything", 0, sec(10), 0, nil},
		{"one sector", sec(12), sec(1), 0, []Extent{x(12, 1, 102, 1)}},
		{"stops", 0, sec(100), 2, []Extent{x(10, 10, 100, 1), x(20, 10, 200, 3).clean()}},
		{"unaligned bytes", sec(12) + 100, 10, 0, []Extent{{Off: sec(12) + 100, Len: 10, Loc: sec(102) + 100, Ver: 1, Dirty: true}}},
		{"negative start", -sec(5), sec(16), 0, []Extent{x(10, 1, 100, 1)}},
		{"empty", sec(12), 0, 0, nil},
		{"huge length", sec(36), 1 << 62, 0, []Extent{x(36, 4, 301, 4)}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var got []Extent
			ix.Lookup(tc.off, tc.len, func(e Extent) bool {
				got = append(got, e)
				return len(got) != tc.stopAfter
			})
			same(t, "Lookup", got, tc.want)
		})
	}
}

func TestAscend(t *testing.T) {
	ix := build(t, x(10, 10, 100, 1), x(20, 10, 200, 3).clean(), x(35, 5, 300, 4), x(50, 1, 400, 5).clean())
	tests := []struct {
		from       int64
		all, dirty []Extent
	}{
		{-1, []Extent{x(10, 10, 100, 1), x(20, 10, 200, 3).clean(), x(35, 5, 300, 4), x(50, 1, 400, 5).clean()},
			[]Extent{x(10, 10, 100, 1), x(35, 5, 300, 4)}},
		{sec(20), []Extent{x(20, 10, 200, 3).clean(), x(35, 5, 300, 4), x(50, 1, 400, 5).clean()},
			[]Extent{x(35, 5, 300, 4)}},
		{sec(20) - 1, []Extent{x(10, 10, 100, 1), x(20, 10, 200, 3).clean(), x(35, 5, 300, 4), x(50, 1, 400, 5).clean()},
			[]Extent{x(10, 10, 100, 1), x(35, 5, 300, 4)}},
		{sec(39), []Extent{x(35, 5, 300, 4), x(50, 1, 400, 5).clean()}, []Extent{x(35, 5, 300, 4)}},
		{sec(40), []Extent{x(50, 1, 400, 5).clean()}, nil},
		{MaxOffset, nil, nil},
		{1 << 62, nil, nil},
	}
	for _, tc := range tests {
		var got, gotDirty []Extent
		ix.Ascend(tc.from, func(e Extent) bool { got = append(got, e); return true })
		ix.AscendDirty(tc.from, func(e Extent) bool { gotDirty = append(gotDirty, e); return true })
		same(t, "Ascend", got, tc.all)
		same(t, "AscendDirty", gotDirty, tc.dirty)
	}
	n := 0
	ix.AscendDirty(-1, func(Extent) bool { n++; return false })
	if n != 1 {
		t.Errorf("AscendDirty went on after false: %d calls", n)
	}
}

func TestCounters(t *testing.T) {
	ix := build(t, x(10, 10, 100, 1), x(20, 10, 200, 3).clean(), x(35, 5, 300, 4))
	check := func(n int, bytes, dirty int64, dirtyLen int) {
		t.Helper()
		if ix.Len() != n || ix.Bytes() != sec(bytes) || ix.DirtyBytes() != sec(dirty) || ix.DirtyLen() != dirtyLen {
			t.Errorf("Len, Bytes, DirtyBytes, DirtyLen = %d, %d, %d, %d; want %d, %d, %d, %d",
				ix.Len(), ix.Bytes(), ix.DirtyBytes(), ix.DirtyLen(), n, sec(bytes), sec(dirty), dirtyLen)
		}
	}
	check(3, 25, 15, 2)
	ix.Insert(x(15, 10, 500, 9).clean(), nil)
	check(4, 25, 10, 2)
	ix.MarkClean(sec(0), sec(100), 4)
	check(4, 25, 5, 1)
	ix.Delete(0, sec(100), nil)
	check(0, 0, 0, 0)
}

// TestLimits covers the edges of the packed representation.
func TestLimits(t *testing.T) {
	t.Run("long extent is split", func(t *testing.T) {
		e := Extent{Off: sec(8), Len: 2*MaxItemLen + sec(3), Loc: sec(16), Ver: 3, Gen: 200, Dirty: true}
		ix := New()
		ix.Insert(e, nil)
		if ix.Len() != 3 || ix.Bytes() != e.Len || ix.DirtyBytes() != e.Len {
			t.Fatalf("Len, Bytes, DirtyBytes = %d, %d, %d", ix.Len(), ix.Bytes(), ix.DirtyBytes())
		}
		next, loc := e.Off, e.Loc
		for _, p := range all(t, ix) {
			if p.Off != next || p.Loc != loc || p.Ver != 3 || p.Gen != 200 || !p.Dirty || p.Len > MaxItemLen {
				t.Fatalf("piece %v does not continue at %d@%d", p, next, loc)
			}
			next, loc = p.End(), p.Loc+p.Len
		}
		if next != e.End() {
			t.Fatalf("pieces end at %d, want %d", next, e.End())
		}
		// Cleaning it all must not merge beyond MaxItemLen.
		if c, _ := ix.MarkClean(0, MaxOffset, 3); c != e.Len || ix.Len() != 3 {
			t.Fatalf("MarkClean cleaned %d, Len %d", c, ix.Len())
		}
		if err := ix.Check(); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("largest values round-trip", func(t *testing.T) {
		e := Extent{Off: MaxOffset - MaxItemLen, Len: MaxItemLen, Loc: MaxLoc - MaxItemLen, Ver: ^uint64(0), Gen: 255, Dirty: true}
		ix := New()
		ix.Insert(e, nil)
		same(t, "extents", all(t, ix), []Extent{e})
		var got []Extent
		ix.Lookup(MaxOffset-sec(1), 1<<62, func(e Extent) bool { got = append(got, e); return true })
		same(t, "Lookup", got, []Extent{{Off: MaxOffset - sec(1), Len: sec(1), Loc: MaxLoc - sec(1), Ver: ^uint64(0), Gen: 255, Dirty: true}})
		ix.Delete(MaxOffset-sec(1), 1<<62, nil)
		ix.Delete(0, 1<<62, nil)
		if ix.Len() != 0 {
			t.Fatalf("Len %d after deleting everything", ix.Len())
		}
	})
	t.Run("pack round-trip", func(t *testing.T) {
		for _, p := range []piece{
			{start: 0, end: 1, loc: 0},
			{start: maxEndS - maxLenS, end: maxEndS, loc: maxLocS - maxLenS, ver: ^uint64(0), gen: 255, dirty: true},
			{start: 12345, end: 12346, loc: 1<<32 + 7, ver: 1 << 63, gen: 128},
			{start: 1 << 40, end: 1<<40 + 1<<31, loc: 1<<42 | 1<<31, ver: 42, gen: 1, dirty: true},
		} {
			it := p.pack()
			if got := it.unpack(); got != p {
				t.Errorf("pack/unpack %+v = %+v", p, got)
			}
			if it.w0&spareBit != 0 {
				t.Errorf("pack %+v sets the spare bit", p)
			}
		}
	})
}

func mustPanic(t *testing.T, what string, f func()) {
	t.Helper()
	defer func() {
		t.Helper()
		r := recover()
		err, ok := r.(error)
		if !ok || !errors.Is(err, ErrInvalid) {
			t.Errorf("%s: panic %v, want an error wrapping ErrInvalid", what, r)
		}
	}()
	f()
}

func TestInvalid(t *testing.T) {
	ix := build(t, x(10, 10, 100, 1))
	for _, e := range []Extent{
		{Off: 0, Len: 0, Loc: 0},
		{Off: -512, Len: 512},
		{Off: 0, Len: 512, Loc: -512},
		{Off: 1, Len: 512},
		{Off: 0, Len: 511},
		{Off: 0, Len: 512, Loc: 100},
		{Off: MaxOffset, Len: 512},
		{Off: 0, Len: 1024, Loc: MaxLoc - 512},
		{Off: 512, Len: 1<<63 - 512},
	} {
		if err := e.Validate(); !errors.Is(err, ErrInvalid) {
			t.Errorf("Validate(%v) = %v", e, err)
		}
		mustPanic(t, "Insert "+e.String(), func() { ix.Insert(e, nil) })
	}
	mustPanic(t, "Delete unaligned", func() { ix.Delete(1, 512, nil) })
	mustPanic(t, "Delete negative", func() { ix.Delete(-512, 1024, nil) })
	mustPanic(t, "MarkClean unaligned", func() { ix.MarkClean(0, 100, 1) })
	mustPanic(t, "Replace unaligned location", func() { ix.Replace(0, sec(40), 1, 7, 0) })
	mustPanic(t, "Replace beyond MaxLoc", func() { ix.Replace(0, sec(40), 1, MaxLoc-sec(10), 0) })
	// Nothing changed.
	same(t, "extents", all(t, ix), []Extent{x(10, 10, 100, 1)})
}

// TestCheckFails corrupts an index in every way Check looks for.
func TestCheckFails(t *testing.T) {
	tests := []struct {
		name    string
		corrupt func(ix *Index)
		want    string
	}{
		{"overlap", func(ix *Index) {
			ix.tree.ReplaceOrInsert(piece{start: 15, end: 25, loc: 7}.pack())
		}, "starts before"},
		{"empty", func(ix *Index) { ix.tree.ReplaceOrInsert(piece{start: 50, end: 50}.pack()) }, "length 0"},
		{"bytes counter", func(ix *Index) { ix.sectors++ }, "counter says"},
		{"dirty counter", func(ix *Index) { ix.dirtySectors-- }, "counter says"},
		{"dirty region missing", func(ix *Index) { ix.dirty.remove(0) }, "not in the dirty set"},
		{"dirty extent counter", func(ix *Index) { ix.dirtyN++ }, "counter says 2"},
		{"spare bit", func(ix *Index) {
			it := piece{start: 40, end: 41}.pack()
			it.w0 |= spareBit
			ix.tree.ReplaceOrInsert(it)
		}, "spare bit"},
		{"location", func(ix *Index) {
			ix.tree.ReplaceOrInsert(piece{start: 40, end: 48, loc: maxLocS - 4}.pack())
		}, "location beyond"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ix := build(t, x(10, 10, 100, 1), x(30, 5, 100, 2).clean())
			tc.corrupt(ix)
			err := ix.Check()
			if !errors.Is(err, ErrCorrupt) || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Check = %v, want ErrCorrupt mentioning %q", err, tc.want)
			}
		})
	}
}

// TestNoAllocs holds the steady state to zero allocations per call.
func TestNoAllocs(t *testing.T) {
	ix := New()
	for i := int64(0); i < 10000; i++ {
		ix.Insert(x(i*16, 8, i*8, uint64(i)), nil)
	}
	var sink int64
	dropped := func(e Extent) { sink += e.Len }
	visit := func(e Extent) bool { sink += e.Len; return true }
	ver := uint64(1 << 20)
	ops := map[string]func(){
		// Overwrites in place: no node splits.
		"Insert": func() { ver++; ix.Insert(x(1600, 8, 5, ver), dropped) },
		"Insert splitting": func() {
			ver++
			ix.Insert(x(3200, 8, 5, ver), dropped)
			ix.Insert(x(3202, 2, 5, ver+1), dropped)
			ver++
		},
		"Delete":      func() { ix.Delete(sec(4800), sec(8), dropped); ix.Insert(x(4800, 8, 0, 1), nil) },
		"Lookup":      func() { ix.Lookup(0, sec(1000), visit) },
		"Ascend":      func() { ix.Ascend(sec(5000), func(e Extent) bool { sink++; return sink%16 != 0 }) },
		"AscendDirty": func() { ix.AscendDirty(sec(5000), func(e Extent) bool { sink++; return sink%16 != 0 }) },
		"MarkClean": func() {
			ix.Insert(x(8000, 8, 4000, 500), nil)
			ix.MarkClean(sec(8002), sec(2), 500) // splits
			ix.MarkClean(sec(8000), sec(8), 500) // merges back
		},
		"Replace": func() { ix.Replace(sec(9600), sec(4), 600, 0, 1); ix.Replace(sec(9600), sec(8), 600, sec(4800), 1) },
	}
	for name, f := range ops {
		f() // warm up: the first split of a node may allocate
		if n := testing.AllocsPerRun(100, f); n != 0 {
			t.Errorf("%s: %.1f allocations per call", name, n)
		}
	}
	if err := ix.Check(); err != nil {
		t.Fatal(err)
	}
}

// TestRegionSet: membership and ascending search across words, pages and
// the highest region numbers.
func TestRegionSet(t *testing.T) {
	s := newRegionSet()
	top := maxEndS >> regionShift
	members := []int64{0, 63, 64, pageBits - 1, pageBits, 5*pageBits + 7, top}
	for _, r := range []int64{top, 64, 0, pageBits, 63, 5*pageBits + 7, pageBits - 1} {
		s.add(r)
	}
	for i, r := range members {
		if !s.has(r) {
			t.Errorf("has(%d) = false", r)
		}
		from := int64(0)
		if i > 0 {
			from = members[i-1] + 1
		}
		if got, ok := s.next(from); !ok || got != r {
			t.Errorf("next(%d) = %d, %v; want %d", from, got, ok, r)
		}
	}
	if got, ok := s.next(top + 1); ok {
		t.Errorf("next beyond the top = %d", got)
	}
	s.remove(pageBits)
	s.remove(pageBits)     // twice: no effect
	s.remove(3 * pageBits) // on a page never made
	if s.has(pageBits) {
		t.Error("removed member still there")
	}
	if got, _ := s.next(pageBits); got != 5*pageBits+7 {
		t.Errorf("next after a removal = %d", got)
	}
}

// TestDirtySetForgetsCleanRegions: a region whose extents were all marked
// clean stays in the dirty set until AscendDirty walks it whole and finds
// it clean; a walk that starts inside the region does not decide.
func TestDirtySetForgetsCleanRegions(t *testing.T) {
	ix := New()
	region := int64(1) << (regionShift + sectorShift) // bytes
	ix.Insert(Extent{Off: 0, Len: sec(8), Loc: 0, Ver: 1, Dirty: true}, nil)
	ix.Insert(Extent{Off: 3 * region, Len: sec(8), Loc: sec(8), Ver: 2, Dirty: true}, nil)
	ix.MarkClean(0, sec(8), 1)
	if !ix.dirty.has(0) {
		t.Fatal("a region left the set before a walk")
	}
	var got []int64
	ix.AscendDirty(sec(4), func(e Extent) bool { got = append(got, e.Off); return true })
	if !ix.dirty.has(0) {
		t.Fatal("a walk from inside region 0 dropped it")
	}
	ix.AscendDirty(-1, func(e Extent) bool { got = append(got, e.Off); return true })
	if ix.dirty.has(0) || !ix.dirty.has(3) {
		t.Fatalf("after a whole walk: region 0 in set %v, region 3 %v", ix.dirty.has(0), ix.dirty.has(3))
	}
	if want := []int64{3 * region, 3 * region}; !slices.Equal(got, want) {
		t.Fatalf("AscendDirty reported %v, want %v", got, want)
	}
	if err := ix.Check(); err != nil {
		t.Fatal(err)
	}
}
