package nbd

import (
	"context"
	"errors"
	"flag"
	"math/rand/v2"
	"testing"
	"time"
)

var arenaSeed = flag.Uint64("arena-seed", 0, "replay TestArenaModel from this seed")

// TestArenaModel allocates and frees at random against a model: live
// blocks never overlap, stay inside the budget, are aligned to their size,
// and once everything is back the largest block can be had again (the
// buddies merged).
func TestArenaModel(t *testing.T) {
	for _, budget := range []int64{1 << 20, 3<<20 + 5*4096, 96 << 20} {
		seed := *arenaSeed
		if seed == 0 {
			seed = uint64(time.Now().UnixNano())
		}
		t.Logf("budget %d, seed %d", budget, seed)
		rng := rand.New(rand.NewPCG(seed, 1))
		a := newArena(budget)
		ctx := context.Background()
		type live struct {
			b   buffer
			tag byte
		}
		var held []live
		used := 0
		for i := range 4000 {
			if len(held) > 0 && (rng.IntN(2) == 0 || used > a.size*3/4) {
				k := rng.IntN(len(held))
				h := held[k]
				for _, j := range probes(len(h.b.data)) {
					if h.b.data[j] != h.tag {
						t.Fatalf("step %d: byte %d of a live buffer was overwritten", i, j)
					}
				}
				used -= pageSize << h.b.order
				a.put(h.b)
				held = append(held[:k], held[k+1:]...)
				continue
			}
			n := 1 + rng.IntN(min(a.largest(), 1<<20))
			if rng.IntN(4) == 0 {
				n = 1 + rng.IntN(pageSize)
			}
			if used+blockSize(n) > a.size/2 {
				continue // keep every get immediate: no waiting here
			}
			cctx, cancel := context.WithTimeout(ctx, 10*time.Millisecond)
			b, err := a.get(cctx, n)
			cancel()
			if err != nil {
				// Fragmented: legal, the model only checks what is
				// handed out.
				continue
			}
			if len(b.data) != n || cap(b.data) != blockSize(n) {
				t.Fatalf("get(%d): len %d cap %d", n, len(b.data), cap(b.data))
			}
			if int(b.page)*pageSize%cap(b.data) != 0 {
				t.Fatalf("block at page %d of %d bytes is not aligned", b.page, cap(b.data))
			}
			tag := byte(i)
			for _, j := range probes(n) {
				b.data[j] = tag
			}
			held = append(held, live{b, tag})
			used += cap(b.data)
			if st := a.stats(); st.used != used || st.used > a.size {
				t.Fatalf("step %d: arena says %d bytes used, model %d, size %d", i, st.used, used, a.size)
			}
		}
		for _, h := range held {
			a.put(h.b)
		}
		if st := a.stats(); st.used != 0 {
			t.Fatalf("%d bytes still used after every put", st.used)
		}
		b, err := a.get(ctx, a.largest())
		if err != nil {
			t.Fatal(err)
		}
		a.put(b)
		a.release()
		if _, err := a.get(ctx, 1); !errors.Is(err, errArenaClosed) {
			t.Fatalf("get after release: %v", err)
		}
	}
}

// probes are the bytes of an n-byte buffer that the model tags: the first
// and last of every page.
func probes(n int) []int {
	var p []int
	for off := 0; off < n; off += pageSize {
		p = append(p, off, min(off+pageSize, n)-1)
	}
	return p
}

// TestArenaFIFO: a large request waiting for room is not overtaken by
// small ones that arrive after it, and a waiter that gives up lets the
// ones behind it through.
func TestArenaFIFO(t *testing.T) {
	a := newArena(1 << 20)
	ch := watch(a)
	ctx := context.Background()
	half, err := a.get(ctx, 512<<10) // one of the two 512 KiB halves
	if err != nil {
		t.Fatal(err)
	}
	quarter, err := a.get(ctx, 256<<10)
	if err != nil {
		t.Fatal(err)
	}
	// 256 KiB are free, but the big request needs 512 KiB: it waits.
	type result struct {
		name string
		b    buffer
		err  error
	}
	got := make(chan result, 3)
	getAsync := func(ctx context.Context, name string, n int) {
		go func() {
			b, err := a.get(ctx, n)
			got <- result{name, b, err}
		}()
	}
	getAsync(ctx, "big", 512<<10)
	waitArena(t, a, ch, "big to queue", queuedN(1))
	getAsync(ctx, "small", 4096) // fits, but must queue behind big
	waitArena(t, a, ch, "small to queue", queuedN(2))
	select {
	case r := <-got:
		t.Fatalf("%s was served while the head of the line waits", r.name)
	default:
	}
	a.put(half)
	var big buffer
	for range 2 {
		r := <-got
		if r.err != nil {
			t.Fatalf("%s: %v", r.name, r.err)
		}
		if r.name == "big" {
			big = r.b
		} else {
			a.put(r.b)
		}
	}

	// A waiter that gives up: the one behind it is served.
	cctx, cancel := context.WithCancel(ctx)
	getAsync(cctx, "doomed", 512<<10)
	waitArena(t, a, ch, "doomed to queue", queuedN(1))
	getAsync(ctx, "patient", 4096)
	waitArena(t, a, ch, "patient to queue", queuedN(2))
	cancel()
	for range 2 {
		r := <-got
		switch {
		case r.name == "doomed" && !errors.Is(r.err, context.Canceled):
			t.Fatalf("cancelled waiter: %v", r.err)
		case r.name == "patient" && r.err != nil:
			t.Fatalf("waiter behind a cancelled one: %v", r.err)
		case r.name == "patient":
			a.put(r.b)
		}
	}
	a.put(quarter)
	a.put(big)
	if st := a.stats(); st.used != 0 || st.waits != 4 {
		t.Fatalf("used %d, waits %d; want 0 and 4", st.used, st.waits)
	}
}

// watch makes a report its changes on the returned channel (coalesced).
func watch(a *arena) <-chan struct{} {
	ch := make(chan struct{}, 1)
	f := func() {
		select {
		case ch <- struct{}{}:
		default:
		}
	}
	a.observe.Store(&f)
	return ch
}

// waitArena waits, for at most 10 s, until cond holds of a's state; ch
// comes from watch(a).
func waitArena(t *testing.T, a *arena, ch <-chan struct{}, what string, cond func(arenaStats) bool) {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for !cond(a.stats()) {
		select {
		case <-ch:
		case <-deadline:
			t.Fatalf("waiting for %s: arena %+v", what, a.stats())
		}
	}
}

func queuedN(n int) func(arenaStats) bool {
	return func(s arenaStats) bool { return s.queued >= n }
}
