package cache

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nbdcache/nbdcache/storage"
	"github.com/nbdcache/nbdcache/test/testseed"
	"github.com/nbdcache/nbdcache/writeback"
)

// The randomized power-cut test. A seeded single-goroutine workload of
// writes, overwrites, FUA writes, flushes, trims, zeroes, reads, writeback
// steps, GC passes, checkpoints and mode switches runs against a Cache on
// two storage.Crash devices (cache and backing). At a random storage
// operation (counted across both devices) the power fails on both at one
// instant (storage.PowerCutAll); the surviving images are checked offline
// (Check), reopened, and every sector is compared with the oracle:
//
//   - a sector whose write was made durable (a completed Flush after it,
//     or FUA) holds that write or a later one;
//   - any other sector holds the data of some write it really received
//     (or zeroes after a trim or zero, or its initial zeroes). A trim, as
//     in bcache, drops dirty data too, so after one the sector may hold
//     zeroes or any value it ever had.
//
// Sectors are self-describing (LBA + write id + pattern), so garbage and
// misplaced data are caught too.

// pend is one value a sector was given since its last flush.
type pend struct {
	id   uint64
	trim bool // a trim: zeroes, or any value the sector ever had
}

// oracle tracks, per sector, what may be read back.
type oracle struct {
	durable [][]uint64 // allowed after a crash, from flushed history
	pending [][]pend   // since the last flush, in order
	cur     [][]uint64 // allowed now (live reads)
	ever    [][]uint64 // every value a sector was given, its initial 0 first
	// ackDurable: the crash is a process kill (KeepUnsynced), which
	// loses no acknowledged write, so every acknowledgement is durable.
	ackDurable bool
}

func newOracle(sectors int64) *oracle {
	o := &oracle{durable: make([][]uint64, sectors), pending: make([][]pend, sectors), cur: make([][]uint64, sectors), ever: make([][]uint64, sectors)}
	for i := range o.durable {
		o.durable[i] = []uint64{0}
		o.cur[i] = []uint64{0}
		o.ever[i] = []uint64{0}
	}
	return o
}

// apply is set after p: a write's value, or after a trim the values set
// allowed and every value the sector ever had (ever holds 0).
func apply(set []uint64, p pend, ever []uint64) []uint64 {
	if !p.trim {
		return []uint64{p.id}
	}
	out := append([]uint64(nil), set...)
	for _, v := range ever {
		if !contains(out, v) {
			out = append(out, v)
		}
	}
	return out
}

// begin records that an operation is issued (it may be half done by a cut).
func (o *oracle) begin(off, n int64, p pend) {
	for s := off / sectorSize; s < (off+n)/sectorSize; s++ {
		o.pending[s] = append(o.pending[s], p)
		if !p.trim && !contains(o.ever[s], p.id) {
			o.ever[s] = append(o.ever[s], p.id)
		}
	}
}

// done records that it was acknowledged.
func (o *oracle) done(off, n int64, p pend, fua bool) {
	fua = fua || o.ackDurable
	for s := off / sectorSize; s < (off+n)/sectorSize; s++ {
		o.cur[s] = apply(o.cur[s], p, o.ever[s])
		if fua {
			o.durable[s] = apply(o.durable[s], p, o.ever[s])
			if !p.trim {
				// What was issued before p is superseded; what was
				// issued after it (a batch begins all its writes
				// first) is still pending.
				o.pending[s] = pendingAfter(o.pending[s], p)
			}
		}
	}
}

// pendingAfter is what ps holds after p (p not trim), or nil.
func pendingAfter(ps []pend, p pend) []pend {
	for i, q := range ps {
		if !q.trim && q.id == p.id {
			return ps[i+1:]
		}
	}
	return nil
}

func (o *oracle) flushed() {
	for s := range o.pending {
		for _, p := range o.pending[s] {
			o.durable[s] = apply(o.durable[s], p, o.ever[s])
		}
		o.pending[s] = nil
	}
}

