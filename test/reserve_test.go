package test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// smallFS mounts a tmpfs of size bytes for the test (root only) and
// returns its folder.
func smallFS(t *testing.T, size string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount a small tmpfs")
	}
	mnt := filepath.Join(t.TempDir(), "fs")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", mnt, "tmpfs", 0, "size="+size); err != nil {
		t.Skipf("mount a tmpfs: %v", err)
	}
	t.Cleanup(func() { unix.Unmount(mnt, unix.MNT_DETACH) })
	return mnt
}

// fillFS writes zeroes into a new file in dir until its file system is
// full.
func fillFS(t *testing.T, dir string) {
	t.Helper()
	f, err := os.CreateTemp(dir, "filler")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	zero := make([]byte, 1<<20)
	for {
		if _, err := f.Write(zero); err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatal(err)
			}
			return
		}
	}
}

// TestCacheFileReserved: a sparse cache file takes blocks as the cache
// writes it, and on a file system that filled up meanwhile a write-back
// cache found no room for its journal and refused every write from then
// on (fio: "No space left on device" after 24 MiB of 100). So the cache
// file's blocks are reserved when it is formatted, and again whenever it
// is opened:
//   - format, and serve --format, refuse a cache file its file system has
//     no room for, before writing anything, and say how much is missing;
//   - a cache formatted on a file system that then fills up takes four
//     times its size of client writes with no error, and the bytes read
//     back are the bytes written;
//   - a formatted cache that cannot be reserved (a sparse copy onto a full
//     file system) is still served, with a warning: it may hold dirty data.
func TestCacheFileReserved(t *testing.T) {
	nbdcopy := tool(t, "nbdcopy")
	fs := smallFS(t, "24m")
	backing := sparseFile(t, "backing.img", 128*mib)

	// Refused: a 64 MiB cache on a 24 MiB file system.
	big := sparseAt(t, filepath.Join(fs, "big.img"), 64*mib)
	want := []string{"the file system of the cache " + big + " has no room for it", "about 64.0 MiB"}
	refused(t, []string{big, backing}, exitCorrupt, want, "format", "--cache", big, "--backing", backing)
	// serve must exit at once; a serve that went on serving would hang
	// refused's wait, so it gets a minute.
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, binary, "serve", "--cache", big, "--backing", backing, "--format",
		"--listen", "unix:"+filepath.Join(t.TempDir(), "s")).CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != exitCorrupt || !strings.Contains(string(out), want[0]) {
		t.Errorf("serve --format on a cache its file system has no room for: %v, want exit %d saying %q:\n%s", err, exitCorrupt, want[0], out)
	}
	if err := os.Remove(big); err != nil {
		t.Fatal(err)
	}

	// Reserved: a 16 MiB cache, then the file system filled to the brim.
	cache := sparseAt(t, filepath.Join(fs, "cache.img"), 16*mib)
	s := startServe(t, "--cache", cache, "--backing", backing, "--format")
	fillFS(t, fs)
	src, data := randomFile(t, "data", 64*mib, 22)
	run(t, nbdcopy, "--flush", src, s.uri)
	got := filepath.Join(t.TempDir(), "got")
	run(t, nbdcopy, s.uri, got)
	back, err := os.ReadFile(got)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(back[:len(data)], data) {
		t.Fatal("the export does not read back the 64 MiB written through a reserved cache on a full file system")
	}
	s.stop()
	if strings.Contains(s.stderr.String(), "refusing writes") {
		t.Errorf("the cache refused writes:\n%s", s.stderr)
	}

	// Served with a warning: a cache formatted elsewhere, holding 1 MiB,
	// copied sparse onto the full file system (its blocks of zeroes
	// become holes).
	if err := os.Remove(cache); err != nil {
		t.Fatal(err)
	}
	backing2, elsewhere := cacheFiles(t, 32*mib, 64*mib)
	s = startServe(t, "--cache", elsewhere, "--backing", backing2, "--format")
	small, data2 := randomFile(t, "data2", 1*mib, 23)
	run(t, nbdcopy, "--flush", small, s.uri)
	s.stop()
	sparse := filepath.Join(fs, "sparse.img")
	if out, err := exec.Command("cp", "--sparse=always", elsewhere, sparse).CombinedOutput(); err != nil {
		t.Fatalf("cp: %v: %s", err, out)
	}
	fillFS(t, fs)
	s = startServe(t, "--cache", sparse, "--backing", backing2)
	run(t, nbdcopy, s.uri, got)
	if back, err = os.ReadFile(got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(back[:len(data2)], data2) {
		t.Error("the export over the sparse copy does not read back what was written")
	}
	s.stop()
	if !strings.Contains(s.stderr.String(), "blocks could not be reserved") {
		t.Errorf("no warning that the cache file's blocks are not reserved:\n%s", s.stderr)
	}
}

// sparseAt creates a sparse file of size bytes at path.
func sparseAt(t *testing.T, path string, size int64) string {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	return path
}
