package btreeidx

import (
	"flag"
	"fmt"
	"math/rand/v2"
	"runtime"
	"testing"
	"time"
)

var longFlag = flag.Bool("long", false, "run TestLong: 10 million random inserts, time and bytes per extent")

const (
	tib = int64(1) << 40
	kib = int64(1) << 10
)

// pattern yields the i-th extent of a workload.
type pattern func(r *rand.Rand, i int) Extent

// random4K: 4 KiB extents at random 4 KiB-aligned offsets of a 1 TiB
// device; some land next to or on top of others.
func random4K(dirty bool) pattern {
	return func(r *rand.Rand, i int) Extent {
		return Extent{Off: r.Int64N(tib/(4*kib)) * 4 * kib, Len: 4 * kib, Loc: int64(i) * 4 * kib, Ver: uint64(i), Dirty: dirty}
	}
}

// sparse4K: 4 KiB extents at random offsets on an 8 KiB grid: never
// adjacent, so never merged and never split.
func sparse4K(dirty bool) pattern {
	return func(r *rand.Rand, i int) Extent {
		return Extent{Off: r.Int64N(tib/(8*kib)) * 8 * kib, Len: 4 * kib, Loc: int64(i) * 4 * kib, Ver: uint64(i), Dirty: dirty}
	}
}

// sequential4K: 4 KiB writes one after the other (B-tree nodes split in
// the middle and the left halves stay half full: the worst case).
func sequential4K(dirty bool) pattern {
	return func(r *rand.Rand, i int) Extent {
		return Extent{Off: int64(i) * 4 * kib, Len: 4 * kib, Loc: int64(i) * 4 * kib, Ver: uint64(i), Dirty: dirty}
	}
}

func heapAlloc() uint64 {
	runtime.GC()
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}

// fill inserts n extents of pattern p into a new index of degree d and
// returns it with the heap bytes it holds per extent and the time the
// inserts took.
func fill(n, d int, p pattern, seed uint64) (ix *Index, perExtent float64, took time.Duration) {
	r := rand.New(rand.NewPCG(seed, 1))
	before := heapAlloc()
	ix = newIndex(d, regionShift)
	start := time.Now()
	for i := range n {
		ix.Insert(p(r, i), nil)
	}
	took = time.Since(start)
	after := heapAlloc()
	perExtent = float64(int64(after)-int64(before)) / float64(ix.Len())
	runtime.KeepAlive(ix)
	return ix, perExtent, took
}

// BenchmarkInsertRandom inserts dirty 4 KiB extents at random offsets of
// 1 TiB into one growing index (b.N of them).
func BenchmarkInsertRandom(b *testing.B) {
	for _, d := range []int{16, 32, degree, 128} {
		b.Run(fmt.Sprintf("degree=%d", d), func(b *testing.B) {
			r := rand.New(rand.NewPCG(1, 1))
			ix := newIndex(d, regionShift)
			p := random4K(true)
			b.ReportAllocs()
			b.SetBytes(4 * kib)
			for i := 0; b.Loop(); i++ {
				ix.Insert(p(r, i), nil)
			}
		})
	}
}

// BenchmarkOverwrite4K overwrites 4 KiB extents at random 4 KiB-aligned
// offsets of a 16 MiB span that is already all cached: every insert
// replaces one extent of the same range, as a write-back cache holding
// its working set does.
func BenchmarkOverwrite4K(b *testing.B) {
	const span = 16 << 20
	ix := New()
	for i := range int64(span / (4 * kib)) {
		ix.Insert(Extent{Off: i * 4 * kib, Len: 4 * kib, Loc: i * 4 * kib, Dirty: true}, nil)
	}
	r := rand.New(rand.NewPCG(1, 1))
	b.ReportAllocs()
	b.SetBytes(4 * kib)
	for i := 0; b.Loop(); i++ {
		ix.Insert(Extent{Off: r.Int64N(span/(4*kib)) * 4 * kib, Len: 4 * kib, Loc: int64(i%4096) * 4 * kib, Ver: uint64(i), Dirty: true}, nil)
	}
}

// BenchmarkMemory reports heap bytes per extent after 1e6 inserts. Run it
// with -benchtime=1x.
func BenchmarkMemory(b *testing.B) {
	const n = 1_000_000
	for _, w := range []struct {
		name string
		p    pattern
	}{
		{"sparse/clean", sparse4K(false)},
		{"sparse/dirty", sparse4K(true)},
		{"sequential/clean", sequential4K(false)},
		{"sequential/dirty", sequential4K(true)},
	} {
		b.Run(w.name, func(b *testing.B) {
			var per float64
			var took time.Duration
			for b.Loop() {
				_, per, took = fill(n, degree, w.p, 1)
			}
			b.ReportMetric(per, "B/extent")
			b.ReportMetric(float64(took.Nanoseconds())/n, "ns/insert")
		})
	}
}

