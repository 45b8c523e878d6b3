package storage

// file.go: File, a Device on a regular file or a block device.

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// FileOptions configures OpenFile.
type FileOptions struct {
	// ReadOnly opens the file read-only: writes, trims and zeroes fail
	// with ErrReadOnly.
	ReadOnly bool
	// Direct opens the file with O_DIRECT, bypassing the page cache.
	// Requests that are not aligned (buffer address, offset or length)
	// go through an aligned bounce buffer. A regular file's size must be
	// a multiple of the direct I/O alignment.
	Direct bool
	// Size, if > 0, is the least size of the device: a regular file that
	// is smaller (or missing) is created or extended to it; a block device
	// that is smaller is an error. 0 takes the existing size.
	Size int64
	// Claim is the claim taken on the device before anything else is
	// done to it (claim.go); the File holds it until Close. A refused
	// claim fails with an *InUseError, which names the holder.
	Claim Claim
}

// Tunables of File.
const (
	fileBounceSize = 1 << 20   // bounce buffer for unaligned O_DIRECT requests
	fileZeroSize   = 256 << 10 // zero buffer for zeroing by writing
	fileRMWStripes = 64        // locks serializing read-modify-write per block
	fileMinAlign   = 512
	fileMemAlign   = 4096 // alignment of every buffer File allocates
)

// File is a Device on a regular file or a block device. Requests are
// pread/pwrite calls on a descriptor that File owns; Close closes it only
// after the requests in flight have returned.
type File struct {
	path     string
	fd       int
	size     int64
	caps     Caps
	blockDev bool
	direct   bool
	align    int64 // O_DIRECT offset and length alignment
	memAlign uintptr

	// Features found missing at run time.
	noDSync     atomic.Bool // pwritev2(RWF_DSYNC) refused: pwrite + fdatasync
	noPunch     atomic.Bool
	noZeroRange atomic.Bool
	noAllocate  atomic.Bool

	bounce sync.Pool // *[]byte of fileBounceSize, aligned
	zeros  []byte    // fileZeroSize zeroes, aligned
	rmw    [fileRMWStripes]sync.Mutex

	// serial decides whether buffered writes without FUA to a regular
	// file wait on a mutex of their own (serialwrites.go); nil with
	// O_DIRECT and on block devices. A write with FUA never does: its
	// sync runs after the kernel drops the inode lock.
	serial *serialWrites

	// mutations counts the writes, zeroes and trims that have returned;
	// synced is what it was when the last successful fdatasync began.
	// While they are equal a Flush has nothing to make durable
	// (FlushNoWait): a request counts only once it returns, so a sync
	// that began before it returned never claims to cover it.
	mutations, synced atomic.Uint64

	// syncErr is the first sync that failed (fdatasync, or EIO, ENOSPC
	// or EDQUOT from a write with RWF_DSYNC). After a failed writeback
	// the kernel may have dropped the pages it could not write, marked
	// clean, and it reports the error once, to whichever sync comes
	// first: a later fdatasync can succeed though those writes are gone,
	// and a caller who wrote before the failure but syncs after it would
	// take them for durable (PostgreSQL's "fsyncgate", 2018). So the
	// failure is sticky: every later Flush and FUA write fails with
	// ErrSyncFailed until the device is opened again. Writes without FUA
	// still go.
	syncErr atomic.Pointer[error]
	// syncMu makes fdatasync calls one at a time: of two at once, the
	// kernel reports a writeback error to one, and the other returns 0.
	syncMu sync.Mutex

	// testOnSync, if set (by tests, before any request), is called just
	// before each syscall File makes for durability or writeback, so
	// that a test can prove that Flush and FUA reach the disk. An error
	// it returns stands for the syscall's: the syscall is not made.
	testOnSync func(syncKind) error

	// mu is held shared by every request and exclusively by Close.
	mu struct {
		sync.RWMutex
		closed bool
	}
}

var (
	_ Device   = (*File)(nil)
	_ Extenter = (*File)(nil)
)

// syncKind names a syscall that File.testOnSync reports.
type syncKind uint8

const (
	syncFdatasync      syncKind = iota + 1 // fdatasync
	syncDSyncWrite                         // one pwritev2(RWF_DSYNC) call
	syncStartWriteback                     // sync_file_range(SYNC_FILE_RANGE_WRITE): a hint, not durability
)

func (k syncKind) String() string {
	switch k {
	case syncFdatasync:
		return "fdatasync"
	case syncDSyncWrite:
		return "pwritev2(RWF_DSYNC)"
	case syncStartWriteback:
		return "sync_file_range"
	}
	return "unknown"
}

// noteSync calls the test hook, if any, and returns its error.
func (f *File) noteSync(k syncKind) error {
	if f.testOnSync != nil {
		return f.testOnSync(k)
	}
	return nil
}

