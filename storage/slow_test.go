package storage

import (
	"bytes"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/nbdcache/nbdcache/test/testseed"
)

func within(t *testing.T, what string, got, lo, hi time.Duration) {
	t.Helper()
	if got < lo || got > hi {
		t.Errorf("%s = %v, want within [%v, %v]", what, got, lo, hi)
	} else {
		t.Logf("%s = %v", what, got)
	}
}

// zeroModel costs nothing, so the contract suite runs in real time.
func zeroModel() DiskModel {
	return DiskModel{Name: "zero", TransferRate: 1 << 62}
}

func TestSlowHDDRandomVersusSequential(t *testing.T) {
	seed := testseed.Get(t)
	synctest.Test(t, func(t *testing.T) {
		const size = 1 << 40 // a 1 TiB disk: the whole span is a full stroke
		rng := rand.New(rand.NewPCG(seed, 0))
		s := NewSlow(NewMem(size), HDDModel())
		buf := make([]byte, 4096)

		// Random 4 KiB writes.
		const n = 400
		start := time.Now()
		for range n {
			off := rng.Int64N(size/4096) * 4096
			if err := s.WriteAt(buf, off, 0); err != nil {
				t.Fatal(err)
			}
		}
		random := time.Since(start) / n
		within(t, "random 4 KiB write", random, 11*time.Millisecond, 14*time.Millisecond)
		st := s.Stats()
		within(t, "average seek", st.Seek/n, 7500*time.Microsecond, 9500*time.Microsecond)
		within(t, "average rotation", st.Rotation/n, 3600*time.Microsecond, 4800*time.Microsecond)

		// Sequential 4 KiB writes from where the head is.
		off := rng.Int64N(size/2/4096) * 4096
		if err := s.WriteAt(buf, off, 0); err != nil { // position the head
			t.Fatal(err)
		}
		start = time.Now()
		for i := range n {
			if err := s.WriteAt(buf, off+int64(i+1)*4096, 0); err != nil {
				t.Fatal(err)
			}
		}
		seq := time.Since(start) / n
		within(t, "sequential 4 KiB write", seq, 20*time.Microsecond, 40*time.Microsecond)
		if random < 100*seq {
			t.Errorf("random %v is not far slower than sequential %v", random, seq)
		}

		// One sequential 1 MiB write.
		big := make([]byte, 1<<20)
		start = time.Now()
		if err := s.WriteAt(big, off+int64(n+1)*4096, 0); err != nil {
			t.Fatal(err)
		}
		within(t, "sequential 1 MiB write", time.Since(start), 6500*time.Microsecond, 7500*time.Microsecond)
	})
}

func TestSlowSeekGrowsWithDistance(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const size = 1 << 40
		m := HDDModel()
		m.RPM = 0 // isolate the seek
		s := NewSlow(NewMem(size), m)
		buf := make([]byte, 512)
		prev := time.Duration(0)
		for _, d := range []int64{4096, 1 << 20, 1 << 30, 1 << 36, size / 2, size - 512} {
			if err := s.WriteAt(buf, 0, 0); err != nil { // head back to 512
				t.Fatal(err)
			}
			start := time.Now()
			if err := s.WriteAt(buf, d, 0); err != nil {
				t.Fatal(err)
			}
			took := time.Since(start)
			if took <= prev {
				t.Errorf("seek over %d took %v, not longer than the shorter seek's %v", d, took, prev)
			}
			if took > m.FullStroke+time.Millisecond {
				t.Errorf("seek over %d took %v, more than a full stroke", d, took)
			}
			prev = took
		}
		if prev < m.FullStroke-time.Millisecond {
			t.Errorf("full-span seek took %v, want about %v", prev, m.FullStroke)
		}
	})
}

