package cache

import (
	"bytes"
	"errors"
	"testing"

	"github.com/nbdcache/nbdcache/storage"
)

func TestIdentify(t *testing.T) {
	if _, err := Identify(storage.NewMem(8 << 20)); !errors.Is(err, ErrNotFormatted) {
		t.Fatalf("zeroes: %v, want ErrNotFormatted", err)
	}
	d := formatMem(t, 8<<20, 16<<20, FormatOptions{BucketSize: 256 << 10, BackingPath: "/a/b.img"})
	id, err := Identify(d.cache)
	if err != nil || id.BackingID != testBackingID || id.BackingPath != "/a/b.img" || id.BackingSize != 16<<20 ||
		id.CacheSize != 8<<20 || !id.Clean || id.CacheID == ([16]byte{}) {
		t.Fatalf("after Format: %+v, %v", id, err)
	}
	c := openStillT(t, d, Options{})
	if id, err := Identify(d.cache); err != nil || id.Clean {
		t.Fatalf("in use: %+v, %v; want not clean", id, err)
	}
	closeChecked(t, c, d)
	// Both copies with the magic and a bad checksum: corrupt, not "not
	// formatted".
	for _, off := range []int64{100, metaBlock + 100} {
		if err := d.cache.WriteAt([]byte{0xff}, off, 0); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := Identify(d.cache); !errors.Is(err, ErrCorrupt) {
		t.Fatalf("both copies damaged: %v, want ErrCorrupt", err)
	}
}

// TestRebind: a rebound cache opens with the new backing id only, its
// dirty data intact; a backing of another size is refused untouched.
func TestRebind(t *testing.T) {
	d := formatMem(t, 8<<20, 16<<20, FormatOptions{BucketSize: 256 << 10, BackingPath: "/a/b.img"})
	c := openStillT(t, d, Options{})
	p := payload(1<<20, 64<<10, 7)
	if err := c.WriteAt(p, 1<<20, storage.FUA); err != nil {
		t.Fatal(err)
	}
	closeChecked(t, c, d)
	newID := [16]byte{0xaa, 0xbb}
	if err := Rebind(d.cache, storage.NewMem(32<<20), newID, "/c/other.img"); !errors.Is(err, ErrWrongBacking) {
		t.Fatalf("rebind to a backing of another size: %v, want ErrWrongBacking", err)
	}
	if id, _ := Identify(d.cache); id.BackingID != testBackingID || id.BackingPath != "/a/b.img" {
		t.Fatalf("a refused rebind changed the superblock: %+v", id)
	}
	if err := Rebind(d.cache, d.back, newID, "/c/copy.img"); err != nil {
		t.Fatal(err)
	}
	if id, _ := Identify(d.cache); id.BackingID != newID || id.BackingPath != "/c/copy.img" {
		t.Fatalf("after Rebind: %+v", id)
	}
	if _, err := openStill(d.cache, d.back, Options{BackingID: testBackingID}); !errors.Is(err, ErrWrongBacking) {
		t.Fatalf("the old id after Rebind: %v, want ErrWrongBacking", err)
	}
	c, err := openStill(d.cache, d.back, Options{BackingID: newID})
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(p))
	if err := c.ReadAt(got, 1<<20); err != nil || !bytes.Equal(got, p) {
		t.Fatalf("dirty data after Rebind: %v", err)
	}
	if st := c.Stats(); st.DirtyBytes != int64(len(p)) {
		t.Fatalf("%d dirty bytes after Rebind, want %d", st.DirtyBytes, len(p))
	}
	closeChecked(t, c, d)
}

// TestMinCacheSize: Format takes a device of MinCacheSize and refuses
// one 4 KiB smaller with ErrTooSmall, for several geometries.
func TestMinCacheSize(t *testing.T) {
	for _, g := range []struct {
		block  int
		bucket int64
	}{{0, 0}, {4096, 64 << 10}, {512, 4096}, {65536, 8 << 20}} {
		m := MinCacheSize(g.block, g.bucket)
		if m <= 0 {
			t.Fatalf("block %d, bucket %d: MinCacheSize %d", g.block, g.bucket, m)
		}
		fo := FormatOptions{BlockSize: g.block, BucketSize: g.bucket}
		if err := Format(storage.NewMem(m), storage.NewMem(1<<20), fo); err != nil {
			t.Errorf("block %d, bucket %d: Format on MinCacheSize %d: %v", g.block, g.bucket, m, err)
		}
		if err := Format(storage.NewMem(m-metaBlock), storage.NewMem(1<<20), fo); !errors.Is(err, ErrTooSmall) {
			t.Errorf("block %d, bucket %d: Format on %d, 4 KiB under MinCacheSize: %v, want ErrTooSmall", g.block, g.bucket, m-metaBlock, err)
		}
		t.Logf("block %d, bucket %d: at least %d bytes", g.block, g.bucket, m)
	}
}

// TestCheckWrongSize: Check tells a backing of another size (the wrong
// backing) from corruption.
func TestCheckWrongSize(t *testing.T) {
	d := formatMem(t, 8<<20, 16<<20, FormatOptions{BucketSize: 256 << 10})
	rep, err := Check(d.cache, storage.NewMem(32<<20))
	if !errors.Is(err, ErrWrongBacking) || errors.Is(err, ErrCorrupt) || len(rep.WrongBacking) != 1 || len(rep.Problems) != 0 {
		t.Fatalf("a backing of another size: %v, %+v; want ErrWrongBacking only", err, rep)
	}
}
