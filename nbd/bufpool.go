package nbd

import (
	"math/bits"
	"sync"
)

// bufPool hands out byte slices in power-of-two size classes from 4 KiB
// up, so that request payloads are not allocated per request.
type bufPool struct {
	classes [20]sync.Pool // 4 KiB << i, up to 2 GiB
}

const minBufShift = 12

func classOf(n int) int {
	if n <= 1<<minBufShift {
		return 0
	}
	return bits.Len(uint(n-1)) - minBufShift
}

// get returns a slice of length n. Its contents are undefined.
func (p *bufPool) get(n int) []byte {
	c := classOf(n)
	if c >= len(p.classes) {
		return make([]byte, n)
	}
	if b, ok := p.classes[c].Get().(*[]byte); ok {
		return (*b)[:n]
	}
	return make([]byte, n, 1<<(c+minBufShift))
}

// put returns b to the pool.
func (p *bufPool) put(b []byte) {
	c := classOf(cap(b))
	if c >= len(p.classes) || cap(b) != 1<<(c+minBufShift) {
		return
	}
	b = b[:cap(b)]
	p.classes[c].Put(&b)
}
