package btreeidx

import (
	"flag"
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/nbdcache/nbdcache/test/testseed"
)

var opsFlag = flag.Int("ops", 3000, "operations per configuration in TestModel")

// The model: one slot per 512-byte sector of a small virtual device.
type slot struct {
	present bool
	loc     int64 // sector on the cache device
	ver     uint64
	gen     uint8
	dirty   bool
}

type opKind uint8

const (
	opInsert opKind = iota
	opDelete
	opMarkClean
	opReplace
	numOps
)

func (k opKind) String() string {
	return [...]string{"Insert", "Delete", "MarkClean", "Replace"}[k]
}

// op is one step, in sectors.
type op struct {
	kind     opKind
	off, len int64
	loc      int64 // Insert: location; Replace: new location
	ver      uint64
	gen      uint8
	dirty    bool
}

func (o op) String() string {
	switch o.kind {
	case opInsert:
		return fmt.Sprintf("Insert(%v)", o.extent())
	case opDelete:
		return fmt.Sprintf("Delete([%d+%d))", o.off*SectorSize, o.len*SectorSize)
	case opMarkClean:
		return fmt.Sprintf("MarkClean([%d+%d), v%d)", o.off*SectorSize, o.len*SectorSize, o.ver)
	default:
		return fmt.Sprintf("Replace([%d+%d), v%d, @%d, g%d)", o.off*SectorSize, o.len*SectorSize, o.ver, o.loc*SectorSize, o.gen)
	}
}

func (o op) extent() Extent {
	return Extent{Off: o.off * SectorSize, Len: o.len * SectorSize, Loc: o.loc * SectorSize, Ver: o.ver, Gen: o.gen, Dirty: o.dirty}
}

// checker runs ops on an Index and on the model and compares them.
type checker struct {
	t     testing.TB
	ix    *Index
	m     []slot
	step  int
	trace []string // recent ops, printed on failure
}

// newChecker models a device of the given size. Dirty regions of
// 1<<regionShift sectors: small ones, so that AscendDirty crosses many.
func newChecker(t testing.TB, sectors int, regionShift uint) *checker {
	return &checker{t: t, ix: newIndex(degree, regionShift), m: make([]slot, sectors)}
}

func (c *checker) fatalf(format string, args ...any) {
	c.t.Helper()
	start := max(0, len(c.trace)-20)
	msg := fmt.Sprintf(format, args...)
	c.t.Fatalf("step %d: %s\nlast ops:\n  %s", c.step, msg, joinLines(c.trace[start:]))
}

func joinLines(s []string) string {
	out := ""
	for i, l := range s {
		if i > 0 {
			out += "\n  "
		}
		out += l
	}
	return out
}

// apply runs o on both sides and compares the direct results (dropped
// pieces, counts).
func (c *checker) apply(o op) {
	c.t.Helper()
	c.step++
	if len(c.trace) == 64 {
		c.trace = append(c.trace[:0], c.trace[44:]...)
	}
	c.trace = append(c.trace, o.String())
	end := min(o.off+o.len, int64(len(c.m)))
	switch o.kind {
	case opInsert, opDelete:
		before := append([]slot(nil), c.m[o.off:end]...)
		var dropped []Extent
		collect := func(e Extent) { dropped = append(dropped, e) }
		if o.kind == opInsert {
			c.ix.Insert(o.extent(), collect)
			for i := o.off; i < end; i++ {
				c.m[i] = slot{true, o.loc + i - o.off, o.ver, o.gen, o.dirty}
			}
		} else {
			c.ix.Delete(o.off*SectorSize, o.len*SectorSize, collect)
			for i := o.off; i < end; i++ {
				c.m[i] = slot{}
			}
		}
		c.checkDropped(o, before, dropped)
	case opMarkClean:
		var want int64
		for i := o.off; i < end; i++ {
			if c.m[i].present && c.m[i].ver == o.ver {
				c.m[i].dirty = false
				want += SectorSize
			}
		}
		cleaned, collided := c.ix.MarkClean(o.off*SectorSize, o.len*SectorSize, o.ver)
		if cleaned != want || collided != o.len*SectorSize-want {
			c.fatalf("%v = (%d, %d), model says (%d, %d)", o, cleaned, collided, want, o.len*SectorSize-want)
		}
	case opReplace:
		var want int64
		for i := o.off; i < end; i++ {
			if c.m[i].present && c.m[i].ver == o.ver {
				c.m[i].loc = o.loc + i - o.off
				c.m[i].gen = o.gen
				want += SectorSize
			}
		}
		moved := c.ix.Replace(o.off*SectorSize, o.len*SectorSize, o.ver, o.loc*SectorSize, o.gen)
		if moved != want {
			c.fatalf("%v = %d, model says %d", o, moved, want)
		}
	}
}