func (o *oracle) allowedAfterCrash(s int64) []uint64 {
	a := append([]uint64(nil), o.durable[s]...)
	for _, p := range o.pending[s] {
		if p.trim {
			a = append(a, o.ever[s]...)
		} else {
			a = append(a, p.id)
		}
	}
	return a
}

func contains(a []uint64, v uint64) bool {
	for _, x := range a {
		if x == v {
			return true
		}
	}
	return false
}

// pcConfig is one randomized configuration.
type pcConfig struct {
	fo    FormatOptions
	opts  Options
	cache int64
	back  int64
	ops   int
}

func randomConfig(r *rand.Rand) pcConfig {
	bucket := int64(16 << 10 << r.IntN(2))
	nb := int64(12 + r.IntN(20))
	cfg := pcConfig{
		fo:   FormatOptions{BlockSize: []int{512, 4096}[r.IntN(2)], BucketSize: bucket, JournalSize: int64(16+r.IntN(32)) * metaBlock},
		back: 1 << 20,
		ops:  100 + r.IntN(250),
	}
	if r.IntN(3) == 0 {
		// A ring of 96 to 159 blocks: batch runs (batchWrites) of 3 to
		// 4 writes; the smaller rings allow runs of one, or none.
		cfg.fo.JournalSize = int64(96+r.IntN(64)) * metaBlock
	}
	// Room for the metadata (checkpoints are sized by the data area).
	cfg.cache = nb*bucket + 2*metaBlock + cfg.fo.JournalSize + 2*alignUp(ckptHdrSize+align8(nb)+(2*nb*bucket/int64(cfg.fo.BlockSize)+64)*ckptExtSize, metaBlock)
	cfg.opts = Options{
		Mode:       []Mode{Writeback, Writeback, Writeback, Writethrough, Writearound, None}[r.IntN(6)],
		PromoteAll: r.IntN(2) == 0,
	}
	if r.IntN(3) == 0 {
		cfg.opts.SequentialCutoff = 32 << 10
	} else {
		cfg.opts.SequentialCutoff = -1
	}
	if r.IntN(3) == 0 {
		cfg.opts.RAMCache = 256 << 10
	}
	return cfg
}

// pcResult is the outcome of one cut.
type pcResult struct {
	violations []string
	cutAt      int64
	reachedCut bool
	storageOps int64
	opsDone    int
	report     [2]storage.CutReport
}

// pcExtra is what runs beside the seeded workload.
type pcExtra int

const (
	pcAlone        pcExtra = iota // nothing: exactly replayable
	pcBackground                  // the background writeback and GC goroutines
	pcCheckpointer                // a goroutine writing checkpoints back to back
	pcParallel                    // some writes issued in bursts of adjacent ranges at once
	pcThrash                      // the background, and the cache always thrashing (alwaysThrash)
)

