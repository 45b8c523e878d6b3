package nbd

// errno.go: the mapping of Device errors to NBD errors, and the errors'
// names.

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/nbdcache/nbdcache/storage"
)

// errnoFor maps an error from a Device to the NBD error sent to the client.
// It is the only place where this mapping happens.
func errnoFor(err error, write bool) uint32 {
	switch {
	case err == nil:
		return 0
	case errors.Is(err, storage.ErrSyncFailed):
		return errIO // whatever the first failure was: writes are lost
	case errors.Is(err, storage.ErrOutOfRange):
		if write {
			return errNoSpc
		}
		return errInval
	case errors.Is(err, storage.ErrReadOnly), errors.Is(err, unix.EROFS), errors.Is(err, unix.EPERM), errors.Is(err, unix.EACCES):
		return errPerm
	case errors.Is(err, storage.ErrNoSpace), errors.Is(err, unix.ENOSPC), errors.Is(err, unix.EDQUOT), errors.Is(err, unix.EFBIG):
		return errNoSpc
	case errors.Is(err, storage.ErrNotSupported), errors.Is(err, unix.EOPNOTSUPP):
		return errNotSup
	case errors.Is(err, unix.EINVAL):
		return errInval
	case errors.Is(err, unix.ENOMEM):
		return errNoMem
	case errors.Is(err, unix.EOVERFLOW):
		return errOverflow
	case errors.Is(err, unix.ESHUTDOWN):
		return errShutdown
	}
	return errIO
}

// errnoName names an NBD error value for metrics: "" for 0.
func errnoName(errno uint32) string {
	switch errno {
	case 0:
		return ""
	case errPerm:
		return "EPERM"
	case errIO:
		return "EIO"
	case errNoMem:
		return "ENOMEM"
	case errInval:
		return "EINVAL"
	case errNoSpc:
		return "ENOSPC"
	case errOverflow:
		return "EOVERFLOW"
	case errNotSup:
		return "ENOTSUP"
	case errShutdown:
		return "ESHUTDOWN"
	}
	return fmt.Sprintf("E%d", errno)
}
