package cache

import (
	"bytes"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/nbdcache/nbdcache/storage"
	"github.com/nbdcache/nbdcache/test/testseed"
)

// failAt fails every write that starts at off.
type failAt struct {
	*recordingDevice
	off int64
}

var errInjected = errors.New("injected")

func (f *failAt) WriteAt(p []byte, off int64, flags storage.Flags) error {
	if off == f.off {
		f.recordingDevice.WriteAt(nil, off, flags) // recorded, not applied
		return errInjected
	}
	return f.recordingDevice.WriteAt(p, off, flags)
}

// TestGroupWriterMerges: a batch goes out as one write per run of adjacent
// chunks, whatever order the writers joined in; a failed run fails its
// own writers only; and the bytes land where each writer asked.
func TestGroupWriterMerges(t *testing.T) {
	for _, vec := range []bool{false, true} {
		t.Run(fmt.Sprintf("vec=%v", vec), func(t *testing.T) { testGroupWriterMerges(t, vec) })
	}
}

// vecDev is a device whose WriteVecAt joins the buffers and writes them
// with its own WriteAt (so a wrapper's failures and records apply): the
// group writer's path for a VectorWriter.
type vecDev struct{ storage.Device }

func (d vecDev) WriteVecAt(bufs [][]byte, off int64) error {
	var p []byte
	for _, b := range bufs {
		p = append(p, b...)
	}
	return d.WriteAt(p, off, 0)
}

// newGroupWriter is a groupWriter on dev, through vecDev if vec.
func newGroupWriter(dev storage.Device, writes *atomic.Int64, vec bool) *groupWriter {
	g := new(groupWriter)
	if vec {
		dev = vecDev{dev}
	}
	g.init(dev, writes)
	if (g.vec != nil) != vec {
		panic("groupWriter.init: vector path not as asked")
	}
	return g
}

func testGroupWriterMerges(t *testing.T, vec bool) {
	const k = 4096
	rec := &recordingDevice{Device: storage.NewMem(1 << 20)}
	dev := &failAt{recordingDevice: rec, off: 16 * k}
	var writes atomic.Int64
	g := newGroupWriter(dev, &writes, vec)
	spans := [][2]int64{{2 * k, k}, {0, k}, {k, k}, {20 * k, k}, {16 * k, 4 * k}, {40 * k, 2 * k}, {24 * k, 3 * k}}
	reqs := make([]groupReq, len(spans))
	for i, s := range spans {
		reqs[i] = groupReq{p: payload(s[0], s[1], uint64(i+1)), off: s[0]}
	}
	g.flush(reqs)

	want := [][2]int64{{0, 3 * k}, {16 * k, 5 * k}, {24 * k, 3 * k}, {40 * k, 2 * k}}
	got := rec.take()
	got[1][1] = 5 * k // the failed run is recorded with no payload
	if !slices.Equal(got, want) {
		t.Fatalf("device writes %v, want %v", got, want)
	}
	if writes.Load() != int64(len(want)) {
		t.Fatalf("counted %d writes, want %d", writes.Load(), len(want))
	}
	for i, r := range reqs {
		failed := r.off == 16*k || r.off == 20*k
		if failed != errors.Is(r.err, errInjected) {
			t.Fatalf("write %d at %d: err %v", i, r.off, r.err)
		}
		if failed {
			continue
		}
		back := make([]byte, len(r.p))
		if err := rec.ReadAt(back, r.off); err != nil || !bytes.Equal(back, r.p) {
			t.Fatalf("write %d at %d did not land (%v)", i, r.off, err)
		}
	}
}

// TestGroupWriterBoundsRuns: adjacent chunks beyond maxGroupRun split
// into several writes, none longer than maxGroupRun unless one chunk is.
func TestGroupWriterBoundsRuns(t *testing.T) {
	rec := &recordingDevice{Device: storage.NewMem(8 << 20)}
	var writes atomic.Int64
	g := newGroupWriter(rec, &writes, false)
	var reqs []groupReq
	off := int64(0)
	for _, n := range []int64{256 << 10, 512 << 10, 512 << 10, 3 << 20, 64 << 10} {
		reqs = append(reqs, groupReq{p: payload(off, n, 1), off: off})
		off += n
	}
	g.flush(reqs)
	got := rec.take()
	want := [][2]int64{{0, 768 << 10}, {768 << 10, 512 << 10}, {1280 << 10, 3 << 20}, {1280<<10 + 3<<20, 64 << 10}}
	if !slices.Equal(got, want) {
		t.Fatalf("device writes %v, want %v", got, want)
	}
}

// TestGroupWriterConcurrent: many writers of adjacent chunks, as the
// allocator hands them out; every byte lands, and every write returns only
// once its data is on the device.
func TestGroupWriterConcurrent(t *testing.T) {
	seed := testseed.Get(t)
	for _, vec := range []bool{false, true} {
		t.Run(fmt.Sprintf("vec=%v", vec), func(t *testing.T) { testGroupWriterConcurrent(t, seed, vec) })
	}
}

func testGroupWriterConcurrent(t *testing.T, seed uint64, vec bool) {
	const size = 16 << 20
	rec := &recordingDevice{Device: storage.NewMem(size)}
	var writes atomic.Int64
	g := newGroupWriter(rec, &writes, vec)
	var next atomic.Int64
	var wg sync.WaitGroup
	n := int64(0)
	for w := range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rng(seed + uint64(w))
			for {
				l := int64(1+r.IntN(4)) * 4096
				off := next.Add(l) - l
				if off+l > size {
					return
				}
				p := payload(off, l, uint64(w+1))
				if err := g.write(p, off); err != nil {
					t.Error(err)
					return
				}
				back := make([]byte, l)
				if err := rec.ReadAt(back, off); err != nil || !bytes.Equal(back, p) {
					t.Errorf("write at %d returned before its data landed (%v)", off, err)
					return
				}
				atomic.AddInt64(&n, 1)
			}
		}()
	}
	wg.Wait()
	t.Logf("%d writes in %d device writes", n, writes.Load())
	if writes.Load() > n || writes.Load() == 0 {
		t.Fatalf("%d device writes for %d writes", writes.Load(), n)
	}
}
