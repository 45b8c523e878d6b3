package main

import (
	"fmt"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ring is the least of io_uring the floor needs: queue reads and writes,
// submit them with one system call, wait for all of them. One goroutine
// uses it; the kernel's side of the rings is reached through atomics.
type ring struct {
	fd                   int
	sqMem, cqMem, sqeMem []byte
	sqHead, sqTail       *uint32
	sqMask               uint32
	sqArray              []uint32
	sqes                 []sqe
	cqHead, cqTail       *uint32
	cqMask               uint32
	cqes                 []cqe
	queued, inFlight     uint32
	entries              uint32
}

// sqe is struct io_uring_sqe, as far as reads and writes use it.
type sqe struct {
	opcode   uint8
	flags    uint8
	ioprio   uint16
	fd       int32
	off      uint64
	addr     uint64
	len      uint32
	rwFlags  uint32
	userData uint64
	_        [3]uint64
}

// cqe is struct io_uring_cqe.
type cqe struct {
	userData uint64
	res      int32
	flags    uint32
}

type sqOffsets struct{ head, tail, ringMask, ringEntries, flags, dropped, array, resv1, userAddr0, userAddr1 uint32 }
type cqOffsets struct{ head, tail, ringMask, ringEntries, overflow, cqes, flags, resv1, userAddr0, userAddr1 uint32 }

type params struct {
	sqEntries, cqEntries, flags, sqThreadCPU, sqThreadIdle, features, wqFD uint32
	resv                                                                   [3]uint32
	sq                                                                     sqOffsets
	cq                                                                     cqOffsets
}

const (
	opRead  = 22 // IORING_OP_READ
	opWrite = 23 // IORING_OP_WRITE

	offSQRing = 0
	offCQRing = 0x8000000
	offSQEs   = 0x10000000

	enterGetEvents = 1
)

func newRing(entries uint32) (*ring, error) {
	var p params
	fd, _, errno := unix.Syscall(unix.SYS_IO_URING_SETUP, uintptr(entries), uintptr(unsafe.Pointer(&p)), 0)
	if errno != 0 {
		return nil, fmt.Errorf("io_uring_setup: %w", errno)
	}
	r := &ring{fd: int(fd), entries: p.sqEntries}
	var err error
	mmap := func(off int64, n uint32) []byte {
		if err != nil {
			return nil
		}
		var b []byte
		b, err = unix.Mmap(r.fd, off, int(n), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
		return b
	}
	r.sqMem = mmap(offSQRing, p.sq.array+p.sqEntries*4)
	r.cqMem = mmap(offCQRing, p.cq.cqes+p.cqEntries*uint32(unsafe.Sizeof(cqe{})))
	r.sqeMem = mmap(offSQEs, p.sqEntries*uint32(unsafe.Sizeof(sqe{})))
	if err != nil {
		r.close()
		return nil, fmt.Errorf("io_uring mmap: %w", err)
	}
	u32 := func(b []byte, off uint32) *uint32 { return (*uint32)(unsafe.Pointer(&b[off])) }
	r.sqHead, r.sqTail, r.sqMask = u32(r.sqMem, p.sq.head), u32(r.sqMem, p.sq.tail), *u32(r.sqMem, p.sq.ringMask)
	r.sqArray = unsafe.Slice(u32(r.sqMem, p.sq.array), p.sqEntries)
	r.sqes = unsafe.Slice((*sqe)(unsafe.Pointer(&r.sqeMem[0])), p.sqEntries)
	r.cqHead, r.cqTail, r.cqMask = u32(r.cqMem, p.cq.head), u32(r.cqMem, p.cq.tail), *u32(r.cqMem, p.cq.ringMask)
	r.cqes = unsafe.Slice((*cqe)(unsafe.Pointer(&r.cqMem[p.cq.cqes])), p.cqEntries)
	return r, nil
}

func (r *ring) close() {
	for _, b := range [][]byte{r.sqMem, r.cqMem, r.sqeMem} {
		if b != nil {
			unix.Munmap(b)
		}
	}
	unix.Close(r.fd)
}

// queue adds a read or write of p at off on fd; it submits what is queued
// first if the submission ring is full.
func (r *ring) queue(op uint8, fd int, p []byte, off int64) error {
	if r.queued+r.inFlight == r.entries {
		if err := r.wait(); err != nil {
			return err
		}
	}
	tail := atomic.LoadUint32(r.sqTail)
	i := tail & r.sqMask
	r.sqes[i] = sqe{opcode: op, fd: int32(fd), off: uint64(off), addr: uint64(uintptr(unsafe.Pointer(&p[0]))), len: uint32(len(p)), userData: uint64(len(p))}
	r.sqArray[i] = i
	atomic.StoreUint32(r.sqTail, tail+1)
	r.queued++
	return nil
}

// wait submits what is queued and waits for everything in flight. A short
// read or write, or one that failed, is an error.
func (r *ring) wait() error {
	for r.queued+r.inFlight > 0 {
		n, _, errno := unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(r.fd), uintptr(r.queued), uintptr(r.queued+r.inFlight), enterGetEvents, 0, 0)
		if errno == unix.EINTR {
			continue
		}
		if errno != 0 {
			return fmt.Errorf("io_uring_enter: %w", errno)
		}
		r.inFlight += uint32(n)
		r.queued -= uint32(n)
		head, tail := atomic.LoadUint32(r.cqHead), atomic.LoadUint32(r.cqTail)
		for ; head != tail; head++ {
			c := r.cqes[head&r.cqMask]
			if c.res < 0 {
				return fmt.Errorf("io_uring: %w", unix.Errno(-c.res))
			}
			if uint64(c.res) != c.userData {
				return fmt.Errorf("io_uring: %d of %d bytes", c.res, c.userData)
			}
			r.inFlight--
		}
		atomic.StoreUint32(r.cqHead, head)
	}
	return nil
}
