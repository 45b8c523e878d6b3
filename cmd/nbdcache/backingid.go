package main

// backingid.go: the identity of a local backing (file or block device) that
// a cache is bound to.

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

	"github.com/nbdcache/nbdcache/nbd"
)

// A cache belongs to one backing. The backing's identity is a 16-byte id:
// for a regular file, a random id kept in an extended attribute of the
// file (so a copy or a file of the same size is a different backing);
// for a block device, a hash of the identifiers the kernel reports for
// it (WWID, serial, partition UUID), which survive reboots and renames.
//
// A file gets a new id whenever a cache is formatted or rebound for it
// (newBackingID): a cache bound to it before then stops matching it, and
// is refused, rather than writing stale dirty data back over newer data.
const backingIDXattr = "user.nbdcache.backing-id"

var errNoBackingID = errors.New("no stable identity for this backing")

// backingID returns the backing's id. A regular file that carries none
// fails with errNoBackingID.
func backingID(path string) ([16]byte, error) {
	var id [16]byte
	if nbd.IsURI(path) {
		return remoteBackingID(path)
	}
	fi, err := os.Stat(path)
	if err != nil {
		return id, err
	}
	if fi.Mode()&os.ModeDevice != 0 {
		return blockDeviceID(path)
	}
	id, found, err := fileBackingID(path)
	if err == nil && !found {
		err = fmt.Errorf("%s: %w: it carries no %s attribute", path, errNoBackingID, backingIDXattr)
	}
	return id, err
}

// fileBackingID reads a regular file's id; found is false when it has
// none. An error means the attribute cannot be read (or is not an id).
func fileBackingID(path string) (id [16]byte, found bool, err error) {
	buf := make([]byte, 64)
	n, err := unix.Getxattr(path, backingIDXattr, buf)
	if errors.Is(err, unix.ENODATA) {
		return id, false, nil
	}
	if err != nil {
		return id, false, fmt.Errorf("%s: reading extended attribute %s: %w (the backing's filesystem must support user xattrs)", path, backingIDXattr, err)
	}
	b, derr := hex.DecodeString(string(buf[:n]))
	if derr != nil || len(b) != 16 {
		return id, false, fmt.Errorf("%s: extended attribute %s is corrupt (%q)", path, backingIDXattr, buf[:n])
	}
	copy(id[:], b)
	return id, true, nil
}

// newBackingID returns the id to bind a cache to the backing at path,
// and commit, which records it: the caller writes the cache's superblock
// first, then commits. A regular file gets a new random id, which commit
// sets in place of any old one; a crash between the two leaves a cache
// that refuses the backing until `nbdcache rebind`, never a cache that
// accepts a backing it was not bound to. A block device's id is what the
// kernel reports for it, and commit does nothing.
func newBackingID(path string) (id [16]byte, commit func() error, err error) {
	if nbd.IsURI(path) {
		id, err := remoteBackingID(path)
		return id, func() error { return nil }, err
	}
	fi, err := os.Stat(path)
	if err != nil {
		return id, nil, err
	}
	if fi.Mode()&os.ModeDevice != 0 {
		id, err := blockDeviceID(path)
		return id, func() error { return nil }, err
	}
	if _, _, err := fileBackingID(path); err != nil { // xattrs work here
		return id, nil, err
	}
	if _, err := rand.Read(id[:]); err != nil {
		return id, nil, err
	}
	commit = func() error {
		if err := unix.Setxattr(path, backingIDXattr, []byte(hex.EncodeToString(id[:])), 0); err != nil {
			return fmt.Errorf("%s: setting extended attribute %s: %w", path, backingIDXattr, err)
		}
		return nil
	}
	return id, commit, nil
}

// dropBackingID removes a regular file's id: it is no longer a backing
// (format --force made it a cache).
func dropBackingID(path string) error {
	err := unix.Removexattr(path, backingIDXattr)
	if err != nil && !errors.Is(err, unix.ENODATA) {
		return fmt.Errorf("%s: removing extended attribute %s: %w", path, backingIDXattr, err)
	}
	return nil
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
