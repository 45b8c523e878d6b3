package cache

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"

	"github.com/nbdcache/nbdcache/storage"
	"github.com/nbdcache/nbdcache/test/testseed"
)

// TestModel runs one seeded stream of operations, aligned and not, against
// the Cache in many configurations and against a plain byte slice: every
// read must return the same bytes. Trimmed sectors may read as zeroes or as
// their old data, so the model forgets them until they are written again.
func TestModel(t *testing.T) {
	seed := testseed.Get(t)
	type conf struct {
		mode   Mode
		block  int
		ram    int64
		cutoff int64
		bg     bool
	}
	var confs []conf
	for _, m := range []Mode{Writeback, Writethrough, Writearound, None} {
		for _, bs := range []int{512, 4096} {
			confs = append(confs, conf{m, bs, 0, -1, false}, conf{m, bs, 1 << 20, 64 << 10, bs == 4096})
		}
	}
	for i, cf := range confs {
		t.Run(fmt.Sprintf("%s-b%d-ram%d-cut%d-bg%v", cf.mode, cf.block, cf.ram, cf.cutoff, cf.bg), func(t *testing.T) {
			t.Parallel()
			r := rng(mix(seed, uint64(i), 7))
			const back = 2 << 20
			d := formatMem(t, 1<<20+256<<10, back, FormatOptions{BlockSize: cf.block, BucketSize: 32 << 10, JournalSize: 32 * metaBlock})
			c := openHooked(t, d, Options{Mode: cf.mode, RAMCache: cf.ram, SequentialCutoff: cf.cutoff}, testHooks{noBackground: !cf.bg})
			defer c.Close()
			model := make([]byte, back)
			unknown := make([]bool, back/sectorSize)
			check := func(off int64, got []byte) {
				t.Helper()
				for j := range got {
					s := (off + int64(j)) / sectorSize
					if unknown[s] {
						continue
					}
					if got[j] != model[off+int64(j)] {
						t.Fatalf("byte %d: got %d, want %d (stats %+v)", off+int64(j), got[j], model[off+int64(j)], c.Stats())
					}
				}
			}
			for op := 0; op < 3000; op++ {
				off := r.Int64N(back)
				n := 1 + r.Int64N(min(64<<10, back-off))
				if r.IntN(2) == 0 { // aligned
					off = off / sectorSize * sectorSize
					n = (n + sectorSize - 1) / sectorSize * sectorSize
					n = min(n, back-off)
				}
				switch k := r.IntN(20); {
				case k < 8:
					p := make([]byte, n)
					for j := range p {
						p[j] = byte(r.Uint32())
					}
					if err := c.WriteAt(p, off, storage.Flags(r.IntN(2))&storage.FUA); err != nil {
						t.Fatal(err)
					}
					copy(model[off:], p)
					for s := off / sectorSize; s < (off+n+sectorSize-1)/sectorSize; s++ {
						// A partial write over an unknown sector keeps
						// it unknown.
						if s*sectorSize >= off && (s+1)*sectorSize <= off+n {
							unknown[s] = false
						}
					}
				case k < 14:
					got := make([]byte, n)
					if err := c.ReadAt(got, off); err != nil {
						t.Fatal(err)
					}
					check(off, got)
				case k < 15:
					if err := c.Zero(off, n, 0); err != nil {
						t.Fatal(err)
					}
					clear(model[off : off+n])
					for s := (off + sectorSize - 1) / sectorSize; s < (off+n)/sectorSize; s++ {
						unknown[s] = false
					}
				case k < 16:
					if err := c.Trim(off, n, 0); err != nil {
						t.Fatal(err)
					}
					for s := (off + sectorSize - 1) / sectorSize; s < (off+n)/sectorSize; s++ {
						unknown[s] = true
					}
				case k < 17:
					if err := c.Flush(); err != nil {
						t.Fatal(err)
					}
				case k < 18:
					if !cf.bg {
						writebackStep(c, r.Int64N(back), 256<<10)
						c.GCStep(r.IntN(2) == 0)
					}
				default:
					got := make([]byte, n)
					if err := c.ReadAt(got, off); err != nil {
						t.Fatal(err)
					}
					check(off, got)
				}
			}
			// Drain: the backing alone must now equal the model.
			if err := c.SetMode(context.Background(), Writethrough); err != nil {
				t.Fatal(err)
			}
			if c.DirtyBytes() != 0 {
				t.Fatalf("%d dirty bytes after drain", c.DirtyBytes())
			}
			got := make([]byte, back)
			if err := d.back.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			check(0, got)
			closeChecked(t, c, d)
		})
	}
}