// hookErrno is noteSync for a raw syscall: the hook's error as an errno
// (EIO if it is not one), or 0.
func (f *File) hookErrno(k syncKind) unix.Errno {
	err := f.noteSync(k)
	if err == nil {
		return 0
	}
	var e unix.Errno
	if !errors.As(err, &e) {
		e = unix.EIO
	}
	return e
}

// failedSync returns the sticky error of an earlier failed sync (see
// syncErr), or nil.
func (f *File) failedSync() error {
	if e := f.syncErr.Load(); e != nil {
		return fmt.Errorf("%w: %s: %w", ErrSyncFailed, f.path, *e)
	}
	return nil
}

// syncFailed makes err, the failure of a sync, sticky (the first one
// stays) and returns it.
func (f *File) syncFailed(err error) error {
	f.syncErr.CompareAndSwap(nil, &err)
	return err
}

// OpenFile opens a regular file or a block device as a Device.
func OpenFile(path string, opts FileOptions) (*File, error) {
	flags := unix.O_CLOEXEC
	if opts.ReadOnly {
		flags |= unix.O_RDONLY
	} else {
		flags |= unix.O_RDWR
	}
	if opts.Direct {
		flags |= unix.O_DIRECT
	}
	if opts.Size > 0 && !opts.ReadOnly {
		flags |= unix.O_CREAT
	}
	if excl := claimFlags(path, opts.Claim); excl != 0 {
		// A block device: it exists, and O_EXCL without O_CREAT is the
		// kernel's exclusive claim (with O_CREAT it would mean EEXIST).
		flags = flags&^unix.O_CREAT | excl
	}
	var fd int
	err := retryEINTR(func() (err error) { fd, err = unix.Open(path, flags, 0o644); return err })
	if err == unix.EBUSY && flags&unix.O_EXCL != 0 {
		return nil, takeClaim(path, -1, opts.Claim)
	}
	if err != nil {
		return nil, fmt.Errorf("storage: open %s: %w", path, err)
	}
	if err := takeClaim(path, fd, opts.Claim); err != nil {
		unix.Close(fd)
		return nil, err
	}
	f := &File{path: path, fd: fd, direct: opts.Direct, align: fileMinAlign, memAlign: fileMinAlign}
	if err := f.setup(opts); err != nil {
		unix.Close(fd)
		return nil, err
	}
	// What was written before this open (by an earlier server through
	// another descriptor, as before attach --reconnect) and the size set
	// here may not be durable, nor their writeback errors seen: the first
	// Flush syncs (FlushNoWait).
	f.mutations.Store(1)
	return f, nil
}

// setup finds the size, type, alignment and capabilities of the open file.
func (f *File) setup(opts FileOptions) error {
	var st unix.Stat_t
	if err := unix.Fstat(f.fd, &st); err != nil {
		return fmt.Errorf("storage: stat %s: %w", f.path, err)
	}
	f.caps = Caps{
		ReadOnly: opts.ReadOnly, Flush: true, FUA: true, Trim: true, Zero: true, FastZero: true,
		BlockSize: fileMinAlign,
	}
	var queue string // sysfs queue directory of the underlying disk
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		f.size = st.Size
		if opts.Size > f.size {
			if opts.ReadOnly {
				return fmt.Errorf("storage: %s is %d bytes, %d asked: %w", f.path, f.size, opts.Size, ErrReadOnly)
			}
			if err := retryEINTR(func() error { return unix.Ftruncate(f.fd, opts.Size) }); err != nil {
				return fmt.Errorf("storage: extend %s to %d: %w", f.path, opts.Size, err)
			}
			f.size = opts.Size
		}
		queue = sysfsQueue(unix.Major(st.Dev), unix.Minor(st.Dev))
	case unix.S_IFBLK:
		f.blockDev = true
		sz, err := unix.IoctlGetUint64(f.fd, unix.BLKGETSIZE64)
		if err != nil {
			return fmt.Errorf("storage: BLKGETSIZE64 %s: %w", f.path, err)
		}
		f.size = int64(sz)
		if opts.Size > f.size {
			return fmt.Errorf("storage: %s is %d bytes, %d asked: %w", f.path, f.size, opts.Size, ErrNoSpace)
		}
		if lbs, err := unix.IoctlGetInt(f.fd, unix.BLKSSZGET); err == nil && lbs >= fileMinAlign {
			f.align = int64(lbs)
			f.caps.BlockSize = lbs
		}
		queue = sysfsQueue(unix.Major(st.Rdev), unix.Minor(st.Rdev))
		f.caps.Trim = sysfsInt(queue, "discard_max_bytes") > 0
		f.caps.FastZero = sysfsInt(queue, "write_zeroes_max_bytes") > 0
	default:
		return fmt.Errorf("storage: %s is neither a regular file nor a block device: %w", f.path, ErrNotSupported)
	}
	f.caps.Rotational = sysfsInt(queue, "rotational") == 1
	if f.direct {
		var stx unix.Statx_t
		err := unix.Statx(f.fd, "", unix.AT_EMPTY_PATH, unix.STATX_DIOALIGN, &stx)
		if err == nil && stx.Mask&unix.STATX_DIOALIGN != 0 && stx.Dio_offset_align > 0 {
			f.align = max(f.align, int64(stx.Dio_offset_align))
			f.memAlign = uintptr(max(stx.Dio_mem_align, 1))
		} else if !f.blockDev {
			f.align = fileMemAlign // a safe guess for an older kernel
			f.memAlign = fileMemAlign
		}
		if f.align > fileMemAlign || f.align&(f.align-1) != 0 {
			return fmt.Errorf("storage: %s: direct I/O alignment %d: %w", f.path, f.align, ErrNotSupported)
		}
		if f.size%f.align != 0 {
			return fmt.Errorf("storage: %s: size %d is not a multiple of the direct I/O alignment %d: %w",
				f.path, f.size, f.align, ErrNotSupported)
		}
		f.caps.BlockSize = int(f.align)
		f.bounce.New = func() any { b := AlignedBuf(fileBounceSize); return &b }
	}
	if !f.blockDev && !f.direct {
		f.serial = new(serialWrites)
	}
	f.zeros = AlignedBuf(fileZeroSize)
	return nil
}

