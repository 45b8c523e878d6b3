package storage

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/nbdcache/nbdcache/test/testseed"
)

// volatileModel predicts what a cut may leave, per 512-byte sector. The
// test drives unaligned requests too, so a sector's versions are whole
// sector images: hist[s][0] is its durable content, then one image per
// unsynced request that touched it, in order.
type volatileModel struct {
	cur  []byte
	hist [][]string
	// unsynced requests and their bytes, as the device logs them
	entries int
	bytes   int64
}

func newVolatileModel(img []byte) *volatileModel {
	m := &volatileModel{cur: bytes.Clone(img), hist: make([][]string, len(img)/SectorSize)}
	for s := range m.hist {
		m.hist[s] = []string{m.sector(int64(s))}
	}
	return m
}

func (m *volatileModel) sector(s int64) string {
	return string(m.cur[s*SectorSize : (s+1)*SectorSize])
}

// apply records a write (p != nil) or a zeroing of [off, off+n).
func (m *volatileModel) apply(p []byte, off, n int64, fua bool) {
	if n == 0 {
		return
	}
	if p != nil {
		copy(m.cur[off:], p)
	} else {
		clear(m.cur[off : off+n])
	}
	for s := off / SectorSize; s <= (off+n-1)/SectorSize; s++ {
		if fua {
			m.hist[s] = []string{m.sector(s)}
		} else {
			m.hist[s] = append(m.hist[s], m.sector(s))
		}
	}
	if !fua {
		m.entries++
		m.bytes += n
	}
}

func (m *volatileModel) flush() {
	for s := range m.hist {
		m.hist[s] = []string{m.sector(int64(s))}
	}
	m.entries, m.bytes = 0, 0
}

// check compares the device after a cut with the model.
func (m *volatileModel) check(got []byte, model LossModel, rep VolatileReport) error {
	if rep.Entries != m.entries {
		return fmt.Errorf("report has %d entries, model %d", rep.Entries, m.entries)
	}
	if rep.BytesDropped+rep.BytesKept != m.bytes {
		return fmt.Errorf("report: %d bytes dropped + %d kept, model logged %d", rep.BytesDropped, rep.BytesKept, m.bytes)
	}
	if rep.Dropped+rep.Kept+rep.Partial != rep.Entries {
		return fmt.Errorf("report: %d dropped + %d kept + %d partial != %d entries", rep.Dropped, rep.Kept, rep.Partial, rep.Entries)
	}
	if model != LoseTorn && (rep.Torn || rep.Garbage) {
		return fmt.Errorf("%v tore: %+v", model, rep.Tear)
	}
	// Undone: sorted, disjoint, no more than was dropped; a sector outside
	// it (and not the garbage sector) holds its newest content.
	undone := make(map[int64]bool)
	var undoneBytes int64
	for i, r := range rep.Undone {
		if r.Len <= 0 || (i > 0 && r.Off <= rep.Undone[i-1].Off+rep.Undone[i-1].Len) {
			return fmt.Errorf("undone ranges not sorted and merged: %v", rep.Undone)
		}
		undoneBytes += r.Len
		for s := r.Off / SectorSize; s*SectorSize < r.Off+r.Len; s++ {
			undone[s] = true
		}
	}
	if undoneBytes > rep.BytesDropped || (undoneBytes == 0) != (rep.BytesDropped == 0) {
		return fmt.Errorf("undone ranges hold %d bytes, %d were dropped", undoneBytes, rep.BytesDropped)
	}
	if rep.Garbage {
		undone[rep.GarbageOff/SectorSize] = true
	}
	for s := range m.hist {
		if h := m.hist[s]; !undone[int64(s)] && string(got[s*SectorSize:(s+1)*SectorSize]) != h[len(h)-1] {
			return fmt.Errorf("sector %d is outside the undone ranges but not its newest content", s)
		}
	}
	for s := range m.hist {
		sec := string(got[s*SectorSize : (s+1)*SectorSize])
		h := m.hist[s]
		switch model {
		case LoseUnsynced:
			if sec != h[0] {
				return fmt.Errorf("sector %d is not its durable content (%d unsynced versions)", s, len(h)-1)
			}
			continue
		case KeepUnsynced:
			if sec != h[len(h)-1] {
				return fmt.Errorf("sector %d is not its newest content", s)
			}
			continue
		}
		if slices.Contains(h, sec) {
			continue
		}
		if len(h) > 1 && rep.Garbage && rep.GarbageOff == int64(s)*SectorSize {
			continue
		}
		return fmt.Errorf("sector %d holds none of its %d versions (%+v)", s, len(h), rep.Tear)
	}
	return nil
}

