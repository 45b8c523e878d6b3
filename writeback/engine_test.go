package writeback

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/nbdcache/nbdcache/btreeidx"
	"github.com/nbdcache/nbdcache/storage"
	"github.com/nbdcache/nbdcache/test/testseed"
)

// TestWriteBack: the synchronous writeback the cache uses for its own
// (GC's cleaning, the write-back before a bypass) keeps a batch's rule and
// order. Extents handed over in any order reach the backing ascending,
// adjacent ones merged up to MaxWrite, one longer than MaxWrite whole (a
// cut would cut it in the index); one Flush, then MarkClean, each only for
// data the backing holds durably. observe sees every write. A failed
// write leaves its piece dirty and is returned; the rest is cleaned. It
// needs no turn: it runs inside Exclusive.
func TestWriteBack(t *testing.T) {
	seed := testseed.Get(t)
	rng := newRand(seed)
	const bs, maxWrite = 4096, 64 << 10
	for _, fail := range []bool{false, true} {
		src := newFakeSource(512, bs, 1<<30)
		for b := 0; b < 64; b++ { // 64 adjacent one-block extents: 4 writes of 16
			src.write(b, 1)
		}
		src.write(100, 40) // one extent of 160 KiB, longer than MaxWrite
		for b := 200; b < 400; b += 2 + rng.IntN(8) {
			src.write(b, 1)
		}
		var es []btreeidx.Extent
		src.DirtyExtents(0, func(e btreeidx.Extent) bool { es = append(es, e); return true })
		rng.Shuffle(len(es), func(i, j int) { es[i], es[j] = es[j], es[i] })
		dev := &recDev{inner: storage.NewMem(src.size())}
		guard(src, dev)
		errBad := errors.New("bad sector")
		badOff := int64(200 * bs) // a one-block extent, apart from others
		for src.DirtyBytes() > 0 && !src.mu.dirty[badOff/bs] {
			badOff += bs
		}
		if fail {
			dev.failWrite = func(off, n int64) error {
				if off <= badOff && badOff < off+n {
					return errBad
				}
				return nil
			}
		}
		f := New(src, dev, Config{MaxWrite: maxWrite, MaxInFlight: 4, Logger: quiet})
		var mu sync.Mutex
		var observed, observedN int64
		var cleaned int64
		var err error
		total := src.DirtyBytes()
		if xerr := f.Exclusive(context.Background(), func() {
			cleaned, err = f.WriteBack(es, func(took time.Duration, n int64) {
				mu.Lock()
				observed++
				observedN += n
				mu.Unlock()
			})
		}); xerr != nil {
			t.Fatal(xerr)
		}
		src.check(t)
		ws := dev.writes()
		// The window is 4 jobs in flight (MaxInFlight), each up to
		// jobBytes of consecutive spans written in order: a write can be
		// overtaken by the other jobs' spans, up to that many one-block
		// spans each.
		checkAscending(t, ws, 4*jobBytes/bs)
		var long bool
		var sum int64
		for _, w := range ws {
			sum += w.n
			if w.off == 100*bs {
				long = w.n == 40*bs
			}
			if w.n > maxWrite && w.off != 100*bs {
				t.Errorf("a write of %d bytes at %d: longer than MaxWrite", w.n, w.off)
			}
		}
		t.Logf("fail=%v: %d extents in %d writes, %d flushes, %d cleaned of %d; err %v", fail, len(es), len(ws), dev.flushes(), cleaned, total, err)
		if !long {
			t.Errorf("the 160 KiB extent was not written whole: %v", ws)
		}
		wantObs, wantN := int64(len(ws)), sum
		if fail { // the failed write, which the backing did not record
			wantObs, wantN = wantObs+1, wantN+bs
		}
		if observed != wantObs || observedN != wantN {
			t.Errorf("observe saw %d writes of %d bytes; the backing %d of %d", observed, observedN, len(ws), sum)
		}
		if dev.flushes() != 1 {
			t.Errorf("%d flushes, want 1", dev.flushes())
		}
		if !fail {
			if err != nil || cleaned != total || src.DirtyBytes() != 0 || len(ws) > 4+1+len(es)-65 {
				t.Errorf("err %v, cleaned %d of %d, %d dirty left, %d writes", err, cleaned, total, src.DirtyBytes(), len(ws))
			}
			checkImage(t, dev, src)
			continue
		}
		if !errors.Is(err, errBad) || src.DirtyBytes() != bs || cleaned != total-bs {
			t.Errorf("a failed write: err %v, cleaned %d of %d, %d dirty left (want the one block)", err, cleaned, total, src.DirtyBytes())
		}
	}
}