// Size returns the device size in bytes.
func (f *File) Size() int64 { return f.size }

// Caps reports the capabilities found at open.
func (f *File) Caps() Caps { return f.caps }

// Path returns the path the file was opened with.
func (f *File) Path() string { return f.path }

// begin takes the shared lock and checks the state and the range. On
// success the caller must call f.mu.RUnlock.
func (f *File) begin(off, length int64, write bool) error {
	f.mu.RLock()
	switch {
	case f.mu.closed:
		f.mu.RUnlock()
		return ErrClosed
	case CheckRange(f.size, off, length) != nil:
		f.mu.RUnlock()
		return ErrOutOfRange
	case write && f.caps.ReadOnly:
		f.mu.RUnlock()
		return ErrReadOnly
	}
	return nil
}

// ReadAt fills p from offset off.
func (f *File) ReadAt(p []byte, off int64) error {
	if err := f.begin(off, int64(len(p)), false); err != nil {
		return err
	}
	defer f.mu.RUnlock()
	if f.direct && !f.aligned(p, off) {
		return f.readBounce(p, off)
	}
	return f.pread(p, off)
}

// ReadNoWait reads p from the page cache alone (preadv2 with RWF_NOWAIT):
// false when part of it is not there, when the file is opened with
// O_DIRECT (every read waits for the disk), or on any error (ReadAt will
// report it).
func (f *File) ReadNoWait(p []byte, off int64) bool {
	if f.direct || f.begin(off, int64(len(p)), false) != nil {
		return false
	}
	defer f.mu.RUnlock()
	for len(p) > 0 {
		n, err := unix.Preadv2(f.fd, [][]byte{p}, off, unix.RWF_NOWAIT)
		switch {
		case err == unix.EINTR:
			continue
		case err != nil || n == 0:
			return false // EAGAIN: not all in the page cache
		}
		p = p[n:]
		off += int64(n)
	}
	return true
}

// StartWriteback asks the kernel to start writing the range's dirty pages
// (sync_file_range with SYNC_FILE_RANGE_WRITE). Errors are ignored: it
// is only a hint, and Flush reports what matters.
func (f *File) StartWriteback(off, length int64) {
	if f.direct || f.begin(off, length, false) != nil {
		return
	}
	defer f.mu.RUnlock()
	if f.noteSync(syncStartWriteback) != nil {
		return
	}
	unix.SyncFileRange(f.fd, off, length, unix.SYNC_FILE_RANGE_WRITE)
}

// WantsAligned reports whether the file is open with O_DIRECT, where a
// buffer not aligned in memory goes through a bounce buffer
// (AlignedWriter).
func (f *File) WantsAligned() bool { return f.direct }

// WriteAt writes p at offset off; with FUA, p is durable on return.
func (f *File) WriteAt(p []byte, off int64, flags Flags) error {
	if err := f.begin(off, int64(len(p)), true); err != nil {
		return err
	}
	defer f.mu.RUnlock()
	defer f.mutations.Add(1)
	return f.write(p, off, flags&FUA != 0)
}

