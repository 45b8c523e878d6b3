package test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// smallFS mounts a small file system of kind "tmpfs" or "xfs" (a loop
// mount of an image in the test's folder) for the test (root only), and
// returns its folder.
func smallFS(t *testing.T, kind string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount a small file system")
	}
	mnt := filepath.Join(t.TempDir(), "fs")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	var err error
	switch kind {
	case "tmpfs":
		err = unix.Mount("tmpfs", mnt, "tmpfs", 0, "size=24m")
	case "xfs":
		img := sparseFile(t, "xfs.img", 300*mib) // mkfs.xfs's smallest
		run(t, tool(t, "mkfs.xfs"), "-q", img)
		var out []byte
		out, err = exec.Command(tool(t, "mount"), "-o", "loop", img, mnt).CombinedOutput()
		if err != nil {
			err = fmt.Errorf("%w: %s", err, out)
		}
	}
	if err != nil {
		t.Skipf("mount a %s: %v", kind, err)
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

// allocated is how many bytes of blocks the file at path has.
func allocated(t *testing.T, path string) int64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

// TestCacheFileReserved: a sparse cache file takes blocks as the cache
// writes it, and on a file system that filled up meanwhile a write-back
// cache found no room for its journal and refused every write from then
// on (fio: "No space left on device" after 24 MiB of 100). So the cache
// file's blocks are reserved when it is formatted, and again whenever it
// is opened. On a tmpfs and on XFS (which sets aside the whole length of
// a fallocate before it looks at what is allocated: asking again for a
// whole file that has its blocks failed once XFS was full):
//   - format, and serve --format, refuse a cache file its file system has
//     no room for, before writing anything, and say how much is missing;
//   - a cache formatted on a file system that then fills up takes four
//     times its size of client writes with no error, and the bytes read
//     back are the bytes written; opened again on the full file system, it
//     is served with no warning;
//   - a formatted cache copied sparse (its blocks of zeroes become holes)
//     gets its blocks when opened where there is room; on a full file
//     system it is still served, with a warning: it may hold dirty data
//     (its first journal write there fails, and the cache then refuses
//     writes).
func TestCacheFileReserved(t *testing.T) {
	for _, c := range []struct {
		kind              string
		big, cache, write int64
	}{
		{"tmpfs", 64 * mib, 16 * mib, 64 * mib},
		{"xfs", 512 * mib, 32 * mib, 128 * mib},
	} {
		t.Run(c.kind, func(t *testing.T) {
			testCacheFileReserved(t, c.kind, c.big, c.cache, c.write)
		})
	}
}

func testCacheFileReserved(t *testing.T, kind string, bigSize, cacheSize, writeSize int64) {
	nbdcopy := tool(t, "nbdcopy")
	fs := smallFS(t, kind)
	backing := sparseFile(t, "backing.img", 2*writeSize)

	// Refused: a cache larger than the file system.
	big := sparseAt(t, filepath.Join(fs, "big.img"), bigSize)
	want := []string{"the file system of the cache " + big + " has no room for it"}
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

	// Reserved, then the file system filled to the brim.
	cache := sparseAt(t, filepath.Join(fs, "cache.img"), cacheSize)
	s := startServe(t, "--cache", cache, "--backing", backing, "--format")
	fillFS(t, fs)
	src, data := randomFile(t, "data", int(writeSize), 22)
	run(t, nbdcopy, "--flush", src, s.uri)
	got := filepath.Join(t.TempDir(), "got")
	readBack := func(what string, want []byte) {
		t.Helper()
		run(t, nbdcopy, s.uri, got)
		back, err := os.ReadFile(got)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(back[:len(want)], want) {
			t.Errorf("the export does not read back %s", what)
		}
	}
	readBack("what was written through a reserved cache on a full file system", data)
	s.stop()
	if strings.Contains(s.stderr.String(), "refusing writes") {
		t.Errorf("the cache refused writes:\n%s", s.stderr)
	}
	s = startServe(t, "--cache", cache, "--backing", backing)
	readBack("its data once opened again on the full file system", data)
	s.stop()
	if strings.Contains(s.stderr.String(), "could not be reserved") {
		t.Errorf("a cache that has all its blocks, opened on a full file system, warns:\n%s", s.stderr)
	}
	if err := os.Remove(cache); err != nil {
		t.Fatal(err)
	}

	// A cache formatted elsewhere, holding 1 MiB, copied sparse.
	backing2, elsewhere := cacheFiles(t, 32*mib, cacheSize)
	s = startServe(t, "--cache", elsewhere, "--backing", backing2, "--format")
	small, data2 := randomFile(t, "data2", 1*mib, 23)
	run(t, nbdcopy, "--flush", small, s.uri)
	s.stop()
	sparse := filepath.Join(fs, "sparse.img")
	copySparse := func() {
		t.Helper()
		os.Remove(sparse)
		if out, err := exec.Command("cp", "--sparse=always", "--reflink=never", elsewhere, sparse).CombinedOutput(); err != nil {
			t.Fatalf("cp: %v: %s", err, out)
		}
		if n := allocated(t, sparse); n >= cacheSize {
			t.Fatalf("the sparse copy has %d bytes of blocks of %d", n, cacheSize)
		}
	}
	// Where there is room: opened, it gets its blocks.
	fillers, _ := filepath.Glob(filepath.Join(fs, "filler*"))
	for _, f := range fillers {
		if err := os.Remove(f); err != nil {
			t.Fatal(err)
		}
	}
	copySparse()
	s = startServe(t, "--cache", sparse, "--backing", backing2)
	readBack("what the sparse copy holds", data2)
	s.stop()
	if n := allocated(t, sparse); n < cacheSize {
		t.Errorf("a sparse cache opened where there is room has %d bytes of blocks of %d", n, cacheSize)
	}
	// On a full file system: served, with a warning.
	copySparse()
	fillFS(t, fs)
	s = startServe(t, "--cache", sparse, "--backing", backing2)
	readBack("what the sparse copy holds, on a full file system", data2)
	s.kill() // its next journal write fails (ENOSPC), and so would its exit
	if !strings.Contains(s.stderr.String(), "blocks could not be reserved") {
		t.Errorf("no warning that the cache file's blocks are not reserved:\n%s", s.stderr)
	}
}
