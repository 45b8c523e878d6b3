package storage

// device.go: the Device contract: Flags, Caps, the sentinel errors and the
// optional interfaces.

import "errors"

// Flags modify a single data request.
type Flags uint8

const (
	// FUA asks for the data of this request to be durable before the call
	// returns (force unit access).
	FUA Flags = 1 << iota
	// NoHole asks Zero to leave the range allocated: it must not punch a
	// hole.
	NoHole
	// FastZero asks Zero to fail with ErrNotSupported, without touching
	// anything, unless it can zero the range faster than by writing zeroes.
	FastZero
)

// Sentinel errors. Callers check them with errors.Is; the nbd package maps
// them, and the syscall errnos they may wrap, to NBD errors in one place.
var (
	ErrOutOfRange   = errors.New("storage: range outside the device")
	ErrReadOnly     = errors.New("storage: device is read-only")
	ErrNotSupported = errors.New("storage: operation not supported")
	ErrClosed       = errors.New("storage: device closed")
	ErrNoSpace      = errors.New("storage: no space left")
	// ErrSyncFailed: a sync of the device failed earlier, and writes
	// done before it may be lost though a later sync succeeds (File).
	ErrSyncFailed = errors.New("storage: an earlier sync failed; writes before it may be lost (reopen the device to go on)")
	// ErrUnavailable: the device could not be reached (a remote that went
	// away and did not come back in time); it may be reachable later.
	ErrUnavailable = errors.New("storage: device unreachable")
)

// Reachability is implemented by devices that can be out of reach for a
// while (a remote): Reachable reports whether the device is reachable
// now, as far as it knows, without waiting.
type Reachability interface {
	Reachable() bool
}

// Caps describes what a device can do. A layer above must not call a method
// whose capability is false (Trim without Trim, FUA without FUA).
type Caps struct {
	ReadOnly   bool // every write, trim and zero fails with ErrReadOnly
	Flush      bool // Flush makes earlier writes durable (false: writes are durable when acknowledged, or the device is volatile)
	FUA        bool // the FUA flag is honoured natively
	Trim       bool // Trim discards data
	Zero       bool // Zero is cheaper than writing zeroes
	FastZero   bool // Zero can honour FastZero
	Rotational bool // seeks are expensive (a disk, or the hdd model)
	// BlockSize is the smallest unit of I/O that the device handles
	// without read-modify-write; a power of two, at least 512.
	BlockSize int
}

// Device is a block device: a fixed-size array of bytes with a volatile
// write cache. It is the one contract between the NBD server, the cache and
// every storage implementation.
//
// The durability contract: a WriteAt, Trim or Zero that returned nil may
// still be lost by a crash until a later Flush returns nil, unless it
// carried FUA. Methods may be called concurrently; concurrent writes to
// overlapping ranges leave one of them, per block, in an unspecified order.
// Every method checks its range: off >= 0 and off+len <= Size(), else
// ErrOutOfRange.
type Device interface {
	// Size is the device size in bytes. It does not change.
	Size() int64
	// ReadAt fills p from offset off. It never returns a short read
	// without an error.
	ReadAt(p []byte, off int64) error
	// WriteAt writes p at offset off. Flags: FUA.
	WriteAt(p []byte, off int64, flags Flags) error
	// Flush makes every write that returned before Flush was called
	// durable.
	Flush() error
	// Trim discards the range: it reads back as zeroes or as its old data.
	// Flags: FUA.
	Trim(off, length int64, flags Flags) error
	// Zero makes the range read back as zeroes. Flags: FUA, NoHole,
	// FastZero.
	Zero(off, length int64, flags Flags) error
	// Caps reports the device's capabilities. It does not change.
	Caps() Caps
	// Close releases the device. It does not flush.
	Close() error
}

// Extent is a run of bytes with the same allocation state.
type Extent struct {
	Length int64
	Hole   bool // reads as zeroes and is not allocated
	Zero   bool // reads as zeroes
}

// Extenter is implemented by devices that know which ranges are allocated
// (NBD BLOCK_STATUS, base:allocation). Extents calls fn with consecutive
// extents starting at off, covering at least one byte and at most length
// bytes, and stops early when fn returns false.
type Extenter interface {
	Extents(off, length int64, fn func(Extent) bool) error
}