// checkDropped verifies that the dropped pieces are, in ascending order
// and without overlap, exactly the sectors of the range that held data.
func (c *checker) checkDropped(o op, before []slot, dropped []Extent) {
	c.t.Helper()
	var want, got int64
	for _, s := range before {
		if s.present {
			want++
		}
	}
	prev := o.off * SectorSize
	for _, e := range dropped {
		if e.Off < prev || e.Len <= 0 || e.End() > (o.off+o.len)*SectorSize {
			c.fatalf("%v: dropped %v out of order, empty or outside the range", o, e)
		}
		prev = e.End()
		for b := e.Off; b < e.End(); b += SectorSize {
			s := before[b/SectorSize-o.off]
			w := slot{true, e.Loc/SectorSize + (b-e.Off)/SectorSize, e.Ver, e.Gen, e.Dirty}
			if s != w {
				c.fatalf("%v: dropped %v, but sector %d held %+v", o, e, b/SectorSize, s)
			}
			got++
		}
	}
	if got != want {
		c.fatalf("%v: dropped %d sectors, %d held data", o, got, want)
	}
}

// verify compares the whole state, through every read method, and runs
// Check. r supplies the random ranges; nil means fixed ones only.
func (c *checker) verify(r *rand.Rand) {
	c.t.Helper()
	if err := c.ix.Check(); err != nil {
		c.fatalf("Check: %v", err)
	}
	var bytes, dirty int64
	for _, s := range c.m {
		if s.present {
			bytes += SectorSize
			if s.dirty {
				dirty += SectorSize
			}
		}
	}
	if c.ix.Bytes() != bytes || c.ix.DirtyBytes() != dirty {
		c.fatalf("Bytes, DirtyBytes = %d, %d; model says %d, %d", c.ix.Bytes(), c.ix.DirtyBytes(), bytes, dirty)
	}
	n := int64(len(c.m))
	c.checkLookup(0, n)
	c.checkAscend(-1, false)
	c.checkAscend(-1, true)
	if r == nil {
		return
	}
	for range 3 {
		off := r.Int64N(n)
		c.checkLookup(off, r.Int64N(n-off)+1)
	}
	c.checkAscend(r.Int64N(n*SectorSize), false)
	c.checkAscend(r.Int64N(n*SectorSize), true)
}

// checkLookup compares Lookup of the sectors [off, off+length) with the
// model, sector by sector.
func (c *checker) checkLookup(off, length int64) {
	c.t.Helper()
	next := off // first sector not yet accounted for
	c.ix.Lookup(off*SectorSize, length*SectorSize, func(e Extent) bool {
		if e.Off%SectorSize != 0 || e.Len%SectorSize != 0 || e.Len <= 0 {
			c.fatalf("Lookup([%d+%d)) reported %v", off*SectorSize, length*SectorSize, e)
		}
		s, t := e.Off/SectorSize, e.End()/SectorSize
		if s < next || t > off+length {
			c.fatalf("Lookup([%d+%d)) reported %v: out of order or not clipped", off*SectorSize, length*SectorSize, e)
		}
		for i := next; i < s; i++ {
			if c.m[i].present {
				c.fatalf("Lookup([%d+%d)) skipped sector %d holding %+v", off*SectorSize, length*SectorSize, i, c.m[i])
			}
		}
		for i := s; i < t; i++ {
			w := slot{true, e.Loc/SectorSize + i - s, e.Ver, e.Gen, e.Dirty}
			if c.m[i] != w {
				c.fatalf("Lookup([%d+%d)) reported %v, but sector %d holds %+v", off*SectorSize, length*SectorSize, e, i, c.m[i])
			}
		}
		next = t
		return true
	})
	for i := next; i < off+length; i++ {
		if c.m[i].present {
			c.fatalf("Lookup([%d+%d)) missed sector %d holding %+v", off*SectorSize, length*SectorSize, i, c.m[i])
		}
	}
}

// checkAscend compares Ascend (or AscendDirty) from byte offset from with
// the model: whole extents, ascending, matching the model, and covering
// every (dirty) sector after from.
func (c *checker) checkAscend(from int64, dirtyOnly bool) {
	c.t.Helper()
	name := "Ascend"
	walk := c.ix.Ascend
	if dirtyOnly {
		name, walk = "AscendDirty", c.ix.AscendDirty
	}
	wanted := func(s slot) bool { return s.present && (s.dirty || !dirtyOnly) }
	next := max(from, 0) / SectorSize // first sector not yet accounted for
	first := true
	walk(from, func(e Extent) bool {
		if e.End() <= from || e.Len <= 0 {
			c.fatalf("%s(%d) reported %v", name, from, e)
		}
		s, t := e.Off/SectorSize, e.End()/SectorSize
		if !first && s < next || first && t <= next {
			c.fatalf("%s(%d) reported %v out of order", name, from, e)
		}
		first = false
		for i := next; i < s; i++ {
			if wanted(c.m[i]) {
				c.fatalf("%s(%d) skipped sector %d holding %+v", name, from, i, c.m[i])
			}
		}
		for i := s; i < t; i++ {
			w := slot{true, e.Loc/SectorSize + i - s, e.Ver, e.Gen, e.Dirty}
			if c.m[i] != w || !wanted(w) {
				c.fatalf("%s(%d) reported %v, but sector %d holds %+v", name, from, e, i, c.m[i])
			}
		}
		next = t
		return true
	})
	for i := next; i < int64(len(c.m)); i++ {
		if wanted(c.m[i]) {
			c.fatalf("%s(%d) missed sector %d holding %+v", name, from, i, c.m[i])
		}
	}
}

