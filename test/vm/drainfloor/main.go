// Command drainfloor is a guest tool of the VM benchmarks (issue 22): the
// least a user-space write-back cache must do to drain the burst of
// bench/kernel-caches.sh, with nothing else. Its drain time is the floor
// that nbdcache's drain is measured against.
//
//	drainfloor fill  -cache /dev/vda -span MiB -ios N -seed S
//	drainfloor drain -cache /dev/vda -backing /dev/vdb -span MiB -ios N -seed S
//	drainfloor verify -backing /dev/vdb -span MiB -ios N -seed S
//
// fill writes the burst into the cache device as a log-structured cache
// lays it out: ios random 4 KiB blocks over the first span MiB (uniform,
// with repeats, as fio's norandommap draws them), the i-th write at
// 4 KiB x i, through the page cache, then one fsync. drain draws the same
// blocks again from the seed and writes back the last version of each
// block: blocks in address order, one pwrite a run of adjacent blocks,
// each block read from its place in the log with one pread, with as many
// writes in flight as nbdcache's flusher allows (8), then one fsync of
// the backing. No index, no checksums, no journal: only the system calls
// every user-space drain of this burst makes. A second drain finds a
// marker file and does nothing (the tool's own start, as nbdcache's
// "drain again" row).
//
// Between fill and drain the caller must hold the cache device open, as
// a cache's own process would (kcache.sh does): Linux drops a block
// device's page cache at its last close, and the drain would then read
// every block from the disk instead of from memory.
package main

import (
	"bytes"
	"flag"
	"fmt"
	"maps"
	"math/rand/v2"
	"os"
	"runtime"
	"slices"
	"sync"

	"golang.org/x/sys/unix"

	"github.com/nbdcache/nbdcache/storage"
)

const block = 4096

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: drainfloor fill|drain|verify [flags]")
		os.Exit(2)
	}
	fs := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	cache := fs.String("cache", "/dev/vda", "the cache device")
	backing := fs.String("backing", "/dev/vdb", "the backing device")
	span := fs.Int64("span", 128, "MiB the burst's writes fall over")
	ios := fs.Int("ios", 8000, "writes in the burst")
	seed := fs.Uint64("seed", 1, "the burst's seed")
	jobs := fs.Int("jobs", 8, "writes in flight in the drain")
	direct := fs.Bool("direct", false, "write the backing with O_DIRECT")
	uring := fs.Uint("uring", 0, "read and write through io_uring, this many in flight (0: pread and pwrite)")
	marker := fs.String("marker", "/tmp/drainfloor.done", "written after a drain; a drain that finds it does nothing")
	fs.Parse(os.Args[2:])
	blocks := burst(*span<<20/block, *ios, *seed)
	var err error
	switch os.Args[1] {
	case "fill":
		err = fill(*cache, blocks)
	case "verify":
		err = verify(*backing, blocks)
	case "drain":
		if _, e := os.Stat(*marker); e == nil {
			return
		}
		if err = drain(*cache, *backing, blocks, *jobs, *direct, uint32(*uring)); err == nil {
			err = os.WriteFile(*marker, nil, 0o644)
		}
	default:
		err = fmt.Errorf("unknown mode %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "drainfloor:", err)
		os.Exit(1)
	}
}

// burst draws the block of each write.
func burst(nblocks int64, ios int, seed uint64) []int64 {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	b := make([]int64, ios)
	for i := range b {
		b[i] = r.Int64N(nblocks)
	}
	return b
}

