package kernel

// sysfs.go: device paths and sysfs: queue tuning (Tune), the connected
// server's pid, a free index.

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
)

// DevicePath is the device node of index: /dev/nbdN.
func DevicePath(index int) string { return "/dev/nbd" + strconv.Itoa(index) }

// ParseDevice reads the index out of /dev/nbdN (or nbdN).
func ParseDevice(s string) (int, error) {
	name := strings.TrimPrefix(s, "/dev/")
	num, ok := strings.CutPrefix(name, "nbd")
	if !ok || num == "" || strings.Contains(name, "/") {
		return 0, fmt.Errorf("%w: %q (want /dev/nbdN)", ErrBadDevice, s)
	}
	n, err := strconv.Atoi(num)
	if err != nil || n < 0 || num != strconv.Itoa(n) {
		return 0, fmt.Errorf("%w: %q (want /dev/nbdN)", ErrBadDevice, s)
	}
	return n, nil
}

// Shape is how the block layer should treat the device: written to
// /sys/block/nbdN/queue after the device is connected. Zero values leave
// the kernel's defaults.
type Shape struct {
	// Rotational tells the I/O schedulers whether seeks are expensive.
	Rotational bool
	// MaxSectorsKB caps one request (max_sectors_kb); clamped to the
	// hardware limit the driver set (max_hw_sectors_kb).
	MaxSectorsKB int
	// NrRequests is the queue depth (nr_requests).
	NrRequests int
	// ReadAheadKB is the read-ahead window (read_ahead_kb).
	ReadAheadKB int
	// Scheduler names the I/O scheduler ("none", "mq-deadline").
	Scheduler string
}

// Tune writes s to sysDir/block/nbdN/queue. It writes what it can and
// returns the failures joined; a missing or read-only attribute is not
// fatal to the device.
func Tune(sysDir string, index int, s Shape) error {
	if sysDir == "" {
		sysDir = "/sys"
	}
	q := filepath.Join(sysDir, "block", "nbd"+strconv.Itoa(index), "queue")
	var errs []error
	write := func(name, v string) {
		if err := os.WriteFile(filepath.Join(q, name), []byte(v+"\n"), 0); err != nil {
			errs = append(errs, fmt.Errorf("kernel: %s=%s: %w", name, v, err))
		}
	}
	rot := "0"
	if s.Rotational {
		rot = "1"
	}
	write("rotational", rot)
	if s.Scheduler != "" {
		write("scheduler", s.Scheduler)
	}
	if s.MaxSectorsKB > 0 {
		kb := s.MaxSectorsKB
		if hw, err := readInt(filepath.Join(q, "max_hw_sectors_kb")); err == nil && hw > 0 && kb > hw {
			kb = hw
		}
		write("max_sectors_kb", strconv.Itoa(kb))
	}
	if s.NrRequests > 0 {
		write("nr_requests", strconv.Itoa(s.NrRequests))
	}
	if s.ReadAheadKB > 0 {
		write("read_ahead_kb", strconv.Itoa(s.ReadAheadKB))
	}
	return errors.Join(errs...)
}

func readInt(p string) (int, error) {
	b, err := os.ReadFile(p)
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(strings.TrimSpace(string(b)))
}

// ServerPID is the pid of the process that connected the device
// (/sys/block/nbdN/pid), or 0 when it is not connected.
func ServerPID(sysDir string, index int) int {
	if sysDir == "" {
		sysDir = "/sys"
	}
	pid, err := readInt(filepath.Join(sysDir, "block", "nbd"+strconv.Itoa(index), "pid"))
	if err != nil {
		return 0
	}
	return pid
}

// FreeIndex finds the lowest nbd device that is not connected (no pid
// file, size 0), for the ioctl path, where the kernel does not pick.
func FreeIndex(sysDir string) (int, error) {
	if sysDir == "" {
		sysDir = "/sys"
	}
	ents, err := os.ReadDir(filepath.Join(sysDir, "block"))
	if err != nil {
		return 0, fmt.Errorf("kernel: %w", err)
	}
	var idx []int
	for _, e := range ents {
		if n, err := ParseDevice(e.Name()); err == nil {
			idx = append(idx, n)
		}
	}
	sort.Ints(idx)
	for _, n := range idx {
		dir := filepath.Join(sysDir, "block", "nbd"+strconv.Itoa(n))
		if exists(filepath.Join(dir, "pid")) {
			continue
		}
		if size, err := readInt(filepath.Join(dir, "size")); err == nil && size == 0 {
			return n, nil
		}
	}
	return 0, fmt.Errorf("%w: every nbd device is in use (load nbd with a larger nbds_max)", ErrBusy)
}