// TestConcurrent: writers own disjoint regions and check their own data,
// while readers, flushes, mode switches and the background writeback, GC
// and checkpoints run. Meant for -race.
func TestConcurrent(t *testing.T) {
	seed := testseed.Get(t)
	const back = 4 << 20
	d := formatMem(t, 1<<20+512<<10, back, FormatOptions{BucketSize: 32 << 10, JournalSize: 24 * metaBlock})
	c := openT(t, d, Options{RAMCache: 512 << 10, SequentialCutoff: 256 << 10, WritebackPercent: 20})
	const writers = 6
	region := int64(back / writers / sectorSize * sectorSize)
	var wg sync.WaitGroup
	errs := make(chan error, writers+4)
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rng(mix(seed, uint64(w), 1))
			base := int64(w) * region
			model := make([]byte, region)
			for op := 0; op < 600; op++ {
				off := r.Int64N(region/sectorSize) * sectorSize
				n := min(int64(1+r.IntN(32))*sectorSize, region-off)
				switch r.IntN(6) {
				case 0, 1, 2:
					p := make([]byte, n)
					for j := range p {
						p[j] = byte(r.Uint32())
					}
					if err := c.WriteAt(p, base+off, storage.Flags(r.IntN(2))&storage.FUA); err != nil {
						errs <- err
						return
					}
					copy(model[off:], p)
				case 3:
					if r.IntN(3) == 0 { // dirty data over more than a bucket: zeroed on the backing
						n = min(int64(64+r.IntN(128))*sectorSize, region-off)
						p := make([]byte, n)
						for j := range p {
							p[j] = byte(r.Uint32()) | 1
						}
						if err := c.WriteAt(p, base+off, 0); err != nil {
							errs <- err
							return
						}
					}
					if err := c.Zero(base+off, n, 0); err != nil {
						errs <- err
						return
					}
					clear(model[off : off+n])
				case 4:
					if err := c.Flush(); err != nil {
						errs <- err
						return
					}
				default:
					got := make([]byte, n)
					if err := c.ReadAt(got, base+off); err != nil {
						errs <- err
						return
					}
					if !bytes.Equal(got, model[off:off+n]) {
						errs <- fmt.Errorf("writer %d: read at %d differs", w, base+off)
						return
					}
				}
			}
		}()
	}
	stop := make(chan struct{})
	var bg sync.WaitGroup
	bg.Add(1)
	go func() {
		defer bg.Done()
		r := rng(seed ^ 99)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			switch i % 4 {
			case 0:
				m := []Mode{Writeback, Writethrough, Writearound, Writeback}[r.IntN(4)]
				if err := c.SetMode(context.Background(), m); err != nil {
					errs <- err
					return
				}
			case 1:
				c.GCStep(true)
			case 2:
				if err := c.Checkpoint(); err != nil {
					errs <- err
					return
				}
			default:
				got := make([]byte, 64<<10)
				if err := c.ReadAt(got, r.Int64N(back-64<<10)); err != nil {
					errs <- err
					return
				}
			}
		}
	}()
	wg.Wait()
	close(stop)
	bg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	t.Logf("%+v", c.Stats())
	closeChecked(t, c, d)
	var _ = rand.Int
}
