package faults

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nbdcache/nbdcache/cache"
	"github.com/nbdcache/nbdcache/storage"
)

// testRig builds fault mode the way storageFlags.open does, on in-memory
// devices: a backing, a write-back cache (nil cacheMem: none) and the
// export.
type testRig struct {
	rig               *Rig
	backMem, cacheMem *storage.Mem
	export            storage.Device
	backDev, cacheDev storage.Device // as the first generation's Gate shows them
	firstCache        *cache.Cache
	opts              cache.Options
	backingID         [16]byte
}

func newTestRig(t *testing.T, withCache bool) *testRig {
	t.Helper()
	log := slog.New(slog.DiscardHandler)
	r := &testRig{rig: New(log), backMem: storage.NewMem(8 << 20), backingID: [16]byte{1, 2, 3}}
	r.backDev = r.rig.WrapBacking(r.backMem, false, nil)
	dev := r.backDev
	if withCache {
		r.cacheMem = storage.NewMem(8 << 20)
		r.cacheDev = r.rig.WrapCache(r.cacheMem)
		if err := cache.Format(r.cacheDev, r.backDev, cache.FormatOptions{BackingID: r.backingID, BucketSize: 256 << 10}); err != nil {
			t.Fatal(err)
		}
		r.opts = cache.Options{BackingID: r.backingID, Logger: r.rig.CacheLogger()}
		c, err := cache.Open(r.cacheDev, r.backDev, r.opts)
		if err != nil {
			t.Fatal(err)
		}
		r.rig.SetCache(c, r.opts)
		r.firstCache = c
		dev = c
	}
	r.export = r.rig.WrapExport(dev)
	t.Cleanup(func() { r.rig.CloseCache() })
	return r
}

// mustCut cuts the power and powers on again.
func mustCut(t *testing.T, r *Rig, model storage.LossModel, seed uint64) PowerCutResult {
	t.Helper()
	res, err := r.PowerCut(model, seed, false)
	if err != nil {
		t.Fatal(err)
	}
	return res
}

func pattern(n int, b byte) []byte { return bytes.Repeat([]byte{b}, n) }

func readBack(t *testing.T, d storage.Device, off int64, n int) []byte {
	t.Helper()
	p := make([]byte, n)
	if err := d.ReadAt(p, off); err != nil {
		t.Fatalf("read at %d: %v", off, err)
	}
	return p
}

// writeFlushedAndNot writes 64 KiB of 0xA1 at 0 and flushes, then 64 KiB
// of 0xB2 at 1 MiB without a flush: what checkUnflushedCut expects.
func (r *testRig) writeFlushedAndNot(t *testing.T) {
	t.Helper()
	for _, err := range []error{
		r.export.WriteAt(pattern(64<<10, 0xA1), 0, 0),
		r.export.Flush(),
		r.export.WriteAt(pattern(64<<10, 0xB2), 1<<20, 0),
	} {
		if err != nil {
			t.Fatal(err)
		}
	}
}

// checkUnflushedCut checks the export after an unflushed-model cut of
// writeFlushedAndNot's writes (when: "after the cut", say): the flushed
// data is there, the unflushed gone, and a new write reads back.
func (r *testRig) checkUnflushedCut(t *testing.T, label, when string) {
	t.Helper()
	if got := readBack(t, r.export, 0, 64<<10); !bytes.Equal(got, pattern(64<<10, 0xA1)) {
		t.Errorf("%s: flushed data lost", label)
	}
	if got := readBack(t, r.export, 1<<20, 64<<10); !bytes.Equal(got, make([]byte, 64<<10)) {
		t.Errorf("%s: unflushed data survived", label)
	}
	if err := r.export.WriteAt(pattern(4096, 0xD4), 2<<20, 0); err != nil {
		t.Fatalf("%s: write %s: %v", label, when, err)
	}
	if err := r.export.Flush(); err != nil {
		t.Fatalf("%s: flush %s: %v", label, when, err)
	}
	if got := readBack(t, r.export, 2<<20, 4096); !bytes.Equal(got, pattern(4096, 0xD4)) {
		t.Errorf("%s: write %s lost", label, when)
	}
}

