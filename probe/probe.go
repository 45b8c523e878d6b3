// Package probe looks at a device before nbdcache writes over it: what it
// holds (the signatures wipefs and blkid know: filesystems, LVM, RAID,
// LUKS, partition tables, swap), whether its first and last MiB hold
// anything but zeroes, and whether two paths reach the same sectors (the
// same file or device through another name, a partition of a disk, a
// loop or device-mapper device stacked on another, a file on a
// filesystem on a device).
//
// Probing reads and never writes. It is a safety net, not a proof: a
// device can hold data that no signature names and that lies between its
// first and last MiB.
package probe

// probe.go: Signatures and NonZero: what a device holds.

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io"
)

// Signature is recognizable content found on a device.
type Signature struct {
	Name   string // what it is: "ext2/3/4 filesystem", "LVM2 physical volume", ...
	Offset int64  // where its magic lies
}

func (s Signature) String() string { return fmt.Sprintf("%s (magic at offset %d)", s.Name, s.Offset) }

// magic is one entry of the signature table: the bytes at an offset from
// the start of the device, or from its end when fromEnd (the offset is then
// computed from the size).
type magic struct {
	name  string
	off   func(size int64) int64
	bytes string
}

func at(off int64) func(int64) int64 { return func(int64) int64 { return off } }

// The table follows util-linux's libblkid (superblocks/*.c, partitions/*.c).
var magics = []magic{
	{"ext2/3/4 filesystem", at(0x438), "\x53\xef"},
	{"XFS filesystem", at(0), "XFSB"},
	{"btrfs filesystem", at(0x10040), "_BHRfS_M"},
	{"F2FS filesystem", at(0x400), "\x10\x20\xf5\xf2"},
	{"squashfs filesystem", at(0), "hsqs"},
	{"ISO 9660 filesystem", at(0x8001), "CD001"},
	{"NTFS filesystem", at(3), "NTFS    "},
	{"exFAT filesystem", at(3), "EXFAT   "},
	{"FAT filesystem", at(54), "FAT12   "},
	{"FAT filesystem", at(54), "FAT16   "},
	{"FAT filesystem", at(82), "FAT32   "},
	{"swap space", at(4096 - 10), "SWAPSPACE2"},
	{"swap space", at(4096 - 10), "SWAP-SPACE"},
	{"swap space", at(65536 - 10), "SWAPSPACE2"},
	{"LUKS encrypted volume", at(0), "LUKS\xba\xbe"},
	{"LUKS2 encrypted volume", at(0x4000), "SKUL\xba\xbe"},
	{"LVM2 physical volume", at(0), "LABELONE"},
	{"LVM2 physical volume", at(512), "LABELONE"},
	{"LVM2 physical volume", at(1024), "LABELONE"},
	{"LVM2 physical volume", at(1536), "LABELONE"},
	{"Linux RAID member (md 1.1)", at(0), "\xfc\x4e\x2b\xa9"},
	{"Linux RAID member (md 1.2)", at(4096), "\xfc\x4e\x2b\xa9"},
	{"Linux RAID member (md 1.0)", func(size int64) int64 { return ((size/512 - 16) &^ 7) * 512 }, "\xfc\x4e\x2b\xa9"},
	{"Linux RAID member (md 0.90)", func(size int64) int64 { return (size &^ (65536 - 1)) - 65536 }, "\xfc\x4e\x2b\xa9"},
	{"bcache device", at(4096 + 24), "\xc6\x85\x73\xf6\x4e\x1a\x45\xca\x82\x65\xf5\x7f\x48\xba\x6d\x81"},
	{"GPT partition table", at(512), "EFI PART"},
	{"GPT partition table", at(4096), "EFI PART"},
	{"qcow2 image", at(0), "QFI\xfb"},
	{"VDI image", at(64), "\x7f\x10\xda\xbe"},
	{"VMDK image", at(0), "KDMV"},
}

// Signatures returns the signatures found on a device of size bytes, in
// the table's order. An MBR boot signature (0x55AA at 510) counts as a
// DOS partition table when one of its four entries is in use, as libblkid
// decides, and is not reported again under a FAT or NTFS filesystem.
func Signatures(r io.ReaderAt, size int64) ([]Signature, error) {
	var found []Signature
	fat := false
	for _, m := range magics {
		off := m.off(size)
		if off < 0 || off+int64(len(m.bytes)) > size {
			continue
		}
		b := make([]byte, len(m.bytes))
		if _, err := r.ReadAt(b, off); err != nil && err != io.EOF {
			return nil, fmt.Errorf("probe: read at %d: %w", off, err)
		}
		if string(b) == m.bytes {
			found = append(found, Signature{Name: m.name, Offset: off})
			fat = fat || m.name == "FAT filesystem" || m.name == "NTFS filesystem" || m.name == "exFAT filesystem"
		}
	}
	if size >= 512 && !fat {
		b := make([]byte, 512)
		if _, err := r.ReadAt(b, 0); err != nil && err != io.EOF {
			return nil, fmt.Errorf("probe: read at 0: %w", err)
		}
		if b[510] == 0x55 && b[511] == 0xaa && mbrInUse(b) {
			found = append(found, Signature{Name: "DOS partition table", Offset: 510})
		}
	}
	return found, nil
}

// mbrInUse reports whether an MBR has a partition entry in use: a type,
// a start and a length, with a boot flag of 0 or 0x80.
func mbrInUse(b []byte) bool {
	for i := range 4 {
		e := b[446+16*i : 446+16*(i+1)]
		if e[0] != 0 && e[0] != 0x80 {
			return false
		}
		if e[4] != 0 && binary.LittleEndian.Uint32(e[8:]) != 0 && binary.LittleEndian.Uint32(e[12:]) != 0 {
			return true
		}
	}
	return false
}

// EdgeSize is how much of each end of a device NonZero reads.
const EdgeSize = 1 << 20

// NonZero returns the offset of the first byte that is not zero in the
// first or last EdgeSize bytes of a device of size bytes, and whether
// there is one.
func NonZero(r io.ReaderAt, size int64) (int64, bool, error) {
	b := make([]byte, min(size, EdgeSize))
	for _, start := range []int64{0, max(size-EdgeSize, 0)} {
		if _, err := r.ReadAt(b, start); err != nil && err != io.EOF {
			return 0, false, fmt.Errorf("probe: read at %d: %w", start, err)
		}
		if i := firstNonZero(b); i >= 0 {
			return start + int64(i), true, nil
		}
	}
	return 0, false, nil
}

func firstNonZero(b []byte) int {
	var zero [4096]byte
	for i := 0; i < len(b); i += len(zero) {
		c := b[i:min(i+len(zero), len(b))]
		if !bytes.Equal(c, zero[:len(c)]) {
			for j, x := range c {
				if x != 0 {
					return i + j
				}
			}
		}
	}
	return -1
}
