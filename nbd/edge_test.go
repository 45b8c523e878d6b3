package nbd

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"slices"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/nbdcache/nbdcache/storage"
)

// call is one device call as recordingDevice saw it.
type call struct {
	kind   storage.OpKind
	off, n int64
	flags  storage.Flags
}

func (c call) String() string {
	return fmt.Sprintf("%s(%d,%d,flags=%#x)", c.kind, c.off, c.n, c.flags)
}

// recordingDevice is a Device wrapper that records every call with its
// flags, and can fail calls of chosen kinds with a chosen error (before
// they reach the inner device).
type recordingDevice struct {
	inner storage.Device

	mu struct {
		sync.Mutex
		calls []call
		fail  map[storage.OpKind]error
	}
}

func newRecordingDevice(inner storage.Device) *recordingDevice {
	d := &recordingDevice{inner: inner}
	d.mu.fail = map[storage.OpKind]error{}
	return d
}

// record notes a call and returns the error injected for its kind.
func (d *recordingDevice) record(c call) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.mu.calls = append(d.mu.calls, c)
	return d.mu.fail[c.kind]
}

// take returns the calls recorded since the last take and forgets them.
func (d *recordingDevice) take() []call {
	d.mu.Lock()
	defer d.mu.Unlock()
	c := d.mu.calls
	d.mu.calls = nil
	return c
}

// failWith makes every later call of kind k fail with err (nil: succeed).
func (d *recordingDevice) failWith(k storage.OpKind, err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.mu.fail[k] = err
}

func (d *recordingDevice) Size() int64 { return d.inner.Size() }

func (d *recordingDevice) Caps() storage.Caps {
	c := d.inner.Caps()
	c.FUA, c.Trim, c.Zero, c.FastZero = true, true, true, true
	return c
}

func (d *recordingDevice) Close() error { return d.inner.Close() }

func (d *recordingDevice) ReadAt(p []byte, off int64) error {
	if err := d.record(call{storage.OpRead, off, int64(len(p)), 0}); err != nil {
		return err
	}
	return d.inner.ReadAt(p, off)
}

func (d *recordingDevice) WriteAt(p []byte, off int64, f storage.Flags) error {
	if err := d.record(call{storage.OpWrite, off, int64(len(p)), f}); err != nil {
		return err
	}
	return d.inner.WriteAt(p, off, f)
}

func (d *recordingDevice) Flush() error {
	if err := d.record(call{kind: storage.OpFlush}); err != nil {
		return err
	}
	return d.inner.Flush()
}

func (d *recordingDevice) Trim(off, n int64, f storage.Flags) error {
	if err := d.record(call{storage.OpTrim, off, n, f}); err != nil {
		return err
	}
	return d.inner.Trim(off, n, f)
}

func (d *recordingDevice) Zero(off, n int64, f storage.Flags) error {
	if err := d.record(call{storage.OpZero, off, n, f}); err != nil {
		return err
	}
	return d.inner.Zero(off, n, f)
}

