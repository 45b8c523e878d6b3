package storage

// claim.go: exclusive claims on devices, and who holds one.

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Claim says how OpenFile claims a device against other users of it.
//
// A claim is flock(2) on the open file description, taken without
// waiting, plus O_EXCL on an exclusive open of a block device. flock is
// tied to the open file description, not to the process, so a second
// OpenFile of the same file in the same process is refused too (POSIX
// fcntl locks would not be); closing the File releases it, and so does
// the death of the process. O_EXCL is the kernel's own exclusive claim on
// a block device (the one mount, md and device-mapper take): it reaches
// the device through any node that names it, and a partition and its
// whole disk exclude each other. Both claims are advisory against
// programs that take none (dd, cp).
//
// flock does not report its holder, so a refused claim finds it the way
// lsof does: /proc/locks names the process that took each flock, and for
// a block device /proc/*/fd, the mount table and sysfs's holders say who
// else has it.
type Claim int

const (
	// ClaimNone takes no claim.
	ClaimNone Claim = iota
	// ClaimShared takes a shared flock: other shared claims may hold the
	// device too, an exclusive one may not. For read-only users.
	ClaimShared
	// ClaimExclusive takes an exclusive flock and, on a block device,
	// opens it with O_EXCL: nobody else may claim it.
	ClaimExclusive
)

// ErrInUse: another user holds a claim on the device. The error is an
// *InUseError, which says who.
var ErrInUse = errors.New("storage: device in use")

// InUseError is the error of an OpenFile refused because another user
// holds the device. errors.Is(err, ErrInUse) holds.
type InUseError struct {
	Path string
	// Holders is who was found holding or using the device; empty when
	// nobody could be named (the holder has just gone, or is hidden from
	// this process).
	Holders []Holder
}

// Holder is one user of a device.
type Holder struct {
	// PID is the holding process; 0 when the holder is not a process (a
	// mount, a device-mapper or RAID device stacked on the device).
	PID int
	// Command is the process's command line, shortened, or names the
	// device stacked on it.
	Command string
	// How it holds the device: "claimed" (a flock), "open" (an open file
	// descriptor seen in /proc), "mounted at DIR", or "holder".
	How string
}

func (h Holder) String() string {
	switch {
	case h.PID > 0 && h.How == "claimed":
		return fmt.Sprintf("process %d (%s)", h.PID, h.Command)
	case h.PID > 0:
		return fmt.Sprintf("process %d (%s), which has it %s", h.PID, h.Command, h.How)
	case h.How == "holder":
		return h.Command + ", which is stacked on it"
	}
	return h.How
}

func (e *InUseError) Error() string {
	if len(e.Holders) == 0 {
		return fmt.Sprintf("storage: %s is in use by another user, which could not be named", e.Path)
	}
	names := make([]string, len(e.Holders))
	for i, h := range e.Holders {
		names[i] = h.String()
	}
	return fmt.Sprintf("storage: %s is in use by %s", e.Path, strings.Join(names, "; "))
}

// Is makes errors.Is(err, ErrInUse) hold.
func (e *InUseError) Is(target error) bool { return target == ErrInUse }

// PIDs returns the pids of the processes among the holders.
func (e *InUseError) PIDs() []int {
	var pids []int
	for _, h := range e.Holders {
		if h.PID > 0 {
			pids = append(pids, h.PID)
		}
	}
	return pids
}

// claimFlags adds O_EXCL for an exclusive claim on a block device. The
// type is looked up before the open; setup checks it again on the open
// descriptor.
func claimFlags(path string, c Claim) int {
	if c != ClaimExclusive {
		return 0
	}
	var st unix.Stat_t
	if unix.Stat(path, &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFBLK {
		return unix.O_EXCL
	}
	return 0
}

// takeClaim flocks fd, without waiting. An open that O_EXCL refused
// (EBUSY) comes here too, with fd -1, to be told who holds the device.
func takeClaim(path string, fd int, c Claim) error {
	if c == ClaimNone {
		return nil
	}
	if fd >= 0 {
		how := unix.LOCK_EX
		if c == ClaimShared {
			how = unix.LOCK_SH
		}
		err := retryEINTR(func() error { return unix.Flock(fd, how|unix.LOCK_NB) })
		if err == nil {
			return nil
		}
		if err != unix.EWOULDBLOCK {
			return fmt.Errorf("storage: claim %s: %w", path, err)
		}
	}
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return &InUseError{Path: path}
	}
	return &InUseError{Path: path, Holders: findHolders(&st)}
}

// findHolders names who holds the file or device st describes: the
// processes with a flock on its inode, and for a block device, the
// processes that have it (or its disk or partitions) open, the mounts of
// it and the devices stacked on it.
func findHolders(st *unix.Stat_t) []Holder {
	var hs []Holder
	seen := map[int]bool{}
	for _, pid := range flockHolders(st.Dev, st.Ino) {
		if !seen[pid] {
			seen[pid] = true
			hs = append(hs, Holder{PID: pid, Command: cmdline(pid), How: "claimed"})
		}
	}
	if st.Mode&unix.S_IFMT != unix.S_IFBLK {
		return hs
	}
	related := RelatedBlockDevices(st.Rdev)
	for _, pid := range openers(related) {
		if !seen[pid] {
			seen[pid] = true
			hs = append(hs, Holder{PID: pid, Command: cmdline(pid), How: "open"})
		}
	}
	for _, dir := range mountsOf(related) {
		hs = append(hs, Holder{How: "mounted at " + dir})
	}
	for _, name := range stackedOn(related) {
		hs = append(hs, Holder{Command: name, How: "holder"})
	}
	return hs
}

