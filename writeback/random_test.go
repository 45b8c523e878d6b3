package writeback

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/nbdcache/nbdcache/btreeidx"
	"github.com/nbdcache/nbdcache/storage"
	"github.com/nbdcache/nbdcache/test/testseed"
)

// TestRandomized runs the flusher against a random foreground (writes of
// 1..8 blocks, busy spells and idle spells), a random configuration, a
// disk model, racing writes during writeback and injected backing errors,
// then drains. At every MarkClean the piece must be durable on the backing
// with its own data; at the end nothing is dirty and the backing equals the
// model. -long runs more rounds.
func TestRandomized(t *testing.T) {
	seed := testseed.Get(t)
	rounds := 8
	if *longFlag {
		rounds = 200
	}
	for r := range rounds {
		s := seed + uint64(r)
		t.Run(fmt.Sprint(r), func(t *testing.T) {
			synctest.Test(t, func(t *testing.T) { randomRound(t, s) })
		})
	}
}

func randomRound(t *testing.T, seed uint64) {
	rng := newRand(seed)
	blocks := 256 + rng.IntN(2048)
	const bs = 4096
	maxWrite := int64(bs) << rng.IntN(9) // 4 KiB .. 1 MiB
	inFlight := 1 + rng.IntN(8)
	target := 1 + rng.IntN(30)
	cfg := Config{
		TargetPercent:  target,
		LowWatermark:   rng.IntN(target+1) - 1, // -1 disables the stop
		HighWatermark:  target + rng.IntN(101-target),
		MaxInFlight:    inFlight,
		MaxWrite:       maxWrite,
		BatchBytes:     maxWrite * int64(1+rng.IntN(32)),
		BatchTime:      time.Duration(50+rng.IntN(1000)) * time.Millisecond,
		MaxDirtyAge:    time.Duration(rng.IntN(20)-2) * time.Second,
		IdleAfter:      time.Duration(50+rng.IntN(2000)) * time.Millisecond,
		UpdateInterval: time.Duration(100+rng.IntN(2000)) * time.Millisecond,
		RetryMin:       10 * time.Millisecond,
		RetryMax:       time.Second,
		Logger:         quiet,
	}
	if cfg.LowWatermark == 0 {
		cfg.LowWatermark = -1
	}
	if cfg.MaxDirtyAge == 0 {
		cfg.MaxDirtyAge = -1
	}
	src := newFakeSource(blocks, bs, int64(blocks)*bs*int64(1+rng.IntN(4))/2)
	mem := storage.NewMem(int64(blocks) * bs)
	var disk storage.Device = mem
	switch rng.IntN(3) {
	case 0:
		disk = storage.NewSlow(mem, storage.HDDModel())
	case 1:
		disk = storage.NewSlow(mem, storage.DiskModel{Name: "xfer", TransferRate: 20e6, FlushTime: time.Millisecond})
	}
	dev := &recDev{inner: disk}
	guardRaw(src, dev, mem)
	t.Logf("%d blocks, capacity %d, backing %T, config %+v", blocks, src.capacity, disk, cfg)

	// Racing writes: some reads from the cache are followed at once by a
	// foreground write to the same block (decided by a hash, so it does
	// not depend on scheduling).
	var raced sync.Map
	src.afterRead = func(e btreeidx.Extent) {
		if (e.Ver*0x9e3779b97f4a7c15+uint64(e.Off))%11 == 0 {
			if _, dup := raced.LoadOrStore(e.Ver, true); !dup {
				src.write(int(e.Off/bs), 1)
			}
		}
	}
	// Backing errors: the first two attempts on some spans fail.
	var fmu sync.Mutex
	tries := map[int64]int{}
	boom := errors.New("injected")
	failing := rng.IntN(2) == 0
	dev.failWrite = func(off, n int64) error {
		if !failing || (off/bs)%13 != 5 {
			return nil
		}
		fmu.Lock()
		defer fmu.Unlock()
		tries[off]++
		if tries[off] <= 2 {
			return boom
		}
		return nil
	}

	// Odd seeds read in batches (BatchReader): full-speed batches and
	// WriteBack read ahead by windows. By the seed, not a draw, so that
	// older seeds replay as they ran.
	var source Source = src
	if seed%2 == 1 {
		source = &batchSource{fakeSource: src}
	}
	f := New(source, dev, cfg)
	ctx, cancel := context.WithCancel(context.Background())
	runDone := make(chan error, 1)
	go func() { runDone <- f.Run(ctx) }()

	for range 200 + rng.IntN(400) {
		switch k := rng.IntN(20); {
		case k < 14:
			n := 1 + rng.IntN(8)
			b := rng.IntN(blocks - n + 1)
			src.write(b, n)
			f.NoteForeground()
			f.Kick()
		case k < 18:
			time.Sleep(time.Duration(rng.IntN(50)) * time.Millisecond)
		case k < 19:
			time.Sleep(time.Duration(rng.IntN(5000)) * time.Millisecond) // maybe idle
		default:
			f.NoteForeground()
		}
	}
	stopRun := func() {
		cancel()
		if runDone == nil {
			return
		}
		if err := <-runDone; err != nil {
			t.Fatal(err)
		}
		runDone = nil
	}
	defer stopRun()
	if rng.IntN(2) == 0 {
		stopRun() // drain with Run stopped, else while it runs
	}
	dctx, dcancel := context.WithTimeout(context.Background(), time.Hour)
	defer dcancel()
	var prog []int64
	if err := f.Drain(dctx, func(done, total int64) { prog = append(prog, done, total) }); err != nil {
		t.Fatalf("Drain: %v", err)
	}
	stopRun()
	src.check(t)
	if d := src.DirtyBytes(); d != 0 {
		t.Fatalf("DirtyBytes = %d after Drain", d)
	}
	checkImage(t, mem, src)
	st := f.Stats()
	t.Logf("stats: %+v", st)
	if st.Writes != int64(len(dev.writes())) || st.Flushes != int64(dev.flushes()) {
		t.Errorf("stats say %d writes and %d flushes, the device saw %d and %d", st.Writes, st.Flushes, len(dev.writes()), dev.flushes())
	}
	if failing && st.Errors == 0 && len(tries) > 0 {
		t.Errorf("errors were injected on %d spans but none counted", len(tries))
	}
	for i := 2; i < len(prog); i += 2 {
		if prog[i] < prog[i-2] || prog[i] > prog[i+1] || prog[i+1] < prog[i-1] {
			t.Fatalf("progress went (%d/%d) -> (%d/%d)", prog[i-2], prog[i-1], prog[i], prog[i+1])
		}
	}
	if n := len(prog); n < 2 || prog[n-2] != prog[n-1] {
		t.Errorf("progress ended at %v, want done == total", prog[max(n-2, 0):])
	}
}