// runCut runs one seeded workload, cuts the power at a random storage
// operation under model, recovers and checks.
func runCut(seed uint64, model storage.LossModel, brk breakMode, extra pcExtra) pcResult {
	r := rng(seed)
	cfg := randomConfig(r)
	var res pcResult
	fail := func(format string, a ...any) {
		if len(res.violations) < 8 {
			res.violations = append(res.violations, fmt.Sprintf(format, a...))
		}
	}
	cdev, bdev := storage.NewCrash(cfg.cache), storage.NewCrash(cfg.back)
	cfg.fo.BackingID = testBackingID
	if err := Format(cdev, bdev, cfg.fo); err != nil {
		fail("format: %v", err)
		return res
	}
	cutRng := rng(seed ^ 0xc07)
	res.cutAt = int64(r.IntN(cfg.ops * 2))
	var (
		count   atomic.Int64
		once    sync.Once
		newC    *storage.Crash
		newB    *storage.Crash
		cutDone atomic.Bool
	)
	// Both devices lose power at one instant (PowerCutAll): no operation
	// on the backing completes between the cut of the cache and its own.
	// The loss draws are made cache first, then backing, as two PowerCut
	// calls in that order made them, so a seed replays as before.
	cut := func() {
		once.Do(func() {
			devs, reps := storage.PowerCutAll(model, cutRng, cdev, bdev)
			newC, newB = devs[0], devs[1]
			res.report = [2]storage.CutReport(reps)
			cutDone.Store(true)
		})
	}
	hook := func(storage.Op) {
		if count.Add(1)-1 == res.cutAt {
			cut()
		}
	}
	cdev.SetHook(hook)
	bdev.SetHook(hook)

	o := newOracle(cfg.back / sectorSize)
	o.ackDurable = model == storage.KeepUnsynced
	opts := cfg.opts
	bg := extra == pcBackground || extra == pcThrash
	h := testHooks{brk: brk, noBackground: !bg, alwaysThrash: extra == pcThrash}
	if bg {
		opts.Writeback = writeback.Config{TargetPercent: 1, LowWatermark: -1, IdleAfter: time.Millisecond,
			UpdateInterval: 5 * time.Millisecond, BatchTime: 5 * time.Millisecond, RetryMin: time.Millisecond, RetryMax: 5 * time.Millisecond}
	}
	opts.BackingID = testBackingID
	c, err := open(cdev, bdev, opts, h)
	if err == nil {
		var ckDone sync.WaitGroup
		stop := make(chan struct{})
		if extra == pcCheckpointer {
			// Checkpoints run while the workload writes, flushes and
			// commits: the cut lands inside them often.
			ckDone.Go(func() {
				for {
					select {
					case <-stop:
						return
					default:
					}
					if err := c.Checkpoint(); err != nil {
						if !errors.Is(err, storage.ErrPoweredOff) && !errors.Is(err, ErrFailed) {
							fail("checkpointer: %v", err)
						}
						return
					}
				}
			})
		}
		workload(c, r, cfg, o, &res, fail, extra == pcParallel)
		close(stop)
		ckDone.Wait()
		c.Close() // after a cut it fails, but stops the RAM tier
	} else if !errors.Is(err, storage.ErrPoweredOff) {
		fail("open: %v", err)
	}
	res.reachedCut = cutDone.Load()
	res.storageOps = count.Load()
	cut()

	// Recovery: offline check, then open and read every sector.
	if rep, err := Check(newC, newB); err != nil {
		fail("check after cut: %v (%+v)", err, rep)
	}
	c2, err := open(newC, newB, opts, h)
	if err != nil {
		fail("reopen: %v", err)
		return res
	}
	defer c2.Close()
	// The recovered cache's invariants, clean extents equal to the
	// backing included; unless the cut put a garbage sector on the
	// backing, which may lie under a clean extent (a gap-fill torn: the
	// known limit in doc.go).
	deep := !res.report[1].Garbage
	if deep {
		if err := c2.Verify(); err != nil {
			fail("verify after recovery: %v", err)
		}
	}
	buf := make([]byte, 64<<10)
	for off := int64(0); off < cfg.back; off += int64(len(buf)) {
		if err := c2.ReadAt(buf, off); err != nil {
			fail("read after recovery at %d: %v", off, err)
			return res
		}
		for i := int64(0); i < int64(len(buf)); i += sectorSize {
			s := (off + i) / sectorSize
			id, err := sectorID(buf[i:i+sectorSize], s)
			if err != nil {
				// The backing itself tore a sector that a write
				// passed through to it (writearound, none, cutoff):
				// what a raw disk does; the cache cannot prevent it.
				if rep := res.report[1]; rep.Garbage && rep.GarbageOff/sectorSize == s && len(o.pending[s]) > 0 {
					continue
				}
				fail("%v", err)
				continue
			}
			if a := o.allowedAfterCrash(s); !contains(a, id) {
				fail("sector %d holds write %d; allowed %v (durable %v)", s, id, a, o.durable[s])
			}
		}
	}
	if err := c2.Close(); err != nil {
		fail("close after recovery: %v", err)
	}
	check := Check
	if deep {
		check = CheckDeep
	}
	if rep, err := check(newC, newB); err != nil {
		fail("check after reopen: %v (%+v)", err, rep)
	}
	return res
}