// WriteVecAt writes bufs one after another from off (VectorWriter), with
// pwritev calls of at most iovMax buffers each. With O_DIRECT the buffers
// are joined into an aligned one first (a piece of a batch is rarely
// aligned in memory).
func (f *File) WriteVecAt(bufs [][]byte, off int64) error {
	n := vecLen(bufs)
	if f.direct {
		p := AlignedBuf(int(n))[:0]
		for _, b := range bufs {
			p = append(p, b...)
		}
		return f.WriteAt(p, off, 0)
	}
	if err := f.begin(off, n, true); err != nil {
		return err
	}
	defer f.mu.RUnlock()
	defer f.mutations.Add(1)
	if f.serial != nil {
		defer f.serial.end(f.serial.begin())
	}
	// A write cut short leaves a buffer half written: the rest of it is
	// resliced here, so work on a copy of the caller's slice (without
	// empty buffers: every one left has bytes to write).
	bufs = slices.DeleteFunc(slices.Clone(bufs), func(b []byte) bool { return len(b) == 0 })
	for len(bufs) > 0 {
		w, err := unix.Pwritev(f.fd, bufs[:min(len(bufs), iovMax)], off)
		switch {
		case err == unix.EINTR:
			continue
		case err != nil:
			return f.errorf("pwritev", off, err)
		case w == 0:
			return f.errorf("pwritev", off, unix.EIO)
		}
		off += int64(w)
		bufs = skipWritten(bufs, w)
	}
	return nil
}

// skipWritten drops the first w bytes of bufs, none of them empty, and
// returns what is left to write, with no empty buffer either.
func skipWritten(bufs [][]byte, w int) [][]byte {
	for w > 0 {
		k := min(w, len(bufs[0]))
		bufs[0], w = bufs[0][k:], w-k
		if len(bufs[0]) == 0 {
			bufs = bufs[1:]
		}
	}
	return bufs
}

// iovMax is Linux's limit on the buffers of one pwritev (UIO_MAXIOV).
const iovMax = 1024

// WriteBatch does WriteAt for each write (BatchWriter). Into the page
// cache they go one after another, in order: the NBD server so runs a
// socket read's worth of small writes on its read loop, without handing
// each to a worker. With O_DIRECT each write waits for the device, so
// writes that overlap none of the others go at once, as workers would send
// them; a batch with overlapping writes goes in order.
func (f *File) WriteBatch(ws []BatchWrite) {
	if !f.direct || len(ws) < 2 || overlapping(ws) {
		for i := range ws {
			ws[i].Err = f.WriteAt(ws[i].P, ws[i].Off, ws[i].Flags)
		}
		return
	}
	var wg sync.WaitGroup
	for i := range ws {
		wg.Go(func() { ws[i].Err = f.WriteAt(ws[i].P, ws[i].Off, ws[i].Flags) })
	}
	wg.Wait()
}

// overlapping reports whether two writes of ws overlap.
func overlapping(ws []BatchWrite) bool {
	for i := range ws {
		for j := range i {
			if ws[i].Off < ws[j].Off+int64(len(ws[j].P)) && ws[j].Off < ws[i].Off+int64(len(ws[i].P)) {
				return true
			}
		}
	}
	return false
}

// Flush makes every write that returned before it durable (fdatasync).
func (f *File) Flush() error {
	if err := f.begin(0, 0, false); err != nil {
		return err
	}
	defer f.mu.RUnlock()
	return f.fdatasync()
}

// FlushNoWait reports whether a Flush has nothing to do
// (NoWaitFlusher): no write, zero or trim has returned since the last
// successful sync began, and no sync has failed.
func (f *File) FlushNoWait() bool {
	if f.begin(0, 0, false) != nil {
		return false
	}
	defer f.mu.RUnlock()
	return f.failedSync() == nil && f.mutations.Load() == f.synced.Load()
}

