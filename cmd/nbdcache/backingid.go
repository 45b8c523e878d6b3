package main

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// A cache belongs to one backing. The backing's identity is a 16-byte id:
// for a regular file, a random id kept in an extended attribute of the
// file (so a copy or a file of the same size is a different backing);
// for a block device, a hash of the identifiers the kernel reports for
// it (WWID, serial, partition UUID), which survive reboots and renames.
const backingIDXattr = "user.nbdcache.backing-id"

var errNoBackingID = errors.New("no stable identity for this backing")

// backingID returns the backing's id. With create, a regular file that has
// none is given a new one.
func backingID(path string, create bool) ([16]byte, error) {
	var id [16]byte
	fi, err := os.Stat(path)
	if err != nil {
		return id, err
	}
	if fi.Mode()&os.ModeDevice != 0 {
		return blockDeviceID(path)
	}
	buf := make([]byte, 64)
	n, err := unix.Getxattr(path, backingIDXattr, buf)
	if err == nil {
		b, derr := hex.DecodeString(string(buf[:n]))
		if derr != nil || len(b) != 16 {
			return id, fmt.Errorf("%s: extended attribute %s is corrupt (%q)", path, backingIDXattr, buf[:n])
		}
		copy(id[:], b)
		return id, nil
	}
	if !errors.Is(err, unix.ENODATA) {
		return id, fmt.Errorf("%s: reading extended attribute %s: %w (the backing's filesystem must support user xattrs)", path, backingIDXattr, err)
	}
	if !create {
		return id, fmt.Errorf("%s: %w: it has never been formatted with a cache (no %s attribute)", path, errNoBackingID, backingIDXattr)
	}
	if _, err := rand.Read(id[:]); err != nil {
		return id, err
	}
	if err := unix.Setxattr(path, backingIDXattr, []byte(hex.EncodeToString(id[:])), unix.XATTR_CREATE); err != nil {
		return id, fmt.Errorf("%s: setting extended attribute %s: %w", path, backingIDXattr, err)
	}
	return id, nil
}

// blockDeviceID derives an id from what sysfs says about the device.
func blockDeviceID(path string) ([16]byte, error) {
	var id [16]byte
	real, err := filepath.EvalSymlinks(path)
	if err != nil {
		return id, err
	}
	name := filepath.Base(real)
	sys := filepath.Join("/sys/class/block", name)
	var parts []string
	for _, f := range []string{"device/wwid", "wwid", "device/serial", "serial", "partition", "dev"} {
		if b, err := os.ReadFile(filepath.Join(sys, f)); err == nil {
			parts = append(parts, f+"="+strings.TrimSpace(string(b)))
		}
	}
	if uuid := partUUID(real); uuid != "" {
		parts = append(parts, "partuuid="+uuid)
	}
	stable := false
	for _, p := range parts {
		if !strings.HasPrefix(p, "dev=") && !strings.HasPrefix(p, "partition=") {
			stable = true
		}
	}
	if !stable {
		return id, fmt.Errorf("%s: %w: the kernel reports no WWID, serial or partition UUID for it", path, errNoBackingID)
	}
	sum := sha256.Sum256([]byte(strings.Join(parts, "\n")))
	copy(id[:], sum[:])
	return id, nil
}

// partUUID finds the partition UUID of a device node through udev's links.
func partUUID(dev string) string {
	links, _ := filepath.Glob("/dev/disk/by-partuuid/*")
	for _, l := range links {
		if t, err := filepath.EvalSymlinks(l); err == nil && t == dev {
			return filepath.Base(l)
		}
	}
	return ""
}