func fill(cache string, blocks []int64) error {
	f, err := os.OpenFile(cache, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	buf := make([]byte, block)
	for i, b := range blocks {
		version(buf, b, i)
		if _, err := f.WriteAt(buf, int64(i)*block); err != nil {
			return err
		}
	}
	return f.Sync()
}

// version fills buf with the i-th write's bytes, of block b. Each version
// of a block differs: a drain that wrote an older one leaves other bytes.
func version(buf []byte, b int64, i int) {
	for j := range buf {
		buf[j] = byte(b) + byte(i) + byte(i>>8) + byte(j)
	}
}

// verify checks that the backing holds the last version of every block
// written.
func verify(backing string, blocks []int64) error {
	f, err := os.Open(backing)
	if err != nil {
		return err
	}
	defer f.Close()
	want, got := make([]byte, block), make([]byte, block)
	for b, i := range lastWrites(blocks) {
		version(want, b, i)
		if _, err := f.ReadAt(got, b*block); err != nil {
			return err
		}
		if !bytes.Equal(got, want) {
			return fmt.Errorf("block %d does not hold its last version (write %d)", b, i)
		}
	}
	return nil
}

// lastWrites maps each block written to the index of its last write.
func lastWrites(blocks []int64) map[int64]int {
	last := make(map[int64]int, len(blocks))
	for i, b := range blocks {
		last[b] = i
	}
	return last
}

// run is a run of adjacent blocks on the backing, and where each block's
// last version lies in the log.
type run struct {
	first int64
	logAt []int64
}

func drain(cache, backing string, blocks []int64, jobs int, direct bool, uring uint32) error {
	last := lastWrites(blocks) // the i-th write lies at 4 KiB x i in the log
	keys := slices.Sorted(maps.Keys(last))
	var runs []run
	for _, b := range keys {
		at := int64(last[b]) * block
		if n := len(runs); n > 0 && runs[n-1].first+int64(len(runs[n-1].logAt)) == b {
			runs[n-1].logAt = append(runs[n-1].logAt, at)
			continue
		}
		runs = append(runs, run{first: b, logAt: []int64{at}})
	}
	c, err := os.Open(cache)
	if err != nil {
		return err
	}
	defer c.Close()
	flags := os.O_WRONLY
	if direct {
		flags |= unix.O_DIRECT
	}
	w, err := os.OpenFile(backing, flags, 0)
	if err != nil {
		return err
	}
	defer w.Close()
	if uring > 0 {
		if err := drainRing(runs, int(c.Fd()), int(w.Fd()), uring); err != nil {
			return err
		}
		return w.Sync()
	}
	work := make(chan run)
	errs := make(chan error, jobs)
	var wg sync.WaitGroup
	for range jobs {
		wg.Go(func() {
			var buf []byte
			for r := range work {
				need := len(r.logAt) * block
				if cap(buf) < need {
					buf = storage.AlignedBuf(need)
				}
				buf = buf[:need]
				for i, at := range r.logAt {
					if n, err := unix.Pread(int(c.Fd()), buf[i*block:(i+1)*block], at); err != nil || n != block {
						errs <- fmt.Errorf("read %d bytes of %d at %d: %v", n, block, at, err)
						return
					}
				}
				if n, err := unix.Pwrite(int(w.Fd()), buf, r.first*block); err != nil || n != len(buf) {
					errs <- fmt.Errorf("wrote %d bytes of %d at %d: %v", n, len(buf), r.first*block, err)
					return
				}
			}
		})
	}
	for _, r := range runs {
		select {
		case work <- r:
		case err := <-errs:
			close(work)
			wg.Wait()
			return err
		}
	}
	close(work)
	wg.Wait()
	select {
	case err := <-errs:
		return err
	default:
	}
	return w.Sync()
}

// drainRing drains runs through io_uring, a window of at most 16 MiB (or
// one longer run) at a time: every block of the window read, then every
// run written. A full ring waits for all it holds before taking more, so
// depth is a batch, not a steady depth.
func drainRing(runs []run, cache, backing int, depth uint32) error {
	runtime.LockOSThread() // one thread enters the ring
	defer runtime.UnlockOSThread()
	r, err := newRing(depth)
	if err != nil {
		return err
	}
	defer r.close()
	window := 16 << 20
	for _, rn := range runs {
		window = max(window, len(rn.logAt)*block)
	}
	arena := storage.AlignedBuf(window)
	for len(runs) > 0 {
		k, bytes := 0, 0
		for k < len(runs) && (k == 0 || bytes+len(runs[k].logAt)*block <= window) {
			bytes += len(runs[k].logAt) * block
			k++
		}
		at := 0
		for _, rn := range runs[:k] {
			for _, l := range rn.logAt {
				if err := r.queue(opRead, cache, arena[at:at+block], l); err != nil {
					return err
				}
				at += block
			}
		}
		if err := r.wait(); err != nil {
			return err
		}
		at = 0
		for _, rn := range runs[:k] {
			n := len(rn.logAt) * block
			if err := r.queue(opWrite, backing, arena[at:at+n], rn.first*block); err != nil {
				return err
			}
			at += n
		}
		if err := r.wait(); err != nil {
			return err
		}
		runs = runs[k:]
	}
	return nil
}
