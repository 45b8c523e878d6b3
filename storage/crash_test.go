package storage

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"

	"github.com/nbdcache/nbdcache/test/testseed"
)

// crashModel predicts, per sector, what a power cut may leave. The test
// drives sector-aligned operations only, so a sector's content after a cut
// is exactly one candidate.
type crashModel struct {
	visible []byte
	durable []byte     // exact result of LoseUnsynced
	cands   [][]string // per sector: contents a cut may leave
	touched []bool     // a non-FUA write touched the sector since the last flush
	// the unsynced log, as the device keeps it
	logOps, logForced int
	logBytes          int64 // bytes of non-forced records
}

func newCrashModel(img []byte) *crashModel {
	m := &crashModel{visible: bytes.Clone(img), durable: bytes.Clone(img)}
	n := len(img) / SectorSize
	m.cands = make([][]string, n)
	m.touched = make([]bool, n)
	for s := range n {
		m.cands[s] = []string{string(img[s*SectorSize : (s+1)*SectorSize])}
	}
	return m
}

// apply records a write (p != nil) or a zeroing of [off, off+length).
func (m *crashModel) apply(p []byte, off, length int64, fua bool) {
	if p != nil {
		copy(m.visible[off:], p)
	} else {
		clear(m.visible[off : off+length])
	}
	if length == 0 {
		return
	}
	switch {
	case fua && m.logOps == 0:
		// applied to the durable image directly
	case fua:
		m.logOps++
		m.logForced++
	default:
		m.logOps++
		m.logBytes += length
	}
	if fua {
		copy(m.durable[off:off+length], m.visible[off:off+length])
	}
	for s := off / SectorSize; s < (off+length)/SectorSize; s++ {
		v := string(m.visible[s*SectorSize : (s+1)*SectorSize])
		if fua {
			m.cands[s] = []string{v}
		} else {
			m.cands[s] = append(m.cands[s], v)
			if p != nil {
				m.touched[s] = true
			}
		}
	}
}

func (m *crashModel) flush() {
	copy(m.durable, m.visible)
	for s := range m.cands {
		m.cands[s] = []string{string(m.visible[s*SectorSize : (s+1)*SectorSize])}
		m.touched[s] = false
	}
	m.logOps, m.logForced, m.logBytes = 0, 0, 0
}

// check verifies a cut's result and report against the model.
func (m *crashModel) check(got []byte, rep CutReport) error {
	if rep.Ops != m.logOps || rep.Forced != m.logForced {
		return fmt.Errorf("report counts %d ops, %d forced; model %d, %d", rep.Ops, rep.Forced, m.logOps, m.logForced)
	}
	if n := rep.OpsKept + rep.OpsPartial + rep.OpsDropped; n != rep.Ops-rep.Forced {
		return fmt.Errorf("report: kept+partial+dropped = %d, want %d", n, rep.Ops-rep.Forced)
	}
	if b := rep.BytesKept + rep.BytesDropped; b != m.logBytes {
		return fmt.Errorf("report: %d bytes kept+dropped, model logged %d", b, m.logBytes)
	}
	switch rep.Model {
	case LoseUnsynced:
		if !bytes.Equal(got, m.durable) {
			return fmt.Errorf("LoseUnsynced: not the durable image: %s", firstDiff(got, m.durable))
		}
		// Kept bytes are the sectors a later FUA op covered (pinned).
		if rep.Torn || rep.Garbage {
			return fmt.Errorf("LoseUnsynced tore: %+v", rep)
		}
	case KeepUnsynced:
		if !bytes.Equal(got, m.visible) {
			return fmt.Errorf("KeepUnsynced: not the visible image: %s", firstDiff(got, m.visible))
		}
	}
	if (rep.Torn || rep.Garbage) && rep.Model != LoseTorn {
		return fmt.Errorf("model %v tore or garbled: %+v", rep.Model, rep)
	}
	return m.checkSectors(got, rep)
}

// checkSectors verifies that every sector holds one of its candidates, or
// is LoseTorn's garbage sector in a place an unsynced write touched.
func (m *crashModel) checkSectors(got []byte, rep CutReport) error {
	for s := range m.cands {
		v := string(got[s*SectorSize : (s+1)*SectorSize])
		if slices.Contains(m.cands[s], v) {
			continue
		}
		if rep.Garbage && rep.GarbageOff == int64(s)*SectorSize {
			if !m.touched[s] {
				return fmt.Errorf("garbage in sector %d, which no unsynced write touched", s)
			}
			continue
		}
		return fmt.Errorf("sector %d holds data it never received (%d candidates; report %+v)", s, len(m.cands[s]), rep)
	}
	return nil
}