// volatileOps runs n random requests, unaligned ones included.
func volatileOps(t *testing.T, rng *rand.Rand, d Device, m *volatileModel, n int, tag uint64) {
	t.Helper()
	size := d.Size()
	driveOps(t, rng, d, m, n, tag, func() (off, length int64) {
		if rng.IntN(3) == 0 {
			off = rng.Int64N(size)
			return off, 1 + rng.Int64N(min(size-off, 3000))
		}
		off = rng.Int64N(size/SectorSize) * SectorSize
		return off, min(size-off, (1+rng.Int64N(16))*SectorSize)
	}, 0)
}

// TestVolatileModels runs chains of random requests and power cuts under
// every loss model, on a Mem, and checks every sector and the report
// against the model.
func TestVolatileModels(t *testing.T) {
	rounds := 300
	if *longFlag {
		rounds = 5000
	}
	for _, model := range []LossModel{LoseUnsynced, LoseRandom, LoseTorn, KeepUnsynced} {
		t.Run(model.String(), func(t *testing.T) {
			seed := testseed.Get(t)
			rng := newRand(seed)
			mem := NewMem(128 * SectorSize)
			var total VolatileReport
			torn, garbage := 0, 0
			for round := range rounds {
				v := NewVolatile(mem, VolatileOptions{})
				m := newVolatileModel(readAll(t, mem))
				volatileOps(t, rng, v, m, 1+rng.IntN(60), uint64(round))
				rep, err := v.Cut(model, rng)
				if err != nil {
					t.Fatalf("round %d: cut: %v", round, err)
				}
				if err := m.check(readAll(t, mem), model, rep); err != nil {
					t.Fatalf("round %d: %v", round, err)
				}
				if err := v.ReadAt(make([]byte, 1), 0); !errors.Is(err, ErrPoweredOff) {
					t.Fatalf("round %d: a read after the cut: %v", round, err)
				}
				total.BytesKept += rep.BytesKept
				total.BytesDropped += rep.BytesDropped
				total.Partial += rep.Partial
				if rep.Torn {
					torn++
				}
				if rep.Garbage {
					garbage++
				}
			}
			t.Logf("%v over %d cuts: %d bytes kept, %d dropped, %d partial entries, %d torn writes, %d garbage sectors",
				model, rounds, total.BytesKept, total.BytesDropped, total.Partial, torn, garbage)
			// The models must do what they say, not merely stay within
			// the bounds.
			switch model {
			case LoseRandom, LoseTorn:
				if total.BytesKept == 0 || total.BytesDropped == 0 || total.Partial == 0 {
					t.Errorf("%v never kept, dropped or split anything", model)
				}
			case LoseUnsynced:
				// Kept bytes are those a later FUA write covered.
				if total.BytesDropped == 0 {
					t.Errorf("LoseUnsynced dropped nothing")
				}
			case KeepUnsynced:
				if total.BytesDropped != 0 {
					t.Errorf("KeepUnsynced dropped %d bytes", total.BytesDropped)
				}
			}
			if model == LoseTorn && (torn == 0 || garbage == 0) {
				t.Errorf("LoseTorn never tore (%d) or garbled (%d)", torn, garbage)
			}
		})
	}
}

// TestVolatileReplay: one seed gives one outcome.
func TestVolatileReplay(t *testing.T) {
	seed := testseed.Get(t)
	run := func() ([]byte, VolatileReport) {
		rng := newRand(seed)
		mem := NewMem(64 * SectorSize)
		v := NewVolatile(mem, VolatileOptions{})
		volatileOps(t, rng, v, newVolatileModel(make([]byte, mem.Size())), 80, 1)
		rep, err := v.Cut(LoseTorn, rng)
		if err != nil {
			t.Fatal(err)
		}
		return readAll(t, mem), rep
	}
	a, ra := run()
	b, rb := run()
	if !bytes.Equal(a, b) || fmt.Sprint(ra) != fmt.Sprint(rb) {
		t.Fatalf("two runs of seed %d differ: %+v / %+v", seed, ra, rb)
	}
}

