package probe

import (
	"bytes"
	"encoding/binary"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// image is a zeroed device image of size bytes with some bytes set.
func image(size int64, at map[int64]string) *bytes.Reader {
	b := make([]byte, size)
	for off, s := range at {
		copy(b[off:], s)
	}
	return bytes.NewReader(b)
}

func TestSignatures(t *testing.T) {
	const size = 8 << 20
	mbr := make([]byte, 512)
	mbr[446+4] = 0x83
	binary.LittleEndian.PutUint32(mbr[446+8:], 2048)
	binary.LittleEndian.PutUint32(mbr[446+12:], 4096)
	mbr[510], mbr[511] = 0x55, 0xaa
	fat := make([]byte, 512)
	copy(fat[82:], "FAT32   ")
	fat[510], fat[511] = 0x55, 0xaa
	md10 := int64((size/512-16)&^7) * 512
	for _, c := range []struct {
		name string
		at   map[int64]string
		want string // "" for none
	}{
		{"zeroes", nil, ""},
		{"text", map[int64]string{0: "hello, world"}, ""},
		{"ext4", map[int64]string{0x438: "\x53\xef"}, "ext2/3/4 filesystem"},
		{"xfs", map[int64]string{0: "XFSB"}, "XFS filesystem"},
		{"btrfs", map[int64]string{0x10040: "_BHRfS_M"}, "btrfs filesystem"},
		{"lvm at sector 1", map[int64]string{512: "LABELONE"}, "LVM2 physical volume"},
		{"md 1.2", map[int64]string{4096: "\xfc\x4e\x2b\xa9"}, "Linux RAID member (md 1.2)"},
		{"md 1.0 near the end", map[int64]string{md10: "\xfc\x4e\x2b\xa9"}, "Linux RAID member (md 1.0)"},
		{"md 0.90 at the end", map[int64]string{size - 65536: "\xfc\x4e\x2b\xa9"}, "Linux RAID member (md 0.90)"},
		{"luks", map[int64]string{0: "LUKS\xba\xbe"}, "LUKS encrypted volume"},
		{"gpt", map[int64]string{512: "EFI PART"}, "GPT partition table"},
		{"dos partition table", map[int64]string{0: string(mbr)}, "DOS partition table"},
		{"boot signature without partitions", map[int64]string{510: "\x55\xaa"}, ""},
		{"fat is not also a partition table", map[int64]string{0: string(fat)}, "FAT filesystem"},
		{"swap", map[int64]string{4086: "SWAPSPACE2"}, "swap space"},
		{"qcow2", map[int64]string{0: "QFI\xfb"}, "qcow2 image"},
	} {
		sigs, err := Signatures(image(size, c.at), size)
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, s := range sigs {
			names = append(names, s.Name)
		}
		if got := strings.Join(names, ", "); got != c.want {
			t.Errorf("%s: found %q, want %q", c.name, got, c.want)
		}
	}
	// A device too small for most offsets is probed without error.
	if sigs, err := Signatures(image(100, nil), 100); err != nil || len(sigs) != 0 {
		t.Errorf("100-byte device: %v, %v", sigs, err)
	}
}

// TestSignaturesOfRealFilesystems runs the real mkfs tools, where
// installed.
func TestSignaturesOfRealFilesystems(t *testing.T) {
	for _, c := range []struct{ tool, want string }{
		{"mkfs.ext4", "ext2/3/4 filesystem"},
		{"mkfs.xfs", "XFS filesystem"},
		{"mkswap", "swap space"},
	} {
		mkfs, err := exec.LookPath(c.tool)
		if err != nil {
			t.Logf("%s not installed", c.tool)
			continue
		}
		p := filepath.Join(t.TempDir(), "fs.img")
		if err := os.WriteFile(p, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(p, 320<<20); err != nil {
			t.Fatal(err)
		}
		if out, err := exec.Command(mkfs, p).CombinedOutput(); err != nil {
			t.Logf("%s: %v: %s", c.tool, err, out)
			continue
		}
		f, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		sigs, err := Signatures(f, 320<<20)
		f.Close()
		if err != nil || len(sigs) == 0 || sigs[0].Name != c.want {
			t.Errorf("%s: found %v (%v), want %s", c.tool, sigs, err, c.want)
		}
	}
}

func TestNonZero(t *testing.T) {
	const size = 4 << 20
	for _, c := range []struct {
		name  string
		at    map[int64]string
		off   int64
		found bool
	}{
		{"zeroes", nil, 0, false},
		{"first MiB", map[int64]string{100: "x"}, 100, true},
		{"last byte", map[int64]string{size - 1: "x"}, size - 1, true},
		{"middle only: not looked at", map[int64]string{2 << 20: "x"}, 0, false},
	} {
		off, found, err := NonZero(image(size, c.at), size)
		if err != nil || off != c.off || found != c.found {
			t.Errorf("%s: %d, %v, %v; want %d, %v", c.name, off, found, err, c.off, c.found)
		}
	}
	if off, found, _ := NonZero(image(1000, map[int64]string{999: "x"}), 1000); !found || off != 999 {
		t.Errorf("small device: %d, %v", off, found)
	}
}

func TestOverlapFiles(t *testing.T) {
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a.img"), filepath.Join(dir, "b.img")
	for _, p := range []string{a, b} {
		if err := os.WriteFile(p, make([]byte, 4096), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	sym, hard := filepath.Join(dir, "sym"), filepath.Join(dir, "hard")
	if err := os.Symlink(a, sym); err != nil {
		t.Fatal(err)
	}
	if err := os.Link(a, hard); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		x, y string
		want string // a word of the answer, "" for distinct
	}{
		{a, a, "same file"},
		{a, sym, "same file"},
		{hard, a, "same file"},
		{a, b, ""},
	} {
		got, err := Overlap(c.x, c.y)
		if err != nil {
			t.Fatal(err)
		}
		if (c.want == "") != (got == "") || !strings.Contains(got, c.want) {
			t.Errorf("Overlap(%s, %s) = %q, want %q", c.x, c.y, got, c.want)
		}
	}
	if _, err := Overlap(a, filepath.Join(dir, "missing")); err == nil {
		t.Error("Overlap with a missing path: no error")
	}

	// A file lies on the block device of its filesystem, where there is one.
	var st unix.Stat_t
	if err := unix.Stat(a, &st); err != nil {
		t.Fatal(err)
	}
	dev := devName(st.Dev)
	var dst unix.Stat_t
	if unix.Stat(dev, &dst) != nil || dst.Rdev != st.Dev {
		t.Logf("the temporary folder is on no block device with a /dev node (%s): that case is not covered", dev)
		return
	}
	got, err := Overlap(dev, a)
	if err != nil || !strings.Contains(got, "is a file on a filesystem on "+dev) {
		t.Errorf("Overlap(%s, %s) = %q, %v", dev, a, got, err)
	}
}

// TestOverlapLoop: a loop device lies on its backing file (root only).
func TestOverlapLoop(t *testing.T) {
	losetup, err := exec.LookPath("losetup")
	if err != nil || os.Geteuid() != 0 {
		t.Skip("needs root and losetup")
	}
	dir := t.TempDir()
	img, other := filepath.Join(dir, "loop.img"), filepath.Join(dir, "other.img")
	for _, p := range []string{img, other} {
		if err := os.WriteFile(p, make([]byte, 4<<20), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	out, err := exec.Command(losetup, "--find", "--show", img).CombinedOutput()
	if err != nil {
		t.Skipf("losetup: %v: %s", err, out)
	}
	loop := strings.TrimSpace(string(out))
	defer exec.Command(losetup, "--detach", loop).Run()
	for _, c := range [][2]string{{loop, img}, {img, loop}} {
		got, err := Overlap(c[0], c[1])
		if err != nil || !strings.Contains(got, loop+" is a loop device over "+img) {
			t.Errorf("Overlap(%s, %s) = %q, %v", c[0], c[1], got, err)
		}
	}
	if got, err := Overlap(loop, other); err != nil || got != "" {
		t.Errorf("Overlap(%s, %s) = %q, %v; want distinct", loop, other, got, err)
	}
}