// TestRigPowerCutUnflushed: through the export, flushed data survives the
// unflushed model and unflushed data is gone, with and without a cache;
// the export keeps serving the new state.
func TestRigPowerCutUnflushed(t *testing.T) {
	for _, withCache := range []bool{false, true} {
		r := newTestRig(t, withCache)
		r.writeFlushedAndNot(t)
		if err := r.export.WriteAt(pattern(4096, 0xC3), 0, 0); err != nil {
			t.Fatal(err)
		}
		res := mustCut(t, r.rig, storage.LoseUnsynced, 1)
		if res.Error != "" || (res.Check != nil && !res.Check.OK) {
			t.Fatalf("cache=%v: cut: %+v %+v", withCache, res, res.Check)
		}
		if withCache && r.rig.CurrentCache() == r.firstCache {
			t.Error("the cache was not reopened")
		}
		if withCache && res.Recovery == nil {
			t.Error("no recovery report")
		}
		// The export serves the new state and takes writes.
		r.checkUnflushedCut(t, fmt.Sprintf("cache=%v", withCache), "after the cut")
	}
}

// TestRigOldGenerationFenced: nothing of the world before a cut reaches
// the devices after it: not the old cache, and not a request that was
// sleeping in a Delay when the power failed.
func TestRigOldGenerationFenced(t *testing.T) {
	r := newTestRig(t, true)
	old := r.firstCache
	r.rig.back.delay.Set(storage.OpWrite, 300*time.Millisecond)
	var wg sync.WaitGroup
	var lateErr error
	wg.Add(1)
	started := make(chan struct{})
	go func() {
		defer wg.Done()
		close(started)
		lateErr = r.backDev.WriteAt(pattern(4096, 0xEE), 4<<20, 0) // sleeps in the Delay
	}()
	<-started
	res := mustCut(t, r.rig, storage.LoseUnsynced, 2)
	if res.Error != "" {
		t.Fatal(res.Error)
	}
	wg.Wait()
	r.rig.back.delay.Clear()
	if !errors.Is(lateErr, storage.ErrPoweredOff) {
		t.Errorf("a request of the old generation that outlived the cut: %v, want ErrPoweredOff", lateErr)
	}
	if got := readBack(t, r.backMem, 4<<20, 4096); !bytes.Equal(got, make([]byte, 4096)) {
		t.Error("a request of the old generation landed after the cut")
	}
	// The old cache fails; the new devices are untouched by it.
	before := readBack(t, r.cacheMem, 0, 8<<20)
	if err := old.WriteAt(pattern(4096, 0xFF), 0, storage.FUA); err == nil {
		t.Error("the abandoned cache still writes")
	}
	if err := r.cacheDev.WriteAt(pattern(4096, 0xFF), 0, 0); !errors.Is(err, storage.ErrPoweredOff) {
		t.Errorf("the old gate: %v", err)
	}
	if after := readBack(t, r.cacheMem, 0, 8<<20); !bytes.Equal(before, after) {
		t.Error("the abandoned cache changed the cache device")
	}
}

// TestRigExportHeld: a request that arrives during a cut waits for the
// new device instead of failing.
func TestRigExportHeld(t *testing.T) {
	r := newTestRig(t, false)
	sw := r.rig.export
	sw.Hold()
	done := make(chan error)
	go func() { done <- r.export.WriteAt(pattern(4096, 0x11), 0, 0) }()
	select {
	case err := <-done:
		t.Fatalf("a request went through a held export: %v", err)
	case <-time.After(50 * time.Millisecond):
	}
	next := storage.NewMem(r.export.Size())
	sw.Release(next)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if got := readBack(t, next, 0, 4096); !bytes.Equal(got, pattern(4096, 0x11)) {
		t.Error("the held request did not go to the new device")
	}
}

// TestDurableAcks: with --sync always, a write the client never flushed
// survives the unflushed model.
func TestDurableAcks(t *testing.T) {
	for _, withCache := range []bool{false, true} {
		r := newTestRig(t, withCache)
		d := storage.NewDurableAcks(r.export)
		for i := range 16 {
			if err := d.WriteAt(pattern(4096, byte(i+1)), int64(i)*(64<<10), 0); err != nil {
				t.Fatal(err)
			}
		}
		if err := d.Zero(1<<20, 8192, 0); err != nil {
			t.Fatal(err)
		}
		res := mustCut(t, r.rig, storage.LoseUnsynced, 3)
		if res.Error != "" {
			t.Fatal(res.Error)
		}
		for i := range 16 {
			if got := readBack(t, d, int64(i)*(64<<10), 4096); !bytes.Equal(got, pattern(4096, byte(i+1))) {
				t.Fatalf("cache=%v: acknowledged write %d lost", withCache, i)
			}
		}
	}
}