// TestVolatileFUAPin: a FUA write survives every model, even over older
// unsynced writes to the same sectors, and later unsynced writes over it
// fall back to it, not past it.
func TestVolatileFUAPin(t *testing.T) {
	for _, model := range []LossModel{LoseUnsynced, LoseRandom, LoseTorn} {
		for seed := range uint64(20) {
			mem := NewMem(16 * SectorSize)
			v := NewVolatile(mem, VolatileOptions{})
			a, b, c := fill(4096, 1), fill(4096, 2), fill(4096, 3)
			must(t, v.WriteAt(a, 0, 0))
			must(t, v.WriteAt(b, 0, FUA))
			must(t, v.WriteAt(c, 0, 0))
			if _, err := v.Cut(model, newRand(seed)); err != nil {
				t.Fatal(err)
			}
			got := readAll(t, mem)[:4096]
			for s := 0; s < 4096; s += SectorSize {
				sec := got[s : s+SectorSize]
				if !bytes.Equal(sec, b[s:s+SectorSize]) && !bytes.Equal(sec, c[s:s+SectorSize]) && model != LoseTorn {
					t.Fatalf("%v seed %d: sector %d is neither the FUA write nor the newer one", model, seed, s/SectorSize)
				}
				if model == LoseUnsynced && !bytes.Equal(sec, b[s:s+SectorSize]) {
					t.Fatalf("unflushed: sector %d is not the FUA write", s/SectorSize)
				}
			}
		}
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// TestVolatileBoundedLog: past MaxUndo the wrapper flushes early; a
// request longer than MaxUndo is written through. Either survives a cut.
func TestVolatileBoundedLog(t *testing.T) {
	mem := NewMem(64 << 10)
	v := NewVolatile(mem, VolatileOptions{MaxUndo: 8 << 10})
	first := fill(4096, 1)
	must(t, v.WriteAt(first, 0, 0))
	must(t, v.WriteAt(fill(4096, 2), 4096, 0))
	if st := v.Stats(); st.UnsyncedEntries != 2 || st.UnsyncedBytes != 8192 || st.Overflows != 0 {
		t.Fatalf("after 8 KiB: %+v", st)
	}
	third := fill(4096, 3)
	must(t, v.WriteAt(third, 8192, 0)) // overflows: the first two become durable
	if st := v.Stats(); st.UnsyncedEntries != 1 || st.Overflows != 1 {
		t.Fatalf("after the overflow: %+v", st)
	}
	big := fill(16<<10, 4)
	must(t, v.WriteAt(big, 32<<10, 0)) // longer than the log: written through
	if st := v.Stats(); st.UnsyncedEntries != 0 || st.WriteThrough != 1 {
		t.Fatalf("after the long write: %+v", st)
	}
	last := fill(4096, 5)
	must(t, v.WriteAt(last, 8192, 0))
	rep, err := v.Cut(LoseUnsynced, nil)
	if err != nil {
		t.Fatal(err)
	}
	got := readAll(t, mem)
	want := make([]byte, 64<<10)
	copy(want, first)
	copy(want[4096:], fill(4096, 2))
	copy(want[8192:], third)
	copy(want[32<<10:], big)
	if !bytes.Equal(got, want) {
		t.Fatalf("after the cut: %s", firstDiff(got, want))
	}
	if rep.Entries != 1 || rep.Dropped != 1 || rep.Overflows != 1 || rep.WriteThrough != 1 {
		t.Fatalf("report %+v", rep)
	}
}

// TestVolatileFlushDuringWrites: writes that complete while a Flush runs
// stay undoable; writes that completed before it began do not.
func TestVolatileFlushDuringWrites(t *testing.T) {
	inner := &gatedFlush{Device: NewMem(1 << 20), started: make(chan struct{}), release: make(chan struct{})}
	v := NewVolatile(inner, VolatileOptions{})
	before := fill(4096, 1)
	must(t, v.WriteAt(before, 0, 0))
	done := make(chan error)
	go func() { done <- v.Flush() }()
	<-inner.started
	during := fill(4096, 2)
	must(t, v.WriteAt(during, 4096, 0))
	close(inner.release)
	must(t, <-done)
	if _, err := v.Cut(LoseUnsynced, nil); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 8192)
	must(t, inner.Device.ReadAt(got, 0))
	if !bytes.Equal(got[:4096], before) {
		t.Fatal("a write made before the flush was lost")
	}
	if !bytes.Equal(got[4096:], make([]byte, 4096)) {
		t.Fatal("a write made during the flush survived the unflushed model")
	}
}

// gatedFlush holds its first Flush until release is closed. It embeds
// Device on purpose: it is a test fixture, not a wrapper.
type gatedFlush struct {
	Device
	once             sync.Once
	started, release chan struct{}
}

func (g *gatedFlush) Flush() error {
	first := false
	g.once.Do(func() { first = true })
	if first {
		close(g.started)
		<-g.release
	}
	return g.Device.Flush()
}

// TestVolatileConcurrentCut cuts the power under concurrent writers,
// flushers and readers. Each writer owns one block and writes numbered
// versions; after the cut the block must hold a version no older than
// the last one its own completed Flush covered, and every call after the
// cut fails with ErrPoweredOff.
func TestVolatileConcurrentCut(t *testing.T) {
	seed := testseed.Get(t)
	for round := range 20 {
		rng := newRand(seed + uint64(round))
		const writers, bs = 8, 4096
		mem := NewMem(writers * bs)
		v := NewVolatile(mem, VolatileOptions{})
		var durable [writers]atomic.Int64
		var wg sync.WaitGroup
		var cut atomic.Bool
		for w := range writers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				r := newRand(seed ^ uint64(w+1))
				for ver := int64(1); ; ver++ {
					p := make([]byte, bs)
					for i := 0; i < bs; i += 8 {
						p[i] = byte(ver)
						p[i+1] = byte(ver >> 8)
					}
					flags := Flags(0)
					if r.IntN(10) == 0 {
						flags = FUA
					}
					if err := v.WriteAt(p, int64(w)*bs, flags); err != nil {
						if !errors.Is(err, ErrPoweredOff) || !cut.Load() {
							t.Errorf("write: %v", err)
						}
						return
					}
					if flags == FUA {
						durable[w].Store(ver)
					}
					if r.IntN(4) == 0 {
						if err := v.Flush(); err != nil {
							if !errors.Is(err, ErrPoweredOff) {
								t.Errorf("flush: %v", err)
							}
							return
						}
						durable[w].Store(ver)
					}
				}
			}()
		}
		for range 100 + rng.IntN(2000) {
			if err := v.ReadAt(make([]byte, 512), rng.Int64N(writers*bs/512)*512); err != nil {
				t.Fatal(err)
			}
		}
		cut.Store(true)
		model := []LossModel{LoseUnsynced, LoseRandom, LoseTorn}[round%3]
		if _, err := v.Cut(model, rng); err != nil {
			t.Fatal(err)
		}
		wg.Wait()
		img := readAll(t, mem)
		for w := range writers {
			blk := img[w*bs : (w+1)*bs]
			// The torn model may garble sectors of the newest versions;
			// it never reaches a durable sector, so read the first one
			// that holds a whole version.
			min := durable[w].Load()
			for s := 0; s < bs; s += SectorSize {
				ver := int64(blk[s]) | int64(blk[s+1])<<8
				if ver < min && model != LoseTorn {
					t.Fatalf("round %d (%v): block %d sector %d holds version %d, older than durable %d", round, model, w, s/SectorSize, ver, min)
				}
				if ver < min && model == LoseTorn && ver != 0 {
					t.Fatalf("round %d (torn): block %d sector %d holds version %d, older than durable %d", round, w, s/SectorSize, ver, min)
				}
			}
		}
		if err := v.Flush(); !errors.Is(err, ErrPoweredOff) {
			t.Fatalf("flush after the cut: %v", err)
		}
		if _, err := v.Cut(LoseUnsynced, nil); !errors.Is(err, ErrAlreadyCut) {
			t.Fatalf("second cut: %v", err)
		}
	}
}