// TestSlowSameTrack: on the head's track there is no seek; skipping ahead
// costs the time the gap takes to pass under the head, stepping back most
// of a revolution.
func TestSlowSameTrack(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		m := HDDModel()
		s := NewSlow(NewMem(1<<30), m)
		buf := make([]byte, 4096)
		track := int64(float64(m.TransferRate) * m.revolution().Seconds())
		base := 100 * track
		if err := s.WriteAt(buf, base, 0); err != nil { // head to the start of a track
			t.Fatal(err)
		}
		xfer := time.Duration(4096 * int64(time.Second) / m.TransferRate)
		for _, gap := range []int64{4096, 64 << 10, 256 << 10} {
			pos := s.mu.pos
			start := time.Now()
			if err := s.WriteAt(buf, pos+gap, 0); err != nil {
				t.Fatal(err)
			}
			want := time.Duration(gap*int64(time.Second)/m.TransferRate) + xfer
			within(t, fmt.Sprintf("skip %d KiB ahead", gap>>10), time.Since(start), want-20*time.Microsecond, want+20*time.Microsecond)
		}
		pos := s.mu.pos
		start := time.Now()
		if err := s.WriteAt(buf, pos-8192, 0); err != nil {
			t.Fatal(err)
		}
		within(t, "step 8 KiB back", time.Since(start), m.revolution()-200*time.Microsecond, m.revolution()+100*time.Microsecond)
		if st := s.Stats(); st.Seek != m.Settle+time.Duration(float64(m.FullStroke-m.Settle)*math.Sqrt(float64(base)/float64(1<<30))) {
			t.Errorf("seek time %v: only the first request should have moved the arm", st.Seek)
		}
	})
}

// TestSlowOneHead checks that concurrent requests are served one at a time:
// the elapsed time is the sum of their modelled times.
func TestSlowOneHead(t *testing.T) {
	seed := testseed.Get(t)
	synctest.Test(t, func(t *testing.T) {
		const size = 1 << 36
		s := NewSlow(NewMem(size), HDDModel())
		start := time.Now()
		var wg sync.WaitGroup
		for g := range 4 {
			rng := rand.New(rand.NewPCG(seed, uint64(g)))
			wg.Go(func() {
				buf := make([]byte, 4096)
				for range 50 {
					if err := s.WriteAt(buf, rng.Int64N(size/4096)*4096, 0); err != nil {
						t.Error(err)
					}
				}
			})
		}
		wg.Wait()
		elapsed := time.Since(start)
		busy := s.Stats().Busy()
		if st := s.Stats(); st.Requests != 200 {
			t.Errorf("requests = %d, want 200", st.Requests)
		}
		// Timer granularity aside, the elapsed time is the busy time.
		if elapsed < busy || elapsed > busy+time.Millisecond {
			t.Errorf("elapsed %v, busy %v: requests overlapped or idled", elapsed, busy)
		}
		if busy < 200*10*time.Millisecond {
			t.Errorf("busy %v for 200 random writes: too fast for one head", busy)
		}
	})
}

func TestSlowFlushAndData(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		s := NewSlow(NewMem(1<<30), HDDModel())
		if !s.Caps().Rotational || !s.Caps().Flush {
			t.Errorf("caps %+v: want rotational and the inner caps", s.Caps())
		}
		want := bytes.Repeat([]byte("slow"), 2048)
		if err := s.WriteAt(want, 12345, FUA); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(want))
		if err := s.ReadAt(got, 12345); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, want) {
			t.Error("read back differs from what was written")
		}
		start := time.Now()
		if err := s.Flush(); err != nil {
			t.Fatal(err)
		}
		if took := time.Since(start); took != HDDModel().FlushTime {
			t.Errorf("flush took %v, want %v", took, HDDModel().FlushTime)
		}
		before := s.Stats()
		start = time.Now()
		if err := s.WriteAt(want, 1<<30-10, 0); !errors.Is(err, ErrOutOfRange) {
			t.Errorf("write past the end: %v, want ErrOutOfRange", err)
		}
		if time.Since(start) != 0 || s.Stats() != before {
			t.Error("a rejected request was charged")
		}
		if err := s.Zero(0, 8192, 0); err != nil {
			t.Fatal(err)
		}
		if err := s.ReadAt(got[:8192], 0); err != nil || !bytes.Equal(got[:8192], make([]byte, 8192)) {
			t.Errorf("zeroed range reads back %v, %q...", err, got[:8])
		}
	})
}

