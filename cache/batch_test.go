package cache

import (
	"bytes"
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/nbdcache/nbdcache/storage"
	"github.com/nbdcache/nbdcache/test/testseed"
)

// TestWriteBatch: a batch reads back as its writes one after another, in
// order (a later write over the same range wins), whether they went in a
// run or the single way: unaligned writes, writes longer than a bucket, a
// cache with no space or an index with no room (testHooks.maxExt) end a
// run, and the rest follow in order. The background runs (flusher, GC,
// checkpoints). A model of the disk checks every byte after each batch,
// and again after a reopen. Other modes and a sequential cutoff send
// writes to the backing (runs stop there). After every batch no index
// room stays reserved.
func TestWriteBatch(t *testing.T) {
	seed := testseed.Get(t)
	for _, cf := range []struct {
		mode   Mode
		cutoff int64
		maxExt int64
	}{{Writeback, -1, 0}, {Writeback, -1, 48}, {Writeback, -1, 8}, {Writeback, 32 << 10, 0}, {Writethrough, 32 << 10, 0}, {None, -1, 0}} {
		maxExt := cf.maxExt
		t.Run(fmt.Sprintf("%v-cutoff%d-maxExt%d", cf.mode, cf.cutoff, maxExt), func(t *testing.T) {
			r := rng(seed + uint64(maxExt) + uint64(cf.mode)<<8 + uint64(cf.cutoff))
			const back = 4 << 20
			d := formatMem(t, 1<<20+256<<10, back, FormatOptions{BucketSize: 64 << 10, JournalSize: 64 * metaBlock})
			o := Options{Mode: cf.mode, SequentialCutoff: cf.cutoff, CheckpointInterval: -1}
			c := openHooked(t, d, o, testHooks{maxExt: maxExt})
			model := make([]byte, back)
			var id uint64
			for range 300 {
				var ws []BatchWrite
				base := r.Int64N(back/sectorSize-256) * sectorSize
				for range 1 + r.IntN(12) {
					off := base + r.Int64N(64)*sectorSize
					n := (1 + r.Int64N(24)) * sectorSize
					switch r.IntN(10) {
					case 0: // unaligned
						off += 1 + r.Int64N(sectorSize-1)
					case 1: // longer than a bucket
						n = (129 + r.Int64N(64)) * sectorSize
					}
					n = min(n, back-off)
					id++
					p := make([]byte, n)
					for i := range p {
						p[i] = byte(id) ^ byte(i>>9)
					}
					var fl storage.Flags
					if r.IntN(8) == 0 {
						fl = storage.FUA
					}
					ws = append(ws, BatchWrite{P: p, Off: off, Flags: fl})
				}
				c.WriteBatch(ws)
				for _, w := range ws {
					if w.Err != nil {
						t.Fatalf("seed %d: write of %d at %d: %v", seed, len(w.P), w.Off, w.Err)
					}
					copy(model[w.Off:], w.P)
				}
				c.mu.Lock()
				reserved := c.mu.reservedExt
				c.mu.Unlock()
				if reserved != 0 {
					t.Fatalf("seed %d: %d index extents still reserved after a batch", seed, reserved)
				}
				got := make([]byte, 128<<10)
				if err := c.ReadAt(got, base); err != nil {
					t.Fatal(err)
				}
				if i := firstDiff(got, model[base:base+int64(len(got))]); i >= 0 {
					t.Fatalf("seed %d: byte %d differs after a batch", seed, base+int64(i))
				}
			}
			st := c.Stats()
			t.Logf("%d writes: %d batched, %d cached bytes, %d bypasses, %d no-space, %d extents of %d", st.Writes, st.BatchedWrites, st.CachedWriteBytes, st.Bypasses, st.NoSpace, st.Extents, c.maxExtents())
			if cf.mode == Writeback && (st.BatchedWrites == 0 || st.BatchedWrites == st.Writes) {
				t.Errorf("%d of %d writes batched: the test does not take both ways", st.BatchedWrites, st.Writes)
			}
			if cf.mode != Writeback && st.BatchedWrites != 0 {
				t.Errorf("%d writes batched in %v mode: only write-back writes go in runs", st.BatchedWrites, cf.mode)
			}
			check := func(c *Cache, when string) {
				got := make([]byte, back)
				if err := c.ReadAt(got, 0); err != nil {
					t.Fatal(err)
				}
				if i := firstDiff(got, model); i >= 0 {
					t.Fatalf("seed %d: byte %d differs %s", seed, i, when)
				}
			}
			check(c, "at the end")
			closeChecked(t, c, d)
			c = openHooked(t, d, o, testHooks{maxExt: maxExt})
			defer c.Close()
			check(c, "after a reopen")
		})
	}
}