// TestVolatileCutAll: two devices cut at one instant; a write that
// reached the second device after the first was cut is impossible.
func TestVolatileCutAll(t *testing.T) {
	a, b := NewMem(1<<16), NewMem(1<<16)
	va, vb := NewVolatile(a, VolatileOptions{}), NewVolatile(b, VolatileOptions{})
	must(t, va.WriteAt(fill(4096, 1), 0, 0))
	must(t, vb.WriteAt(fill(4096, 2), 0, 0))
	must(t, vb.Flush())
	reps, err := CutVolatile(LoseUnsynced, nil, va, vb)
	if err != nil {
		t.Fatal(err)
	}
	if reps[0].Dropped != 1 || reps[1].Entries != 0 {
		t.Fatalf("reports %+v", reps)
	}
	if !bytes.Equal(readAll(t, a), make([]byte, 1<<16)) {
		t.Fatal("the unflushed write to a survived")
	}
	if got := readAll(t, b); !bytes.Equal(got[:4096], fill(4096, 2)) {
		t.Fatal("the flushed write to b was lost")
	}
	for _, v := range []*Volatile{va, vb} {
		if err := v.WriteAt(make([]byte, 1), 0, 0); !errors.Is(err, ErrPoweredOff) {
			t.Fatalf("write after the cut: %v", err)
		}
	}
}

