package writeback

import (
	"bytes"
	"encoding/binary"
	"flag"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"

	"github.com/nbdcache/nbdcache/btreeidx"
	"github.com/nbdcache/nbdcache/storage"
)

var longFlag = flag.Bool("long", false, "run the long tests")

func newRand(seed uint64) *rand.Rand { return rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15)) }

// locBias is where the fake puts a block's data "on the cache device":
// Loc = Off + locBias, so the test sees whether pieces keep Loc - Off.
const locBias = 1 << 40

// content is the data of the write with version ver at byte pos.
func content(pos int64, ver uint64) byte {
	var w [8]byte
	binary.LittleEndian.PutUint64(w[:], word(pos>>3, ver))
	return w[pos&7]
}

func word(i int64, ver uint64) uint64 {
	x := uint64(i)*0x9e3779b97f4a7c15 ^ ver*0xbf58476d1ce4e5b9
	return x ^ x>>29
}

// fillContent fills p with the data of version ver from byte off.
func fillContent(p []byte, off int64, ver uint64) {
	i := 0
	for ; i < len(p) && (off+int64(i))&7 != 0; i++ {
		p[i] = content(off+int64(i), ver)
	}
	for ; i+8 <= len(p); i += 8 {
		binary.LittleEndian.PutUint64(p[i:], word((off+int64(i))>>3, ver))
	}
	for ; i < len(p); i++ {
		p[i] = content(off+int64(i), ver)
	}
}

// fakeSource is a cache reduced to its index: fixed blocks, each with the
// version of the write that last covered it and a dirty bit. Adjacent dirty
// blocks of one version are listed as one extent, as the real index lists a
// write's pieces. The data of version v at byte pos is content(pos, v), so
// the fake needs no storage and the model image is a function of ver.
type fakeSource struct {
	bs       int64
	capacity int64

	// Hooks, set before use. Called without the fake's lock.
	afterRead func(e btreeidx.Extent)       // after a successful ReadCached
	readErr   func(e btreeidx.Extent) error // ReadCached fails with this if non-nil
	onMark    func(e btreeidx.Extent)       // at MarkClean, before the CAS

	mu struct {
		sync.Mutex
		ver        []uint64
		dirty      []bool
		next       uint64
		dirtyBytes int64
		reads      int
		marks      int
		releases   int
		reg        map[btreeidx.Extent]int // pieces read and not yet marked clean or released
		bad        []string                // contract violations seen
	}
}

var _ Releaser = (*fakeSource)(nil)

func newFakeSource(blocks int, bs, capacity int64) *fakeSource {
	s := &fakeSource{bs: bs, capacity: capacity}
	s.mu.ver = make([]uint64, blocks)
	s.mu.dirty = make([]bool, blocks)
	s.mu.reg = map[btreeidx.Extent]int{}
	return s
}

func (s *fakeSource) size() int64 { return int64(len(s.mu.ver)) * s.bs }

// write is a foreground write of blocks [b, b+n): one new version, dirty.
func (s *fakeSource) write(b, n int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.mu.next++
	for i := b; i < b+n; i++ {
		s.mu.ver[i] = s.mu.next
		if !s.mu.dirty[i] {
			s.mu.dirty[i] = true
			s.mu.dirtyBytes += s.bs
		}
	}
}

func (s *fakeSource) violation(format string, args ...any) {
	s.mu.Lock()
	s.mu.bad = append(s.mu.bad, fmt.Sprintf(format, args...))
	s.mu.Unlock()
}

// check fails t with every contract violation seen, and with pieces read
// but never marked clean or released.
func (s *fakeSource) check(t testing.TB) {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	for e := range s.mu.reg {
		s.mu.bad = append(s.mu.bad, fmt.Sprintf("%v was read but neither marked clean nor released", e))
	}
	for i, b := range s.mu.bad {
		if i == 10 {
			t.Errorf("... and %d more", len(s.mu.bad)-10)
			break
		}
		t.Error(b)
	}
}

func (s *fakeSource) DirtyExtents(from int64, fn func(btreeidx.Extent) bool) {
	b := int(max(from, 0) / s.bs)
	for {
		// A chunk of up to 64 extents under the lock, then fn without it.
		var chunk []btreeidx.Extent
		s.mu.Lock()
		for b < len(s.mu.ver) && len(chunk) < 64 {
			if !s.mu.dirty[b] {
				b++
				continue
			}
			v, start := s.mu.ver[b], b
			for b < len(s.mu.ver) && s.mu.dirty[b] && s.mu.ver[b] == v {
				b++
			}
			off := int64(start) * s.bs
			n := int64(b-start) * s.bs
			chunk = append(chunk, btreeidx.Extent{Off: off, Len: n, Loc: off + locBias, Ver: v, Dirty: true})
		}
		s.mu.Unlock()
		if len(chunk) == 0 {
			return
		}
		for _, e := range chunk {
			if !fn(e) {
				return
			}
		}
	}
}