// flockHolders reads /proc/locks for the pids of the flocks on the inode
// (dev, ino). Lines look like
//
//	1: FLOCK  ADVISORY  WRITE 8283 fe:00:9978067 0 EOF
//
// with the device's major and minor in hex; a waiter's line has "->"
// after the number, and is skipped.
func flockHolders(dev uint64, ino uint64) []int {
	b, err := os.ReadFile("/proc/locks")
	if err != nil {
		return nil
	}
	want := fmt.Sprintf("%02x:%02x:%d", unix.Major(dev), unix.Minor(dev), ino)
	var pids []int
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 6 || f[1] != "FLOCK" || f[5] != want {
			continue
		}
		if pid, err := strconv.Atoi(f[4]); err == nil && pid > 0 {
			pids = append(pids, pid)
		}
	}
	return pids
}

// RelatedBlockDevices returns the device numbers that share sectors with
// the block device rdev: itself, the whole disk if it is a partition, and
// the partitions if it is a whole disk.
func RelatedBlockDevices(rdev uint64) []uint64 {
	devs := []uint64{rdev}
	sys, err := filepath.EvalSymlinks(sysBlockDir(rdev))
	if err != nil {
		return devs
	}
	if _, err := os.Stat(filepath.Join(sys, "partition")); err == nil {
		if d, ok := readDevNumber(filepath.Join(filepath.Dir(sys), "dev")); ok {
			devs = append(devs, d)
		}
		return devs
	}
	entries, _ := os.ReadDir(sys)
	for _, e := range entries {
		if _, err := os.Stat(filepath.Join(sys, e.Name(), "partition")); err != nil {
			continue
		}
		if d, ok := readDevNumber(filepath.Join(sys, e.Name(), "dev")); ok {
			devs = append(devs, d)
		}
	}
	return devs
}

// sysBlockDir is the sysfs link of a block device number.
func sysBlockDir(rdev uint64) string {
	return fmt.Sprintf("/sys/dev/block/%d:%d", unix.Major(rdev), unix.Minor(rdev))
}

// readDevNumber reads a sysfs "MAJ:MIN" file.
func readDevNumber(path string) (uint64, bool) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, false
	}
	maj, min, ok := strings.Cut(strings.TrimSpace(string(b)), ":")
	if !ok {
		return 0, false
	}
	a, err1 := strconv.ParseUint(maj, 10, 32)
	i, err2 := strconv.ParseUint(min, 10, 32)
	if err1 != nil || err2 != nil {
		return 0, false
	}
	return unix.Mkdev(uint32(a), uint32(i)), true
}

// openers lists the processes with a descriptor open on one of the block
// devices, as lsof and fuser find them.
func openers(devs []uint64) []int {
	procs, _ := os.ReadDir("/proc")
	var pids []int
	for _, p := range procs {
		pid, err := strconv.Atoi(p.Name())
		if err != nil {
			continue
		}
		fds, _ := os.ReadDir(filepath.Join("/proc", p.Name(), "fd"))
		for _, fd := range fds {
			var st unix.Stat_t
			if unix.Stat(filepath.Join("/proc", p.Name(), "fd", fd.Name()), &st) != nil {
				continue
			}
			if st.Mode&unix.S_IFMT == unix.S_IFBLK && containsDev(devs, st.Rdev) {
				pids = append(pids, pid)
				break
			}
		}
	}
	return pids
}

// mountsOf lists where the block devices are mounted.
func mountsOf(devs []uint64) []string {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	var dirs []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 {
			continue
		}
		maj, min, ok := strings.Cut(f[2], ":")
		if !ok {
			continue
		}
		a, err1 := strconv.ParseUint(maj, 10, 32)
		i, err2 := strconv.ParseUint(min, 10, 32)
		if err1 == nil && err2 == nil && containsDev(devs, unix.Mkdev(uint32(a), uint32(i))) {
			dirs = append(dirs, f[4])
		}
	}
	return dirs
}

// stackedOn lists the devices (device-mapper, md) that sysfs says hold
// one of the block devices.
func stackedOn(devs []uint64) []string {
	var names []string
	for _, d := range devs {
		entries, _ := os.ReadDir(filepath.Join(sysBlockDir(d), "holders"))
		for _, e := range entries {
			names = append(names, "/dev/"+e.Name())
		}
	}
	return names
}

func containsDev(devs []uint64, d uint64) bool {
	for _, x := range devs {
		if x == d {
			return true
		}
	}
	return false
}

// cmdline returns a process's command line, shortened to 120 bytes.
func cmdline(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil || len(b) == 0 {
		return "?"
	}
	s := strings.TrimSpace(strings.ReplaceAll(string(bytes.TrimRight(b, "\x00")), "\x00", " "))
	if len(s) > 120 {
		s = s[:117] + "..."
	}
	return s
}
