// Package unixsock creates unix sockets that only the users they are
// meant for can connect to, and tells a server who connected.
//
// # Invariants
//
//   - A socket made by Listen never exists at its path with looser
//     permissions than asked for, not even for an instant: it is bound in
//     a fresh 0700 directory beside the path, given its mode and group
//     there, and only then linked into place. The umask plays no part.
//   - Listen never replaces anything but a stale socket (one nobody
//     listens on): a live socket, a regular file or a directory at the
//     path is an error, and the link that publishes the socket fails
//     rather than overwrite a file created meanwhile.
//   - PeerCred reports what the kernel recorded when the peer connected
//     (SO_PEERCRED, SO_PEERGROUPS), not anything the peer says.
package unixsock

// unixsock.go: Listen, PeerCred and LookupGroup.

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Perm says who may connect to a socket made by Listen.
type Perm struct {
	// Mode holds the permission bits (0: 0600, the owner only).
	Mode os.FileMode
	// GID, if not negative, is the socket's group; otherwise the group is
	// the process's.
	GID int
}

// Owner is the default: the owner only, the process's group.
var Owner = Perm{Mode: 0o600, GID: -1}

// ErrInUse is returned by Listen when a server is listening at the path.
var ErrInUse = errors.New("unixsock: another server is listening there")

// ErrNotSocket is returned by Listen when the path holds something other
// than a socket.
var ErrNotSocket = errors.New("unixsock: the path exists and is not a socket")

// Listen creates a unix socket at path with perm and listens on it. A
// stale socket at path is replaced. Closing the listener does not remove
// path: the caller does, once it stops serving.
func Listen(path string, perm Perm) (*net.UnixListener, error) {
	if perm.Mode == 0 {
		perm.Mode = 0o600
	}
	if perm.Mode&^os.ModePerm != 0 {
		return nil, fmt.Errorf("unixsock: mode %v has bits other than permissions", perm.Mode)
	}
	if err := removeStale(path); err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp(filepath.Dir(path), ".sock")
	if err != nil {
		return nil, fmt.Errorf("unixsock: %w", err)
	}
	defer os.RemoveAll(dir)
	tmp := filepath.Join(dir, "s")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: tmp, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("unixsock: binding %s (beside %s): %w", tmp, path, err)
	}
	l.SetUnlinkOnClose(false)
	publish := func() error {
		if perm.GID >= 0 {
			if err := os.Lchown(tmp, -1, perm.GID); err != nil {
				return err
			}
		}
		if err := os.Chmod(tmp, perm.Mode); err != nil {
			return err
		}
		// link(2), unlike rename(2), fails if path exists.
		if err := os.Link(tmp, path); err != nil {
			if errors.Is(err, os.ErrExist) {
				return fmt.Errorf("%s: %w (created meanwhile)", path, ErrNotSocket)
			}
			return err
		}
		return nil
	}
	if err := publish(); err != nil {
		l.Close()
		return nil, fmt.Errorf("unixsock: %w", err)
	}
	return l, nil
}

// removeStale removes a socket at path that nobody listens on, and
// refuses a live one or anything else.
func removeStale(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("unixsock: %w", err)
	}
	if fi.Mode()&os.ModeSocket == 0 {
		return fmt.Errorf("%s: %w", path, ErrNotSocket)
	}
	if c, err := net.Dial("unix", path); err == nil {
		c.Close()
		return fmt.Errorf("%s: %w", path, ErrInUse)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("unixsock: removing the stale socket: %w", err)
	}
	return nil
}

// Cred is who is on the other end of a unix socket, as the kernel
// recorded it at connect time.
type Cred struct {
	PID, UID, GID int
	Groups        []int // supplementary groups
}

// InGroup reports whether gid is the peer's group or one of its
// supplementary groups.
func (c Cred) InGroup(gid int) bool {
	if c.GID == gid {
		return true
	}
	for _, g := range c.Groups {
		if g == gid {
			return true
		}
	}
	return false
}

// ErrNotUnix is returned by PeerCred for a connection that is not a unix
// socket.
var ErrNotUnix = errors.New("unixsock: not a unix socket connection")

// PeerCred returns the credentials of the process that connected to c.
func PeerCred(c net.Conn) (Cred, error) {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return Cred{}, ErrNotUnix
	}
	rc, err := uc.SyscallConn()
	if err != nil {
		return Cred{}, err
	}
	var cred Cred
	var serr error
	err = rc.Control(func(fd uintptr) {
		var u *unix.Ucred
		if u, serr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED); serr != nil {
			return
		}
		cred = Cred{PID: int(u.Pid), UID: int(u.Uid), GID: int(u.Gid)}
		cred.Groups, serr = peerGroups(int(fd))
	})
	if err == nil {
		err = serr
	}
	if err != nil {
		return Cred{}, fmt.Errorf("unixsock: peer credentials: %w", err)
	}
	return cred, nil
}

// peerGroups reads SO_PEERGROUPS, growing the buffer as the kernel asks
// (at most NGROUPS_MAX, 65536 groups).
func peerGroups(fd int) ([]int, error) {
	buf := make([]uint32, 64)
	for range 3 {
		n := uint32(len(buf) * 4)
		_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), unix.SOL_SOCKET, unix.SO_PEERGROUPS,
			uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&n)), 0)
		switch {
		case errno == 0:
			gs := make([]int, n/4)
			for i := range gs {
				gs[i] = int(buf[i])
			}
			return gs, nil
		case errno == unix.ERANGE && int(n/4) > len(buf) && n/4 <= 65536:
			buf = make([]uint32, n/4)
		case errno == unix.ENOPROTOOPT:
			return nil, nil // a kernel before 4.13: primary group only
		default:
			return nil, errno
		}
	}
	return nil, unix.ERANGE
}

// LookupGroup resolves a group name or number to a gid.
func LookupGroup(s string) (int, error) {
	if n, err := strconv.Atoi(s); err == nil && n >= 0 {
		return n, nil
	}
	g, err := user.LookupGroup(s)
	if err != nil {
		return 0, fmt.Errorf("unixsock: %w", err)
	}
	return strconv.Atoi(g.Gid)
}