func TestParseFaultArgs(t *testing.T) {
	if _, err := ParseErrno("EDQUOT"); err == nil {
		t.Error("EDQUOT accepted: NBD cannot carry it")
	}
	for _, e := range WireErrnos() {
		got, err := ParseErrno(e.Name)
		if err != nil || got != e.Errno || ErrnoName(got) != e.Name {
			t.Errorf("%s: %v %v", e.Name, got, err)
		}
	}
	if k, err := ParseOps("read,trim"); err != nil || k != storage.OpRead|storage.OpTrim {
		t.Errorf("read,trim: %v %v", k, err)
	}
	if _, err := ParseOps("read,append"); err == nil {
		t.Error("append accepted")
	}
	for _, m := range LossModelNames() {
		if got, err := ParseLossModel(m.Name); err != nil || got != m.Model || LossModelName(got) != m.Name {
			t.Errorf("%s: %v %v", m.Name, got, err)
		}
	}
}

// TestRigPrefetchReachesCache: NBD CACHE through fault mode's export
// layers warms the cache, as it does without --faults.
func TestRigPrefetchReachesCache(t *testing.T) {
	r := newTestRig(t, true)
	p, ok := r.export.(storage.Prefetcher)
	if !ok {
		t.Fatal("the fault-mode export is not a Prefetcher: NBD CACHE would do nothing")
	}
	if err := p.Prefetch(0, 64<<10); err != nil {
		t.Fatal(err)
	}
	if got := r.rig.CurrentCache().Stats().Promotions; got == 0 {
		t.Fatal("Prefetch through the export promoted nothing into the cache")
	}
}

// TestRigPowerOff: power-cut --off leaves every request failing with EIO
// (a disk without power), refuses a second cut, and power-on brings back
// the state after the cut: flushed data kept, unflushed data gone.
func TestRigPowerOff(t *testing.T) {
	for _, withCache := range []bool{false, true} {
		r := newTestRig(t, withCache)
		must := func(err error) {
			t.Helper()
			if err != nil {
				t.Fatalf("cache=%v: %v", withCache, err)
			}
		}
		r.writeFlushedAndNot(t)
		if _, err := r.rig.PowerOn(); !errors.Is(err, ErrPowerOn) {
			t.Errorf("cache=%v: power-on while on: %v, want ErrPowerOn", withCache, err)
		}
		res, err := r.rig.PowerCut(storage.LoseUnsynced, 4, true)
		must(err)
		if !res.PoweredOff || res.Check != nil || res.Recovery != nil {
			t.Errorf("cache=%v: an --off cut reported %+v", withCache, res)
		}
		if !r.rig.Status().Off {
			t.Errorf("cache=%v: status does not say the power is off", withCache)
		}
		p := make([]byte, 4096)
		for name, err := range map[string]error{
			"read":  r.export.ReadAt(p, 0),
			"write": r.export.WriteAt(p, 8192, 0),
			"flush": r.export.Flush(),
		} {
			if !errors.Is(err, unix.EIO) {
				t.Errorf("cache=%v: %s while the power is off: %v, want EIO", withCache, name, err)
			}
		}
		if _, err := r.rig.PowerCut(storage.LoseUnsynced, 5, false); !errors.Is(err, ErrPowerOff) {
			t.Errorf("cache=%v: a cut while off: %v, want ErrPowerOff", withCache, err)
		}
		res, err = r.rig.PowerOn()
		must(err)
		if res.Error != "" || (withCache && (res.Check == nil || !res.Check.OK || res.Recovery == nil)) {
			t.Errorf("cache=%v: power-on reported %+v", withCache, res)
		}
		r.checkUnflushedCut(t, fmt.Sprintf("cache=%v", withCache), "after the power-on")
		if r.rig.Status().Off {
			t.Errorf("cache=%v: status still says the power is off", withCache)
		}
	}
}
