package probe

// overlap.go: Overlap, whether two paths reach the same sectors.

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/nbdcache/nbdcache/storage"
)

// node is a file or block device on a path's stack: the path itself, and
// everything its sectors lie on.
type node struct {
	file bool
	dev  uint64 // a file: the device of its inode
	ino  uint64
	rdev uint64 // a block device
	name string
	// why says how the path lies on this node, one clause per step
	// ("/dev/sdb1 is a partition of /dev/sdb"); empty for the path.
	why []string
}

func (n node) same(o node) bool {
	if n.file != o.file {
		return false
	}
	if n.file {
		return n.dev == o.dev && n.ino == o.ino
	}
	return n.rdev == o.rdev
}

// maxStack bounds the walk down a stack of devices.
const maxStack = 32

// stack returns the path's node first, then every file and block device
// it lies on: for a file, the block device of its filesystem; for a
// partition, its disk; for a device-mapper or md device, its slaves; for
// a loop device, its backing file. A filesystem on no block device
// (tmpfs, a network filesystem) ends the walk.
func stack(path string) ([]node, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return nil, fmt.Errorf("probe: %s: %w", path, err)
	}
	var root node
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
		root = node{file: true, dev: st.Dev, ino: st.Ino, name: path}
	case unix.S_IFBLK:
		root = node{rdev: st.Rdev, name: path}
	default:
		return nil, fmt.Errorf("probe: %s is neither a regular file nor a block device", path)
	}
	nodes := []node{root}
	for i := 0; i < len(nodes) && len(nodes) < maxStack; i++ {
		for _, next := range below(nodes[i]) {
			if !contains(nodes, next) {
				nodes = append(nodes, next)
			}
		}
	}
	return nodes, nil
}

// below returns the nodes n lies on directly.
func below(n node) []node {
	step := func(m node, clause string) node {
		m.why = append(append([]string(nil), n.why...), clause)
		return m
	}
	if n.file {
		if _, err := os.Stat(sysBlock(n.dev)); err != nil {
			return nil // tmpfs, overlay, NFS: no block device to name
		}
		d := node{rdev: n.dev, name: devName(n.dev)}
		return []node{step(d, fmt.Sprintf("%s is a file on a filesystem on %s", n.name, d.name))}
	}
	var out []node
	if rel := storage.RelatedBlockDevices(n.rdev); isPartition(n.rdev) && len(rel) == 2 {
		p := node{rdev: rel[1], name: devName(rel[1])} // a partition's one related device: its disk
		out = append(out, step(p, fmt.Sprintf("%s is a partition of %s", n.name, p.name)))
	}
	sys := sysBlock(n.rdev)
	slaves, _ := os.ReadDir(filepath.Join(sys, "slaves"))
	for _, s := range slaves {
		if d, ok := devNumber(filepath.Join(sys, "slaves", s.Name(), "dev")); ok {
			p := node{rdev: d, name: "/dev/" + s.Name()}
			out = append(out, step(p, fmt.Sprintf("%s is stacked on %s", n.name, p.name)))
		}
	}
	if b, err := os.ReadFile(filepath.Join(sys, "loop", "backing_file")); err == nil {
		f := strings.TrimSpace(string(b))
		var st unix.Stat_t
		if unix.Stat(f, &st) == nil {
			p := node{file: true, dev: st.Dev, ino: st.Ino, name: f}
			out = append(out, step(p, fmt.Sprintf("%s is a loop device over %s", n.name, f)))
		}
	}
	return out
}

func contains(nodes []node, n node) bool {
	for _, m := range nodes {
		if m.same(n) {
			return true
		}
	}
	return false
}

// Overlap says whether the paths a and b reach common sectors, and how:
// the same file or device (through a symlink, a hard link, a
// /dev/disk/by-* name), or one lying on the other (a partition of a disk,
// a loop device over a file, a file on a filesystem on a device). The
// answer is "" when they are distinct. Two partitions of one disk are
// distinct.
func Overlap(a, b string) (string, error) {
	sa, err := stack(a)
	if err != nil {
		return "", err
	}
	sb, err := stack(b)
	if err != nil {
		return "", err
	}
	if sa[0].same(sb[0]) {
		if sa[0].file {
			return fmt.Sprintf("%s and %s are the same file (inode %d)", a, b, sa[0].ino), nil
		}
		return fmt.Sprintf("%s and %s are the same block device (%d:%d)", a, b, unix.Major(sa[0].rdev), unix.Minor(sa[0].rdev)), nil
	}
	for _, n := range sb[1:] {
		if n.same(sa[0]) {
			return fmt.Sprintf("%s lies on %s: %s", b, a, strings.Join(n.why, "; ")), nil
		}
	}
	for _, n := range sa[1:] {
		if n.same(sb[0]) {
			return fmt.Sprintf("%s lies on %s: %s", a, b, strings.Join(n.why, "; ")), nil
		}
	}
	return "", nil
}

func sysBlock(rdev uint64) string {
	return fmt.Sprintf("/sys/dev/block/%d:%d", unix.Major(rdev), unix.Minor(rdev))
}

func isPartition(rdev uint64) bool {
	_, err := os.Stat(filepath.Join(sysBlock(rdev), "partition"))
	return err == nil
}

// devName is the /dev name of a block device number, from sysfs.
func devName(rdev uint64) string {
	if p, err := filepath.EvalSymlinks(sysBlock(rdev)); err == nil {
		return "/dev/" + filepath.Base(p)
	}
	return fmt.Sprintf("block device %d:%d", unix.Major(rdev), unix.Minor(rdev))
}

func devNumber(path string) (uint64, bool) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, false
	}
	var maj, min uint32
	if _, err := fmt.Sscanf(strings.TrimSpace(string(b)), "%d:%d", &maj, &min); err != nil {
		return 0, false
	}
	return unix.Mkdev(maj, min), true
}