// CleanExtents lists blocks written once and clean now, merged by
// version like DirtyExtents (blocks never written are not cached).
func (s *fakeSource) CleanExtents(off, end int64, fn func(btreeidx.Extent) bool) {
	var es []btreeidx.Extent
	s.mu.Lock()
	for b := int(off / s.bs); b < len(s.mu.ver) && int64(b)*s.bs < end; {
		if s.mu.dirty[b] || s.mu.ver[b] == 0 {
			b++
			continue
		}
		v, start := s.mu.ver[b], b
		for b < len(s.mu.ver) && int64(b)*s.bs < end && !s.mu.dirty[b] && s.mu.ver[b] == v {
			b++
		}
		es = append(es, btreeidx.Extent{Off: int64(start) * s.bs, Len: int64(b-start) * s.bs, Loc: int64(start)*s.bs + locBias, Ver: v})
	}
	s.mu.Unlock()
	for _, e := range es {
		if !fn(e) {
			return
		}
	}
}

func (s *fakeSource) ReadCached(e btreeidx.Extent, p []byte) error {
	if int64(len(p)) != e.Len || e.Loc != e.Off+locBias || e.Off%512 != 0 || e.Len%512 != 0 || e.Len <= 0 || e.End() > s.size() {
		s.violation("ReadCached(%v, len %d): not a piece of a listed extent", e, len(p))
		return fmt.Errorf("fake: bad ReadCached %v", e)
	}
	if s.readErr != nil {
		if err := s.readErr(e); err != nil {
			return err
		}
	}
	s.mu.Lock()
	s.mu.reads++
	for r := range s.mu.reg {
		if r.Off < e.End() && e.Off < r.End() {
			s.mu.bad = append(s.mu.bad, fmt.Sprintf("ReadCached(%v) while %v is being written back", e, r))
		}
	}
	s.mu.reg[e]++
	s.mu.Unlock()
	fillContent(p, e.Off, e.Ver)
	if s.afterRead != nil {
		s.afterRead(e)
	}
	return nil
}

func (s *fakeSource) MarkClean(e btreeidx.Extent) (cleaned, collided int64) {
	if s.onMark != nil {
		s.onMark(e)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.mu.marks++
	s.unregisterLocked("MarkClean", e)
	for pos := e.Off; pos < e.End(); {
		b := int(pos / s.bs)
		n := min(int64(b+1)*s.bs, e.End()) - pos
		if s.mu.ver[b] == e.Ver {
			cleaned += n
			if s.mu.dirty[b] && n == s.bs {
				s.mu.dirty[b] = false
				s.mu.dirtyBytes -= s.bs
			}
		} else {
			collided += n
		}
		pos += n
	}
	return cleaned, collided
}

func (s *fakeSource) ReleaseCached(e btreeidx.Extent) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.mu.releases++
	s.unregisterLocked("ReleaseCached", e)
}

func (s *fakeSource) unregisterLocked(op string, e btreeidx.Extent) {
	if s.mu.reg[e] == 0 {
		s.mu.bad = append(s.mu.bad, fmt.Sprintf("%s(%v) without a ReadCached of that piece", op, e))
		return
	}
	if s.mu.reg[e]--; s.mu.reg[e] == 0 {
		delete(s.mu.reg, e)
	}
}

func (s *fakeSource) DirtyBytes() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.mu.dirtyBytes
}

func (s *fakeSource) CapacityBytes() int64 { return s.capacity }

// image is the model: what the backing must hold once nothing is dirty.
func (s *fakeSource) image() []byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	img := make([]byte, s.size())
	for b, v := range s.mu.ver {
		if v != 0 {
			fillContent(img[int64(b)*s.bs:int64(b+1)*s.bs], int64(b)*s.bs, v)
		}
	}
	return img
}

// checkImage compares the backing with the model.
func checkImage(t testing.TB, d storage.Device, s *fakeSource) {
	t.Helper()
	got := make([]byte, d.Size())
	if err := d.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	want := s.image()
	if !bytes.Equal(got, want) {
		for i := range got {
			if got[i] != want[i] {
				t.Fatalf("backing differs from the model first at byte %d (block %d)", i, int64(i)/s.bs)
			}
		}
	}
}

