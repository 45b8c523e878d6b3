package cache

import (
	"context"
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/nbdcache/nbdcache/storage"
)

func benchDevs(b *testing.B, kind string, cacheSize, backSize int64) devPair {
	b.Helper()
	switch kind {
	case "mem":
		return devPair{storage.NewMem(cacheSize), storage.NewMem(backSize)}
	default: // "file", or "direct": the cache file with O_DIRECT
		dir := b.TempDir()
		cf, err := storage.OpenFile(filepath.Join(dir, "cache"), storage.FileOptions{Size: cacheSize, Direct: kind == "direct"})
		if err != nil {
			b.Fatal(err)
		}
		bf, err := storage.OpenFile(filepath.Join(dir, "back"), storage.FileOptions{Size: backSize})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { cf.Close(); bf.Close() })
		return devPair{cf, bf}
	}
}

func benchCache(b *testing.B, kind string, o Options, h ...testHooks) (*Cache, devPair) {
	d := benchDevs(b, kind, 256<<20, 1<<30)
	if err := Format(d.cache, d.back, FormatOptions{BackingID: testBackingID}); err != nil {
		b.Fatal(err)
	}
	o.BackingID = testBackingID
	var hooks testHooks
	if len(h) > 0 {
		hooks = h[0]
	}
	c, err := open(d.cache, d.back, o, hooks)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { c.Close() })
	return c, d
}

// BenchmarkRandWrite4K: 4 KiB random writes in writeback mode over a
// 64 MiB range (fits the cache), from one goroutine (qd1: every write
// pays its own journal publish) and from parallel ones (publishes are
// shared, and adjacent data writes merge: data-writes/op).
func BenchmarkRandWrite4K(b *testing.B) {
	for _, kind := range []string{"mem", "file", "direct"} {
		for _, par := range []bool{false, true} {
			name := kind + "/qd1"
			if par {
				name = kind + "/parallel"
			}
			b.Run(name, func(b *testing.B) {
				c, _ := benchCache(b, kind, Options{})
				b.SetBytes(4096)
				b.ReportAllocs()
				write := func(r *rand.Rand, p []byte) {
					if err := c.WriteAt(p, r.Int64N(64<<20/4096)*4096, 0); err != nil {
						b.Fatal(err)
					}
				}
				b.ResetTimer()
				if !par {
					r, p := rand.New(rand.NewPCG(rand.Uint64(), 1)), make([]byte, 4096)
					for range b.N {
						write(r, p)
					}
					return
				}
				b.SetParallelism(16)
				b.RunParallel(func(pb *testing.PB) {
					r, p := rand.New(rand.NewPCG(rand.Uint64(), 1)), make([]byte, 4096)
					for pb.Next() {
						write(r, p)
					}
				})
				b.ReportMetric(float64(c.Stats().DataWrites)/float64(b.N), "data-writes/op")
			})
		}
	}
}

// BenchmarkHotRead4K: 4 KiB random reads of a cached 32 MiB range, with
// and without the RAM tier.
func BenchmarkHotRead4K(b *testing.B) {
	for _, kind := range []string{"mem", "file"} {
		for _, ram := range []int64{0, 64 << 20} {
			name := kind
			if ram > 0 {
				name += "-ram"
			}
			b.Run(name, func(b *testing.B) {
				c, _ := benchCache(b, kind, Options{RAMCache: ram, SequentialCutoff: -1})
				p := make([]byte, 1<<20)
				for off := int64(0); off < 32<<20; off += int64(len(p)) {
					if err := c.WriteAt(p, off, 0); err != nil {
						b.Fatal(err)
					}
				}
				b.SetBytes(4096)
				b.ReportAllocs()
				b.ResetTimer()
				b.RunParallel(func(pb *testing.PB) {
					r := rand.New(rand.NewPCG(rand.Uint64(), 2))
					p := make([]byte, 4096)
					for pb.Next() {
						if err := c.ReadAt(p, r.Int64N(32<<20/4096)*4096); err != nil {
							b.Fatal(err)
						}
					}
				})
				if st := c.Stats(); st.Misses > 0 {
					b.Fatalf("hot reads missed: %+v", st)
				}
			})
		}
	}
}

