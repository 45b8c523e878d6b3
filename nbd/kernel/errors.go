package kernel

// errors.go: the package's sentinel errors.

import "errors"

// Sentinel errors. Callers check them with errors.Is; the messages carry
// what to do about them.
var (
	// ErrNoDriver: the nbd driver is neither loaded nor loadable.
	ErrNoDriver = errors.New("kernel: nbd driver not available")
	// ErrNoNetlink: the kernel has no "nbd" generic netlink family (a
	// kernel older than 4.12); the ioctl path is the fallback.
	ErrNoNetlink = errors.New("kernel: nbd generic netlink family not found")
	// ErrPermission: the caller lacks CAP_SYS_ADMIN (or CAP_SYS_MODULE to
	// load the module).
	ErrPermission = errors.New("kernel: permission denied (run as root)")
	// ErrBusy: the device is already connected.
	ErrBusy = errors.New("kernel: device busy")
	// ErrNotConnected: the device has no connection to reconfigure or
	// disconnect.
	ErrNotConnected = errors.New("kernel: device not connected")
	// ErrBadDevice: a path that is not /dev/nbdN.
	ErrBadDevice = errors.New("kernel: not an nbd device")
	// ErrInvalid: a configuration the kernel would refuse.
	ErrInvalid = errors.New("kernel: invalid configuration")
	// ErrUnsupported: the operation is impossible on this path (for
	// example Reconfigure over ioctl).
	ErrUnsupported = errors.New("kernel: not supported")
)
