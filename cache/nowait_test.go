package cache

import (
	"bytes"
	"context"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nbdcache/nbdcache/storage"
)

// TestReadNoWait: ReadNoWait serves a range the cache holds whole, from the
// cache device's page cache or the RAM tier, with the bytes ReadAt gives,
// and counts it as a hit; it refuses (false) a range with a gap, or one
// the cache device cannot give without waiting, and a refusal leaves no
// trace: no read, miss or promotion counted. The cache device is a
// buffered file (its page cache serves the hits), background work runs.
// Its pages going cold is modelled (coldFile), not made with
// FADV_DONTNEED: on this machine's kernel (6.18, in a VM) a RWF_NOWAIT
// read of dropped pages starts the disk read, which the VM may complete
// before the call returns, and then it is served; in some runs 50 drops
// in a row were all read back that way (CI failed on it). File's own
// test (storage's TestFileReadNoWait) covers RWF_NOWAIT.
func TestReadNoWait(t *testing.T) {
	for _, ram := range []int64{0, 1 << 20} {
		dir := t.TempDir()
		cachePath := filepath.Join(dir, "cache")
		f, err := storage.OpenFile(cachePath, storage.FileOptions{Size: 8 << 20})
		if err != nil {
			t.Fatal(err)
		}
		cf := &coldFile{File: f}
		back := storage.NewMem(4 << 20)
		if err := Format(cf, back, FormatOptions{BucketSize: 256 << 10, BackingID: testBackingID}); err != nil {
			t.Fatal(err)
		}
		old := payload(64<<10, 64<<10, 1)
		if err := back.WriteAt(old, 64<<10, 0); err != nil {
			t.Fatal(err)
		}
		c := openT(t, devPair{cf, back}, Options{RAMCache: ram, SequentialCutoff: -1})
		w := payload(0, 64<<10, 2)
		if err := c.WriteAt(w, 0, storage.FUA); err != nil {
			t.Fatal(err)
		}
		p := make([]byte, 64<<10)
		before := c.Stats()
		if !c.ReadNoWait(p, 0) || !bytes.Equal(p, w) {
			t.Fatalf("ram %d: a cached range was not served without waiting, or not its bytes", ram)
		}
		if s := c.Stats(); s.Hits != before.Hits+1 || s.Reads != before.Reads+1 {
			t.Errorf("ram %d: a no-wait hit counted %d hits, %d reads; want one each", ram, s.Hits-before.Hits, s.Reads-before.Reads)
		}
		for _, r := range [][2]int64{{64 << 10, 64 << 10}, {32 << 10, 64 << 10}, {4 << 20, 4096}} {
			before := c.Stats()
			if c.ReadNoWait(p[:r[1]], r[0]) {
				t.Errorf("ram %d: [%d+%d), not all cached (or outside), was served without waiting", ram, r[0], r[1])
			}
			if s := c.Stats(); s.Reads != before.Reads || s.Misses != before.Misses || s.PartialHits != before.PartialHits || s.Promotions != before.Promotions {
				t.Errorf("ram %d: a refused no-wait read was counted: %+v then %+v", ram, before, s)
			}
		}
		// Out of the page cache: refused, unless the RAM tier has it
		// (its sets are applied in the background: wait for them; the
		// full -race run failed here once without).
		if c.ram != nil {
			c.ram.Wait()
		}
		// The flusher reads the dirty range from the cache file to
		// write it back, which brings its pages back: drain first.
		if err := c.Drain(context.Background(), nil); err != nil {
			t.Fatal(err)
		}
		cf.cold.Store(true)
		before = c.Stats()
		if got := c.ReadNoWait(p, 0); got != (ram > 0) {
			t.Errorf("ram %d: with the cache file's pages cold, ReadNoWait = %v", ram, got)
		}
		if s := c.Stats(); ram == 0 && (s.Reads != before.Reads || s.Hits != before.Hits || s.Misses != before.Misses) {
			t.Errorf("ram %d: a no-wait read refused by the device was counted: %+v then %+v", ram, before, s)
		}
		if err := c.ReadAt(p, 0); err != nil || !bytes.Equal(p, w) {
			t.Fatalf("ram %d: ReadAt: %v", ram, err)
		}
		if !c.ReadNoWait(p, 0) || !bytes.Equal(p, w) {
			t.Errorf("ram %d: a range read back was not served without waiting", ram)
		}
		closeChecked(t, c, devPair{cf, back})
	}
}

