package storage

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nbdcache/nbdcache/test/testseed"
)

// openTemp opens a new file of size bytes in a test directory.
func openTemp(t testing.TB, size int64, direct bool) *File {
	t.Helper()
	f, err := OpenFile(filepath.Join(t.TempDir(), "dev.img"), FileOptions{Size: size, Direct: direct})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func TestFileOpen(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "a.img")
	if _, err := OpenFile(path, FileOptions{}); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("missing file without Size: %v, want ErrNotExist", err)
	}
	f, err := OpenFile(path, FileOptions{Size: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if err := f.WriteAt([]byte("abc"), 100, 0); err != nil {
		t.Fatal(err)
	}
	f.Close()
	cases := []struct {
		name    string
		opts    FileOptions
		size    int64
		wantErr error
	}{
		{"existing size", FileOptions{}, 1 << 20, nil},
		{"smaller Size keeps the file", FileOptions{Size: 4096}, 1 << 20, nil},
		{"extend", FileOptions{Size: 2 << 20}, 2 << 20, nil},
		{"read-only", FileOptions{ReadOnly: true}, 2 << 20, nil},
		{"read-only cannot extend", FileOptions{ReadOnly: true, Size: 4 << 20}, 0, ErrReadOnly},
		{"direct", FileOptions{Direct: true}, 2 << 20, nil},
	}
	for _, c := range cases {
		f, err := OpenFile(path, c.opts)
		if !errors.Is(err, c.wantErr) {
			t.Fatalf("%s: %v, want %v", c.name, err, c.wantErr)
		}
		if err != nil {
			continue
		}
		if f.Size() != c.size {
			t.Errorf("%s: size %d, want %d", c.name, f.Size(), c.size)
		}
		got := make([]byte, 3)
		if err := f.ReadAt(got, 100); err != nil || string(got) != "abc" {
			t.Errorf("%s: data %q, %v", c.name, got, err)
		}
		if f.Caps().ReadOnly != c.opts.ReadOnly {
			t.Errorf("%s: caps %+v", c.name, f.Caps())
		}
		f.Close()
	}
	if _, err := OpenFile(dir, FileOptions{ReadOnly: true}); !errors.Is(err, ErrNotSupported) {
		t.Errorf("directory: %v, want ErrNotSupported", err)
	}
	odd := filepath.Join(dir, "odd.img")
	if err := os.WriteFile(odd, make([]byte, 1000), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := OpenFile(odd, FileOptions{Direct: true}); !errors.Is(err, ErrNotSupported) {
		t.Errorf("O_DIRECT on a 1000-byte file: %v, want ErrNotSupported", err)
	}
	if f, err := OpenFile(odd, FileOptions{}); err != nil || f.Size() != 1000 {
		t.Errorf("buffered 1000-byte file: %v", err)
	} else {
		f.Close()
	}
}

func TestFileReadOnly(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ro.img")
	want := fill(1<<16, 5)
	if err := os.WriteFile(path, want, 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := OpenFile(path, FileOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for name, err := range map[string]error{
		"WriteAt":     f.WriteAt(make([]byte, 512), 0, 0),
		"WriteAt FUA": f.WriteAt(make([]byte, 512), 0, FUA),
		"Trim":        f.Trim(0, 4096, 0),
		"Zero":        f.Zero(0, 4096, 0),
		"Zero NoHole": f.Zero(0, 4096, NoHole),
	} {
		if !errors.Is(err, ErrReadOnly) {
			t.Errorf("%s: %v, want ErrReadOnly", name, err)
		}
	}
	if err := f.Flush(); err != nil {
		t.Errorf("Flush on a read-only file: %v", err)
	}
	if got := readAll(t, f); !bytes.Equal(got, want) {
		t.Fatalf("read-only file changed: %s", firstDiff(got, want))
	}
}

// allocated is the number of bytes the file system holds for path.
func allocated(t *testing.T, path string) int64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks * 512
}

func TestFileHoles(t *testing.T) {
	const mib = 1 << 20
	f := openTemp(t, 8*mib, false)
	if got := collectExtents(t, f, 0, f.Size()); got != "H8388608 " {
		t.Fatalf("new file: %s", got)
	}
	if err := f.WriteAt(fill(4*mib, 1), 2*mib, 0); err != nil {
		t.Fatal(err)
	}
	if got, want := collectExtents(t, f, 0, f.Size()), "H2097152 D4194304 H2097152 "; got != want {
		t.Fatalf("after write: %s, want %s", got, want)
	}
	before := allocated(t, f.Path())
	if err := f.Trim(3*mib, mib, FUA); err != nil {
		t.Fatal(err)
	}
	if got, want := collectExtents(t, f, 0, f.Size()), "H2097152 D1048576 H1048576 D2097152 H2097152 "; got != want {
		t.Errorf("after trim: %s, want %s", got, want)
	}
	if after := allocated(t, f.Path()); before-after != mib {
		t.Errorf("trim freed %d bytes, want %d", before-after, mib)
	}
	got := make([]byte, mib)
	if err := f.ReadAt(got, 3*mib); err != nil || !bytes.Equal(got, make([]byte, mib)) {
		t.Errorf("trimmed range does not read as zeroes (%v)", err)
	}
	// Zero punches a hole; Zero with NoHole keeps the blocks (ext4 and
	// xfs then hold them as unwritten extents, which SEEK_DATA may report
	// as a hole: so check the allocation, not the extents).
	before = allocated(t, f.Path())
	if err := f.Zero(2*mib, mib, 0); err != nil {
		t.Fatal(err)
	}
	if after := allocated(t, f.Path()); before-after != mib {
		t.Errorf("zero freed %d bytes, want %d", before-after, mib)
	}
	if got, want := collectExtents(t, f, 0, 5*mib), "H4194304 D1048576 "; got != want {
		t.Errorf("after zero: %s, want %s", got, want)
	}
	before = allocated(t, f.Path())
	if err := f.Zero(4*mib, mib, NoHole); err != nil {
		t.Fatal(err)
	}
	if after := allocated(t, f.Path()); after != before {
		t.Errorf("zero with NoHole changed the allocation from %d to %d bytes", before, after)
	}
	if err := f.ReadAt(got, 4*mib); err != nil || !bytes.Equal(got, make([]byte, mib)) {
		t.Errorf("NoHole-zeroed range does not read as zeroes (%v)", err)
	}
	if err := f.Zero(0, f.Size(), FastZero); err != nil {
		t.Errorf("FastZero on ext4/xfs/tmpfs: %v", err)
	}
}

// TestFileFUA writes with FUA through pwritev2(RWF_DSYNC) and through the
// pwrite + fdatasync fallback, and checks the kernel took RWF_DSYNC.
func TestFileFUA(t *testing.T) {
	for _, direct := range []bool{false, true} {
		for _, fallback := range []bool{false, true} {
			f := openTemp(t, 1<<20, direct)
			f.noDSync.Store(fallback)
			want := fill(1<<20, 9)
			for off := 0; off < len(want); off += 12288 {
				end := min(off+12288, len(want))
				if err := f.WriteAt(want[off:end], int64(off), FUA); err != nil {
					t.Fatalf("direct=%v fallback=%v: %v", direct, fallback, err)
				}
			}
			if got := readAll(t, f); !bytes.Equal(got, want) {
				t.Fatalf("direct=%v fallback=%v: %s", direct, fallback, firstDiff(got, want))
			}
			if !fallback && f.noDSync.Load() {
				t.Errorf("direct=%v: the kernel refused pwritev2(RWF_DSYNC)", direct)
			}
		}
	}
}

// TestFileDirectUnaligned drives unaligned reads and writes, from
// misaligned buffers, through O_DIRECT and compares with a model.
func TestFileDirectUnaligned(t *testing.T) {
	seed := testseed.Get(t)
	rng := newRand(seed)
	const size = 3 << 20
	f := openTemp(t, size, true)
	if f.align < 512 || !f.direct {
		t.Fatalf("direct I/O alignment %d", f.align)
	}
	model := make([]byte, size)
	backing := make([]byte, 2<<20+64)
	for i := range 400 {
		off := rng.Int64N(size)
		length := rng.Int64N(min(size-off, 1536<<10) + 1)
		shift := rng.IntN(64)
		p := backing[shift : shift+int(length)]
		if rng.IntN(2) == 0 {
			copy(p, fill(int(length), seed+uint64(i)))
			var flags Flags
			if rng.IntN(5) == 0 {
				flags = FUA
			}
			if err := f.WriteAt(p, off, flags); err != nil {
				t.Fatalf("op %d: write %d+%d: %v", i, off, length, err)
			}
			copy(model[off:], p)
		} else {
			if err := f.ReadAt(p, off); err != nil {
				t.Fatalf("op %d: read %d+%d: %v", i, off, length, err)
			}
			if !bytes.Equal(p, model[off:off+length]) {
				t.Fatalf("op %d: read %d+%d: %s", i, off, length, firstDiff(p, model[off:off+length]))
			}
		}
	}
	if got := readAll(t, f); !bytes.Equal(got, model) {
		t.Fatalf("final: %s", firstDiff(got, model))
	}
}

// TestFileDirectRMW has writers share every block with unaligned writes;
// without the read-modify-write locks they undo each other's bytes.
func TestFileDirectRMW(t *testing.T) {
	const writers = 4
	const piece = 100 // bytes per writer, interleaved within each block
	f := openTemp(t, 1<<20, true)
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for round := range 100 {
				p := bytes.Repeat([]byte{byte(1 + w + writers*round)}, piece)
				for blk := range int64(8) {
					if err := f.WriteAt(p, blk*4096+int64(w*piece)+7, 0); err != nil {
						errs <- err
						return
					}
				}
				// Nobody else writes these bytes: they must still be ours.
				got := make([]byte, piece)
				for blk := range int64(8) {
					if err := f.ReadAt(got, blk*4096+int64(w*piece)+7); err != nil {
						errs <- err
						return
					}
					if !bytes.Equal(got, p) {
						errs <- fmt.Errorf("writer %d round %d block %d: bytes undone by another write", w, round, blk)
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	got := readAll(t, f)
	for blk := range 8 {
		for w := range writers {
			at := blk*4096 + w*piece + 7
			if want := bytes.Repeat([]byte{byte(1 + w + writers*99)}, piece); !bytes.Equal(got[at:at+piece], want) {
				t.Fatalf("block %d, writer %d: lost write (got %#x)", blk, w, got[at])
			}
		}
	}
}

// TestFileNoAllocs checks that aligned reads and writes allocate nothing.
func TestFileNoAllocs(t *testing.T) {
	for _, direct := range []bool{false, true} {
		f := openTemp(t, 1<<20, direct)
		p := AlignedBuf(4096)
		for name, fn := range map[string]func(){
			"ReadAt":      func() { f.ReadAt(p, 8192) },
			"WriteAt":     func() { f.WriteAt(p, 8192, 0) },
			"WriteAt FUA": func() { f.WriteAt(p, 8192, FUA) },
		} {
			if n := testing.AllocsPerRun(20, fn); n != 0 {
				t.Errorf("direct=%v: %s: %v allocations per call", direct, name, n)
			}
		}
	}
}

// TestFileCloseRace closes while requests run: they succeed or fail with
// ErrClosed, never with EBADF or on another file.
func TestFileCloseRace(t *testing.T) {
	for range 20 {
		f := openTemp(t, 1<<20, false)
		var wg sync.WaitGroup
		errs := make(chan error, 4)
		for w := range 4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				p := make([]byte, 4096)
				for i := 0; ; i++ {
					var err error
					if i%2 == 0 {
						err = f.ReadAt(p, int64(w)*4096)
					} else {
						err = f.WriteAt(p, int64(w)*4096, 0)
					}
					if errors.Is(err, ErrClosed) {
						return
					}
					if err != nil {
						errs <- err
						return
					}
				}
			}()
		}
		if err := f.Close(); err != nil {
			t.Fatal(err)
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			t.Fatal(err)
		}
	}
}

func TestFileErrors(t *testing.T) {
	f := &File{path: "x"}
	cases := []struct {
		errno error
		is    []error
	}{
		{unix.ENOSPC, []error{ErrNoSpace, unix.ENOSPC}},
		{unix.EDQUOT, []error{ErrNoSpace, unix.EDQUOT}},
		{unix.EOPNOTSUPP, []error{ErrNotSupported, unix.EOPNOTSUPP}},
		{unix.EROFS, []error{ErrReadOnly, unix.EROFS}},
		{unix.EIO, []error{unix.EIO}},
	}
	for _, c := range cases {
		err := f.errorf("pwrite", 4096, c.errno)
		for _, want := range c.is {
			if !errors.Is(err, want) {
				t.Errorf("%v: errors.Is(%v) is false", err, want)
			}
		}
		if !strings.HasPrefix(err.Error(), "storage: ") {
			t.Errorf("%q lacks the package prefix", err)
		}
	}
	// A real one: the file shrinks under the device.
	g := openTemp(t, 1<<20, false)
	if err := unix.Ftruncate(g.fd, 4096); err != nil {
		t.Fatal(err)
	}
	if err := g.ReadAt(make([]byte, 4096), 8192); !errors.Is(err, unix.EIO) {
		t.Errorf("read past a shrunk file: %v, want EIO", err)
	}
}

// TestFileZeroPaths forces each way File can zero a range of a regular
// file, as on file systems that lack some fallocate modes.
func TestFileZeroPaths(t *testing.T) {
	const mib = 1 << 20
	cases := []struct {
		name                          string
		noPunch, noZeroRange, noAlloc bool
		flags                         Flags
		hole, notSupported            bool // expected outcome
	}{
		{"punch", false, false, false, 0, true, false},
		{"zero range", false, false, false, NoHole, false, false},
		{"punch+allocate", false, true, false, NoHole, false, false},
		{"punch+allocate fast", false, true, false, NoHole | FastZero, false, false},
		{"write, no allocate", false, true, true, NoHole, false, false},
		{"write, no allocate, fast", false, true, true, NoHole | FastZero, false, true},
		{"zero range, no punch", true, false, false, 0, false, false},
		{"write, no punch", true, true, false, 0, false, false},
		{"write, no punch, fast", true, true, false, FastZero, false, true},
	}
	for _, c := range cases {
		f := openTemp(t, 4*mib, false)
		data := fill(4*mib, 3)
		if err := f.WriteAt(data, 0, 0); err != nil {
			t.Fatal(err)
		}
		if err := f.Flush(); err != nil {
			t.Fatal(err)
		}
		f.noPunch.Store(c.noPunch)
		f.noZeroRange.Store(c.noZeroRange)
		f.noAllocate.Store(c.noAlloc)
		before := allocated(t, f.Path())
		err := f.Zero(mib+100, 2*mib, c.flags)
		if c.notSupported {
			if !errors.Is(err, ErrNotSupported) {
				t.Errorf("%s: %v, want ErrNotSupported", c.name, err)
			}
			if got := readAll(t, f); !bytes.Equal(got, data) {
				t.Errorf("%s: a refused FastZero touched data: %s", c.name, firstDiff(got, data))
			}
			continue
		}
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		clear(data[mib+100 : 3*mib+100])
		if got := readAll(t, f); !bytes.Equal(got, data) {
			t.Errorf("%s: %s", c.name, firstDiff(got, data))
		}
		after := allocated(t, f.Path())
		if c.hole != (after < before) {
			t.Errorf("%s: allocation went from %d to %d bytes", c.name, before, after)
		}
	}
}

// TestFileReadNoWait: a buffered file's ReadNoWait serves what the page
// cache holds, with the bytes ReadAt would give, and refuses (false) a
// range whose pages were dropped, until a ReadAt brings them back; a file
// opened with O_DIRECT always refuses, as does a range outside the device.
func TestFileReadNoWait(t *testing.T) {
	const size = 1 << 20
	f := openTemp(t, size, false)
	want := fill(size, 7)
	if err := f.WriteAt(want, 0, FUA); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 64<<10)
	if !f.ReadNoWait(got, 128<<10) || !bytes.Equal(got, want[128<<10:192<<10]) {
		t.Fatal("a range just written was not read from the page cache, or not its bytes")
	}
	// Written back (FUA) and clean: DONTNEED drops the pages. It skips a
	// page it finds busy (locked, or still under writeback), so on a
	// loaded machine it may take more than one go (a fresh-clone CI run
	// saw the range still served after one).
	dropped := false
	for try := 0; try < 50 && !dropped; try++ {
		if err := unix.Fadvise(f.fd, 0, size, unix.FADV_DONTNEED); err != nil {
			t.Fatal(err)
		}
		dropped = !f.ReadNoWait(got, 128<<10)
		if !dropped {
			time.Sleep(10 * time.Millisecond)
		}
	}
	if !dropped {
		t.Fatal("a range out of the page cache was read without waiting (after 50 drops)")
	}
	if err := f.ReadAt(got, 128<<10); err != nil {
		t.Fatal(err)
	}
	if !f.ReadNoWait(got, 128<<10) || !bytes.Equal(got, want[128<<10:192<<10]) {
		t.Fatal("a range read back into the page cache was not served from it")
	}
	if f.ReadNoWait(got, size-4096) {
		t.Fatal("a range past the end was served")
	}
	d := openTemp(t, size, true)
	if d.ReadNoWait(got[:4096], 0) {
		t.Fatal("an O_DIRECT file served a read without waiting")
	}
}

// TestFileFlushNoWait: a freshly opened File has something to flush (what
// was written before the open, through another descriptor, may not be
// durable: found by review, the case of attach --reconnect). Then a Flush
// has nothing to do until a write, zero or trim returns, and again once a
// sync that began after it has succeeded. A write that returns while a
// sync runs is not counted as covered by it, and a File whose sync failed
// never has nothing to do.
func TestFileFlushNoWait(t *testing.T) {
	var _ NoWaitFlusher = (*File)(nil)
	path := filepath.Join(t.TempDir(), "dev.img")
	old, err := OpenFile(path, FileOptions{Size: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if err := old.WriteAt(fill(4096, 9), 0, 0); err != nil {
		t.Fatal(err)
	}
	old.Close() // unsynced: Close does not flush
	var syncs int
	f, err := OpenFile(path, FileOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	f.testOnSync = func(k syncKind) error {
		if k == syncFdatasync {
			syncs++
		}
		return nil
	}
	if f.FlushNoWait() {
		t.Fatal("a File just opened over unsynced writes has nothing to flush")
	}
	if err := f.Flush(); err != nil || syncs != 1 || !f.FlushNoWait() {
		t.Fatalf("the first Flush: %v, %d fdatasync, nothing left %v", err, syncs, f.FlushNoWait())
	}
	f.testOnSync = nil
	for _, op := range []struct {
		name string
		do   func() error
	}{
		{"write", func() error { return f.WriteAt(fill(4096, 1), 0, 0) }},
		{"zero", func() error { return f.Zero(4096, 4096, 0) }},
		{"trim", func() error { return f.Trim(8192, 4096, 0) }},
		{"FUA write", func() error { return f.WriteAt(fill(4096, 2), 0, FUA) }},
	} {
		if err := op.do(); err != nil {
			t.Fatal(op.name, err)
		}
		if f.FlushNoWait() {
			t.Errorf("after a %s, a Flush has nothing to do", op.name)
		}
		if err := f.Flush(); err != nil {
			t.Fatal(err)
		}
		if !f.FlushNoWait() {
			t.Errorf("after a %s and a Flush, a Flush has something to do", op.name)
		}
	}

	// A write that returns while the sync runs.
	f.testOnSync = func(k syncKind) error {
		if k != syncFdatasync {
			return nil
		}
		f.testOnSync = nil
		return f.WriteAt(fill(4096, 3), 0, 0)
	}
	if err := f.Flush(); err != nil {
		t.Fatal(err)
	}
	if f.FlushNoWait() {
		t.Error("a write that returned while the sync ran counts as covered by it")
	}
	if err := f.Flush(); err != nil || !f.FlushNoWait() {
		t.Fatalf("the next Flush: %v, nothing left %v", err, f.FlushNoWait())
	}

	// A failed sync: never nothing to do.
	if err := f.WriteAt(fill(4096, 4), 0, 0); err != nil {
		t.Fatal(err)
	}
	f.testOnSync = func(k syncKind) error { return unix.EIO }
	if err := f.Flush(); err == nil {
		t.Fatal("the sync did not fail")
	}
	f.testOnSync = nil
	if f.FlushNoWait() {
		t.Error("after a failed sync, a Flush has nothing to do")
	}
}

// TestFileWriteVec: WriteVecAt lands its buffers one after another, as
// WriteAt of them joined would, buffered and with O_DIRECT (where they are
// joined into an aligned copy), with empty buffers among them and more
// than one pwritev's worth (iovMax); and a Flush after it has work to do.
func TestFileWriteVec(t *testing.T) {
	seed := testseed.Get(t)
	for _, direct := range []bool{false, true} {
		t.Run(fmt.Sprintf("direct=%v", direct), func(t *testing.T) {
			rng := newRand(seed)
			const size = 4 << 20
			f := openTemp(t, size, direct)
			model := make([]byte, size)
			for i := range 40 {
				bufs := make([][]byte, 1+rng.IntN(2*iovMax))
				total := 0
				for k := range bufs {
					n := 0
					if rng.IntN(8) != 0 {
						n = 1 + rng.IntN(1024)
					}
					bufs[k] = fill(n, seed+uint64(i*4096+k))
					total += n
				}
				// Whole sectors: O_DIRECT writes of them need no read.
				total = (total + 511) / 512 * 512
				bufs = append(bufs, make([]byte, total-int(vecLen(bufs))))
				off := rng.Int64N((size-int64(total))/512+1) * 512
				kept := slices.Clone(bufs)
				if err := f.WriteVecAt(bufs, off); err != nil {
					t.Fatalf("op %d: %d buffers at %d: %v", i, len(bufs), off, err)
				}
				for k := range bufs {
					if len(bufs[k]) != len(kept[k]) {
						t.Fatalf("op %d: WriteVecAt changed the caller's buffer %d", i, k)
					}
				}
				for _, b := range bufs {
					off += int64(copy(model[off:], b))
				}
				if f.FlushNoWait() {
					t.Fatalf("op %d: a Flush after WriteVecAt would have nothing to do", i)
				}
				if err := f.Flush(); err != nil {
					t.Fatal(err)
				}
			}
			if got := readAll(t, f); !bytes.Equal(got, model) {
				t.Fatalf("final: %s", firstDiff(got, model))
			}
			if err := f.WriteVecAt([][]byte{make([]byte, 512), make([]byte, 512)}, size-512); !errors.Is(err, ErrOutOfRange) {
				t.Fatalf("a write past the end: %v, want ErrOutOfRange", err)
			}
		})
	}
}

// TestSkipWritten: a pwritev cut short anywhere (in a buffer, at the end of
// one) leaves exactly the bytes after the cut, with no empty buffer.
func TestSkipWritten(t *testing.T) {
	rng := newRand(testseed.Get(t))
	for range 500 {
		bufs := make([][]byte, 1+rng.IntN(6))
		var joined []byte
		for k := range bufs {
			bufs[k] = fill(1+rng.IntN(9), rng.Uint64())
			joined = append(joined, bufs[k]...)
		}
		w := rng.IntN(len(joined) + 1)
		left := skipWritten(slices.Clone(bufs), w)
		var got []byte
		for _, b := range left {
			if len(b) == 0 {
				t.Fatalf("an empty buffer left after %d of %d bytes", w, len(joined))
			}
			got = append(got, b...)
		}
		if !bytes.Equal(got, joined[w:]) {
			t.Fatalf("after %d of %d bytes: %d left, want %d", w, len(joined), len(got), len(joined)-w)
		}
	}
}

// TestFileReserve: Reserve gives a sparse file blocks for all of its
// size, keeps its contents (holes read as zeroes, data stays), and
// reports what was missing: nothing the second time; on a read-only file
// it does nothing.
func TestFileReserve(t *testing.T) {
	const size = 8 << 20
	path := filepath.Join(t.TempDir(), "f.img")
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, size); err != nil {
		t.Fatal(err)
	}
	blocks := func() int64 {
		var st unix.Stat_t
		if err := unix.Stat(path, &st); err != nil {
			t.Fatal(err)
		}
		return st.Blocks * 512
	}
	ro, err := OpenFile(path, FileOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if missing, err := ro.Reserve(); err != nil || missing != 0 || blocks() != 0 {
		t.Errorf("read-only Reserve = %d, %v, and %d bytes of blocks; want nothing done", missing, err, blocks())
	}
	ro.Close()
	f, err := OpenFile(path, FileOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	data := bytes.Repeat([]byte{0x5a}, 4096)
	if err := f.WriteAt(data, 1<<20, 0); err != nil {
		t.Fatal(err)
	}
	missing, err := f.Reserve()
	if errors.Is(err, ErrNotSupported) {
		t.Skipf("the test folder's file system cannot allocate ahead: %v", err)
	}
	if err != nil || missing < size-64<<10 || missing > size {
		t.Fatalf("Reserve = %d, %v; want about %d missing", missing, err, size)
	}
	if got := blocks(); got < size {
		t.Errorf("after Reserve the file has %d bytes of blocks, want %d", got, size)
	}
	if missing, err := f.Reserve(); err != nil || missing != 0 {
		t.Errorf("second Reserve = %d, %v; want 0, nil", missing, err)
	}
	got := make([]byte, size)
	if err := f.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	want := make([]byte, size)
	copy(want[1<<20:], data)
	if !bytes.Equal(got, want) {
		t.Error("Reserve changed the file's contents")
	}
}
