package storage

import (
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// syncLog records the syscalls a File reports through testOnSync.
type syncLog struct {
	mu    sync.Mutex
	kinds []syncKind
}

// watch installs the log as f's hook; f must have no request in flight.
func (l *syncLog) watch(f *File) {
	f.testOnSync = func(k syncKind) error {
		l.mu.Lock()
		defer l.mu.Unlock()
		l.kinds = append(l.kinds, k)
		return nil
	}
}

// take returns what was logged since the last take, and forgets it.
func (l *syncLog) take() []syncKind {
	l.mu.Lock()
	defer l.mu.Unlock()
	k := l.kinds
	l.kinds = nil
	return k
}

// durable reports whether ks ends with a syscall that makes data durable:
// an fdatasync, or a pwritev2(RWF_DSYNC) (durable on return).
func durable(ks []syncKind) bool {
	return len(ks) > 0 && (ks[len(ks)-1] == syncFdatasync || ks[len(ks)-1] == syncDSyncWrite)
}

// TestFileFlushSyncs proves that File.Flush issues an fdatasync every
// time, including the first Flush after open with nothing written through
// this File (the page cache may hold an earlier process's writes), and
// that writes, trims and zeroes without FUA issue none (so the test would
// see one that Flush skipped). A closed File's Flush fails with ErrClosed
// and issues nothing.
func TestFileFlushSyncs(t *testing.T) {
	for _, direct := range []bool{false, true} {
		t.Run(fmt.Sprintf("direct=%v", direct), func(t *testing.T) {
			f := openTemp(t, 1<<20, direct)
			var log syncLog
			log.watch(f)
			if err := f.Flush(); err != nil {
				t.Fatalf("Flush with nothing written: %v", err)
			}
			if got := log.take(); !slices.Equal(got, []syncKind{syncFdatasync}) {
				t.Fatalf("Flush with nothing written issued %v, want [fdatasync]", got)
			}
			if err := f.WriteAt(fill(12288, 1), 4096, 0); err != nil {
				t.Fatal(err)
			}
			if err := f.WriteAt(fill(1000, 2), 100, 0); err != nil { // unaligned: the bounce path with O_DIRECT
				t.Fatal(err)
			}
			if err := f.Trim(65536, 8192, 0); err != nil {
				t.Fatal(err)
			}
			if err := f.Zero(131072, 8192, 0); err != nil {
				t.Fatal(err)
			}
			if got := log.take(); len(got) != 0 {
				t.Fatalf("writes, trim and zero without FUA issued %v", got)
			}
			for i := range 2 {
				if err := f.Flush(); err != nil {
					t.Fatal(err)
				}
				if got := log.take(); !slices.Equal(got, []syncKind{syncFdatasync}) {
					t.Fatalf("Flush %d issued %v, want [fdatasync]", i, got)
				}
			}
			if err := f.Close(); err != nil {
				t.Fatal(err)
			}
			if err := f.Flush(); !errors.Is(err, ErrClosed) {
				t.Fatalf("Flush after Close: %v, want ErrClosed", err)
			}
			if got := log.take(); len(got) != 0 {
				t.Fatalf("Flush after Close issued %v", got)
			}
		})
	}
}

// TestFileFUASyncs proves that every request with FUA ends with a syscall
// that makes it durable before it returns: a write through
// pwritev2(RWF_DSYNC) (or, where the kernel refuses it, pwrite and then
// fdatasync, and only that), a trim or a zero by an fdatasync, on every
// zeroing path, aligned or not, with and without O_DIRECT.
func TestFileFUASyncs(t *testing.T) {
	for _, direct := range []bool{false, true} {
		for _, fallback := range []bool{false, true} {
			t.Run(fmt.Sprintf("direct=%v/fallback=%v", direct, fallback), func(t *testing.T) {
				f := openTemp(t, 4<<20, direct)
				f.noDSync.Store(fallback)
				var log syncLog
				log.watch(f)
				writes := []struct{ off, n int64 }{{0, 4096}, {8192, 1 << 20}, {100, 1000}, {(2 << 20) - 512, 3 << 19}}
				for _, w := range writes {
					if err := f.WriteAt(fill(int(w.n), 7), w.off, FUA); err != nil {
						t.Fatal(err)
					}
					got := log.take()
					if !durable(got) {
						t.Fatalf("FUA write of %d at %d issued %v: nothing durable last", w.n, w.off, got)
					}
					if (fallback || f.noDSync.Load()) && !slices.Contains(got, syncFdatasync) {
						t.Fatalf("FUA write of %d at %d by pwrite issued %v, no fdatasync", w.n, w.off, got)
					}
					if !fallback && !f.noDSync.Load() && slices.Contains(got, syncFdatasync) {
						t.Errorf("FUA write of %d at %d issued %v: an fdatasync beside RWF_DSYNC", w.n, w.off, got)
					}
				}
				if err := f.Trim(65536, 8192, FUA); err != nil {
					t.Fatal(err)
				}
				if got := log.take(); !slices.Equal(got, []syncKind{syncFdatasync}) {
					t.Fatalf("FUA trim issued %v, want [fdatasync]", got)
				}
				zeroPaths := []struct {
					name                          string
					noPunch, noZeroRange, noAlloc bool
					flags                         Flags
				}{
					{"punch", false, false, false, 0},
					{"zero range", false, false, false, NoHole},
					{"punch+allocate", false, true, false, NoHole},
					{"write", true, true, true, 0},
				}
				for _, z := range zeroPaths {
					f.noPunch.Store(z.noPunch)
					f.noZeroRange.Store(z.noZeroRange)
					f.noAllocate.Store(z.noAlloc)
					if err := f.Zero(131072+100, 300<<10, z.flags|FUA); err != nil {
						t.Fatalf("zero (%s): %v", z.name, err)
					}
					if got := log.take(); !slices.Equal(got, []syncKind{syncFdatasync}) {
						t.Fatalf("FUA zero (%s) issued %v, want [fdatasync]", z.name, got)
					}
				}
			})
		}
	}
}

// TestFileStartWritebackIsAHint proves StartWriteback issues only
// sync_file_range (never mistaken for durability), and nothing with
// O_DIRECT, where there is no page cache to start.
func TestFileStartWritebackIsAHint(t *testing.T) {
	for _, direct := range []bool{false, true} {
		f := openTemp(t, 1<<20, direct)
		var log syncLog
		log.watch(f)
		if err := f.WriteAt(fill(65536, 3), 0, 0); err != nil {
			t.Fatal(err)
		}
		f.StartWriteback(0, 65536)
		want := []syncKind{syncStartWriteback}
		if direct {
			want = nil
		}
		if got := log.take(); !slices.Equal(got, want) {
			t.Errorf("direct=%v: StartWriteback issued %v, want %v", direct, got, want)
		}
	}
}

// TestFileSyncFailureIsSticky: after a sync fails, the kernel may have
// dropped the pages it could not write and reports the error only once,
// so a later fdatasync succeeds though they are lost. File keeps the
// failure: every later Flush and FUA write fails with ErrSyncFailed (EIO
// on the wire), until the file is opened again; writes without FUA still
// go. EIO, ENOSPC and EDQUOT from a write with RWF_DSYNC count too (its
// sync reports an earlier writeback's failure anywhere in the file, and
// a failed writeback reports these); another error is the write's own.
func TestFileSyncFailureIsSticky(t *testing.T) {
	for _, tc := range []struct {
		name   string
		fail   syncKind
		errno  unix.Errno
		sticky bool
	}{
		{"fdatasync EIO", syncFdatasync, unix.EIO, true},
		{"fdatasync ENOSPC", syncFdatasync, unix.ENOSPC, true},
		{"dsync write EIO", syncDSyncWrite, unix.EIO, true},
		{"dsync write ENOSPC", syncDSyncWrite, unix.ENOSPC, true},
		{"dsync write EBADMSG", syncDSyncWrite, unix.EBADMSG, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := openTemp(t, 1<<20, false)
			if f.noDSync.Load() && tc.fail == syncDSyncWrite {
				t.Skip("no RWF_DSYNC here")
			}
			var once sync.Once
			f.testOnSync = func(k syncKind) error {
				var err error
				if k == tc.fail {
					once.Do(func() { err = tc.errno })
				}
				return err
			}
			if err := f.WriteAt(fill(4096, 1), 0, 0); err != nil {
				t.Fatal(err)
			}
			var err error
			if tc.fail == syncFdatasync {
				err = f.Flush()
			} else {
				err = f.WriteAt(fill(4096, 2), 8192, FUA)
			}
			if !errors.Is(err, tc.errno) {
				t.Fatalf("the failing sync returned %v, want %v", err, tc.errno)
			}
			// The kernel would now report success.
			err = f.Flush()
			if !tc.sticky {
				if err != nil {
					t.Fatalf("Flush after a write's own error: %v", err)
				}
				return
			}
			if !errors.Is(err, ErrSyncFailed) || !errors.Is(err, tc.errno) {
				t.Fatalf("Flush after the failure: %v; want ErrSyncFailed with the first error", err)
			}
			if err := f.WriteAt(fill(4096, 3), 4096, FUA); !errors.Is(err, ErrSyncFailed) {
				t.Fatalf("FUA write after the failure: %v; want ErrSyncFailed", err)
			}
			if err := f.WriteAt(fill(4096, 4), 4096, 0); err != nil {
				t.Fatalf("plain write after the failure: %v", err)
			}
			path := f.path
			if err := f.Close(); err != nil {
				t.Fatal(err)
			}
			g, err := OpenFile(path, FileOptions{})
			if err != nil {
				t.Fatal(err)
			}
			defer g.Close()
			if err := g.Flush(); err != nil {
				t.Fatalf("Flush after reopening: %v", err)
			}
		})
	}
}