// coldFile is a buffered cache file whose pages can be made cold: once
// cold is set, ReadNoWait refuses until a ReadAt (which would bring the
// pages back into the page cache).
type coldFile struct {
	*storage.File
	cold atomic.Bool
}

func (f *coldFile) ReadNoWait(p []byte, off int64) bool {
	return !f.cold.Load() && f.File.ReadNoWait(p, off)
}

func (f *coldFile) ReadAt(p []byte, off int64) error {
	f.cold.Store(false)
	return f.File.ReadAt(p, off)
}

// wbCalls is a cache device that sends its StartWriteback calls on calls.
type wbCalls struct {
	storage.Device
	calls chan [2]int64
}

func (d *wbCalls) StartWriteback(off, n int64) {
	select {
	case d.calls <- [2]int64{off, n}:
	default:
	}
}

// TestEarlyWriteback: once earlyWriteback bytes are written into the
// cache, and not before, the background loop is asked to start the kernel
// writing out what the open bucket holds so far, long before the bucket
// fills (so that a FLUSH finds little in the page cache to write); and
// startWriteback covers the open bucket. No background loop runs: the
// test sees the ask itself.
func TestEarlyWriteback(t *testing.T) {
	d := formatMem(t, 8<<20, 4<<20, FormatOptions{BucketSize: 1 << 20})
	rec := &wbCalls{Device: d.cache, calls: make(chan [2]int64, 64)}
	c := openStillT(t, devPair{rec, d.back}, Options{SequentialCutoff: -1})
	defer closeChecked(t, c, d)
	var written int64
	for written+4096 < earlyWriteback {
		if err := c.WriteAt(payload(written, 4096, 1), written, 0); err != nil {
			t.Fatal(err)
		}
		written += 4096
	}
	if len(c.bg.startWB) != 0 {
		t.Fatalf("writeback asked for after %d bytes, under earlyWriteback", written)
	}
	if err := c.WriteAt(payload(written, 4096, 1), written, 0); err != nil {
		t.Fatal(err)
	}
	written += 4096
	if len(c.bg.startWB) != 1 {
		t.Fatalf("no writeback asked for after %d bytes", written)
	}
	c.startWriteback()
	select {
	case r := <-rec.calls:
		if r[1] < written || r[1] >= 1<<20 {
			t.Fatalf("writeback started over [%d+%d), want the open bucket's %d bytes so far", r[0], r[1], written)
		}
	default:
		t.Fatal("startWriteback left the open bucket out")
	}

	// Asks come at most once an earlyWritebackGap: within the gap (made
	// long here) none, however much is written; once it has passed, the
	// next write asks, for the bytes held back too.
	<-c.bg.startWB
	c.bg.lastStartAsk.Store(int64(time.Since(c.bg.epoch) + time.Hour))
	for end := written + 2*earlyWriteback; written < end; written += 4096 {
		if err := c.WriteAt(payload(written, 4096, 1), written, 0); err != nil {
			t.Fatal(err)
		}
	}
	if len(c.bg.startWB) != 0 {
		t.Fatal("writeback asked for again within earlyWritebackGap")
	}
	c.bg.lastStartAsk.Store(int64(time.Since(c.bg.epoch) - earlyWritebackGap))
	if err := c.WriteAt(payload(written, 4096, 1), written, 0); err != nil {
		t.Fatal(err)
	}
	if len(c.bg.startWB) != 1 {
		t.Fatal("no writeback asked for by the first write after earlyWritebackGap, with bytes held back")
	}
}

// plainDev hides the cache device's ReadNoWait (every read from it waits).
type plainDev struct{ storage.Device }

// TestReadNoWaitRefusalCountsNoRAMHits: a ReadNoWait that serves a piece
// from the RAM tier, then refuses at the next (its cache device cannot
// tell), counts no RAM hit: the worker's ReadAt will.
func TestReadNoWaitRefusalCountsNoRAMHits(t *testing.T) {
	d := formatMem(t, 8<<20, 4<<20, FormatOptions{BucketSize: 256 << 10})
	c := openStillT(t, devPair{plainDev{d.cache}, d.back}, Options{RAMCache: 1 << 20, SequentialCutoff: -1})
	defer closeChecked(t, c, d)
	// Two extents (two versions): [0,4K) and [4K,8K).
	for _, off := range []int64{0, 4096} {
		if err := c.WriteAt(payload(off, 4096, 1), off, 0); err != nil {
			t.Fatal(err)
		}
	}
	p := make([]byte, 8192)
	if err := c.ReadAt(p[:4096], 0); err != nil { // [0,4K) into the RAM tier
		t.Fatal(err)
	}
	c.ram.Wait()
	before := c.Stats()
	if c.ReadNoWait(p, 0) {
		t.Fatal("served [4K,8K) without the RAM tier or a NoWaitReader")
	}
	if s := c.Stats(); s.RAMHits != before.RAMHits {
		t.Errorf("a refused ReadNoWait counted %d RAM hits", s.RAMHits-before.RAMHits)
	}
}