// opModel is what driveOps keeps in step with the device: a model of the
// writes it received and of which are synced.
type opModel interface {
	apply(p []byte, off, length int64, fua bool)
	flush()
}

// driveOps runs n random requests on d and m: writes, trims, zeroes
// (with zeroFlags added) and flushes, FUA now and then, over the ranges
// pick draws.
func driveOps(t *testing.T, rng *rand.Rand, d Device, m opModel, n int, tag uint64, pick func() (off, length int64), zeroFlags Flags) {
	t.Helper()
	for i := range n {
		off, length := pick()
		fua := rng.IntN(8) == 0
		var flags Flags
		if fua {
			flags = FUA
		}
		var err error
		switch k := rng.IntN(20); {
		case k < 14:
			p := fill(int(length), tag<<20|uint64(i))
			err = d.WriteAt(p, off, flags)
			m.apply(p, off, length, fua)
		case k < 16:
			err = d.Trim(off, length, flags)
			m.apply(nil, off, length, fua)
		case k < 18:
			err = d.Zero(off, length, flags|zeroFlags)
			m.apply(nil, off, length, fua)
		default:
			err = d.Flush()
			m.flush()
		}
		if err != nil {
			t.Fatalf("op %d: %v", i, err)
		}
	}
}

// randomOps drives n random sector-aligned operations on d and the model.
func randomOps(t *testing.T, rng *rand.Rand, d *Crash, m *crashModel, n int, tag uint64) {
	t.Helper()
	sectors := d.Size() / SectorSize
	driveOps(t, rng, d, m, n, tag, func() (int64, int64) {
		s := rng.Int64N(sectors)
		cnt := 1 + rng.Int64N(min(sectors-s, 24))
		if rng.IntN(8) == 0 {
			cnt = 1 + rng.Int64N(sectors-s) // now and then a long one
		}
		return s * SectorSize, cnt * SectorSize
	}, NoHole)
}

// TestCrashModels runs chains of random operations and power cuts under
// every loss model and checks every sector against the model.
func TestCrashModels(t *testing.T) {
	rounds := 300
	if *longFlag {
		rounds = 5000
	}
	for _, model := range []LossModel{LoseUnsynced, LoseRandom, LoseTorn, KeepUnsynced} {
		t.Run(model.String(), func(t *testing.T) {
			seed := testseed.Get(t)
			rng := newRand(seed)
			d := NewCrash(256 * SectorSize)
			m := newCrashModel(make([]byte, d.Size()))
			var total CutReport
			for round := range rounds {
				randomOps(t, rng, d, m, 1+rng.IntN(60), uint64(round))
				nd, rep := d.PowerCut(model, rng)
				got := readAll(t, nd)
				if err := m.check(got, rep); err != nil {
					t.Fatalf("round %d: %v", round, err)
				}
				if err := d.ReadAt(make([]byte, 1), 0); !errors.Is(err, ErrPoweredOff) {
					t.Fatalf("round %d: old device still reads: %v", round, err)
				}
				total.BytesKept += rep.BytesKept
				total.BytesDropped += rep.BytesDropped
				total.OpsPartial += rep.OpsPartial
				if rep.Torn {
					total.OpsKept++ // count of torn cuts
				}
				if rep.Garbage {
					total.OpsDropped++ // count of garbage cuts
				}
				d, m = nd, newCrashModel(got)
			}
			t.Logf("%v over %d cuts: %d bytes kept, %d dropped, %d partial ops, %d torn, %d garbage",
				model, rounds, total.BytesKept, total.BytesDropped, total.OpsPartial, total.OpsKept, total.OpsDropped)
			// The models must do what they say, not merely stay within
			// the bounds.
			switch model {
			case LoseRandom, LoseTorn:
				if total.BytesKept == 0 || total.BytesDropped == 0 || total.OpsPartial == 0 {
					t.Errorf("%v never kept, dropped or split anything", model)
				}
			case KeepUnsynced:
				if total.BytesDropped != 0 {
					t.Errorf("KeepUnsynced dropped %d bytes", total.BytesDropped)
				}
			}
			if model == LoseTorn && (total.OpsKept == 0 || total.OpsDropped == 0) {
				t.Errorf("LoseTorn never tore (%d) or garbled (%d)", total.OpsKept, total.OpsDropped)
			}
		})
	}
}

