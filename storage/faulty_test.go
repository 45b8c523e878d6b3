package storage

import (
	"bytes"
	"errors"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/nbdcache/nbdcache/test/testseed"
)

// faultyCalls runs one request of every kind at off+length and returns
// each one's error.
func faultyCalls(f *Faulty, off, length int64) map[OpKind]error {
	p := make([]byte, length)
	return map[OpKind]error{
		OpRead:    f.ReadAt(p, off),
		OpWrite:   f.WriteAt(p, off, 0),
		OpFlush:   f.Flush(),
		OpTrim:    f.Trim(off, length, 0),
		OpZero:    f.Zero(off, length, 0),
		OpExtents: f.Extents(off, length, func(Extent) bool { return true }),
	}
}

func TestFaultyMatching(t *testing.T) {
	cases := []struct {
		name   string
		fault  Fault
		off    int64
		length int64
		fail   OpKind // kinds that must fail
	}{
		{"all kinds, whole device", Fault{}, 0, 512, OpAll},
		{"writes only", Fault{Ops: OpWrite}, 0, 512, OpWrite},
		{"reads and flushes", Fault{Ops: OpRead | OpFlush}, 4096, 512, OpRead | OpFlush},
		{"range hit", Fault{Off: 8192, Length: 4096}, 8000, 512, OpAll &^ OpFlush},
		{"range hit at its last byte", Fault{Off: 8192, Length: 4096}, 12287, 1, OpAll &^ OpFlush},
		{"range miss below", Fault{Off: 8192, Length: 4096}, 7680, 512, 0},
		{"range miss above", Fault{Off: 8192, Length: 4096}, 12288, 512, 0},
		{"trim in range", Fault{Ops: OpTrim | OpZero, Off: 0, Length: 512}, 0, 4096, OpTrim | OpZero},
		{"ENOSPC", Fault{Ops: OpWrite, Err: unix.ENOSPC}, 0, 512, OpWrite},
	}
	for _, c := range cases {
		f := NewFaulty(NewMem(1<<16), 1)
		f.SetFaults(c.fault)
		want := c.fault.Err
		if want == nil {
			want = unix.EIO
		}
		for kind, err := range faultyCalls(f, c.off, c.length) {
			if c.fail&kind != 0 {
				if !errors.Is(err, ErrInjected) || !errors.Is(err, want) {
					t.Errorf("%s: %v: %v, want an injected %v", c.name, kind, err, want)
				}
			} else if err != nil {
				t.Errorf("%s: %v: %v, want success", c.name, kind, err)
			}
		}
		f.Clear()
		for kind, err := range faultyCalls(f, c.off, c.length) {
			if err != nil {
				t.Errorf("%s: after Clear: %v: %v", c.name, kind, err)
			}
		}
	}
}

func TestFaultyCounting(t *testing.T) {
	f := NewFaulty(NewMem(1<<16), 1)
	f.SetFaults(Fault{Ops: OpWrite, After: 3, Times: 2})
	var pattern []bool
	for range 8 {
		pattern = append(pattern, f.WriteAt([]byte{1}, 0, 0) != nil)
	}
	want := []bool{false, false, false, true, true, false, false, false}
	for i := range want {
		if pattern[i] != want[i] {
			t.Fatalf("After 3, Times 2: failures %v, want %v", pattern, want)
		}
	}
	if f.Injected() != 2 {
		t.Errorf("Injected() = %d, want 2", f.Injected())
	}
	// Out-of-range requests fail as such and do not count.
	f.SetFaults(Fault{Ops: OpRead, Times: 1})
	if err := f.ReadAt(make([]byte, 2), 1<<16-1); !errors.Is(err, ErrOutOfRange) {
		t.Errorf("out of range with a fault set: %v", err)
	}
	if err := f.ReadAt(make([]byte, 2), 0); !errors.Is(err, ErrInjected) {
		t.Errorf("first in-range read: %v, want injected", err)
	}
}

func TestFaultyProbability(t *testing.T) {
	seed := testseed.Get(t)
	run := func() []bool {
		f := NewFaulty(NewMem(1<<16), seed)
		f.SetFaults(Fault{Ops: OpRead, Prob: 0.25})
		var out []bool
		for range 2000 {
			out = append(out, f.ReadAt(make([]byte, 1), 0) != nil)
		}
		return out
	}
	a, b := run(), run()
	n := 0
	for i := range a {
		if a[i] != b[i] {
			t.Fatalf("same seed, different draws at request %d", i)
		}
		if a[i] {
			n++
		}
	}
	// 2000 draws at p=1/4: mean 500, sd ~19.4; 6 sd either side.
	if n < 384 || n > 616 {
		t.Errorf("%d of 2000 requests failed at Prob 0.25", n)
	}
}

func TestFaultyApply(t *testing.T) {
	m := NewMem(1 << 16)
	f := NewFaulty(m, 1)
	f.SetFaults(Fault{Ops: OpWrite, Apply: true})
	p := []byte("landed")
	if err := f.WriteAt(p, 100, 0); !errors.Is(err, unix.EIO) {
		t.Fatalf("Apply write: %v", err)
	}
	got := make([]byte, len(p))
	if err := m.ReadAt(got, 100); err != nil || !bytes.Equal(got, p) {
		t.Fatalf("Apply write did not land: %q %v", got, err)
	}
	f.SetFaults(Fault{Ops: OpWrite})
	if err := f.WriteAt([]byte("lost!!"), 100, 0); !errors.Is(err, unix.EIO) {
		t.Fatalf("plain fault: %v", err)
	}
	if err := m.ReadAt(got, 100); err != nil || !bytes.Equal(got, p) {
		t.Fatalf("a failed write touched data: %q %v", got, err)
	}
}

// TestFaultyConcurrent changes the faults while requests run (-race).
func TestFaultyConcurrent(t *testing.T) {
	f := NewFaulty(NewMem(1<<20), 1)
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for w := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p := make([]byte, 4096)
			for {
				select {
				case <-stop:
					return
				default:
				}
				err := f.WriteAt(p, int64(w)*4096, 0)
				if err != nil && !errors.Is(err, ErrInjected) {
					t.Error(err)
					return
				}
			}
		}()
	}
	for i := range 200 {
		if i%2 == 0 {
			f.SetFaults(Fault{Ops: OpWrite, Prob: 0.5})
		} else {
			f.Clear()
		}
	}
	close(stop)
	wg.Wait()
}

func TestFaultyNoAllocs(t *testing.T) {
	f := NewFaulty(NewMem(1<<20), 1)
	p := make([]byte, 4096)
	f.WriteAt(p, 0, 0)
	if n := testing.AllocsPerRun(100, func() { f.ReadAt(p, 0); f.WriteAt(p, 0, 0) }); n != 0 {
		t.Errorf("%v allocations per request without faults", n)
	}
}