// workload runs cfg.ops random operations, stopping at the first error
// (the power cut).
func workload(c *Cache, r *rand.Rand, cfg pcConfig, o *oracle, res *pcResult, fail func(string, ...any), par bool) {
	sectors := cfg.back / sectorSize
	var id uint64
	var seqNext int64 = -1
	var wbCursor int64
	randRange := func(maxSectors int64) (int64, int64) {
		s := r.Int64N(sectors)
		n := 1 + r.Int64N(maxSectors)
		n = min(n, sectors-s)
		return s * sectorSize, n * sectorSize
	}
	for i := 0; i < cfg.ops; i++ {
		res.opsDone = i
		var err error
		switch k := r.IntN(100); {
		case k < 40 && par && r.IntN(3) == 0:
			err = parallelWrites(c, r, cfg, o, &id)
		case k < 40 && r.IntN(4) == 0:
			err = batchWrites(c, r, cfg, o, &id)
		case k < 40: // write, sometimes sequential, sometimes FUA
			off, n := randRange(48)
			if seqNext >= 0 && r.IntN(2) == 0 && seqNext+n <= cfg.back {
				off = seqNext
			}
			seqNext = off + n
			id++
			fua := r.IntN(8) == 0
			p := pend{id: id}
			o.begin(off, n, p)
			var fl storage.Flags
			if fua {
				fl = storage.FUA
			}
			if err = c.WriteAt(payload(off, n, id), off, fl); err == nil {
				o.done(off, n, p, fua)
			}
		case k < 50:
			if err = c.Flush(); err == nil {
				o.flushed()
			}
		case k < 56: // trim
			off, n := randRange(64)
			p := pend{trim: true}
			o.begin(off, n, p)
			if err = c.Trim(off, n, 0); err == nil {
				o.done(off, n, p, false)
			}
		case k < 62: // zero, sometimes over more than a bucket
			off, n := randRange([]int64{64, 64, 256}[r.IntN(3)])
			p := pend{}
			o.begin(off, n, p)
			fua := r.IntN(4) == 0
			var fl storage.Flags
			if fua {
				fl = storage.FUA
			}
			if err = c.Zero(off, n, fl); err == nil {
				o.done(off, n, p, fua)
			}
		case k < 78: // read and compare with the live model
			off, n := randRange(64)
			buf := make([]byte, n)
			if err = c.ReadAt(buf, off); err == nil {
				for j := int64(0); j < n; j += sectorSize {
					s := (off + j) / sectorSize
					got, e := sectorID(buf[j:j+sectorSize], s)
					if e != nil {
						fail("live read: %v", e)
					} else if !contains(o.cur[s], got) {
						fail("live read: sector %d holds write %d, want one of %v", s, got, o.cur[s])
					}
				}
			}
		case k < 88:
			wbCursor, _, err = writebackStep(c, wbCursor, int64(1+r.IntN(64))<<10)
		case k < 93:
			c.GCStep(r.IntN(2) == 0)
		case k < 96:
			err = c.Checkpoint()
		case k < 98:
			m := []Mode{Writeback, Writeback, Writethrough, Writearound, None}[r.IntN(5)]
			err = c.SetMode(context.Background(), m)
		default:
			off, n := randRange(64)
			err = c.Prefetch(off, n)
		}
		if err != nil {
			if !errors.Is(err, storage.ErrPoweredOff) && !errors.Is(err, ErrFailed) {
				fail("op %d: %v", i, err)
			}
			return
		}
	}
}

