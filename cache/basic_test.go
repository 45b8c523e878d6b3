package cache

import (
	"bytes"
	"context"
	"errors"
	"testing"

	"github.com/nbdcache/nbdcache/storage"
)

func TestBasicWriteReadReopen(t *testing.T) {
	d := formatMem(t, 4<<20, 8<<20, FormatOptions{BucketSize: 64 << 10, JournalSize: 64 << 10})
	c := openStillT(t, d, Options{})
	p := payload(4096, 8192, 7)
	if err := c.WriteAt(p, 4096, 0); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 8192)
	if err := c.ReadAt(got, 4096); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, p) {
		t.Fatal("read back differs")
	}
	// Unaligned write.
	if err := c.WriteAt([]byte("hello"), 4100, 0); err != nil {
		t.Fatal(err)
	}
	copy(p[4:], "hello")
	if err := c.ReadAt(got, 4096); err != nil || !bytes.Equal(got, p) {
		t.Fatal("rmw read back differs", err)
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	if st := c.Stats(); st.DirtyBytes != 8192 {
		t.Fatalf("dirty %d", st.DirtyBytes)
	}
	closeChecked(t, c, d)
	if err := Format(d.cache, d.back, FormatOptions{BackingID: testBackingID}); !errors.Is(err, ErrDirty) {
		t.Fatalf("format over dirty: %v", err)
	}
	if _, err := Open(d.cache, d.back, Options{}); !errors.Is(err, ErrWrongBacking) {
		t.Fatalf("wrong backing: %v", err)
	}
	c = openStillT(t, d, Options{})
	if err := c.ReadAt(got, 4096); err != nil || !bytes.Equal(got, p) {
		t.Fatal("after reopen differs", err)
	}
	if err := c.Drain(context.Background(), nil); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 8192)
	if err := d.back.ReadAt(b, 4096); err != nil || !bytes.Equal(b, p) {
		t.Fatal("backing after drain differs", err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := Format(d.cache, d.back, FormatOptions{BackingID: testBackingID, BucketSize: 64 << 10}); err != nil {
		t.Fatalf("format over clean: %v", err)
	}
	var _ storage.Device = c
}

// TestTrimDropsDirty: a trim deletes the extents over it, dirty ones too
// (bcache's discard), and reaches the backing, and the deletion outlives a
// reopen.
func TestTrimDropsDirty(t *testing.T) {
	const K = 1 << 10
	d := formatMem(t, 4<<20, 1<<20, FormatOptions{BucketSize: 64 << 10, JournalSize: 64 << 10})
	if err := d.back.WriteAt(payload(0, 256*K, 1), 0, 0); err != nil {
		t.Fatal(err)
	}
	c := openStillT(t, d, Options{})
	// [192K, 256K) cached and clean, [64K, 192K) dirty.
	if err := c.WriteAt(payload(192*K, 64*K, 3), 192*K, 0); err != nil {
		t.Fatal(err)
	}
	if _, _, err := writebackStep(c, 0, 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := c.WriteAt(payload(64*K, 128*K, 2), 64*K, storage.FUA); err != nil {
		t.Fatal(err)
	}
	if got := c.DirtyBytes(); got != 128*K {
		t.Fatalf("dirty before trim: %d", got)
	}
	if err := c.Trim(64*K, 192*K, 0); err != nil {
		t.Fatal(err)
	}
	zeroes := make([]byte, 192*K)
	check := func(when string) {
		t.Helper()
		if got := c.DirtyBytes(); got != 0 {
			t.Fatalf("%s: %d dirty bytes left in a trimmed range", when, got)
		}
		if st := c.Stats(); st.Extents != 0 {
			t.Fatalf("%s: %d extents left in a trimmed range", when, st.Extents)
		}
		got := make([]byte, 192*K)
		if err := d.back.ReadAt(got, 64*K); err != nil || !bytes.Equal(got, zeroes) {
			t.Fatalf("%s: the trim did not reach the backing (%v)", when, err)
		}
		if err := c.ReadAt(got, 64*K); err != nil || !bytes.Equal(got, zeroes) {
			t.Fatalf("%s: a trimmed range reads old data (%v)", when, err)
		}
		if err := c.ReadAt(got[:64*K], 0); err != nil || !bytes.Equal(got[:64*K], payload(0, 64*K, 1)) {
			t.Fatalf("%s: data before the trimmed range changed (%v)", when, err)
		}
	}
	check("after trim")
	closeChecked(t, c, d)
	c = openStillT(t, d, Options{})
	defer c.Close()
	check("after reopen")
}

// TestZeroDropsDirty: a zero over a bucket or more of dirty data zeroes
// the backing and drops the extents, instead of filling the cache with
// zeroes; a shorter one writes zeroes into the cache. Both read as zeroes,
// before and after a reopen.
func TestZeroDropsDirty(t *testing.T) {
	const K = 1 << 10
	d := formatMem(t, 4<<20, 1<<20, FormatOptions{BucketSize: 64 << 10, JournalSize: 64 << 10})
	if err := d.back.WriteAt(payload(0, 512*K, 1), 0, 0); err != nil {
		t.Fatal(err)
	}
	c := openStillT(t, d, Options{})
	if err := c.WriteAt(payload(0, 512*K, 2), 0, 0); err != nil {
		t.Fatal(err)
	}
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	// 256 KiB (4 buckets) at 64K: on the backing; 8 KiB at 384K: in the cache.
	if err := c.Zero(64*K, 256*K, 0); err != nil {
		t.Fatal(err)
	}
	if err := c.Zero(384*K, 8*K, storage.FUA); err != nil {
		t.Fatal(err)
	}
	want := payload(0, 512*K, 2)
	clear(want[64*K : 320*K])
	clear(want[384*K : 392*K])
	check := func(when string) {
		t.Helper()
		if got := c.DirtyBytes(); got != 512*K-256*K {
			t.Fatalf("%s: %d dirty bytes, want %d (the long zero dropped, the short one cached)", when, got, 512*K-256*K)
		}
		got := make([]byte, 512*K)
		if err := c.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
			t.Fatalf("%s: reads differ (%v)", when, err)
		}
		if err := d.back.ReadAt(got[:256*K], 64*K); err != nil || !bytes.Equal(got[:256*K], make([]byte, 256*K)) {
			t.Fatalf("%s: the long zero is not on the backing (%v)", when, err)
		}
	}
	check("after the zeroes")
	closeChecked(t, c, d)
	c = openStillT(t, d, Options{})
	defer c.Close()
	check("after reopen")
}