// BenchmarkFlush: one 4 KiB write then FLUSH, on files, with the chosen
// ordering (one sync per commit, data checksummed) and with the
// alternative (sync data, then write the journal and sync again).
func BenchmarkFlush(b *testing.B) {
	for _, two := range []bool{false, true} {
		name := "one-sync-crc"
		if two {
			name = "two-syncs"
		}
		b.Run(name, func(b *testing.B) {
			c, _ := benchCache(b, "file", Options{}, testHooks{twoSyncs: two})
			p := make([]byte, 4096)
			r := rand.New(rand.NewPCG(1, 2))
			b.ResetTimer()
			for range b.N {
				if err := c.WriteAt(p, r.Int64N(64<<20/4096)*4096, 0); err != nil {
					b.Fatal(err)
				}
				if err := c.Flush(); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkPressure: 4 KiB random writes from 16 goroutines over a working
// set of ratio × the cache's capacity (a 32 MiB cache on memory devices,
// background work on), after a warm-up that fills the cache. It reports
// GC write amplification (bytes GC moved per byte written), the bypass
// share and the evicted share: the figures issue 18's goals bound.
func BenchmarkPressure(b *testing.B) {
	for _, ratio := range []float64{0.25, 0.5, 1, 2, 4, 8} {
		b.Run(fmt.Sprintf("ratio=%g", ratio), func(b *testing.B) {
			const cacheSize = 32 << 20
			span := int64(ratio*cacheSize) / 4096 * 4096
			d := benchDevs(b, "mem", cacheSize, max(span, 1<<20))
			if err := Format(d.cache, d.back, FormatOptions{BackingID: testBackingID, BucketSize: 256 << 10}); err != nil {
				b.Fatal(err)
			}
			c, err := Open(d.cache, d.back, Options{BackingID: testBackingID})
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { c.Close() })
			write := func(r *rand.Rand, p []byte) {
				if err := c.WriteAt(p, r.Int64N(span/4096)*4096, 0); err != nil {
					b.Fatal(err)
				}
			}
			r, p := rand.New(rand.NewPCG(1, 1)), make([]byte, 4096)
			for range 2 * cacheSize / 4096 { // warm up: fill the cache
				write(r, p)
			}
			before := c.Stats()
			b.SetBytes(4096)
			b.SetParallelism(8)
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				r, p := rand.New(rand.NewPCG(rand.Uint64(), 1)), make([]byte, 4096)
				for pb.Next() {
					write(r, p)
				}
			})
			b.StopTimer()
			s := c.Stats()
			written := float64(s.WriteBytes - before.WriteBytes)
			b.ReportMetric(float64(s.GCMovedBytes-before.GCMovedBytes)/written, "gc-wa")
			b.ReportMetric(float64(s.Bypasses-before.Bypasses)/float64(s.Writes-before.Writes), "bypass-share")
			b.ReportMetric(float64(s.EvictedBytes-before.EvictedBytes)/written, "evicted/written")
		})
	}
}

// BenchmarkDrain: the drain of issue 22's burst, on files: 8000 random
// 4 KiB writes over 128 MiB (16 writers) into a 256 MiB cache, then
// Drain. It reports ns per dirty extent written back, and the backing
// writes and writeback batches the drain took.
func BenchmarkDrain(b *testing.B) {
	const writes, span = 8000, 128 << 20
	var backWrites, batches, switches, cpu int64
	var ru0, ru1 syscall.Rusage
	for i := range b.N {
		b.StopTimer()
		c, _ := benchCache(b, "file", Options{})
		r := rand.New(rand.NewPCG(uint64(i), 3))
		p := make([]byte, 4096)
		for range writes {
			if err := c.WriteAt(p, r.Int64N(span/4096)*4096, 0); err != nil {
				b.Fatal(err)
			}
		}
		w0 := c.WritebackStats()
		syscall.Getrusage(syscall.RUSAGE_SELF, &ru0)
		b.StartTimer()
		if err := c.Drain(context.Background(), nil); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		syscall.Getrusage(syscall.RUSAGE_SELF, &ru1)
		switches += ru1.Nvcsw + ru1.Nivcsw - ru0.Nvcsw - ru0.Nivcsw
		cpu += ru1.Utime.Nano() + ru1.Stime.Nano() - ru0.Utime.Nano() - ru0.Stime.Nano()
		w1 := c.WritebackStats()
		backWrites += w1.Writes - w0.Writes
		batches += w1.Batches - w0.Batches
		if d := c.Stats().DirtyBytes; d != 0 {
			b.Fatalf("%d bytes dirty after the drain", d)
		}
		c.Close()
		b.StartTimer()
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*writes), "ns/extent")
	b.ReportMetric(float64(backWrites)/float64(b.N), "backing-writes/drain")
	b.ReportMetric(float64(batches)/float64(b.N), "batches/drain")
	b.ReportMetric(float64(switches)/float64(b.N*writes), "ctxsw/extent")
	b.ReportMetric(float64(cpu)/float64(b.N*writes), "cpu-ns/extent")
}

// BenchmarkThrashBypass: what a thrashing cache adds to a write it sends
// around itself, the shape of bench/parallel.sh (16 KiB random writes,
// batches of 2 or 8 as from one socket read, 4 goroutines as connections)
// over a span of 4 times a 16 MiB cache, on memory devices so that the
// devices' own cost is small. "alone" is the same batches written to the
// backing device straight; the backing takes writes without copying them
// (discardWrites), so the time per write is the bypass path's overhead
// (issue 18's parallel goal: no slower than no cache).
func BenchmarkThrashBypass(b *testing.B) {
	const cacheSize, span, size = 16 << 20, 64 << 20, 16 << 10
	for _, bench := range []struct {
		kind  string
		batch int
	}{{"alone", 8}, {"cache", 2}, {"cache", 8}} {
		kind, batch := bench.kind, bench.batch
		b.Run(fmt.Sprintf("%s/batch=%d", kind, batch), func(b *testing.B) {
			back := discardWrites{storage.NewMem(span)}
			write := func(ws []BatchWrite) { // as storage.File.WriteBatch: one by one
				for i := range ws {
					ws[i].Err = back.WriteAt(ws[i].P, ws[i].Off, 0)
				}
			}
			var c *Cache
			if kind == "cache" {
				d := devPair{storage.NewMem(cacheSize + 2<<20), back}
				if err := Format(d.cache, d.back, FormatOptions{BackingID: testBackingID}); err != nil {
					b.Fatal(err)
				}
				var err error
				if c, err = Open(d.cache, d.back, Options{BackingID: testBackingID}); err != nil {
					b.Fatal(err)
				}
				b.Cleanup(func() { c.Close() })
				c.mu.Lock()
				t := &c.mu.admit.thrash
				t.on, t.probe = true, maxProbeWindows
				t.ghost.reset(int(c.CapacityBytes() / 4096))
				c.mu.Unlock()
				write = c.WriteBatch
			}
			b.SetBytes(size)
			b.ReportAllocs()
			b.SetParallelism(2) // 4 goroutines on 2 cores
			b.ResetTimer()
			b.RunParallel(func(pb *testing.PB) {
				r := rand.New(rand.NewPCG(rand.Uint64(), 1))
				ws := make([]BatchWrite, batch)
				for i := range ws {
					ws[i].P = make([]byte, size)
				}
				for pb.Next() { // a batch is batch ops' worth: b.N counts writes
					for i := range ws {
						ws[i].Off, ws[i].Err = r.Int64N(span/size)*size, nil
					}
					write(ws)
					for i := range ws {
						if ws[i].Err != nil {
							b.Error(ws[i].Err)
							return
						}
					}
					for range batch - 1 {
						if !pb.Next() {
							return
						}
					}
				}
			})
			b.StopTimer()
			if c != nil {
				st := c.Stats()
				b.ReportMetric(float64(st.Bypasses)/float64(max(st.Writes, 1)), "bypass-share")
			}
		})
	}
}

// discardWrites is a Mem whose writes are checked and dropped: a backing
// that costs nothing to write.
type discardWrites struct{ *storage.Mem }

func (d discardWrites) WriteAt(p []byte, off int64, _ storage.Flags) error {
	return storage.CheckRange(d.Size(), off, int64(len(p)))
}