// Prefetcher is implemented by devices that can warm a range into a faster
// tier (NBD CACHE).
type Prefetcher interface {
	Prefetch(off, length int64) error
}

// BatchWrite is one write of a batch (BatchWriter): P at Off, with Flags
// (FUA). WriteBatch sets Err.
type BatchWrite struct {
	P     []byte
	Off   int64
	Flags Flags
	Err   error
}

// BatchWriter is implemented by devices that take many writes in one call
// more cheaply than one by one (the NBD server hands over the writes of one
// socket read). WriteBatch does what WriteAt would do for each, one after
// another in order, and sets each one's Err; each write is acknowledged, as
// WriteAt's return acknowledges it, when WriteBatch returns.
type BatchWriter interface {
	WriteBatch(ws []BatchWrite)
}

// VectorWriter is implemented by devices that write several buffers, one
// after another from off, in one call (pwritev), as WriteAt would write
// them joined: a caller holding pieces adjacent on the device writes them
// without copying them into one buffer first. A device that also wants
// aligned buffers (AlignedWriter) may copy unaligned ones.
type VectorWriter interface {
	WriteVecAt(bufs [][]byte, off int64) error
}

// vecLen is the bytes of bufs, joined.
func vecLen(bufs [][]byte) (n int64) {
	for _, b := range bufs {
		n += int64(len(b))
	}
	return n
}

// AlignedWriter is implemented by devices that write a buffer aligned in
// memory as it is and copy any other first (an O_DIRECT file): a caller
// that could hand over either kind should hand over aligned ones when
// WantsAligned reports true.
type AlignedWriter interface {
	WantsAligned() bool
}

// WantsAligned is dev's WantsAligned, or false if dev does not say.
func WantsAligned(dev Device) bool {
	a, ok := dev.(AlignedWriter)
	return ok && a.WantsAligned()
}

// NoWaitReader is implemented by devices that can tell a read served from
// memory (a page cache, a RAM tier) from one that must wait for a disk or
// a network. ReadNoWait fills p as ReadAt would and returns true, or
// returns false, with p's contents unspecified, when the read would wait
// or fails: the caller then reads with ReadAt, from where it may wait (the
// NBD server answers such reads on its read loop, and hands the others to
// workers).
type NoWaitReader interface {
	ReadNoWait(p []byte, off int64) bool
}

// ReadNoWait is dev's ReadNoWait, or false if dev cannot tell.
func ReadNoWait(dev Device, p []byte, off int64) bool {
	r, ok := dev.(NoWaitReader)
	return ok && r.ReadNoWait(p, off)
}

// NoWaitFlusher is implemented by devices that can tell a Flush with
// nothing to do. FlushNoWait returns true, counting a Flush done, when
// everything a Flush now must make durable is durable already; or false,
// having done nothing, when a Flush would write, sync or fail: the caller
// then calls Flush, from where it may wait (the NBD server answers the
// first kind on its read loop).
type NoWaitFlusher interface {
	FlushNoWait() bool
}

// WritebackStarter is implemented by devices that can start writing a
// range to stable storage without waiting for it (sync_file_range). It is
// a hint that shortens a later Flush, and promises nothing.
type WritebackStarter interface {
	StartWriteback(off, length int64)
}

// extentsOf asks dev, or reports the range as all data when dev is not an
// Extenter.
func extentsOf(dev Device, off, length int64, fn func(Extent) bool) error {
	if e, ok := dev.(Extenter); ok {
		return e.Extents(off, length, fn)
	}
	if err := CheckRange(dev.Size(), off, length); err != nil {
		return err
	}
	if length > 0 {
		fn(Extent{Length: length})
	}
	return nil
}

// prefetchOf asks dev, or does nothing when dev is not a Prefetcher.
func prefetchOf(dev Device, off, length int64) error {
	if p, ok := dev.(Prefetcher); ok {
		return p.Prefetch(off, length)
	}
	return CheckRange(dev.Size(), off, length)
}

// CheckRange validates a request against a device of the given size.
func CheckRange(size, off, length int64) error {
	if off < 0 || length < 0 || off > size || length > size-off {
		return ErrOutOfRange
	}
	return nil
}