// TestFileSyncsDoNotOverlap: of two fdatasync calls at once, the kernel
// reports a writeback error to one and the other returns 0. So they go
// one at a time, and the second, finding the first's failure, fails too.
// The hook holds the first in its "syscall" and fails it; the second must
// not return meanwhile, nor succeed after.
func TestFileSyncsDoNotOverlap(t *testing.T) {
	f := openTemp(t, 1<<20, false)
	entered, release := make(chan struct{}), make(chan struct{})
	var calls atomic.Int32
	f.testOnSync = func(k syncKind) error {
		if k == syncFdatasync && calls.Add(1) == 1 {
			close(entered)
			<-release
			return unix.EIO
		}
		return nil
	}
	first, second := make(chan error, 1), make(chan error, 1)
	go func() { first <- f.Flush() }()
	<-entered
	go func() { second <- f.Flush() }()
	select {
	case err := <-second:
		close(release) // or Close, at cleanup, waits for the first for ever
		<-first
		t.Fatalf("a second Flush returned (%v) while the first was in its fdatasync", err)
	case <-time.After(100 * time.Millisecond):
	}
	close(release)
	if err := <-first; !errors.Is(err, unix.EIO) {
		t.Fatalf("first Flush: %v, want EIO", err)
	}
	if err := <-second; !errors.Is(err, ErrSyncFailed) {
		t.Fatalf("second Flush: %v, want ErrSyncFailed", err)
	}
}