// BenchmarkWriteBatch: 4 KiB random writes over a 64 MiB range, handed
// over in batches of 1 to 64 (as a server would after one socket read):
// the cost per write falls as the batch grows (one allocation, one data
// write per run, one lock hold, one publish per batch).
func BenchmarkWriteBatch(b *testing.B) {
	for _, kind := range []string{"mem", "file", "direct"} {
		for _, size := range []int{1, 4, 16, 64} {
			b.Run(fmt.Sprintf("%s/batch=%d", kind, size), func(b *testing.B) {
				c, _ := benchCache(b, kind, Options{})
				r := rng(1)
				ws := make([]BatchWrite, size)
				for i := range ws {
					ws[i].P = make([]byte, 4096)
				}
				b.SetBytes(4096)
				b.ReportAllocs()
				b.ResetTimer()
				for done := 0; done < b.N; done += size {
					for i := range ws {
						ws[i].Off, ws[i].Err = r.Int64N(64<<20/4096)*4096, nil
					}
					c.WriteBatch(ws)
					for i := range ws {
						if ws[i].Err != nil {
							b.Fatal(ws[i].Err)
						}
					}
				}
				b.StopTimer()
				st := c.Stats()
				b.ReportMetric(float64(st.DataWrites)/float64(st.Writes), "data-writes/write")
				b.ReportMetric(float64(st.Publishes)/float64(st.Writes), "publishes/write")
			})
		}
	}
}

// TestWriteBatchConcurrent: batches from several goroutines at once (as
// from several connections), beside single writes, with the background
// on and a small journal ring, so that runs wait for each other's slots
// (enterN) and for checkpoints. Each goroutine owns a region and a model
// of it; every byte is checked at the end and after a reopen.
func TestWriteBatchConcurrent(t *testing.T) {
	seed := testseed.Get(t)
	for _, maxExt := range []int64{0, 64} {
		t.Run(fmt.Sprintf("maxExt=%d", maxExt), func(t *testing.T) {
			const region, workers = 1 << 20, 5
			d := formatMem(t, 1<<20+256<<10, workers*region, FormatOptions{BucketSize: 64 << 10, JournalSize: 32 * metaBlock})
			o := Options{SequentialCutoff: -1}
			c := openHooked(t, d, o, testHooks{maxExt: maxExt})
			models := make([][]byte, workers)
			errs := make(chan error, workers)
			var wg sync.WaitGroup
			for g := range workers {
				models[g] = make([]byte, region)
				wg.Go(func() {
					r := rng(seed + uint64(g)*7919 + uint64(maxExt))
					base := int64(g) * region
					var id uint64
					for range 150 {
						var ws []BatchWrite
						for range 1 + r.IntN(10) {
							off := r.Int64N(region/sectorSize-160) * sectorSize
							n := (1 + r.Int64N(24)) * sectorSize
							switch r.IntN(10) {
							case 0:
								off++
							case 1:
								n = 144 * sectorSize
							}
							id++
							p := make([]byte, n)
							for i := range p {
								p[i] = byte(id) ^ byte(g<<5) ^ byte(i>>9)
							}
							ws = append(ws, BatchWrite{P: p, Off: base + off})
						}
						if g == 0 { // the single way, beside the batches
							for i := range ws {
								ws[i].Err = c.WriteAt(ws[i].P, ws[i].Off, 0)
							}
						} else {
							c.WriteBatch(ws)
						}
						for _, w := range ws {
							if w.Err != nil {
								errs <- fmt.Errorf("worker %d: write of %d at %d: %w", g, len(w.P), w.Off, w.Err)
								return
							}
							copy(models[g][w.Off-base:], w.P)
						}
					}
				})
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Fatalf("seed %d: %v", seed, err)
			}
			check := func(c *Cache, when string) {
				got := make([]byte, region)
				for g := range workers {
					if err := c.ReadAt(got, int64(g)*region); err != nil {
						t.Fatal(err)
					}
					if i := firstDiff(got, models[g]); i >= 0 {
						t.Fatalf("seed %d: worker %d's byte %d differs %s", seed, g, i, when)
					}
				}
			}
			check(c, "at the end")
			st := c.Stats()
			t.Logf("%d writes, %d batched, %d checkpoints, %d bypasses", st.Writes, st.BatchedWrites, st.Checkpoints, st.Bypasses)
			// With 64 extents the index is mostly near a checkpoint's
			// capacity and writes bypass; on a loaded machine, where
			// checkpoints lag, all of them may (2 of 30 runs beside two
			// CPU hogs): only the roomy index must show runs.
			if st.BatchedWrites == 0 && maxExt == 0 {
				t.Error("no write went in a run")
			}
			closeChecked(t, c, d)
			c = openHooked(t, d, o, testHooks{maxExt: maxExt})
			defer c.Close()
			check(c, "after a reopen")
		})
	}
}