// TestReadNoWaitServesThrashingMisses: a thrashing cache promotes no read
// miss, so ReadNoWait serves a miss (or a partial hit) inline when the
// backing can without waiting (its page cache), with the bytes ReadAt
// gives, counted once; a backing that cannot tell, or a cache that would
// promote the miss, refuses it and leaves no trace. Background work runs.
func TestReadNoWaitServesThrashingMisses(t *testing.T) {
	for _, tc := range []struct {
		name          string
		thrash, plain bool // the cache thrashes; the backing hides ReadNoWait
		serve         bool
	}{
		{"thrashing", true, false, true},
		{"thrashing, a backing that cannot tell", true, true, false},
		{"not thrashing: the miss may be promoted", false, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := formatMem(t, 8<<20, 4<<20, FormatOptions{BucketSize: 256 << 10})
			old := payload(0, 64<<10, 1)
			if err := d.back.WriteAt(old, 0, 0); err != nil {
				t.Fatal(err)
			}
			back := d.back
			if tc.plain {
				back = plainDev{d.back}
			}
			c := openHooked(t, devPair{d.cache, back}, Options{SequentialCutoff: -1}, testHooks{alwaysThrash: tc.thrash})
			defer closeChecked(t, c, d)
			w := payload(16<<10, 4096, 2) // cached: a partial hit
			if err := c.WriteAt(w, 16<<10, 0); err != nil {
				t.Fatal(err)
			}
			want := bytes.Clone(old)
			copy(want[16<<10:], w)
			for _, r := range [][2]int64{{32 << 10, 16 << 10}, {0, 64 << 10}} { // a miss, a partial hit
				p := make([]byte, r[1])
				before := c.Stats()
				got := c.ReadNoWait(p, r[0])
				s := c.Stats()
				if got != tc.serve {
					t.Fatalf("[%d+%d): ReadNoWait = %v, want %v", r[0], r[1], got, tc.serve)
				}
				if !got {
					if s.Reads != before.Reads || s.Misses != before.Misses || s.PartialHits != before.PartialHits || s.Promotions != before.Promotions {
						t.Errorf("[%d+%d): a refused no-wait read was counted: %+v then %+v", r[0], r[1], before, s)
					}
					continue
				}
				if !bytes.Equal(p, want[r[0]:r[0]+r[1]]) {
					t.Errorf("[%d+%d): served other bytes than the device holds", r[0], r[1])
				}
				if s.Reads != before.Reads+1 || s.Misses+s.PartialHits != before.Misses+before.PartialHits+1 || s.Promotions != before.Promotions {
					t.Errorf("[%d+%d): counted %d reads, %d misses or partial hits, %d promotions; want 1, 1, 0", r[0], r[1],
						s.Reads-before.Reads, s.Misses+s.PartialHits-before.Misses-before.PartialHits, s.Promotions-before.Promotions)
				}
			}
		})
	}
}

// TestReadNoWaitCountsStreamBypasses: a stream of misses past the
// sequential cutoff, read without waiting from a thrashing cache, counts
// the same bypasses as when read with ReadAt (the no-wait path feeds the
// stream detector only once the read is done; found by review).
func TestReadNoWaitCountsStreamBypasses(t *testing.T) {
	var got [2]int64
	for i, nowait := range []bool{false, true} {
		d := formatMem(t, 8<<20, 4<<20, FormatOptions{BucketSize: 256 << 10})
		c := openHooked(t, d, Options{SequentialCutoff: 32 << 10}, testHooks{alwaysThrash: true})
		p := make([]byte, 16<<10)
		for off := int64(0); off < 16*int64(len(p)); off += int64(len(p)) {
			if nowait {
				if !c.ReadNoWait(p, off) {
					t.Fatalf("a thrashing cache's miss at %d was refused", off)
				}
			} else if err := c.ReadAt(p, off); err != nil {
				t.Fatal(err)
			}
		}
		got[i] = c.Stats().Bypasses
		closeChecked(t, c, d)
	}
	if got[0] == 0 || got[1] != got[0] {
		t.Errorf("a stream of 16 misses counted %d bypasses read with ReadAt, %d without waiting; want the same, above 0", got[0], got[1])
	}
}