func TestParseDiskModel(t *testing.T) {
	hdd := HDDModel()
	slowHDD := HDDModel()
	slowHDD.RPM, slowHDD.TransferRate = 5400, 100_000_000
	flat := HDDModel()
	flat.Name, flat.RPM, flat.Settle, flat.FullStroke, flat.TransferRate, flat.FlushTime = "custom", 0, 0, 0, 500_000_000, 100*time.Microsecond
	for _, tc := range []struct {
		in   string
		want DiskModel
		err  bool
	}{
		{in: "hdd", want: hdd},
		{in: " HDD ", want: hdd},
		{in: "hdd,rpm=5400,rate=100M", want: slowHDD},
		{in: "custom,rpm=0,settle=0s,stroke=0s,rate=500M,flush=100us", want: flat},
		{in: hdd.String(), want: hdd},
		{in: "ssd", err: true},
		{in: "", err: true},
		{in: "hdd,rpm", err: true},
		{in: "hdd,rpm=fast", err: true},
		{in: "hdd,rate=0", err: true},
		{in: "hdd,settle=20ms", err: true}, // longer than the full stroke
		{in: "hdd,colour=blue", err: true},
		{in: "hdd,span=99999999999G", err: true},
	} {
		got, err := ParseDiskModel(tc.in)
		if tc.err {
			if !errors.Is(err, ErrBadModel) {
				t.Errorf("ParseDiskModel(%q) = %v, %v; want ErrBadModel", tc.in, got, err)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("ParseDiskModel(%q) = %+v, %v; want %+v", tc.in, got, err, tc.want)
		}
	}
	if d := hdd.AvgSeek(); d < 8490*time.Microsecond || d > 8510*time.Microsecond {
		t.Errorf("hdd average seek %v, want 8.5ms", d)
	}
	if d := hdd.AvgRotation(); d < 4160*time.Microsecond || d > 4170*time.Microsecond {
		t.Errorf("hdd average rotation %v, want 4.17ms", d)
	}
}

// TestSlowQueueServesBackToBack: requests that wait for the head start
// when the one before them ends, in the model's time, not when their
// goroutine wakes: a sorted sweep of sparse 4 KiB writes kept 8 deep pays
// a short skip forward per write, not the revolution that the timer's
// late wake-up would make it miss. Real time, not synctest: the wake-up
// delay is what is at stake. The same sweep issued one write at a time
// does pay for the caller's latency.
func TestSlowQueueServesBackToBack(t *testing.T) {
	const (
		span = 64 << 20
		n    = 400
	)
	rng := rand.New(rand.NewPCG(7, 7))
	offs := make([]int64, n)
	for i := range offs {
		offs[i] = rng.Int64N(span/4096) * 4096
	}
	slices.Sort(offs)
	offs = slices.Compact(offs)
	s := NewSlow(NewMem(span), HDDModel())
	buf := make([]byte, 4096)
	var wg sync.WaitGroup
	slots := make(chan struct{}, 8)
	prev := make(chan struct{})
	close(prev)
	for _, o := range offs {
		slots <- struct{}{}
		started, p := make(chan struct{}), prev
		wg.Go(func() {
			defer func() { <-slots }()
			<-p
			close(started)
			s.WriteAt(buf, o, 0)
		})
		prev = started
	}
	wg.Wait()
	st := s.Stats()
	per := (st.Seek + st.Rotation) / time.Duration(len(offs))
	t.Logf("%d sorted 4 KiB writes over 64 MiB, 8 deep: %v positioning a write (revolution %v)", len(offs), per, HDDModel().revolution())
	if per > 2*time.Millisecond {
		t.Fatalf("a queued sorted sweep paid %v positioning a write: the queue is not served back to back", per)
	}
}