// Trim discards the range: a hole punched in a regular file (it reads
// back as zeroes), BLKDISCARD on a block device (it reads back as zeroes
// or old data). Where neither is supported, Trim does nothing, which the
// contract allows.
func (f *File) Trim(off, length int64, flags Flags) error {
	if err := f.begin(off, length, true); err != nil {
		return err
	}
	defer f.mu.RUnlock()
	defer f.mutations.Add(1)
	if length == 0 {
		return nil
	}
	if f.blockDev {
		if !f.caps.Trim {
			return nil
		}
		// BLKDISCARD takes whole blocks only: discard the ones inside.
		start := alignUp(off, f.align)
		end := alignDown(off+length, f.align)
		if start < end {
			r := [2]uint64{uint64(start), uint64(end - start)}
			err := ioctlPtr(f.fd, unix.BLKDISCARD, unsafe.Pointer(&r))
			if err != nil && !notSupported(err) {
				return f.errorf("discard", off, err)
			}
		}
	} else if !f.noPunch.Load() {
		err := f.fallocate(unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
		if notSupported(err) {
			f.noPunch.Store(true)
		} else if err != nil {
			return f.errorf("punch hole", off, err)
		}
	}
	if flags&FUA != 0 {
		return f.fdatasync()
	}
	return nil
}

// Zero makes the range read back as zeroes. A regular file gets a hole
// punched (unless NoHole), else FALLOC_FL_ZERO_RANGE, else a hole punched
// and reallocated (NoHole), else written zeroes. A block device gets
// fallocate(PUNCH_HOLE) (unless NoHole), else BLKZEROOUT, with partial
// blocks at the ends written. FastZero fails with ErrNotSupported, having
// touched nothing, when only writing zeroes is left.
func (f *File) Zero(off, length int64, flags Flags) error {
	if err := f.begin(off, length, true); err != nil {
		return err
	}
	defer f.mu.RUnlock()
	defer f.mutations.Add(1)
	if length == 0 {
		return nil
	}
	var err error
	if f.blockDev {
		err = f.zeroBlockDev(off, length, flags)
	} else {
		err = f.zeroFile(off, length, flags)
	}
	if err == nil && flags&FUA != 0 {
		err = f.fdatasync()
	}
	return err
}

func (f *File) zeroFile(off, length int64, flags Flags) error {
	const keep = unix.FALLOC_FL_KEEP_SIZE
	if flags&NoHole == 0 && !f.noPunch.Load() {
		err := f.fallocate(unix.FALLOC_FL_PUNCH_HOLE|keep, off, length)
		if err == nil {
			return nil
		}
		if !notSupported(err) {
			return f.errorf("punch hole", off, err)
		}
		f.noPunch.Store(true)
	}
	if !f.noZeroRange.Load() {
		err := f.fallocate(unix.FALLOC_FL_ZERO_RANGE|keep, off, length)
		if err == nil {
			return nil
		}
		if !notSupported(err) {
			return f.errorf("zero range", off, err)
		}
		f.noZeroRange.Store(true)
	}
	if !f.noPunch.Load() && !f.noAllocate.Load() && f.allocate(off, length) {
		// NoHole without ZERO_RANGE (tmpfs, btrfs): punch, then allocate
		// again (allocate is known to work: it just did). The range reads
		// as zeroes from the punch on.
		err := f.fallocate(unix.FALLOC_FL_PUNCH_HOLE|keep, off, length)
		if err == nil {
			err = f.fallocate(keep, off, length)
			if err != nil {
				return f.errorf("allocate", off, err)
			}
			return nil
		}
		if !notSupported(err) {
			return f.errorf("punch hole", off, err)
		}
		f.noPunch.Store(true)
	}
	if flags&FastZero != 0 {
		return fmt.Errorf("storage: zero %s: only by writing: %w", f.path, ErrNotSupported)
	}
	return f.writeZeroes(off, length)
}

func (f *File) zeroBlockDev(off, length int64, flags Flags) error {
	start := min(alignUp(off, f.align), off+length)
	end := max(alignDown(off+length, f.align), start)
	// Both fast paths (punch, and BLKZEROOUT without its fallback) need
	// the device to support write-zeroes.
	if flags&FastZero != 0 && !f.caps.FastZero {
		return fmt.Errorf("storage: zero %s: only by writing: %w", f.path, ErrNotSupported)
	}
	if start < end {
		done := false
		if flags&NoHole == 0 && !f.noPunch.Load() {
			// The kernel punches only if the device guarantees zeroes
			// afterwards, and never falls back to writing.
			err := f.fallocate(unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, start, end-start)
			switch {
			case err == nil:
				done = true
			case notSupported(err):
				f.noPunch.Store(true)
			default:
				return f.errorf("punch hole", start, err)
			}
		}
		if !done {
			r := [2]uint64{uint64(start), uint64(end - start)}
			if err := ioctlPtr(f.fd, unix.BLKZEROOUT, unsafe.Pointer(&r)); err != nil {
				return f.errorf("zeroout", start, err)
			}
		}
	}
	if off < start {
		if err := f.writeZeroes(off, start-off); err != nil {
			return err
		}
	}
	if end < off+length {
		return f.writeZeroes(end, off+length-end)
	}
	return nil
}

// Reserve gives a regular file the disk blocks of all its size, so that
// no later write into it can fail for want of space on its file system: a
// sparse file takes blocks as it is written, and a write-back cache whose
// file hit a full file system refused every write from then on (the
// journal could not grow). It allocates only the holes (fallocate; XFS sets
// aside the whole length asked for before it looks at what is allocated,
// so asking for a whole file it has failed on a full file system), and
// unshares extents shared with another file (a reflink copy: its first
// overwrite needs new blocks). It returns how many bytes were holes or
// shared. On a block device, or a file opened read-only, it does nothing.
// The errors: ErrNoSpace when the file system has no room for them (what
// it allocated may stay), ErrNotSupported when it cannot allocate ahead or
// unshare (its writes may still fail once it fills). A copy-on-write file
// system (btrfs, ZFS) allocates anew on every overwrite: there no
// reservation holds.
func (f *File) Reserve() (missing int64, err error) {
	if f.blockDev || f.caps.ReadOnly || f.size == 0 {
		return 0, nil
	}
	holes, shared, err := f.unreserved()
	if err != nil {
		return 0, err
	}
	for _, r := range holes {
		missing += r.n
	}
	for _, r := range shared {
		missing += r.n
	}
	for _, r := range holes {
		if err := f.fallocate(0, r.off, r.n); err != nil {
			return missing, f.errorf("reserve", r.off, err)
		}
	}
	for _, r := range shared {
		if err := f.fallocate(unix.FALLOC_FL_UNSHARE_RANGE, r.off, r.n); err != nil {
			return missing, f.errorf("unshare", r.off, err)
		}
	}
	return missing, nil
}

// fileRange is [off, off+n) of a file.
type fileRange struct{ off, n int64 }

// unreserved lists the file's holes and its extents shared with other
// files, from FIEMAP (an extent allocated but unwritten, or delayed, has
// its blocks). A file system without FIEMAP (tmpfs) counts as one hole
// when it has fewer blocks than its size, else none.
func (f *File) unreserved() (holes, shared []fileRange, err error) {
	const (
		fsIocFiemap       = 0xc020660b // _IOWR('f', 11, struct fiemap)
		fiemapExtentLast  = 0x1
		fiemapExtentShare = 0x2000
		batch             = 128
	)
	type extent struct {
		logical, physical, length uint64
		_                         [2]uint64
		flags                     uint32
		_                         [3]uint32
	}
	type fiemap struct {
		start, length                uint64
		flags, mapped, count, unused uint32
		extents                      [batch]extent
	}
	var m fiemap
	next := int64(0) // end of the last extent seen
	for next < f.size {
		m = fiemap{start: uint64(next), length: uint64(f.size - next), count: batch}
		_, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(f.fd), fsIocFiemap, uintptr(unsafe.Pointer(&m)))
		if e != 0 {
			if notSupported(e) {
				var st unix.Stat_t
				if err := unix.Fstat(f.fd, &st); err != nil {
					return nil, nil, fmt.Errorf("storage: stat %s: %w", f.path, err)
				}
				if st.Blocks*512 >= f.size {
					return nil, nil, nil
				}
				return []fileRange{{0, f.size}}, nil, nil
			}
			return nil, nil, f.errorf("fiemap", next, e)
		}
		if m.mapped == 0 {
			break
		}
		last := false
		for _, x := range m.extents[:m.mapped] {
			lo, hi := min(int64(x.logical), f.size), min(int64(x.logical+x.length), f.size)
			if lo > next {
				holes = append(holes, fileRange{next, lo - next})
			}
			if x.flags&fiemapExtentShare != 0 && hi > lo {
				shared = append(shared, fileRange{lo, hi - lo})
			}
			next = max(next, hi)
			last = last || x.flags&fiemapExtentLast != 0
		}
		if last {
			break
		}
	}
	if next < f.size {
		holes = append(holes, fileRange{next, f.size - next})
	}
	return holes, shared, nil
}