// TestCrashReplay checks that one seed gives one outcome.
func TestCrashReplay(t *testing.T) {
	seed := testseed.Get(t)
	run := func() ([]byte, CutReport) {
		rng := newRand(seed)
		d := NewCrash(128 * SectorSize)
		randomOps(t, rng, d, newCrashModel(make([]byte, d.Size())), 80, 1)
		nd, rep := d.PowerCut(LoseTorn, rng)
		return readAll(t, nd), rep
	}
	img1, rep1 := run()
	img2, rep2 := run()
	if rep1 != rep2 || !bytes.Equal(img1, img2) {
		t.Fatalf("same seed, different cut: %+v vs %+v", rep1, rep2)
	}
}

// TestCrashUnaligned checks that an unaligned write survives or dies per
// sector piece: each piece is all old or all new.
func TestCrashUnaligned(t *testing.T) {
	seed := testseed.Get(t)
	rng := newRand(seed)
	for round := range 200 {
		d := NewCrash(16 * SectorSize)
		old := fill(int(d.Size()), uint64(round))
		if err := d.WriteAt(old, 0, 0); err != nil {
			t.Fatal(err)
		}
		if err := d.Flush(); err != nil {
			t.Fatal(err)
		}
		off := rng.Int64N(d.Size() - 1)
		p := fill(int(1+rng.Int64N(d.Size()-off-1)), uint64(round)+1000)
		for i := range p {
			// Every new byte differs from the old one, so that a piece
			// reads back as exactly one of them (a 1-byte piece equal to
			// its old byte was counted kept while the report said dropped).
			if p[i] == old[off+int64(i)] {
				p[i] ^= 0xff
			}
		}
		if err := d.WriteAt(p, off, 0); err != nil {
			t.Fatal(err)
		}
		nd, rep := d.PowerCut(LoseRandom, rng)
		got := readAll(t, nd)
		end := off + int64(len(p))
		kept := int64(0)
		for s := off / SectorSize; s*SectorSize < end; s++ {
			from, to := max(off, s*SectorSize), min(end, (s+1)*SectorSize)
			switch {
			case bytes.Equal(got[from:to], p[from-off:to-off]):
				kept += to - from
			case bytes.Equal(got[from:to], old[from:to]):
			default:
				t.Fatalf("round %d: sector %d piece [%d,%d) mixes old and new", round, s, from, to)
			}
		}
		if !bytes.Equal(got[:off], old[:off]) || !bytes.Equal(got[end:], old[end:]) {
			t.Fatalf("round %d: bytes outside the write changed", round)
		}
		if kept != rep.BytesKept {
			t.Fatalf("round %d: %d bytes kept, report says %d", round, kept, rep.BytesKept)
		}
	}
}

// TestCrashPoweredOff checks that the old device refuses everything and
// that the new one is independent and fresh.
func TestCrashPoweredOff(t *testing.T) {
	d := NewCrash(1 << 16)
	d.SetHook(func(Op) {})
	if err := d.WriteAt([]byte{1, 2, 3}, 0, 0); err != nil {
		t.Fatal(err)
	}
	nd, _ := d.PowerCut(KeepUnsynced, nil)
	buf := make([]byte, 3)
	for name, err := range map[string]error{
		"ReadAt":  d.ReadAt(buf, 0),
		"WriteAt": d.WriteAt(buf, 0, 0),
		"Flush":   d.Flush(),
		"Trim":    d.Trim(0, 512, 0),
		"Zero":    d.Zero(0, 512, 0),
		"Extents": d.Extents(0, 512, func(Extent) bool { return true }),
	} {
		if !errors.Is(err, ErrPoweredOff) {
			t.Errorf("%s after PowerCut: %v, want ErrPoweredOff", name, err)
		}
	}
	if err := d.Close(); err != nil {
		t.Errorf("Close after PowerCut: %v", err)
	}
	if nd.Ops() != 0 || nd.hook.Load() != nil || nd.Stats() != (CrashStats{}) {
		t.Errorf("new device not fresh: ops %d, stats %+v", nd.Ops(), nd.Stats())
	}
	if err := nd.ReadAt(buf, 0); err != nil || !bytes.Equal(buf, []byte{1, 2, 3}) {
		t.Fatalf("new device: %v %v", buf, err)
	}
	// A cut after a clean Close works: the data was flushed or not.
	if err := nd.WriteAt([]byte{9}, 0, 0); err != nil {
		t.Fatal(err)
	}
	nd.Close()
	n2, rep := nd.PowerCut(LoseUnsynced, nil)
	if err := n2.ReadAt(buf, 0); err != nil || buf[0] != 1 || rep.OpsDropped != 1 {
		t.Fatalf("cut after close: %v %v %+v", buf, err, rep)
	}
	defer func() {
		if recover() == nil {
			t.Error("second PowerCut did not panic")
		}
	}()
	nd.PowerCut(LoseUnsynced, nil)
}

