package storage

// mem.go: Mem, a sparse in-memory Device.

import (
	"sync"
	"sync/atomic"
)

// Mem geometry. A chunk is the unit of allocation; a leaf is a lazily
// allocated table of chunks, so that a large, mostly empty Mem costs one
// pointer per leaf.
const (
	memChunkShift = 16 // 64 KiB chunks
	memChunkSize  = 1 << memChunkShift
	memLeafShift  = 8 // 256 chunks (16 MiB) per leaf
	memLeafLen    = 1 << memLeafShift
)

// memChunk is one chunk of a Mem. data == nil means the chunk is a hole that
// reads as zeroes. mu guards data and its contents.
type memChunk struct {
	mu   sync.RWMutex
	data []byte
}

type memLeaf [memLeafLen]memChunk

// Mem is a sparse in-memory Device. Chunks of 64 KiB are allocated on the
// first write that touches them; Trim and Zero free whole chunks. Every
// chunk has its own lock, so requests to different chunks never contend.
// Writes are durable when they return: Flush does nothing.
type Mem struct {
	size   int64
	leaves []atomic.Pointer[memLeaf]
	closed atomic.Bool
}

var (
	_ Device   = (*Mem)(nil)
	_ Extenter = (*Mem)(nil)
)

// NewMem returns a zero-filled Mem of size bytes.
func NewMem(size int64) *Mem {
	if size < 0 {
		size = 0
	}
	nchunks := (size + memChunkSize - 1) >> memChunkShift
	nleaves := (nchunks + memLeafLen - 1) >> memLeafShift
	return &Mem{size: size, leaves: make([]atomic.Pointer[memLeaf], nleaves)}
}

// Size returns the device size in bytes.
func (m *Mem) Size() int64 { return m.size }

// Caps reports a fast, non-rotational device on which every operation is
// supported and durable as soon as it returns.
func (m *Mem) Caps() Caps {
	return Caps{Flush: true, FUA: true, Trim: true, Zero: true, FastZero: true, BlockSize: 512}
}

// ReadAt fills p from offset off.
func (m *Mem) ReadAt(p []byte, off int64) error {
	if m.closed.Load() {
		return ErrClosed
	}
	if err := CheckRange(m.size, off, int64(len(p))); err != nil {
		return err
	}
	m.read(p, off)
	return nil
}

// ReadNoWait is ReadAt: memory never waits.
func (m *Mem) ReadNoWait(p []byte, off int64) bool {
	return m.ReadAt(p, off) == nil
}

// WriteAt writes p at offset off. Every write is durable on return, so FUA
// needs nothing more.
func (m *Mem) WriteAt(p []byte, off int64, flags Flags) error {
	if m.closed.Load() {
		return ErrClosed
	}
	if err := CheckRange(m.size, off, int64(len(p))); err != nil {
		return err
	}
	m.write(p, off)
	return nil
}

// WriteVecAt writes bufs one after another from off (VectorWriter).
func (m *Mem) WriteVecAt(bufs [][]byte, off int64) error {
	if m.closed.Load() {
		return ErrClosed
	}
	if err := CheckRange(m.size, off, vecLen(bufs)); err != nil {
		return err
	}
	for _, b := range bufs {
		m.write(b, off)
		off += int64(len(b))
	}
	return nil
}

// Flush does nothing: Mem has no volatile cache.
func (m *Mem) Flush() error {
	if m.closed.Load() {
		return ErrClosed
	}
	return nil
}

// Trim makes the range read back as zeroes, freeing the chunks it covers
// whole.
func (m *Mem) Trim(off, length int64, flags Flags) error {
	if m.closed.Load() {
		return ErrClosed
	}
	if err := CheckRange(m.size, off, length); err != nil {
		return err
	}
	m.zero(off, length, false)
	return nil
}

// Zero makes the range read back as zeroes. Without NoHole, chunks covered
// whole are freed; with NoHole they stay (or become) allocated.
func (m *Mem) Zero(off, length int64, flags Flags) error {
	if m.closed.Load() {
		return ErrClosed
	}
	if err := CheckRange(m.size, off, length); err != nil {
		return err
	}
	m.zero(off, length, flags&NoHole != 0)
	return nil
}

// Extents reports unallocated chunks as holes (Hole and Zero) and allocated
// chunks as data. Adjacent chunks in the same state are merged.
func (m *Mem) Extents(off, length int64, fn func(Extent) bool) error {
	if m.closed.Load() {
		return ErrClosed
	}
	if err := CheckRange(m.size, off, length); err != nil {
		return err
	}
	m.extents(off, length, fn)
	return nil
}