// allocate allocates the range without changing its contents, and reports
// whether the file system can.
func (f *File) allocate(off, length int64) bool {
	err := f.fallocate(unix.FALLOC_FL_KEEP_SIZE, off, length)
	if err != nil && notSupported(err) {
		f.noAllocate.Store(true)
	}
	return err == nil
}

// writeZeroes zeroes the range by writing.
func (f *File) writeZeroes(off, length int64) error {
	for length > 0 {
		n := min(length, int64(len(f.zeros)))
		if err := f.write(f.zeros[:n], off, false); err != nil {
			return err
		}
		off += n
		length -= n
	}
	return nil
}

// Extents reports the holes of a regular file (SEEK_DATA/SEEK_HOLE) as
// Hole and Zero. A block device, or a file system without SEEK_DATA, is
// all data.
func (f *File) Extents(off, length int64, fn func(Extent) bool) error {
	if err := f.begin(off, length, false); err != nil {
		return err
	}
	defer f.mu.RUnlock()
	end := off + length
	if f.blockDev && off < end {
		fn(Extent{Length: length})
		return nil
	}
	for off < end {
		data, err := unix.Seek(f.fd, off, unix.SEEK_DATA)
		switch {
		case errors.Is(err, unix.ENXIO): // no data after off
			data = end
		case errors.Is(err, unix.EINVAL) || notSupported(err):
			fn(Extent{Length: end - off})
			return nil
		case err != nil:
			return f.errorf("seek data", off, err)
		}
		if data > off {
			n := min(data, end) - off
			if !fn(Extent{Length: n, Hole: true, Zero: true}) {
				return nil
			}
			off += n
			continue
		}
		hole, err := unix.Seek(f.fd, off, unix.SEEK_HOLE)
		if err != nil {
			return f.errorf("seek hole", off, err)
		}
		n := min(max(hole, off+1), end) - off
		if !fn(Extent{Length: n}) {
			return nil
		}
		off += n
	}
	return nil
}

// Close waits for the requests in flight and closes the descriptor. It
// does not flush. Later calls fail with ErrClosed.
func (f *File) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.mu.closed {
		return nil
	}
	f.mu.closed = true
	if err := unix.Close(f.fd); err != nil {
		return fmt.Errorf("storage: close %s: %w", f.path, err)
	}
	return nil
}

