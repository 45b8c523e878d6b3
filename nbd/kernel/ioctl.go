package kernel

// ioctl.go: the legacy ioctl interface, the fallback when netlink is
// missing.

import (
	"errors"
	"fmt"
	"os"
	"runtime"

	"golang.org/x/sys/unix"
)

// The legacy ioctl interface (include/uapi/linux/nbd.h): _IO(0xab, n).
const (
	ioctlSetSock       = 0xab00
	ioctlSetBlksize    = 0xab01
	ioctlDoIt          = 0xab03
	ioctlClearSock     = 0xab04
	ioctlClearQue      = 0xab05
	ioctlSetSizeBlocks = 0xab07
	ioctlDisconnect    = 0xab08
	ioctlSetTimeout    = 0xab09
	ioctlSetFlags      = 0xab0a
)

// ioctlStep is one ioctl of the setup sequence.
type ioctlStep struct {
	name string
	req  uint
	arg  int
	// optional steps may fail with ENOTTY on old kernels (NBD_SET_FLAGS
	// before 3.x): the device then works without FLUSH/TRIM.
	optional bool
}

// ioctlSequence is the setup order: geometry, flags and timeout first,
// then the sockets; NBD_DO_IT comes last, on the same thread (the kernel
// remembers the thread that set the device up and refuses others).
func ioctlSequence(c Config, fds []int) ([]ioctlStep, error) {
	if err := c.check(); err != nil {
		return nil, err
	}
	if len(fds) == 0 {
		return nil, fmt.Errorf("%w: no sockets", ErrInvalid)
	}
	bs := c.BlockSize
	if bs == 0 {
		bs = 512
	}
	steps := []ioctlStep{
		{name: "NBD_SET_BLKSIZE", req: ioctlSetBlksize, arg: bs},
		{name: "NBD_SET_SIZE_BLOCKS", req: ioctlSetSizeBlocks, arg: int(c.Size / int64(bs))},
		{name: "NBD_SET_FLAGS", req: ioctlSetFlags, arg: int(c.ServerFlags), optional: true},
	}
	if c.Timeout > 0 {
		steps = append(steps, ioctlStep{name: "NBD_SET_TIMEOUT", req: ioctlSetTimeout, arg: int(seconds(c.Timeout))})
	}
	for _, fd := range fds {
		steps = append(steps, ioctlStep{name: "NBD_SET_SOCK", req: ioctlSetSock, arg: fd})
	}
	return steps, nil
}

// IoctlDevice is a device connected with the ioctl interface. The
// connection lives as long as this process: it ends when the process
// exits, so Reconfigure (a restart under a mounted filesystem) is not
// possible on this path.
type IoctlDevice struct {
	f    *os.File
	done chan struct{} // closed when NBD_DO_IT returned
	err  error         // NBD_DO_IT's error, set before done is closed
}

// ConnectIoctl configures the device at path with the ioctl sequence and
// starts NBD_DO_IT on a thread of its own. Wait reports when NBD_DO_IT
// returns (after a disconnect).
func ConnectIoctl(path string, c Config, socks []*os.File) (*IoctlDevice, error) {
	steps, err := ioctlSequence(c, fds(socks))
	if err != nil {
		return nil, err
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("kernel: %w", err)
	}
	d := &IoctlDevice{f: f, done: make(chan struct{})}
	setup := make(chan error, 1)
	go d.run(steps, setup)
	if err := <-setup; err != nil {
		f.Close()
		return nil, err
	}
	return d, nil
}

// run performs the setup and NBD_DO_IT on one locked thread. Signals are
// blocked on that thread: NBD_DO_IT waits interruptibly and a signal
// landing there would tear the device down. The thread is discarded
// when run returns (it stays locked).
func (d *IoctlDevice) run(steps []ioctlStep, setup chan<- error) {
	runtime.LockOSThread()
	var all unix.Sigset_t
	for i := range all.Val {
		all.Val[i] = ^uint64(0)
	}
	if err := unix.PthreadSigmask(unix.SIG_BLOCK, &all, nil); err != nil {
		setup <- fmt.Errorf("kernel: blocking signals: %w", err)
		return
	}
	fd := int(d.f.Fd())
	for _, s := range steps {
		if err := unix.IoctlSetInt(fd, s.req, s.arg); err != nil {
			if s.optional && errors.Is(err, unix.ENOTTY) {
				continue
			}
			unix.IoctlSetInt(fd, ioctlClearSock, 0)
			setup <- fmt.Errorf("kernel: %s: %w", s.name, mapErrno(err))
			return
		}
	}
	setup <- nil
	_, err := unix.IoctlRetInt(fd, ioctlDoIt)
	unix.IoctlSetInt(fd, ioctlClearQue, 0)
	unix.IoctlSetInt(fd, ioctlClearSock, 0)
	if err != nil && !errors.Is(err, unix.EINTR) {
		d.err = fmt.Errorf("kernel: NBD_DO_IT: %w", err)
	}
	close(d.done)
}

// Disconnect asks the kernel to disconnect (NBD_DISCONNECT); NBD_DO_IT
// then returns.
func (d *IoctlDevice) Disconnect() error {
	return disconnectIoctlFD(int(d.f.Fd()))
}

// Done is closed when NBD_DO_IT returned: the device is disconnected.
func (d *IoctlDevice) Done() <-chan struct{} { return d.done }

// Wait blocks until NBD_DO_IT returned and reports its error.
func (d *IoctlDevice) Wait() error {
	<-d.done
	return d.err
}

// Close closes the device file; call it after Wait.
func (d *IoctlDevice) Close() error { return d.f.Close() }

func disconnectIoctlFD(fd int) error {
	if err := unix.IoctlSetInt(fd, ioctlDisconnect, 0); err != nil {
		return fmt.Errorf("kernel: NBD_DISCONNECT: %w", mapErrno(err))
	}
	return nil
}

// DisconnectIoctl disconnects the device at path with NBD_DISCONNECT,
// for kernels without the netlink family.
func DisconnectIoctl(path string) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("kernel: %w", err)
	}
	defer f.Close()
	return disconnectIoctlFD(int(f.Fd()))
}