// BenchmarkMemoryDegree compares the bytes per extent of tree degrees.
func BenchmarkMemoryDegree(b *testing.B) {
	const n = 1_000_000
	for _, d := range []int{16, 32, 64, 128} {
		b.Run(fmt.Sprintf("degree=%d", d), func(b *testing.B) {
			var per float64
			for b.Loop() {
				_, per, _ = fill(n, d, sparse4K(false), 1)
			}
			b.ReportMetric(per, "B/extent")
		})
	}
}

// populated is an index of 1e6 sparse clean extents, 1% of them dirty.
func populated(b *testing.B) *Index {
	ix, _, _ := fill(1_000_000, degree, sparse4K(false), 2)
	// Every 100th extent is overwritten with a dirty one; the offsets are
	// gathered first because the index must not change during a walk.
	var offs []int64
	i := 0
	ix.Ascend(-1, func(e Extent) bool {
		if i++; i%100 == 0 {
			offs = append(offs, e.Off)
		}
		return true
	})
	for j, off := range offs {
		ix.Insert(Extent{Off: off, Len: 4 * kib, Loc: int64(j) * 4 * kib, Ver: uint64(2_000_000 + j), Dirty: true}, nil)
	}
	b.ResetTimer()
	return ix
}

func BenchmarkLookup(b *testing.B) {
	ix := populated(b)
	r := rand.New(rand.NewPCG(3, 3))
	var n int
	b.ReportAllocs()
	for b.Loop() {
		ix.Lookup(r.Int64N(tib/(4*kib))*4*kib, 64*kib, func(Extent) bool { n++; return true })
	}
	b.ReportMetric(float64(n)/float64(b.N), "extents/op")
}

// BenchmarkAscendDirty takes the next 64 dirty extents from a random
// point, as writeback does, among 100 times as many clean ones.
func BenchmarkAscendDirty(b *testing.B) {
	ix := populated(b)
	r := rand.New(rand.NewPCG(4, 4))
	b.ReportAllocs()
	for b.Loop() {
		n := 0
		ix.AscendDirty(r.Int64N(tib), func(Extent) bool { n++; return n < 64 })
	}
}

// BenchmarkMarkClean cleans dirty extents one by one, as writeback does,
// re-dirtying them so the state stays the same.
func BenchmarkMarkClean(b *testing.B) {
	ix := populated(b)
	var es []Extent
	ix.AscendDirty(-1, func(e Extent) bool { es = append(es, e); return true })
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; b.Loop(); i++ {
		e := es[i%len(es)]
		if c, _ := ix.MarkClean(e.Off, e.Len, e.Ver); c != e.Len {
			b.Fatalf("cleaned %d of %v", c, e)
		}
		b.StopTimer()
		ix.Insert(e, nil)
		b.StartTimer()
	}
}

// TestMemory holds the memory goal on a quick run: 200k sparse extents.
func TestMemory(t *testing.T) {
	if testing.Short() {
		t.Skip("-short")
	}
	for _, w := range []struct {
		name  string
		p     pattern
		limit float64
	}{
		{"sparse/clean", sparse4K(false), 48},
		{"sparse/dirty", sparse4K(true), 64},
	} {
		_, per, _ := fill(200_000, degree, w.p, 5)
		t.Logf("%s: %.1f B/extent", w.name, per)
		if per > w.limit {
			t.Errorf("%s: %.1f B/extent, more than %.0f", w.name, per, w.limit)
		}
	}
}

// TestLong: 10 million random 4 KiB inserts over a 1 TiB address space,
// timed, and the heap bytes per extent. go test ./btreeidx -run Long -long -v
func TestLong(t *testing.T) {
	if !*longFlag {
		t.Skip("needs -long")
	}
	n := 10_000_000
	if testing.Short() {
		n = 3_000_000
	}
	for _, dirty := range []bool{false, true} {
		ix, per, took := fill(n, degree, random4K(dirty), 7)
		t.Logf("dirty=%v: %d inserts in %v (%.0f ns/insert), %d extents, %.1f B/extent",
			dirty, n, took.Round(time.Millisecond), float64(took.Nanoseconds())/float64(n), ix.Len(), per)
		if per > 64 {
			t.Errorf("dirty=%v: %.1f B/extent, goal <= 64", dirty, per)
		}
		// Time is reported, not asserted: this machine is shared, and a
		// timed assertion would be flaky. The goal is under 10 s.
		if n == 10_000_000 && took > 10*time.Second {
			t.Logf("dirty=%v: %v is over the 10 s goal", dirty, took.Round(time.Millisecond))
		}
		start := time.Now()
		if err := ix.Check(); err != nil {
			t.Fatal(err)
		}
		t.Logf("Check of %d extents: %v", ix.Len(), time.Since(start).Round(time.Millisecond))
	}
}