// parallelWrites issues 2-8 writes of adjacent ranges at once, some with
// FUA, as the NBD server's workers do, so that their data writes merge
// (groupWriter).
func parallelWrites(c *Cache, r *rand.Rand, cfg pcConfig, o *oracle, id *uint64) error {
	type write struct {
		off, n int64
		p      pend
		fua    bool
		err    error
	}
	ws := make([]write, 0, 8)
	pos := r.Int64N(cfg.back/sectorSize) * sectorSize
	for range 2 + r.IntN(7) {
		n := (1 + r.Int64N(16)) * sectorSize
		if pos+n > cfg.back {
			break
		}
		*id++
		w := write{off: pos, n: n, p: pend{id: *id}, fua: r.IntN(8) == 0}
		o.begin(w.off, w.n, w.p)
		ws = append(ws, w)
		pos += n
	}
	var wg sync.WaitGroup
	for i := range ws {
		wg.Go(func() {
			w := &ws[i]
			var fl storage.Flags
			if w.fua {
				fl = storage.FUA
			}
			w.err = c.WriteAt(payload(w.off, w.n, w.p.id), w.off, fl)
		})
	}
	wg.Wait()
	var err error
	for _, w := range ws {
		if w.err == nil {
			o.done(w.off, w.n, w.p, w.fua)
		} else if err == nil {
			err = w.err
		}
	}
	return err
}

// batchWrites writes 2 to 8 writes with one WriteBatch, as a server does
// with the writes of one socket read: some overlap (the later wins), some
// are FUA, some longer than a bucket (they go the single way, in order).
func batchWrites(c *Cache, r *rand.Rand, cfg pcConfig, o *oracle, id *uint64) error {
	type write struct {
		off, n int64
		p      pend
		fua    bool
	}
	var ws []write
	var bws []BatchWrite
	base := r.Int64N(cfg.back/sectorSize) * sectorSize
	for range 2 + r.IntN(7) {
		off := min(base+r.Int64N(32)*sectorSize, cfg.back-sectorSize)
		n := min((1+r.Int64N(24))*sectorSize, cfg.back-off)
		if r.IntN(8) == 0 { // sometimes longer than a bucket: the single way
			n = min((1+r.Int64N(96))*sectorSize, cfg.back-off)
		}
		*id++
		w := write{off: off, n: n, p: pend{id: *id}, fua: r.IntN(8) == 0}
		o.begin(w.off, w.n, w.p)
		ws = append(ws, w)
		var fl storage.Flags
		if w.fua {
			fl = storage.FUA
		}
		bws = append(bws, BatchWrite{P: payload(w.off, w.n, w.p.id), Off: w.off, Flags: fl})
	}
	c.WriteBatch(bws)
	var err error
	for i, w := range ws {
		if bws[i].Err == nil {
			o.done(w.off, w.n, w.p, w.fua)
		} else if err == nil {
			err = bws[i].Err
		}
	}
	return err
}

func TestPowerCut(t *testing.T) {
	cuts := *flagCuts
	if cuts <= 0 {
		cuts = 1200
		if testing.Short() {
			cuts = 200
		}
	}
	master := testseed.Get(t)
	models := []storage.LossModel{storage.LoseUnsynced, storage.LoseRandom, storage.LoseTorn, storage.KeepUnsynced}
	for mi, model := range models {
		t.Run(model.String(), func(t *testing.T) {
			t.Parallel()
			n := (cuts + len(models) - 1) / len(models)
			if cuts == 1 {
				n = 1
			}
			reached, ops := 0, int64(0)
			for i := range n {
				seed := master
				if i > 0 {
					seed = mix(master, uint64(mi), uint64(i))
				}
				res := runCut(seed, model, breakNone, pcAlone)
				if res.reachedCut {
					reached++
				} else {
					ops += res.storageOps
				}
				if len(res.violations) > 0 {
					t.Fatalf("cut %d at op %d (seed %d; replay: go test ./cache -run 'TestPowerCut/%s$' -seed %d -cuts 1):\n%s\ncut reports: %+v",
						i, res.cutAt, seed, model, seed, strings.Join(res.violations, "\n"), res.report)
				}
			}
			t.Logf("%d cuts, %d inside the workload, 0 violations (%d storage ops in %d uncut runs)", n, reached, ops, n-reached)
		})
	}
}