// recDev records what reaches a device: every write in arrival order, the
// ranges written since the last Flush, and flushes. failWrite and
// failFlush inject errors. It writes out every Device method.
type recDev struct {
	inner     storage.Device
	failWrite func(off, n int64) error
	failFlush func() error

	mu struct {
		sync.Mutex
		writes    []rec
		unflushed []rec
		flushes   int
	}
}

type rec struct{ off, n int64 }

var _ storage.Device = (*recDev)(nil)

func (d *recDev) Size() int64                      { return d.inner.Size() }
func (d *recDev) Caps() storage.Caps               { return d.inner.Caps() }
func (d *recDev) Close() error                     { return d.inner.Close() }
func (d *recDev) ReadAt(p []byte, off int64) error { return d.inner.ReadAt(p, off) }
func (d *recDev) Trim(off, n int64, f storage.Flags) error {
	return fmt.Errorf("recDev: writeback must not trim: %w", storage.ErrNotSupported)
}
func (d *recDev) Zero(off, n int64, f storage.Flags) error {
	return fmt.Errorf("recDev: writeback must not zero: %w", storage.ErrNotSupported)
}

func (d *recDev) WriteAt(p []byte, off int64, f storage.Flags) error {
	if d.failWrite != nil {
		if err := d.failWrite(off, int64(len(p))); err != nil {
			return err
		}
	}
	d.mu.Lock()
	d.mu.writes = append(d.mu.writes, rec{off, int64(len(p))})
	d.mu.Unlock()
	err := d.inner.WriteAt(p, off, f)
	if err == nil {
		d.mu.Lock()
		d.mu.unflushed = append(d.mu.unflushed, rec{off, int64(len(p))})
		d.mu.Unlock()
	}
	return err
}

func (d *recDev) Flush() error {
	if d.failFlush != nil {
		if err := d.failFlush(); err != nil {
			return err
		}
	}
	d.mu.Lock()
	pending := len(d.mu.unflushed)
	d.mu.Unlock()
	err := d.inner.Flush()
	if err == nil {
		d.mu.Lock()
		d.mu.flushes++
		d.mu.unflushed = d.mu.unflushed[pending:] // writes that returned before Flush was called
		d.mu.Unlock()
	}
	return err
}

// durable reports whether [off, off+n) was flushed since it was last
// written.
func (d *recDev) durable(off, n int64) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, w := range d.mu.unflushed {
		if w.off < off+n && off < w.off+w.n {
			return false
		}
	}
	return true
}

func (d *recDev) writes() []rec {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]rec(nil), d.mu.writes...)
}

func (d *recDev) flushes() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.mu.flushes
}

// guard makes the fake check the ordering rule at every MarkClean: the
// piece is durable on the backing and holds the piece's data.
func guard(s *fakeSource, d *recDev) { guardRaw(s, d, d.inner) }

// guardRaw is guard reading the data back from raw, the device under any
// latency model.
func guardRaw(s *fakeSource, d *recDev, raw storage.Device) {
	s.onMark = func(e btreeidx.Extent) {
		if !d.durable(e.Off, e.Len) {
			s.violation("MarkClean(%v) before its backing write was flushed", e)
			return
		}
		got := make([]byte, e.Len)
		if err := raw.ReadAt(got, e.Off); err != nil {
			s.violation("reading back %v: %v", e, err)
			return
		}
		want := make([]byte, e.Len)
		fillContent(want, e.Off, e.Ver)
		if !bytes.Equal(got, want) {
			s.violation("MarkClean(%v) but the backing does not hold its data", e)
		}
	}
}

// nullDev is a device that keeps nothing: for timing tests that need no
// data, over sizes Mem would have to allocate.
type nullDev struct{ size int64 }

func (d nullDev) Size() int64        { return d.size }
func (d nullDev) Caps() storage.Caps { return storage.Caps{Flush: true, BlockSize: 512} }
func (d nullDev) Close() error       { return nil }
func (d nullDev) Flush() error       { return nil }
func (d nullDev) ReadAt(p []byte, off int64) error {
	return storage.CheckRange(d.size, off, int64(len(p)))
}
func (d nullDev) WriteAt(p []byte, off int64, _ storage.Flags) error {
	return storage.CheckRange(d.size, off, int64(len(p)))
}
func (d nullDev) Trim(off, n int64, _ storage.Flags) error { return storage.CheckRange(d.size, off, n) }
func (d nullDev) Zero(off, n int64, _ storage.Flags) error { return storage.CheckRange(d.size, off, n) }