func TestCrashStatsAndHook(t *testing.T) {
	d := NewCrash(1 << 16)
	var seen []Op
	d.SetHook(func(op Op) { seen = append(seen, op) })
	p := make([]byte, 1024)
	steps := []func() error{
		func() error { return d.WriteAt(p, 0, 0) },
		func() error { return d.WriteAt(p, 1024, FUA) },
		func() error { return d.ReadAt(p, 0) },
		func() error { return d.Flush() },
		func() error { return d.Trim(0, 512, FUA) },
		func() error { return d.Zero(512, 512, 0) },
		func() error { return d.WriteAt(p, 1<<20, 0) }, // out of range: not counted
		func() error { return d.Extents(0, 512, func(Extent) bool { return true }) },
	}
	for i, s := range steps {
		if err := s(); err != nil && i != 6 {
			t.Fatalf("step %d: %v", i, err)
		}
	}
	want := []Op{
		{0, OpWrite, 0, 1024, 0}, {1, OpWrite, 1024, 1024, FUA}, {2, OpRead, 0, 1024, 0},
		{3, OpFlush, 0, 0, 0}, {4, OpTrim, 0, 512, FUA}, {5, OpZero, 512, 512, 0}, {6, OpExtents, 0, 512, 0},
	}
	if !slices.Equal(seen, want) {
		t.Errorf("hook saw %v\nwant %v", seen, want)
	}
	if d.Ops() != 7 {
		t.Errorf("Ops() = %d, want 7", d.Ops())
	}
	wantStats := CrashStats{Reads: 1, Writes: 2, Flushes: 1, Trims: 1, Zeros: 1, ReadBytes: 1024, WriteBytes: 2048,
		FUA: 2, Syncs: 3, UnsyncedOps: 1, UnsyncedBytes: 512} // the FUA trim met an empty log
	if got := d.Stats(); got != wantStats {
		t.Errorf("Stats() = %+v\nwant %+v", got, wantStats)
	}
	d.SetHook(nil)
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	if len(seen) != 7 {
		t.Errorf("hook called after removal")
	}
	if s := d.Stats(); s.UnsyncedOps != 0 || s.UnsyncedBytes != 0 {
		t.Errorf("Flush left a log: %+v", s)
	}
}

// TestCrashCutFromHook cuts at a random operation index from inside the
// hook: that operation and every later one fail with ErrPoweredOff.
func TestCrashCutFromHook(t *testing.T) {
	seed := testseed.Get(t)
	rng := newRand(seed)
	for round := range 50 {
		d := NewCrash(64 * SectorSize)
		m := newCrashModel(make([]byte, d.Size()))
		k := rng.Int64N(40)
		var nd *Crash
		var rep CutReport
		d.SetHook(func(op Op) {
			if op.Index == k {
				nd, rep = d.PowerCut(LoseUnsynced, nil)
			}
		})
		for i := int64(0); ; i++ {
			p := fill(SectorSize, uint64(i))
			off := rng.Int64N(64) * SectorSize
			err := d.WriteAt(p, off, FUA)
			if i == k {
				if !errors.Is(err, ErrPoweredOff) {
					t.Fatalf("round %d: op %d at the cut: %v", round, i, err)
				}
				break
			}
			if err != nil {
				t.Fatal(err)
			}
			m.apply(p, off, SectorSize, true)
		}
		if err := m.check(readAll(t, nd), rep); err != nil {
			t.Fatalf("round %d (cut at %d): %v", round, k, err)
		}
	}
}