// TestFlagsReachDevice drives every data command through a real
// connection with each combination of its flags, and proves that the
// device sees exactly the flags the client sent: FUA on WRITE, TRIM and
// WRITE_ZEROES, NO_HOLE and FAST_ZERO on WRITE_ZEROES, no FUA when the
// client did not ask for it, and FLUSH as one Flush. When the device cannot
// zero natively, the zeroes the server writes instead carry the request's
// FUA (and nothing else); a FAST_ZERO request is refused with ENOTSUP
// without writing anything.
func TestFlagsReachDevice(t *testing.T) {
	const off, n = 8192, 4096
	payload := bytes.Repeat([]byte{0x5a}, n)
	cases := []struct {
		name      string
		typ       uint16
		flags     uint16
		noZero    bool // the device's Zero fails with ErrNotSupported
		wantErrno uint32
		want      []call
	}{
		{"write", cmdWrite, 0, false, 0, []call{{storage.OpWrite, off, n, 0}}},
		{"write-fua", cmdWrite, cflagFUA, false, 0, []call{{storage.OpWrite, off, n, storage.FUA}}},
		{"trim", cmdTrim, 0, false, 0, []call{{storage.OpTrim, off, n, 0}}},
		{"trim-fua", cmdTrim, cflagFUA, false, 0, []call{{storage.OpTrim, off, n, storage.FUA}}},
		{"zero", cmdWriteZeroes, 0, false, 0, []call{{storage.OpZero, off, n, 0}}},
		{"zero-fua", cmdWriteZeroes, cflagFUA, false, 0, []call{{storage.OpZero, off, n, storage.FUA}}},
		{"zero-nohole", cmdWriteZeroes, cflagNoHole, false, 0, []call{{storage.OpZero, off, n, storage.NoHole}}},
		{"zero-fast", cmdWriteZeroes, cflagFastZero, false, 0, []call{{storage.OpZero, off, n, storage.FastZero}}},
		{"zero-all-flags", cmdWriteZeroes, cflagFUA | cflagNoHole | cflagFastZero, false, 0,
			[]call{{storage.OpZero, off, n, storage.FUA | storage.NoHole | storage.FastZero}}},
		{"flush", cmdFlush, 0, false, 0, []call{{kind: storage.OpFlush}}},
		{"zero-fallback", cmdWriteZeroes, 0, true, 0,
			[]call{{storage.OpZero, off, n, 0}, {storage.OpWrite, off, n, 0}}},
		{"zero-fallback-fua", cmdWriteZeroes, cflagFUA, true, 0,
			[]call{{storage.OpZero, off, n, storage.FUA}, {storage.OpWrite, off, n, storage.FUA}}},
		{"zero-fallback-fua-nohole", cmdWriteZeroes, cflagFUA | cflagNoHole, true, 0,
			[]call{{storage.OpZero, off, n, storage.FUA | storage.NoHole}, {storage.OpWrite, off, n, storage.FUA}}},
		{"zero-fast-unsupported", cmdWriteZeroes, cflagFastZero, true, errNotSup,
			[]call{{storage.OpZero, off, n, storage.FastZero}}},
	}
	dev := newRecordingDevice(storage.NewMem(testSize))
	_, addr := startServer(t, Export{Device: dev})
	for _, structured := range []bool{false, true} {
		c := dial(t, addr)
		c.connect("", structured)
		dev.take() // the handshake's reads, if any
		for i, tc := range cases {
			t.Run(fmt.Sprintf("%s/structured=%v", tc.name, structured), func(t *testing.T) {
				zeroErr := error(nil)
				if tc.noZero {
					zeroErr = storage.ErrNotSupported
				}
				dev.failWith(storage.OpZero, zeroErr)
				defer dev.failWith(storage.OpZero, nil)
				var p []byte
				reqOff, reqLen := uint64(off), uint32(n)
				if tc.typ == cmdWrite {
					p = payload
				}
				if tc.typ == cmdFlush {
					reqOff, reqLen = 0, 0
				}
				cookie := uint64(i + 1)
				c.request(tc.typ, tc.flags, cookie, reqOff, reqLen, p)
				r := c.readReply(nil)
				if r.cookie != cookie || r.errno != tc.wantErrno {
					t.Fatalf("reply cookie %d errno %d, want cookie %d errno %d", r.cookie, r.errno, cookie, tc.wantErrno)
				}
				// The reply follows the device call, so the calls are all
				// recorded by now.
				if got := dev.take(); !slices.Equal(got, tc.want) {
					t.Fatalf("device saw %v, want %v", got, tc.want)
				}
			})
		}
	}
}

