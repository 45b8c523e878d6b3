package storage

// serialwrites.go: when File serializes its buffered writes itself.

import (
	"sync"
	"sync/atomic"
	"time"
)

// serialWrites decides whether the buffered writes to a regular file
// wait on a mutex of their own. The file system serializes them on the
// inode lock anyway (ext4, xfs, btrfs and tmpfs take it exclusively for a
// buffered write), and a thread waiting for it spins while the holder
// runs. That is cheap while a write holds the lock for a microsecond or
// two, as a 4 KiB write into a page of its own does, and parking waiters
// instead costs more (a 4k randwrite row ran about 15% slower with the
// mutex always on). It is ruinous when each write holds the lock for tens
// of microseconds, as when ext4 walks every buffer head of a large folio
// (a file written in 1 MiB pieces, 40+ us a 4 KiB write on this kernel):
// one running writer and one spinning waiter then fill 2 CPUs. So writes
// are timed, and the mutex is used while the average write is slow.
type serialWrites struct {
	mu  sync.Mutex
	avg atomic.Int64 // moving average of a write's duration, ns
	on  atomic.Bool
}

// The average at which the mutex comes into use, and at which it is
// dropped again; the gap keeps it from flapping.
const (
	serialOn  = 20 * time.Microsecond
	serialOff = 8 * time.Microsecond
)

// begin is called before a write; it returns whether it took the mutex
// and the start time, both for end.
func (s *serialWrites) begin() (locked bool, start time.Time) {
	if s.on.Load() {
		s.mu.Lock()
		locked = true
	}
	return locked, time.Now()
}

// end records the write's duration (an estimate: concurrent updates may
// lose one) and releases the mutex if begin took it.
func (s *serialWrites) end(locked bool, start time.Time) {
	s.note(time.Since(start))
	if locked {
		s.mu.Unlock()
	}
}

// note folds d into the average, with a weight of 1/16.
func (s *serialWrites) note(d time.Duration) {
	a := s.avg.Load()
	a += (int64(d) - a) / 16
	s.avg.Store(a)
	switch {
	case a > int64(serialOn):
		s.on.Store(true)
	case a < int64(serialOff):
		s.on.Store(false)
	}
}
