package cache

import (
	"strings"
	"testing"
)

// TestPathHint: the backing path hint round-trips beside the checksummed
// header, reads as none on an older image (zeroes) or when its own crc
// fails, never makes a copy invalid, and keeps the end of a long path.
func TestPathHint(t *testing.T) {
	sb := sampleSuper()
	sb.BackingPath = "/srv/disks/backing.img"
	b := sb.encode()
	got, err := decodeSuperblock(b, -1)
	if err != nil || got.BackingPath != sb.BackingPath {
		t.Fatalf("round trip: %q, %v", got.BackingPath, err)
	}
	old := sampleSuper().encode() // no hint: zeroes, as images before it
	if got, err := decodeSuperblock(old, -1); err != nil || got.BackingPath != "" {
		t.Fatalf("image without a hint: %q, %v", got.BackingPath, err)
	}
	b[pathHintOff+5] ^= 0xff
	if got, err := decodeSuperblock(b, -1); err != nil || got.BackingPath != "" {
		t.Fatalf("a hint that fails its crc: %q, %v; want no path and a valid copy", got.BackingPath, err)
	}
	sb.BackingPath = "/" + strings.Repeat("d/", 2000) + "backing.img"
	got, err = decodeSuperblock(sb.encode(), -1)
	if err != nil || len(got.BackingPath) != maxPathHint || !strings.HasPrefix(got.BackingPath, "...") || !strings.HasSuffix(got.BackingPath, "/d/backing.img") {
		t.Fatalf("long path: %d bytes %q..., %v", len(got.BackingPath), got.BackingPath[:min(20, len(got.BackingPath))], err)
	}
}

// TestPathHintRecorded: Format records the backing path it is given, Open
// records a new one, and an Open without one keeps the old.
func TestPathHintRecorded(t *testing.T) {
	d := formatMem(t, 8<<20, 16<<20, FormatOptions{BucketSize: 256 << 10, BackingPath: "/a/backing.img"})
	path := func() string {
		t.Helper()
		sb, err := readSuper(d.cache)
		if err != nil {
			t.Fatal(err)
		}
		return sb.BackingPath
	}
	if p := path(); p != "/a/backing.img" {
		t.Fatalf("after Format: %q", p)
	}
	c := openStillT(t, d, Options{BackingPath: "/b/moved.img"})
	if p := path(); p != "/b/moved.img" {
		t.Fatalf("after Open with a new path: %q", p)
	}
	closeChecked(t, c, d)
	if p := path(); p != "/b/moved.img" {
		t.Fatalf("after Close: %q", p)
	}
	c = openStillT(t, d, Options{})
	closeChecked(t, c, d)
	if p := path(); p != "/b/moved.img" {
		t.Fatalf("after Open without a path: %q", p)
	}
}
