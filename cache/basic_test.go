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
	c := openT(t, d, Options{NoBackground: true})
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
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := Check(d.cache, d.back); err != nil {
		t.Fatal(err)
	}
	if err := Format(d.cache, d.back, FormatOptions{BackingID: testBackingID}); !errors.Is(err, ErrDirty) {
		t.Fatalf("format over dirty: %v", err)
	}
	if _, err := Open(d.cache, d.back, Options{}); !errors.Is(err, ErrWrongBacking) {
		t.Fatalf("wrong backing: %v", err)
	}
	c = openT(t, d, Options{NoBackground: true})
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