// aligned reports whether p and off suit O_DIRECT as they are.
func (f *File) aligned(p []byte, off int64) bool {
	if len(p) == 0 {
		return true
	}
	return (off|int64(len(p)))&(f.align-1) == 0 && uintptr(unsafe.Pointer(&p[0]))&(f.memAlign-1) == 0
}

// pread reads exactly len(p) bytes at off.
func (f *File) pread(p []byte, off int64) error {
	for len(p) > 0 {
		n, err := unix.Pread(f.fd, p, off)
		switch {
		case err == unix.EINTR:
			continue
		case err != nil:
			return f.errorf("pread", off, err)
		case n == 0:
			return f.errorf("pread", off, unix.EIO) // the file shrank under us
		}
		p = p[n:]
		off += int64(n)
	}
	return nil
}

// write writes p at off, through the bounce buffer if O_DIRECT needs it.
func (f *File) write(p []byte, off int64, fua bool) error {
	if f.direct && !f.aligned(p, off) {
		return f.writeBounce(p, off, fua)
	}
	return f.pwrite(p, off, fua)
}

// pwrite writes all of p at off; with fua, durably.
func (f *File) pwrite(p []byte, off int64, fua bool) error {
	if fua && !f.noDSync.Load() {
		err := f.pwriteDSync(p, off)
		if err == nil || !(notSupported(err) || errors.Is(err, unix.EINVAL)) {
			return err
		}
		// The kernel or file system refused RWF_DSYNC: fall back to
		// pwrite + fdatasync, and remember if that works.
		if err := f.pwrite(p, off, false); err != nil {
			return err
		}
		f.noDSync.Store(true)
		return f.fdatasync()
	}
	if f.serial != nil && !fua {
		defer f.serial.end(f.serial.begin())
	}
	for len(p) > 0 {
		n, err := unix.Pwrite(f.fd, p, off)
		switch {
		case err == unix.EINTR:
			continue
		case err != nil:
			return f.errorf("pwrite", off, err)
		case n == 0:
			return f.errorf("pwrite", off, unix.EIO)
		}
		p = p[n:]
		off += int64(n)
	}
	if fua {
		return f.fdatasync()
	}
	return nil
}

// pwriteDSync writes all of p at off with pwritev2(RWF_DSYNC): each call
// returns once its data (and the metadata to reach it) is durable. The
// iovec lives on the stack, so the call does not allocate.
func (f *File) pwriteDSync(p []byte, off int64) error {
	if err := f.failedSync(); err != nil {
		return err
	}
	for len(p) > 0 {
		var iov unix.Iovec
		iov.Base = &p[0]
		iov.SetLen(len(p))
		var r uintptr
		e := f.hookErrno(syncDSyncWrite)
		if e == 0 {
			// pwritev2(fd, iov, iovcnt, pos_l, pos_h, flags); pos_h is 0
			// on 64-bit systems.
			r, _, e = unix.Syscall6(unix.SYS_PWRITEV2, uintptr(f.fd), uintptr(unsafe.Pointer(&iov)), 1,
				uintptr(off), 0, unix.RWF_DSYNC)
		}
		n := int(r)
		switch {
		case e == unix.EINTR:
			continue
		case e == unix.EIO || e == unix.ENOSPC || e == unix.EDQUOT:
			// The sync may have reported an earlier writeback's failure,
			// anywhere in the file (a writeback fails with these too).
			return f.syncFailed(f.errorf("pwritev2", off, e))
		case e != 0:
			return f.errorf("pwritev2", off, e)
		case n == 0:
			return f.errorf("pwritev2", off, unix.EIO)
		}
		p = p[n:]
		off += int64(n)
	}
	// An fdatasync or another such write beside it may have taken the
	// error. (A window remains: this write may return between the other
	// syscall taking the error and its recording it. Only making such
	// writes wait for each other would close it.)
	return f.failedSync()
}

// readBounce serves an unaligned O_DIRECT read through aligned buffers.
func (f *File) readBounce(p []byte, off int64) error {
	bp := f.bounce.Get().(*[]byte)
	defer f.bounce.Put(bp)
	buf := *bp
	end := off + int64(len(p))
	for pos := alignDown(off, f.align); pos < end; {
		n := min(int64(len(buf)), alignUp(end, f.align)-pos)
		if err := f.pread(buf[:n], pos); err != nil {
			return err
		}
		from := max(pos, off)
		to := min(pos+n, end)
		copy(p[from-off:to-off], buf[from-pos:to-pos])
		pos += n
	}
	return nil
}

