package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"

	"github.com/nbdcache/nbdcache/cache"
	"github.com/nbdcache/nbdcache/storage"
)

// openTestStorage opens storage the way serve does, with args as its
// storage flags (and --faults), on files in a temporary folder: a 64 MiB
// backing and a 16 MiB cache.
func openTestStorage(t *testing.T) (open func(args ...string) *openedStorage, back, cachePath string) {
	dir := t.TempDir()
	back, cachePath = filepath.Join(dir, "backing.img"), filepath.Join(dir, "cache.img")
	if err := createSparse(back, 64<<20); err != nil {
		t.Fatal(err)
	}
	if err := createSparse(cachePath, 16<<20); err != nil {
		t.Fatal(err)
	}
	return func(args ...string) *openedStorage {
		t.Helper()
		var f storageFlags
		fs := flag.NewFlagSet("serve", flag.ContinueOnError)
		f.register(fs)
		fs.BoolVar(&f.faults, "faults", false, "")
		if err := fs.Parse(args); err != nil {
			t.Fatal(err)
		}
		o, err := f.open(io.Discard, slog.New(slog.DiscardHandler))
		if err != nil {
			t.Fatalf("%v: %v", args, err)
		}
		return o
	}, back, cachePath
}

// TestFaultsOffNoWrappers: without --faults nothing of fault mode sits in
// the I/O path, which is why it costs nothing when off: the export is
// the backing file itself, or the cache itself. With --faults it is
// wrapped.
func TestFaultsOffNoWrappers(t *testing.T) {
	open, back, cachePath := openTestStorage(t)
	o := open("--backing", back)
	if _, ok := o.dev.(*storage.File); !ok || o.rig != nil {
		t.Errorf("backing only, no --faults: the export is a %T", o.dev)
	}
	o.Close()
	o = open("--backing", back, "--cache", cachePath, "--format")
	if _, ok := o.dev.(*cache.Cache); !ok || o.rig != nil {
		t.Errorf("with a cache, no --faults: the export is a %T", o.dev)
	}
	o.Close()
	o = open("--backing", back, "--cache", cachePath, "--faults")
	if _, ok := o.dev.(*cache.Cache); ok || o.rig == nil {
		t.Errorf("with --faults: the export is a bare %T", o.dev)
	}
	o.Close()
}

// TestDrainOnDetach: the detach drain writes back the live cache (in fault
// mode, the one of the last power-on), and a cancelled drain (a second
// SIGINT) stops with an error and leaves the dirty data in the cache.
func TestDrainOnDetach(t *testing.T) {
	open, back, cachePath := openTestStorage(t)
	st := open("--backing", back, "--cache", cachePath, "--format", "--faults")
	defer st.Close()
	log := slog.New(slog.DiscardHandler)
	data := bytes.Repeat([]byte{0x5A}, 64<<10)
	if err := st.dev.WriteAt(data, 0, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := st.rig.PowerCut(storage.KeepUnsynced, 6, false); err != nil { // the first cache is gone now
		t.Fatal(err)
	}
	if st.liveCache() == st.cache {
		t.Fatal("the power cut did not replace the cache")
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := drainOnDetach(ctx, st, log); !errors.Is(err, context.Canceled) {
		t.Fatalf("a cancelled drain: %v, want context.Canceled", err)
	}
	if st.liveCache().DirtyBytes() == 0 {
		t.Fatal("a cancelled drain left nothing dirty")
	}
	if err := drainOnDetach(context.Background(), st, log); err != nil {
		t.Fatal(err)
	}
	if d := st.liveCache().DirtyBytes(); d != 0 {
		t.Fatalf("%d bytes still dirty after the drain", d)
	}
	got := make([]byte, len(data))
	f, err := os.Open(back)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.ReadAt(got, 0); err != nil || !bytes.Equal(got, data) {
		t.Fatal("the backing file does not hold the drained data", err)
	}
}

func TestParseSyncMode(t *testing.T) {
	if err := parseSyncMode("sometimes"); err == nil {
		t.Error("--sync sometimes accepted")
	}
	for _, s := range []string{"normal", "always"} {
		if err := parseSyncMode(s); err != nil {
			t.Errorf("--sync %s: %v", s, err)
		}
	}
}
