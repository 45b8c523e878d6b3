package nbd

// arena.go: arena, the server's budget for request buffers: a buddy
// allocator over one mapping.

import (
	"context"
	"errors"
	"fmt"
	"math/bits"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// arena is the server's budget for request buffers: the payloads of
// WRITEs, the data of READs and the descriptors of BLOCK_STATUS replies,
// for every connection together.
//
// The memory is one anonymous mapping of size bytes, made at the first
// get and outside the Go heap, so that neither the garbage collector's
// slack nor a pool's leftovers can make buffers cost more than the
// mapping. Whatever the clients do, buffers never hold more than size
// bytes of memory: that is the bound the server's resident set is
// measured against (test/limits_test.go).
//
// It is a buddy allocator. Blocks are pageSize << order bytes, aligned to
// their own size from the start of the mapping; a request for n bytes
// takes the smallest block that holds n, and a freed block merges with its
// free buddy. The mapping is cut into descending powers of two (a budget
// of 96 MiB is a 64 MiB and a 32 MiB top block), so the largest buffer
// is the largest power of two that fits.
//
// Waiting is first come, first served: a get that cannot be served at once
// queues behind every earlier waiter, even if a smaller block is free, and
// a put serves the queue strictly in order. So a large request is never
// starved by a stream of small ones, and a small one waits at most for the
// requests ahead of it. Every buffer is held for one request's life: a
// device call, plus a reply bounded by Config.WriteTimeout or a payload
// bounded by Config.ReadTimeout. Nothing waits forever.
//
// Lock order: a connection's share (conn.share) is acquired before the
// arena, and nothing else is held while waiting for either.
type arena struct {
	size     int // bytes; a multiple of pageSize
	maxOrder int // order of the largest (first) top block
	// observe, if set (tests), is called without the lock after every
	// change: a get served or queued, a put.
	observe atomic.Pointer[func()]

	mu struct {
		sync.Mutex
		mem      []byte // the mapping; nil before the first get and after release
		released bool
		// Free lists: heads[order] is the first page of a free block of
		// that order, or -1; next and prev link the blocks of one list
		// by their first page; freeOrder[p] is the order of the free
		// block starting at page p, or -1 if none starts there.
		heads     []int32
		next      []int32
		prev      []int32
		freeOrder []int8
		// stash holds freed blocks of the small orders, unmerged, for
		// the next get of the same size: a stream of 4 KiB requests would
		// otherwise split a top block and merge it back on every one.
		// Stashed blocks are free; any get that finds no free block
		// merges the whole stash first, so the stash never makes anyone
		// wait.
		stash [stashOrders][]int32
		used  int // bytes in blocks handed out
		peak  int
		waits int64 // gets that had to queue
		queue []*arenaWaiter
	}
}

// pageSize is the smallest block.
const pageSize = 4096

// The stash keeps up to stashLen blocks of each order below stashOrders
// (4 KiB to 512 KiB).
const (
	stashOrders = 8
	stashLen    = 64
)

// errArenaClosed is returned by get after the server released its
// buffers (Shutdown finished).
var errArenaClosed = errors.New("nbd: buffer arena released")

type arenaWaiter struct {
	order int
	ready chan int32 // receives the block's first page
}

// buffer is one block handed out by an arena; data is its first n bytes.
// lane marks a block of the server's lane arena (conn.getBuf); borrowed,
// a payload left in the read buffer (conn.borrow), of no arena.
type buffer struct {
	data     []byte
	page     int32
	order    int8
	lane     bool
	borrowed bool
}

// newArena makes an arena of size bytes (at least one page; rounded down
// to whole pages). The mapping is made at the first get.
func newArena(size int64) *arena {
	a := &arena{size: int(max(size, pageSize)) &^ (pageSize - 1)}
	pages := a.size / pageSize
	a.maxOrder = bits.Len(uint(pages)) - 1
	return a
}

// largest is the size of the largest block, the largest buffer there is.
func (a *arena) largest() int { return pageSize << a.maxOrder }

// orderOf is the order of the smallest block that holds n > 0 bytes.
func orderOf(n int) int {
	if n <= pageSize {
		return 0
	}
	return bits.Len(uint(n-1)) - bits.Len(pageSize-1)
}

// blockSize is the number of bytes of budget that a buffer of n bytes
// costs.
func blockSize(n int) int { return pageSize << orderOf(n) }

// mapLocked makes the mapping and its free lists on first use.
func (a *arena) mapLocked() error {
	if a.mu.released {
		return errArenaClosed
	}
	if a.mu.mem != nil {
		return nil
	}
	mem, err := unix.Mmap(-1, 0, a.size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	if err != nil {
		return fmt.Errorf("nbd: mapping the %d-byte buffer budget: %w", a.size, err)
	}
	pages := a.size / pageSize
	a.mu.mem = mem
	a.mu.heads = make([]int32, a.maxOrder+1)
	a.mu.next = make([]int32, pages)
	a.mu.prev = make([]int32, pages)
	a.mu.freeOrder = make([]int8, pages)
	for i := range a.mu.heads {
		a.mu.heads[i] = -1
	}
	for i := range a.mu.freeOrder {
		a.mu.freeOrder[i] = -1
	}
	// Top blocks in descending sizes: each starts at a multiple of its
	// own size, since everything before it is a sum of larger powers.
	p := 0
	for o := a.maxOrder; o >= 0; o-- {
		if pages-p >= 1<<o {
			a.pushLocked(int32(p), o)
			p += 1 << o
		}
	}
	return nil
}

func (a *arena) pushLocked(p int32, order int) {
	h := a.mu.heads[order]
	a.mu.next[p], a.mu.prev[p] = h, -1
	if h >= 0 {
		a.mu.prev[h] = p
	}
	a.mu.heads[order] = p
	a.mu.freeOrder[p] = int8(order)
}

func (a *arena) removeLocked(p int32) {
	order := a.mu.freeOrder[p]
	n, pr := a.mu.next[p], a.mu.prev[p]
	if pr >= 0 {
		a.mu.next[pr] = n
	} else {
		a.mu.heads[order] = n
	}
	if n >= 0 {
		a.mu.prev[n] = pr
	}
	a.mu.freeOrder[p] = -1
}

// takeLocked takes a free block of the order: a stashed one, else one from
// the free lists, else, after merging the stash, one from the free lists
// again. ok is false when none is free.
func (a *arena) takeLocked(order int) (p int32, ok bool) {
	if order < stashOrders {
		if st := a.mu.stash[order]; len(st) > 0 {
			p = st[len(st)-1]
			a.mu.stash[order] = st[:len(st)-1]
			a.mu.used += pageSize << order
			a.mu.peak = max(a.mu.peak, a.mu.used)
			return p, true
		}
	}
	if p, ok = a.allocLocked(order); ok {
		return p, true
	}
	drained := false
	for o := range a.mu.stash {
		for _, q := range a.mu.stash[o] {
			a.mergeLocked(q, o)
			drained = true
		}
		a.mu.stash[o] = a.mu.stash[o][:0]
	}
	if !drained {
		return 0, false
	}
	return a.allocLocked(order)
}

// allocLocked takes a free block of the order from the free lists,
// splitting a larger one if need be; ok is false when none is free.
func (a *arena) allocLocked(order int) (p int32, ok bool) {
	k := order
	for k <= a.maxOrder && a.mu.heads[k] < 0 {
		k++
	}
	if k > a.maxOrder {
		return 0, false
	}
	p = a.mu.heads[k]
	a.removeLocked(p)
	for k > order {
		k--
		a.pushLocked(p+1<<k, k)
	}
	a.mu.used += pageSize << order
	a.mu.peak = max(a.mu.peak, a.mu.used)
	return p, true
}

// freeLocked returns a block: to the stash if it is small and the stash
// has room, else to the free lists.
func (a *arena) freeLocked(p int32, order int) {
	a.mu.used -= pageSize << order
	if order < stashOrders && len(a.mu.stash[order]) < stashLen {
		a.mu.stash[order] = append(a.mu.stash[order], p)
		return
	}
	a.mergeLocked(p, order)
}

// mergeLocked puts a free block on the free lists, merged with its free
// buddies.
func (a *arena) mergeLocked(p int32, order int) {
	for order < a.maxOrder {
		b := p ^ 1<<order
		if int(b) >= len(a.mu.freeOrder) || int(a.mu.freeOrder[b]) != order {
			break
		}
		a.removeLocked(b)
		p = min(p, b)
		order++
	}
	a.pushLocked(p, order)
}

// get returns a buffer of n bytes (0 < n <= largest()), waiting in line
// until the budget has room. Its contents are undefined. It fails only if
// ctx ends first or the arena was released.
func (a *arena) get(ctx context.Context, n int) (buffer, error) {
	order := orderOf(n)
	if order > a.maxOrder {
		// Callers validate lengths against the maximum payload,
		// which is at most largest().
		panic(fmt.Sprintf("nbd: buffer of %d bytes exceeds the largest block %d", n, a.largest()))
	}
	a.mu.Lock()
	if err := a.mapLocked(); err != nil {
		a.mu.Unlock()
		return buffer{}, err
	}
	if len(a.mu.queue) == 0 {
		if p, ok := a.takeLocked(order); ok {
			b := a.bufferLocked(p, order, n)
			a.mu.Unlock()
			a.changed()
			return b, nil
		}
	}
	w := &arenaWaiter{order: order, ready: make(chan int32, 1)}
	a.mu.queue = append(a.mu.queue, w)
	a.mu.waits++
	a.mu.Unlock()
	a.changed()

	select {
	case p := <-w.ready:
		return a.buffer(p, order, n), nil
	case <-ctx.Done():
	}
	a.mu.Lock()
	select {
	case p := <-w.ready:
		// Served while giving up: hand the block back.
		a.freeLocked(p, order)
	default:
		for i, q := range a.mu.queue {
			if q == w {
				a.mu.queue = append(a.mu.queue[:i], a.mu.queue[i+1:]...)
				break
			}
		}
	}
	// Leaving may have unblocked the waiters behind.
	a.serveLocked()
	a.mu.Unlock()
	a.changed()
	return buffer{}, ctx.Err()
}

// tryGet returns a buffer of n bytes (0 < n <= largest()) if one can be
// had at once without passing a waiter: nobody is queued and a block is
// free.
func (a *arena) tryGet(n int) (buffer, bool) {
	order := orderOf(n)
	a.mu.Lock()
	if order > a.maxOrder || len(a.mu.queue) > 0 || a.mapLocked() != nil {
		a.mu.Unlock()
		return buffer{}, false
	}
	p, ok := a.takeLocked(order)
	var b buffer
	if ok {
		b = a.bufferLocked(p, order, n)
	}
	a.mu.Unlock()
	if ok {
		a.changed()
	}
	return b, ok
}

func (a *arena) buffer(p int32, order, n int) buffer {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.bufferLocked(p, order, n)
}

func (a *arena) bufferLocked(p int32, order, n int) buffer {
	off := int(p) * pageSize
	return buffer{data: a.mu.mem[off : off+n : off+pageSize<<order], page: p, order: int8(order)}
}

// put returns b to the arena and serves the waiters it makes room for.
// b.data must not be used afterwards.
func (a *arena) put(b buffer) {
	if b.data == nil {
		return
	}
	a.mu.Lock()
	a.freeLocked(b.page, int(b.order))
	a.serveLocked()
	a.mu.Unlock()
	a.changed()
}

func (a *arena) changed() {
	if f := a.observe.Load(); f != nil {
		(*f)()
	}
}

// serveLocked hands blocks to the waiters in order, stopping at the first
// that cannot be served.
func (a *arena) serveLocked() {
	for len(a.mu.queue) > 0 {
		w := a.mu.queue[0]
		p, ok := a.takeLocked(w.order)
		if !ok {
			return
		}
		a.mu.queue[0] = nil
		a.mu.queue = a.mu.queue[1:]
		w.ready <- p
	}
}

// arenaStats is a snapshot for Server.Stats.
type arenaStats struct {
	used, peak int
	waits      int64
	queued     int
}

func (a *arena) stats() arenaStats {
	a.mu.Lock()
	defer a.mu.Unlock()
	return arenaStats{used: a.mu.used, peak: a.mu.peak, waits: a.mu.waits, queued: len(a.mu.queue)}
}

// release unmaps the memory. Every buffer must have been put back: the
// server calls it once no connection is left (Shutdown), or when it is
// garbage (a cleanup), when no connection can be left either.
func (a *arena) release() {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.mu.released = true
	if a.mu.mem == nil {
		return
	}
	if a.mu.used != 0 {
		// A buffer is still out: unmapping would turn a late use into
		// a crash. Keep the mapping; it dies with the process.
		return
	}
	unix.Munmap(a.mu.mem)
	a.mu.mem = nil
}