// TestCrashCutConcurrent cuts while several goroutines write, trim and
// flush. Each goroutine owns a region and remembers what it knows to be
// durable; after the cut, every sector must hold a candidate. Under
// KeepUnsynced every region must read exactly as its goroutine last saw it
// acknowledged: an operation that failed with ErrPoweredOff left no trace
// and every one that succeeded is there.
func TestCrashCutConcurrent(t *testing.T) {
	seed := testseed.Get(t)
	rng := newRand(seed)
	const workers = 4
	const region = 32 // sectors per worker
	rounds := 60
	if *longFlag {
		rounds = 2000
	}
	for round := range rounds {
		model := []LossModel{LoseRandom, KeepUnsynced, LoseUnsynced, LoseTorn}[round%4]
		d := NewCrash(workers * region * SectorSize)
		cutAt := rng.Int64N(400)
		cutRng := newRand(rng.Uint64())
		var nd *Crash
		var rep CutReport
		d.SetHook(func(op Op) {
			if op.Index == cutAt {
				nd, rep = d.PowerCut(model, cutRng)
			}
		})
		models := make([]*crashModel, workers)
		var wg sync.WaitGroup
		for w := range workers {
			models[w] = newCrashModel(make([]byte, region*SectorSize))
			wrng := newRand(rng.Uint64())
			wg.Add(1)
			go func() {
				defer wg.Done()
				m := models[w]
				base := int64(w * region * SectorSize)
				for i := 0; ; i++ {
					s := wrng.Int64N(region)
					cnt := 1 + wrng.Int64N(min(region-s, 8))
					off, length := s*SectorSize, cnt*SectorSize
					fua := wrng.IntN(6) == 0
					var flags Flags
					if fua {
						flags = FUA
					}
					var err error
					var apply func()
					switch k := wrng.IntN(10); {
					case k < 7:
						p := fill(int(length), uint64(round)<<32|uint64(w)<<24|uint64(i))
						err = d.WriteAt(p, base+off, flags)
						apply = func() { m.apply(p, off, length, fua) }
					case k < 8:
						err = d.Trim(base+off, length, flags)
						apply = func() { m.apply(nil, off, length, fua) }
					case k < 9:
						err = d.Flush()
						apply = m.flush
					default:
						err = d.ReadAt(make([]byte, length), base+off)
						apply = func() {}
					}
					if errors.Is(err, ErrPoweredOff) {
						return
					}
					if err != nil {
						t.Error(err)
						return
					}
					apply()
				}
			}()
		}
		wg.Wait()
		if t.Failed() {
			t.FailNow()
		}
		got := readAll(t, nd)
		for w, m := range models {
			part := got[w*region*SectorSize : (w+1)*region*SectorSize]
			if model == KeepUnsynced && !bytes.Equal(part, m.visible) {
				t.Fatalf("round %d (%v, cut at op %d): worker %d region differs from its acknowledged writes: %s",
					round, model, cutAt, w, firstDiff(part, m.visible))
			}
			// Garbage is checked against the worker that owns it.
			r := rep
			r.GarbageOff -= int64(w * region * SectorSize)
			if err := m.checkSectors(part, r); err != nil {
				t.Fatalf("round %d (%v, cut at op %d): worker %d: %v", round, model, cutAt, w, err)
			}
		}
	}
}

// TestPowerCutAll cuts two devices from another goroutine while one
// goroutine writes to both in turn, as a cache writes its cache device and
// its backing. The cut is one instant: once a write to A has failed, no
// write to B may succeed, and with KeepUnsynced each device keeps exactly
// the writes that were acknowledged.
func TestPowerCutAll(t *testing.T) {
	seed := testseed.Get(t)
	rng := newRand(seed)
	for round := range 100 {
		a, b := NewCrash(64*SectorSize), NewCrash(64*SectorSize)
		k := rng.Int64N(100)
		cut := make(chan struct{})
		a.SetHook(func(op Op) {
			if op.Index == k {
				close(cut)
			}
		})
		type result struct {
			devs []*Crash
			reps []CutReport
		}
		done := make(chan result)
		go func() {
			<-cut
			devs, reps := PowerCutAll(KeepUnsynced, nil, a, b)
			done <- result{devs, reps}
		}()
		ma := newCrashModel(make([]byte, a.Size()))
		mb := newCrashModel(make([]byte, b.Size()))
		aFailed := false
		for i := 0; ; i++ {
			off := int64(i%64) * SectorSize
			pa, pb := fill(SectorSize, uint64(2*i)), fill(SectorSize, uint64(2*i+1))
			errA := a.WriteAt(pa, off, 0)
			errB := b.WriteAt(pb, off, 0)
			switch {
			case errA == nil:
				ma.apply(pa, off, SectorSize, false)
			case errors.Is(errA, ErrPoweredOff):
				aFailed = true
			default:
				t.Fatal(errA)
			}
			switch {
			case errB == nil && aFailed:
				t.Fatalf("round %d: write %d to B succeeded after A lost power", round, i)
			case errB == nil:
				mb.apply(pb, off, SectorSize, false)
			case errors.Is(errB, ErrPoweredOff):
			default:
				t.Fatal(errB)
			}
			if errA != nil && errB != nil {
				break
			}
		}
		r := <-done
		for i, m := range []*crashModel{ma, mb} {
			if err := m.check(readAll(t, r.devs[i]), r.reps[i]); err != nil {
				t.Fatalf("round %d, device %d: %v", round, i, err)
			}
		}
	}
}