// TestErrnoFor proves every mapping of errnoFor, the one place device
// errors become NBD errors: each storage sentinel and syscall errno it
// names gets its exact wire value (the numbers of the NBD spec), whether
// it comes bare, wrapped with %w (twice) or inside an *os.PathError, and
// anything else is EIO.
func TestErrnoFor(t *testing.T) {
	// The wire values, from the NBD protocol spec; written as numbers so
	// that a wrong constant in proto.go fails here too.
	const (
		nbdEPERM     = 1
		nbdEIO       = 5
		nbdENOMEM    = 12
		nbdEINVAL    = 22
		nbdENOSPC    = 28
		nbdEOVERFLOW = 75
		nbdENOTSUP   = 95
		nbdESHUTDOWN = 108
	)
	cases := []struct {
		err               error
		wantRead, wantWri uint32
	}{
		{storage.ErrOutOfRange, nbdEINVAL, nbdENOSPC},
		{storage.ErrReadOnly, nbdEPERM, nbdEPERM},
		{unix.EROFS, nbdEPERM, nbdEPERM},
		{unix.EPERM, nbdEPERM, nbdEPERM},
		{unix.EACCES, nbdEPERM, nbdEPERM},
		{storage.ErrNoSpace, nbdENOSPC, nbdENOSPC},
		{unix.ENOSPC, nbdENOSPC, nbdENOSPC},
		{unix.EDQUOT, nbdENOSPC, nbdENOSPC},
		{unix.EFBIG, nbdENOSPC, nbdENOSPC},
		{storage.ErrNotSupported, nbdENOTSUP, nbdENOTSUP},
		{unix.EOPNOTSUPP, nbdENOTSUP, nbdENOTSUP},
		{unix.EINVAL, nbdEINVAL, nbdEINVAL},
		{unix.ENOMEM, nbdENOMEM, nbdENOMEM},
		{unix.EOVERFLOW, nbdEOVERFLOW, nbdEOVERFLOW},
		{unix.ESHUTDOWN, nbdESHUTDOWN, nbdESHUTDOWN},
		// A sync failed earlier: writes are lost, whatever it said.
		{fmt.Errorf("%w: %w", storage.ErrSyncFailed, unix.ENOSPC), nbdEIO, nbdEIO},
		// The default.
		{unix.EIO, nbdEIO, nbdEIO},
		{unix.ENXIO, nbdEIO, nbdEIO},
		{unix.EAGAIN, nbdEIO, nbdEIO},
		{storage.ErrClosed, nbdEIO, nbdEIO},
		{errors.New("something else"), nbdEIO, nbdEIO},
	}
	if got := errnoFor(nil, false); got != 0 {
		t.Errorf("errnoFor(nil, false) = %d, want 0", got)
	}
	if got := errnoFor(nil, true); got != 0 {
		t.Errorf("errnoFor(nil, true) = %d, want 0", got)
	}
	for _, tc := range cases {
		forms := []error{
			tc.err,
			fmt.Errorf("op: %w", tc.err),
			fmt.Errorf("outer: %w", fmt.Errorf("inner: %w", tc.err)),
			&os.PathError{Op: "pwrite", Path: "/dev/x", Err: tc.err},
		}
		for i, err := range forms {
			if got := errnoFor(err, false); got != tc.wantRead {
				t.Errorf("form %d of %v (read): errno %d, want %d", i, tc.err, got, tc.wantRead)
			}
			if got := errnoFor(err, true); got != tc.wantWri {
				t.Errorf("form %d of %v (write): errno %d, want %d", i, tc.err, got, tc.wantWri)
			}
		}
	}
}

// TestDeviceErrorsOnTheWire proves that an error a device call returns
// reaches the client as the mapped errno, with the right write-ness per
// command (an out-of-range error is ENOSPC for WRITE and WRITE_ZEROES,
// EINVAL for READ and TRIM), and that the connection stays usable.
func TestDeviceErrorsOnTheWire(t *testing.T) {
	dev := newRecordingDevice(storage.NewMem(testSize))
	_, addr := startServer(t, Export{Device: dev})
	c := dial(t, addr)
	c.connect("", true)
	cases := []struct {
		kind  storage.OpKind
		typ   uint16
		err   error
		errno uint32
	}{
		{storage.OpWrite, cmdWrite, storage.ErrOutOfRange, errNoSpc},
		{storage.OpZero, cmdWriteZeroes, storage.ErrOutOfRange, errNoSpc},
		{storage.OpRead, cmdRead, storage.ErrOutOfRange, errInval},
		{storage.OpTrim, cmdTrim, storage.ErrOutOfRange, errInval},
		{storage.OpWrite, cmdWrite, fmt.Errorf("pwrite: %w", unix.ENOSPC), errNoSpc},
		{storage.OpRead, cmdRead, fmt.Errorf("pread: %w", unix.EIO), errIO},
		{storage.OpFlush, cmdFlush, fmt.Errorf("fdatasync: %w", unix.EIO), errIO},
		{storage.OpTrim, cmdTrim, storage.ErrReadOnly, errPerm},
		{storage.OpZero, cmdWriteZeroes, fmt.Errorf("fallocate: %w", unix.ESHUTDOWN), errShutdown},
	}
	for i, tc := range cases {
		dev.failWith(tc.kind, tc.err)
		var p []byte
		off, n := uint64(4096), uint32(4096)
		if tc.typ == cmdWrite {
			p = make([]byte, n)
		}
		if tc.typ == cmdFlush {
			off, n = 0, 0
		}
		cookie := uint64(i + 1)
		c.request(tc.typ, 0, cookie, off, n, p)
		r := c.readReply(nil)
		dev.failWith(tc.kind, nil)
		if r.cookie != cookie || r.errno != tc.errno {
			t.Errorf("%s failing with %v: reply cookie %d errno %d, want errno %d", cmdName(tc.typ), tc.err, r.cookie, r.errno, tc.errno)
		}
		c.request(cmdRead, 0, 1000, 0, 512, nil)
		if r := c.readReply(nil); r.errno != 0 || r.cookie != 1000 {
			t.Fatalf("connection unusable after %s failed: %+v", cmdName(tc.typ), r)
		}
	}
}