// TestWriteBatchTinyRing: a journal ring too small for a run (4 blocks:
// one slot for operations in flight) takes every write the single way,
// instead of waiting for slots it can never get.
func TestWriteBatchTinyRing(t *testing.T) {
	d := formatMem(t, 1<<20, 4<<20, FormatOptions{BucketSize: 64 << 10, JournalSize: 4 * metaBlock})
	c := openStillT(t, d, Options{SequentialCutoff: -1})
	defer c.Close()
	ws := []BatchWrite{{P: payload(0, 4096, 1), Off: 0}, {P: payload(8192, 4096, 2), Off: 8192}}
	done := make(chan struct{})
	go func() { c.WriteBatch(ws); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("WriteBatch hangs with a 4-block ring")
	}
	for i, w := range ws {
		got := make([]byte, len(w.P))
		if w.Err != nil || c.ReadAt(got, w.Off) != nil || !bytes.Equal(got, w.P) {
			t.Fatalf("write %d: %v", i, w.Err)
		}
	}
	if st := c.Stats(); st.BatchedWrites != 0 {
		t.Errorf("%d writes batched with one slot", st.BatchedWrites)
	}
}

// TestBypassRunDurability: a batch of writes that miss a thrashing cache
// goes around it in one run (bypassRun). A FLUSH after it makes them
// durable on the backing ("flushed"); and a write in the run over a range
// whose clean extent's removal is not yet durable waits for it (the
// single way: settleCleanGone), so a power cut that keeps the backing's
// writes but loses the cache's unsynced journal cannot bring the clean
// extent back over newer backing data ("clean-gone").
func TestBypassRunDurability(t *testing.T) {
	for _, flushed := range []bool{true, false} {
		name := map[bool]string{true: "flushed", false: "clean-gone"}[flushed]
		t.Run(name, func(t *testing.T) { bypassRunDurability(t, flushed) })
	}
}