// Close frees the memory. Later calls fail with ErrClosed.
func (m *Mem) Close() error {
	if m.closed.Swap(true) {
		return nil
	}
	for i := range m.leaves {
		m.leaves[i].Store(nil)
	}
	return nil
}

// chunk returns chunk number ci, allocating its leaf if alloc is set. It
// returns nil if the leaf does not exist and alloc is false.
func (m *Mem) chunk(ci int64, alloc bool) *memChunk {
	lp := &m.leaves[ci>>memLeafShift]
	leaf := lp.Load()
	if leaf == nil {
		if !alloc {
			return nil
		}
		fresh := new(memLeaf)
		if lp.CompareAndSwap(nil, fresh) {
			leaf = fresh
		} else {
			leaf = lp.Load()
		}
	}
	return &leaf[ci&(memLeafLen-1)]
}

// chunkLen is the length of chunk ci: memChunkSize except for a short last
// chunk.
func (m *Mem) chunkLen(ci int64) int {
	start := ci << memChunkShift
	return int(min(memChunkSize, m.size-start))
}

// read copies [off, off+len(p)) into p. The range must be valid.
func (m *Mem) read(p []byte, off int64) {
	for len(p) > 0 {
		ci := off >> memChunkShift
		co := int(off & (memChunkSize - 1))
		n := min(len(p), memChunkSize-co)
		c := m.chunk(ci, false)
		if c == nil {
			clear(p[:n])
		} else {
			c.mu.RLock()
			if c.data == nil {
				clear(p[:n])
			} else {
				copy(p[:n], c.data[co:])
			}
			c.mu.RUnlock()
		}
		p = p[n:]
		off += int64(n)
	}
}

// write copies p to [off, off+len(p)). The range must be valid.
func (m *Mem) write(p []byte, off int64) {
	for len(p) > 0 {
		ci := off >> memChunkShift
		co := int(off & (memChunkSize - 1))
		n := min(len(p), memChunkSize-co)
		c := m.chunk(ci, true)
		c.mu.Lock()
		if c.data == nil {
			c.data = make([]byte, m.chunkLen(ci))
		}
		copy(c.data[co:], p[:n])
		c.mu.Unlock()
		p = p[n:]
		off += int64(n)
	}
}

// zero zeroes [off, off+length). Chunks covered whole are freed unless
// keep is set, in which case they are allocated. The range must be valid.
func (m *Mem) zero(off, length int64, keep bool) {
	for length > 0 {
		ci := off >> memChunkShift
		co := int(off & (memChunkSize - 1))
		clen := m.chunkLen(ci)
		n := int(min(length, int64(clen-co)))
		whole := co == 0 && n == clen
		c := m.chunk(ci, keep)
		if c != nil {
			c.mu.Lock()
			switch {
			case c.data == nil && keep:
				c.data = make([]byte, clen)
			case c.data == nil:
			case whole && !keep:
				c.data = nil
			default:
				clear(c.data[co : co+n])
			}
			c.mu.Unlock()
		}
		off += int64(n)
		length -= int64(n)
	}
}

// allocated reports whether chunk ci holds data.
func (m *Mem) allocated(ci int64) bool {
	c := m.chunk(ci, false)
	if c == nil {
		return false
	}
	c.mu.RLock()
	a := c.data != nil
	c.mu.RUnlock()
	return a
}

// extents implements Extents on a valid range.
func (m *Mem) extents(off, length int64, fn func(Extent) bool) {
	end := off + length
	for off < end {
		hole := !m.allocated(off >> memChunkShift)
		next := off
		for next < end && !m.allocated(next>>memChunkShift) == hole {
			next = min(end, (next>>memChunkShift+1)<<memChunkShift)
		}
		if !fn(Extent{Length: next - off, Hole: hole, Zero: hole}) {
			return
		}
		off = next
	}
}

// clone returns an independent copy of m's contents.
func (m *Mem) clone() *Mem {
	c := NewMem(m.size)
	for li := range m.leaves {
		leaf := m.leaves[li].Load()
		if leaf == nil {
			continue
		}
		for i := range leaf {
			src := &leaf[i]
			src.mu.RLock()
			if src.data != nil {
				ci := int64(li)<<memLeafShift | int64(i)
				c.chunk(ci, true).data = append([]byte(nil), src.data...)
			}
			src.mu.RUnlock()
		}
	}
	return c
}

// allocatedBytes is the memory held by allocated chunks.
func (m *Mem) allocatedBytes() int64 {
	var n int64
	for li := range m.leaves {
		leaf := m.leaves[li].Load()
		if leaf == nil {
			continue
		}
		for i := range leaf {
			leaf[i].mu.RLock()
			n += int64(len(leaf[i].data))
			leaf[i].mu.RUnlock()
		}
	}
	return n
}