// writeBounce serves an unaligned O_DIRECT write through aligned buffers,
// reading the partial blocks at either end first. Those blocks are locked
// for the whole read-modify-write, so two unaligned writes that share a
// block do not undo each other.
func (f *File) writeBounce(p []byte, off int64, fua bool) error {
	end := off + int64(len(p))
	first := alignDown(off, f.align)
	last := alignDown(end-1, f.align)
	headPartial := off != first
	tailPartial := end != last+f.align
	if headPartial || tailPartial {
		a, b := f.stripe(first), f.stripe(last)
		if !headPartial {
			a = b
		} else if !tailPartial {
			b = a
		}
		if a > b {
			a, b = b, a
		}
		f.rmw[a].Lock()
		defer f.rmw[a].Unlock()
		if b != a {
			f.rmw[b].Lock()
			defer f.rmw[b].Unlock()
		}
	}
	bp := f.bounce.Get().(*[]byte)
	defer f.bounce.Put(bp)
	buf := *bp
	for pos := first; pos < end; {
		n := min(int64(len(buf)), alignUp(end, f.align)-pos)
		chunk := buf[:n]
		if pos < off { // head block
			if err := f.pread(chunk[:f.align], pos); err != nil {
				return err
			}
		}
		// tail block, unless it is the head block, read just above
		if pos+n > end && !(pos < off && n == f.align) {
			if err := f.pread(chunk[n-f.align:], pos+n-f.align); err != nil {
				return err
			}
		}
		from := max(pos, off)
		to := min(pos+n, end)
		copy(chunk[from-pos:to-pos], p[from-off:to-off])
		if err := f.pwrite(chunk, pos, fua); err != nil {
			return err
		}
		pos += n
	}
	return nil
}

// stripe is the RMW lock index of the block at off.
func (f *File) stripe(off int64) int { return int(uint64(off/f.align) % fileRMWStripes) }

// fdatasync makes the written data durable.
func (f *File) fdatasync() error {
	f.syncMu.Lock()
	defer f.syncMu.Unlock()
	if err := f.failedSync(); err != nil {
		return err
	}
	began := f.mutations.Load()
	err := retryEINTR(func() error {
		if err := f.noteSync(syncFdatasync); err != nil {
			return err
		}
		return unix.Fdatasync(f.fd)
	})
	if err != nil {
		return f.syncFailed(fmt.Errorf("storage: fdatasync %s: %w", f.path, err))
	}
	f.synced.Store(began)
	// A write with RWF_DSYNC beside it may have taken the error.
	return f.failedSync()
}

func (f *File) fallocate(mode uint32, off, length int64) error {
	return retryEINTR(func() error { return unix.Fallocate(f.fd, mode, off, length) })
}

// errorf wraps a syscall error with the operation and place, and with the
// package sentinel that matches it, if any.
func (f *File) errorf(op string, off int64, err error) error {
	switch {
	case errors.Is(err, unix.ENOSPC) || errors.Is(err, unix.EDQUOT):
		return fmt.Errorf("storage: %s %s at %d: %w: %w", op, f.path, off, ErrNoSpace, err)
	case notSupported(err):
		return fmt.Errorf("storage: %s %s at %d: %w: %w", op, f.path, off, ErrNotSupported, err)
	case errors.Is(err, unix.EROFS):
		return fmt.Errorf("storage: %s %s at %d: %w: %w", op, f.path, off, ErrReadOnly, err)
	}
	return fmt.Errorf("storage: %s %s at %d: %w", op, f.path, off, err)
}

// notSupported reports whether err says the operation is not supported.
func notSupported(err error) bool {
	return errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOTSUP) || errors.Is(err, unix.ENOSYS) ||
		errors.Is(err, unix.ENOTTY)
}

func retryEINTR(fn func() error) error {
	for {
		if err := fn(); err != unix.EINTR {
			return err
		}
	}
}

func ioctlPtr(fd int, req uint, arg unsafe.Pointer) error {
	return retryEINTR(func() error {
		_, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), uintptr(req), uintptr(arg))
		if e != 0 {
			return e
		}
		return nil
	})
}

func alignDown(x, a int64) int64 { return x &^ (a - 1) }
func alignUp(x, a int64) int64   { return (x + a - 1) &^ (a - 1) }

// AlignedBuf returns n bytes whose address is aligned to fileMemAlign
// (4 KiB), so that a File opened with O_DIRECT writes them as they are,
// without its bounce buffer.
func AlignedBuf(n int) []byte {
	b := make([]byte, n+fileMemAlign)
	o := int(-uintptr(unsafe.Pointer(&b[0])) & (fileMemAlign - 1))
	return b[o : o+n : o+n]
}

// sysfsQueue returns the sysfs queue directory of block device
// major:minor, or of the whole disk if it is a partition; "" if none.
func sysfsQueue(major, minor uint32) string {
	dir := "/sys/dev/block/" + strconv.FormatUint(uint64(major), 10) + ":" + strconv.FormatUint(uint64(minor), 10)
	for _, q := range []string{dir + "/queue", dir + "/../queue"} {
		if _, err := os.Stat(q); err == nil {
			return q
		}
	}
	return ""
}

// sysfsInt reads an integer attribute of a queue directory; -1 if absent.
func sysfsInt(queue, name string) int64 {
	if queue == "" {
		return -1
	}
	b, err := os.ReadFile(queue + "/" + name)
	if err != nil {
		return -1
	}
	v, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		return -1
	}
	return v
}