func bypassRunDurability(t *testing.T, flushed bool) {
	c, cdev, bdev := openCrashStill(t, 2<<20, 4<<20, FormatOptions{BucketSize: 64 << 10, JournalSize: 64 * metaBlock},
		Options{SequentialCutoff: -1}, testHooks{noBackground: true})
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	// The cache full of clean data, durable: written, written back,
	// committed. x, the first, lies in the oldest bucket.
	const x = 0
	capacity := c.CapacityBytes()
	for off := int64(0); off < capacity; off += 64 << 10 {
		must(c.WriteAt(payload(off, 64<<10, 1), off, 0))
	}
	if _, n, err := writebackStep(c, 0, capacity); err != nil || n == 0 {
		t.Fatalf("writeback: %d, %v", n, err)
	}
	must(c.Flush())
	// The cache thrashes, and GC drops x (clean data is evicted, never
	// moved): its removal is journaled, not yet durable.
	c.mu.Lock()
	c.test.alwaysThrash = true
	c.mu.Unlock()
	for range 4 {
		c.GCStep(true)
	}
	c.mu.Lock()
	evicted := !c.cachedLocked(x, 4096)
	c.mu.Unlock()
	if !evicted {
		t.Fatal("GC did not evict the oldest clean extent")
	}
	// A batch of misses; for clean-gone, one of them over x (it goes the
	// single way; for flushed, none does, so that its backing flush is
	// not what covers the run's writes).
	var ws []BatchWrite
	for i := range 8 {
		off := int64(3<<20 + i*64<<10)
		if i == 5 && !flushed {
			off = x
		}
		ws = append(ws, BatchWrite{P: payload(off, 4096, uint64(10+i)), Off: off})
	}
	before, unstarted := c.Stats().ThrashBypasses, c.bg.unstarted.Load()
	c.WriteBatch(ws)
	for i := range ws {
		must(ws[i].Err)
	}
	// Nothing went into the cache device, so nothing there is to be
	// started on its way (a kick of the background per 128 KiB bypassed
	// was a context switch every 32 writes: 0.39 a request, not 0.03).
	if got := c.bg.unstarted.Load(); got != unstarted {
		t.Errorf("writes around the cache counted %d bytes as written into it", got-unstarted)
	}
	if got := c.Stats().ThrashBypasses - before; got != int64(len(ws)) {
		t.Fatalf("%d of %d writes went around the thrashing cache", got, len(ws))
	}
	var newC, newB *storage.Crash
	if flushed {
		must(c.Flush())
		devs, _ := storage.PowerCutAll(storage.LoseUnsynced, nil, cdev, bdev)
		newC, newB = devs[0], devs[1]
	} else {
		// The backing's page cache reached its disk; the cache's
		// unsynced journal did not.
		newC, _ = cdev.PowerCut(storage.LoseUnsynced, nil)
		newB, _ = bdev.PowerCut(storage.KeepUnsynced, nil)
	}
	if rep, err := CheckDeep(newC, newB); err != nil {
		t.Fatalf("deep check after the cut: %v (%+v)", err, rep)
	}
	if !flushed {
		return
	}
	c2, err := openStill(newC, newB, Options{BackingID: testBackingID})
	must(err)
	defer c2.Close()
	for i, w := range ws {
		got := make([]byte, 4096)
		if err := c2.ReadAt(got, w.Off); err != nil || !bytes.Equal(got, w.P) {
			t.Errorf("write %d at %d, flushed, lost after a power cut (%v)", i, w.Off, err)
		}
	}
}