func mix(a, b, c uint64) uint64 {
	x := a ^ b*0x9e3779b97f4a7c15 ^ c*0xbf58476d1ce4e5b9
	x ^= x >> 31
	x *= 0x94d049bb133111eb
	x ^= x >> 29
	return x | 1
}

// TestPowerCutCatchesBrokenOrdering: the harness can fail. Each switch
// breaks one ordering rule; the power-cut test must report violations.
func TestPowerCutCatchesBrokenOrdering(t *testing.T) {
	master := testseed.Get(t)
	for _, tc := range []struct {
		name  string
		brk   breakMode
		model storage.LossModel
	}{
		{"no-sync", breakNoSync, storage.LoseUnsynced},
		{"no-data-crc", breakNoDataCRC, storage.LoseRandom},
		{"skip-backing-flush", breakSkipBFlush, storage.LoseUnsynced},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			caught := 0
			for i := range 2000 {
				res := runCut(mix(master, uint64(tc.brk), uint64(i)), tc.model, tc.brk, pcAlone)
				if len(res.violations) > 0 {
					caught++
					if caught == 1 {
						t.Logf("caught at cut %d: %s", i, res.violations[0])
					}
				}
				if caught >= 1 {
					return
				}
			}
			t.Fatalf("broken ordering %q went unnoticed in 2000 cuts", tc.name)
		})
	}
}

// TestPowerCutBackground: the same, with the background writeback
// (package writeback's Flusher, fast settings) and GC goroutines running
// during the workload. Timing makes a run not exactly replayable; the
// seed still fixes the workload, the configuration and the cut index.
func TestPowerCutBackground(t *testing.T) { timedCuts(t, 200, 77, pcBackground) }

// timedCuts runs n cuts (-cuts overrides) with extra beside the workload,
// cycling through the loss models; salt keeps the seeds of different
// tests apart.
func timedCuts(t *testing.T, n int, salt uint64, extra pcExtra) {
	master := testseed.Get(t)
	if *flagCuts > 0 {
		n = *flagCuts
	}
	models := []storage.LossModel{storage.LoseUnsynced, storage.LoseRandom, storage.LoseTorn, storage.KeepUnsynced}
	for i := range n {
		seed := mix(master, salt, uint64(i))
		model := models[i%len(models)]
		res := runCut(seed, model, breakNone, extra)
		if len(res.violations) > 0 {
			t.Fatalf("cut %d (%s) at op %d, seed %d:\n%s", i, model, res.cutAt, seed, strings.Join(res.violations, "\n"))
		}
	}
}

// TestPowerCutConcurrentCheckpoint: the same, with a goroutine writing
// checkpoints back to back while the workload runs, so that power fails
// in the middle of checkpoints that writes, flushes and commits overtake
// (a checkpoint holds the lock only for its snapshot). Timing makes a run
// not exactly replayable; the seed fixes the workload and the cut index.
func TestPowerCutConcurrentCheckpoint(t *testing.T) { timedCuts(t, 300, 91, pcCheckpointer) }

// TestPowerCutParallelWrites: the same, with bursts of concurrent writes
// to adjacent ranges, whose data reaches the cache device in merged
// writes. Timing makes a run not exactly replayable; the seed fixes the
// workload and the cut index.
func TestPowerCutParallelWrites(t *testing.T) { timedCuts(t, 300, 53, pcParallel) }

// TestPowerCutThrashing: the same, with the background running and the
// cache thrashing throughout: misses go around it (batches of them in one
// go: bypassRun), hits stay in it, and what the flusher cleans it drops
// (Shedding). Timing makes a run not exactly replayable; the seed fixes
// the workload and the cut index.
func TestPowerCutThrashing(t *testing.T) { timedCuts(t, 300, 61, pcThrash) }