// TestVolatileFile: over a real file, the cut leaves the file itself,
// reopened, holding the durable image.
func TestVolatileFile(t *testing.T) {
	seed := testseed.Get(t)
	rng := newRand(seed)
	path := filepath.Join(t.TempDir(), "dev.img")
	const size = 256 << 10
	for round, model := range []LossModel{LoseUnsynced, LoseRandom, LoseTorn, KeepUnsynced} {
		f, err := OpenFile(path, FileOptions{Size: size})
		if err != nil {
			t.Fatal(err)
		}
		m := newVolatileModel(readAll(t, f))
		v := NewVolatile(f, VolatileOptions{})
		volatileOps(t, rng, v, m, 200, uint64(round))
		rep, err := v.Cut(model, rng)
		if err != nil {
			t.Fatal(err)
		}
		if err := v.Close(); err != nil {
			t.Fatal(err)
		}
		got := readAll(t, f) // Close after a cut leaves the file open
		f.Close()
		g, err := OpenFile(path, FileOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if again := readAll(t, g); !bytes.Equal(again, got) {
			t.Fatalf("%v: the reopened file differs", model)
		}
		g.Close()
		if err := m.check(got, model, rep); err != nil {
			t.Fatalf("%v: %v", model, err)
		}
	}
}

// TestVolatileFlushInFlightAtCut: a Flush that has not returned when the
// power fails covers nothing, even if the wrapped device finishes it.
func TestVolatileFlushInFlightAtCut(t *testing.T) {
	inner := &gatedFlush{Device: NewMem(1 << 20), started: make(chan struct{}), release: make(chan struct{})}
	v := NewVolatile(inner, VolatileOptions{})
	must(t, v.WriteAt(fill(4096, 1), 0, 0))
	flushed := make(chan error)
	go func() { flushed <- v.Flush() }()
	<-inner.started
	cut := make(chan error)
	go func() {
		_, err := v.Cut(LoseUnsynced, nil)
		cut <- err
	}()
	for !v.Stats().PoweredOff { // the cut marks the device dead, then waits for the flush
		runtime.Gosched()
	}
	close(inner.release)
	if err := <-flushed; !errors.Is(err, ErrPoweredOff) {
		t.Fatalf("flush in flight at the cut: %v, want ErrPoweredOff", err)
	}
	must(t, <-cut)
	got := make([]byte, 4096)
	must(t, inner.Device.ReadAt(got, 0))
	if !bytes.Equal(got, make([]byte, 4096)) {
		t.Fatal("a write covered only by a flush in flight survived the unflushed model")
	}
}