// TestBypassRunRechecksItsFirstWrite (from review): the write that ends a
// batch's cached run was decided a miss before the run's own writes were
// inserted, and before anyone else could promote over it; bypassRun must
// not send it around the cache on that decision.
//   - overlap: A = [X, X+8K) hits the thrashing cache and is cached; B =
//     [X+4K, X+8K), later in the batch, was decided a miss before A was
//     inserted. Sent around the cache, B would lie under A's newer-looking
//     dirty copy: reads return A, and the writeback writes A over B.
//   - prefetch: between writeRun's decision and bypassRun, an NBD CACHE
//     copies the old backing bytes in as a clean extent; the write sent
//     around it would leave that stale copy in place.
func TestBypassRunRechecksItsFirstWrite(t *testing.T) {
	setup := func(t *testing.T) (*Cache, devPair) {
		d := formatMem(t, 2<<20, 4<<20, FormatOptions{BucketSize: 64 << 10, JournalSize: 64 * metaBlock})
		c := openHooked(t, d, Options{SequentialCutoff: -1}, testHooks{noBackground: true})
		return c, d
	}
	const x = 1 << 20
	t.Run("overlap", func(t *testing.T) {
		c, d := setup(t)
		if err := c.WriteAt(payload(x, 4096, 1), x, 0); err != nil { // X cached
			t.Fatal(err)
		}
		c.mu.Lock()
		c.test.alwaysThrash = true
		c.mu.Unlock()
		ws := []BatchWrite{{P: payload(x, 8192, 2), Off: x}, {P: payload(x+4096, 4096, 3), Off: x + 4096}}
		c.WriteBatch(ws)
		for _, w := range ws {
			if w.Err != nil {
				t.Fatal(w.Err)
			}
		}
		got := make([]byte, 4096)
		if err := c.ReadAt(got, x+4096); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, ws[1].P) {
			t.Error("the batch's later write over [X+4K, X+8K) is not what reads return")
		}
		if err := c.Drain(context.Background(), nil); err != nil {
			t.Fatal(err)
		}
		back := make([]byte, 4096)
		if err := d.back.ReadAt(back, x+4096); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(back, ws[1].P) {
			t.Error("after the drain the backing does not hold the batch's later write")
		}
		closeChecked(t, c, d)
	})
	t.Run("prefetch", func(t *testing.T) {
		c, d := setup(t)
		c.mu.Lock()
		c.test.alwaysThrash = true
		c.mu.Unlock()
		w := []BatchWrite{{P: payload(x, 4096, 5), Off: x}}
		n, stop := c.writeRun(w)
		if n != 0 || stop == nil || !stop.thrash {
			t.Fatalf("writeRun took %d, stop %+v: want a thrash miss", n, stop)
		}
		if err := c.Prefetch(x, 4096); err != nil { // the old backing bytes, clean
			t.Fatal(err)
		}
		c.bypassRun(w, stop)
		c.ackAll(w)
		if w[0].Err != nil {
			t.Fatal(w[0].Err)
		}
		got := make([]byte, 4096)
		if err := c.ReadAt(got, x); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, w[0].P) {
			t.Error("an acknowledged write is not read back: a stale clean copy is served")
		}
		closeChecked(t, c, d)
	})
}

// TestBypassHintDecidesAgain: after a write went around a thrashing cache
// (bypassHint), the next batch starts in bypassRun, which must decide its
// first write under its own hold of the lock: a write over dirty data the
// cache holds stays in the cache, superseding it. Sent around on the
// hint's word, it would land on the backing and leave the cache's older
// copy to be read, and written back over it later.
func TestBypassHintDecidesAgain(t *testing.T) {
	d := formatMem(t, 2<<20, 4<<20, FormatOptions{BucketSize: 64 << 10, JournalSize: 64 * metaBlock})
	c := openHooked(t, d, Options{SequentialCutoff: -1}, testHooks{noBackground: true})
	const x, miss = 1 << 20, 3 << 20
	if err := c.WriteAt(payload(x, 4096, 1), x, 0); err != nil { // x cached, dirty
		t.Fatal(err)
	}
	c.mu.Lock()
	c.test.alwaysThrash = true
	c.mu.Unlock()
	ws := []BatchWrite{{P: payload(miss, 4096, 2), Off: miss}}
	c.WriteBatch(ws)
	if ws[0].Err != nil || !c.bypassHint.Load() {
		t.Fatalf("a miss of a thrashing cache: err %v, hint %v; want it sent around", ws[0].Err, c.bypassHint.Load())
	}
	ws = []BatchWrite{{P: payload(x, 4096, 3), Off: x}, {P: payload(miss, 4096, 4), Off: miss}}
	c.WriteBatch(ws)
	for _, w := range ws {
		if w.Err != nil {
			t.Fatal(w.Err)
		}
	}
	for _, w := range ws {
		got := make([]byte, len(w.P))
		if err := c.ReadAt(got, w.Off); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, w.P) {
			t.Errorf("[%d+%d) reads back stale data", w.Off, len(w.P))
		}
	}
	if err := c.Drain(t.Context(), nil); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4096)
	if err := d.back.ReadAt(got, x); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, ws[0].P) {
		t.Error("the backing holds stale data at x after the drain")
	}
	closeChecked(t, c, d)
}