// config shapes one run of random operations.
type config struct {
	name    string
	sectors int   // size of the virtual device
	maxLen  int64 // longest op, sectors
	wide    int   // one op in wide spans up to the whole device
	locs    int64 // size of the cache device, sectors
}

var configs = []config{
	{"tiny", 64, 16, 8, 256},
	{"small", 512, 24, 8, 4096},
	{"wide", 4096, 600, 8, 1 << 20},
	// Thousands of small extents and rare wide ops that cross many
	// batches of items (batch = 64).
	{"fragmented", 8192, 3, 200, 1 << 20},
}

// randomOp draws an op. CAS versions are usually taken from the data in
// the range, so that they match; sometimes from elsewhere, so they miss.
func (c *checker) randomOp(r *rand.Rand, cfg config, nextVer *uint64) op {
	n := int64(cfg.sectors)
	l := r.Int64N(cfg.maxLen) + 1
	if r.IntN(cfg.wide) == 0 {
		l = r.Int64N(n) + 1 // now and then a wide one
	}
	off := r.Int64N(n)
	l = min(l, n-off)
	// Weights: Insert 40%, Delete 10%, MarkClean 30%, Replace 20%.
	kind := [10]opKind{0, 0, 0, 0, 1, 2, 2, 2, 3, 3}[r.IntN(10)]
	o := op{kind: kind, off: off, len: l, gen: uint8(r.IntN(4))}
	switch o.kind {
	case opInsert:
		*nextVer++
		o.ver = *nextVer
		o.loc = r.Int64N(cfg.locs - l)
		o.dirty = r.IntN(4) != 0
	case opMarkClean, opReplace:
		s := c.m[off+r.Int64N(l)]
		if s.present && r.IntN(5) != 0 {
			o.ver = s.ver
		} else {
			o.ver = r.Uint64N(*nextVer + 1)
		}
		o.loc = r.Int64N(cfg.locs - l)
		if r.IntN(2) == 0 && s.present {
			// Move to where it already is, shifted: exercises merges.
			o.loc = max(0, s.loc-r.Int64N(l))
		}
	}
	return o
}

// TestModel runs thousands of random operations against the Index and a
// per-sector model, comparing every read method after each step. Replay a
// failure with the seed it logs (package testseed).
func TestModel(t *testing.T) {
	seed := testseed.Get(t)
	for i, cfg := range configs {
		t.Run(cfg.name, func(t *testing.T) {
			r := rand.New(rand.NewPCG(seed, uint64(i)))
			shift := uint(r.IntN(8))
			t.Logf("regions of %d sectors", 1<<shift)
			c := newChecker(t, cfg.sectors, shift)
			var nextVer uint64
			for range *opsFlag {
				c.apply(c.randomOp(r, cfg, &nextVer))
				c.verify(r)
			}
			t.Logf("%s: %d extents, %d bytes, %d dirty at the end", cfg.name, c.ix.Len(), c.ix.Bytes(), c.ix.DirtyBytes())
		})
	}
}

// decodeOps turns fuzz input into operations on a 320-sector device, six
// bytes per operation, at most maxFuzzOps of them (longer inputs only slow
// the fuzzer down).
func decodeOps(data []byte) []op {
	var ops []op
	var ver uint64
	for ; len(data) >= 6 && len(ops) < maxFuzzOps; data = data[6:] {
		o := op{
			kind:  opKind(data[0] % uint8(numOps)),
			off:   int64(data[1]),
			len:   int64(data[2]%64) + 1,
			gen:   data[3] & 3,
			loc:   int64(data[4]) * 3,
			dirty: data[5]&1 == 0,
		}
		switch o.kind {
		case opInsert:
			ver++
			o.ver = ver
		default:
			o.ver = uint64(data[5] >> 1 % 32) // small versions: often a match
		}
		ops = append(ops, o)
	}
	return ops
}

const (
	fuzzSectors = 256 + 64
	maxFuzzOps  = 100
)

func FuzzIndexOps(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte) {
		c := newChecker(t, fuzzSectors, 3)
		for _, o := range decodeOps(data) {
			c.apply(o)
			c.verify(nil)
			c.checkLookup(o.off, o.len)
		}
	})
}
