package cache

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nbdcache/nbdcache/storage"
	"github.com/nbdcache/nbdcache/test/testseed"
	"github.com/nbdcache/nbdcache/writeback"
)

// Power cuts under concurrency (issue 14). Several client goroutines, each
// with its own seeded stream, issue writes (some FUA, some unaligned),
// flushes, trims, zeroes, reads, prefetches, checkpoints, GC passes and
// mode switches at once, while the background flusher (aggressive
// settings, a large MaxGap so that clean extents bridge gaps), the
// background loop (GC, eviction, checkpoints) and a cache of a few
// buckets keep GC, eviction and bucket reuse running all the time. At a
// random storage operation, counted across both devices, the cache and
// the backing lose power at one instant (storage.PowerCutAll), under one
// of the four loss models. Then:
//
//   - Check must pass on the surviving images;
//   - reopened, every clean extent of the index must equal the backing's
//     bytes, but for the two exceptions at the end;
//   - every sector is read and compared with the oracle below; after
//     Close, Check must pass again.
//
// The oracle. Every request gets two stamps from one atomic clock: one
// taken just before it is invoked, one just after it returned (a request
// that failed never returned). A Flush, or a FUA request (in nbdcache a
// FUA commits the whole journal and flushes the backing, like a Flush
// after the request), that returned covers every request that returned
// before it was invoked; a FUA request also covers itself. With
// KeepUnsynced (a process kill) every request that returned is covered.
// Data is checked in 32-byte cells, each self-describing (LBA, write id,
// a hash of the LBA, the cell and the id), so garbage and misplaced data
// are caught. For one cell, let M be the newest invocation stamp among
// the covered requests on it. A request is definitely older than a
// covered one d if it returned before d was invoked; the requests not
// definitely older than every covered one are those that returned after
// M (or never). After the crash the cell may hold:
//
//   - the value of a write or zero on it that returned after M or never
//     returned (the newest durable value, or a value of a request that may
//     be linearized after it, or one that was in flight: maybe lost, maybe
//     landed), or its initial zeroes if no covered request touched it;
//   - after a trim that returned after M or never returned: zeroes or any
//     value the cell was ever given (a trim drops dirty data, as bcache's
//     discard does, so older data may show through, as in runCut's oracle).
//
// Never garbage, never another sector's data, never a value older than
// the newest durable one. Reads during the workload are checked by the
// same rule, M then being the newest invocation among the requests on
// the cell that returned before the read was invoked, and only requests
// invoked before the read returned counting.
//
// Unaligned writes go through read-modify-write, which rewrites the rest
// of the sectors it touches with what it read: a concurrent aligned write
// to the same sector could be undone (out of the contract: the cache
// advertises 512-byte blocks). So only client 0 writes, zeroes or trims
// the last eighth of the device, where it also issues 32-byte aligned
// unaligned writes; every client reads and prefetches there.
//
// Known limit (doc.go): concurrent overlapping writethrough writes may
// leave the cache's clean copy and the backing holding different ones of
// the two. A clean extent whose bytes differ from the backing's only
// where the two values came from two writes (or zeroes) issued in
// writethrough mode that were in flight at the same time is counted as
// that limit, not as a violation. Nor is a difference in a cell that a
// trim governs (per the rule above) where both values are ones the cell
// had: a trimmed sector may read as any of them. Every other difference
// is a violation, even where the value read is allowed: an eviction
// would make the sector read as the backing's bytes.
//
// Timing makes a run not exactly replayable: the seed fixes the
// configuration, every client's request stream, the loss model and the
// cut index (counted in storage operations), not the interleaving.

const (
	cellSize       = 32
	cellsPerSector = sectorSize / cellSize
	// never is the return stamp of a request that did not return.
	never = math.MaxUint64
)

func cellHash(lba int64, cell int, id uint64) uint64 {
	x := id*0x9e3779b97f4a7c15 ^ uint64(lba)*0xbf58476d1ce4e5b9 ^ uint64(cell)*0x94d049bb133111eb
	x ^= x >> 31
	x *= 0xd6e8feb86659fd93
	x ^= x >> 32
	return x
}

// fillCell writes cell number cell (0..15) of sector lba for write id.
func fillCell(b []byte, lba int64, cell int, id uint64) {
	binary.LittleEndian.PutUint64(b[0:], uint64(lba))
	binary.LittleEndian.PutUint64(b[8:], id)
	h := cellHash(lba, cell, id)
	binary.LittleEndian.PutUint64(b[16:], h)
	binary.LittleEndian.PutUint64(b[24:], ^h)
}

// cellID names the write a cell holds: 0 for zeroes; an error for garbage
// or another sector's data.
func cellID(b []byte, lba int64, cell int) (uint64, error) {
	if bytes.Equal(b[:cellSize], zeroCell[:]) {
		return 0, nil
	}
	id := binary.LittleEndian.Uint64(b[8:])
	if got := int64(binary.LittleEndian.Uint64(b[0:])); got != lba {
		return 0, fmt.Errorf("sector %d cell %d holds data of sector %d (write %d)", lba, cell, got, id)
	}
	var want [cellSize]byte
	fillCell(want[:], lba, cell, id)
	if !bytes.Equal(want[:], b[:cellSize]) {
		return 0, fmt.Errorf("sector %d cell %d holds garbage (claims write %d)", lba, cell, id)
	}
	return id, nil
}

var zeroCell [cellSize]byte

// cellPayload is the data of write id over [off, off+n), cell-aligned.
func cellPayload(off, n int64, id uint64) []byte {
	p := make([]byte, n)
	for i := int64(0); i < n; i += cellSize {
		a := off + i
		fillCell(p[i:], a/sectorSize, int(a%sectorSize/cellSize), id)
	}
	return p
}

type cKind uint8

const (
	cWrite cKind = iota
	cZero
	cTrim
)

// cOp is one write, zero or trim as the oracle knows it.
type cOp struct {
	kind     cKind
	client   int
	off, n   int64  // bytes, cell-aligned
	id       uint64 // cWrite: the write's id
	inv, ret uint64 // stamps; ret is never if it did not return
	fua      bool
	// wt: the request may have run in writethrough mode (the mode read
	// just before it was invoked, or a SetMode(Writethrough) in flight
	// with it; set by index).
	wt, wtInv bool
}

// modeCall is a SetMode call: the mode changes between inv and ret.
type modeCall struct {
	mode     Mode
	inv, ret uint64
}

func (op *cOp) value() uint64 { return op.id } // 0 for zero (and the initial zeroes)

func (op *cOp) String() string {
	k := [...]string{"write", "zero", "trim"}[op.kind]
	ret := "never"
	if op.ret != never {
		ret = fmt.Sprint(op.ret)
	}
	s := fmt.Sprintf("%s %d c%d [%d+%d) inv %d ret %s", k, op.id, op.client, op.off, op.n, op.inv, ret)
	if op.fua {
		s += " fua"
	}
	if op.wt {
		s += " wt"
	}
	return s
}

// cRead is a read during the workload and the ids it returned, per cell.
type cRead struct {
	client   int
	off, n   int64
	inv, ret uint64
	ids      []uint64
}

// concHist is the shared history: a clock, the coverage mark and one log
// per client (each written by its client only).
type concHist struct {
	clock atomic.Uint64
	// flushMark is the largest invocation stamp of a Flush or FUA
	// request that returned.
	flushMark  atomic.Uint64
	ackDurable bool
	logs       []concLog

	// After the run: every op, and the ops on each sector.
	ops      []cOp
	bySector [][]int32
}

type concLog struct {
	ops   []cOp
	reads []cRead
	modes []modeCall
}

func (h *concHist) stamp() uint64 { return h.clock.Add(1) }

func (h *concHist) flushed(inv uint64) {
	for {
		m := h.flushMark.Load()
		if inv <= m || h.flushMark.CompareAndSwap(m, inv) {
			return
		}
	}
}

func (h *concHist) covered(op *cOp) bool {
	return op.ret != never && (h.ackDurable || op.fua || op.ret < h.flushMark.Load())
}

// index gathers the client logs; call once every client is done.
func (h *concHist) index(sectors int64) {
	var modes []modeCall
	for _, l := range h.logs {
		h.ops = append(h.ops, l.ops...)
		modes = append(modes, l.modes...)
	}
	for i := range h.ops {
		op := &h.ops[i]
		op.wt = op.wtInv
		for _, m := range modes {
			if m.mode == Writethrough && m.inv < op.ret && m.ret > op.inv {
				op.wt = true
			}
		}
	}
	h.bySector = make([][]int32, sectors)
	for i := range h.ops {
		op := &h.ops[i]
		for s := op.off / sectorSize; s < (op.off+op.n+sectorSize-1)/sectorSize; s++ {
			h.bySector[s] = append(h.bySector[s], int32(i))
		}
	}
}

// cellOps is the ops on byte-cell a (a device offset, cell-aligned).
func (h *concHist) cellOps(a int64) []*cOp {
	var out []*cOp
	for _, i := range h.bySector[a/sectorSize] {
		if op := &h.ops[i]; op.off <= a && a < op.off+op.n {
			out = append(out, op)
		}
	}
	return out
}

// allowedValues applies the rule: ops are the ops on the cell that count, mark
// the newest invocation that makes older ones obsolete (0: none).
func allowedValues(ops []*cOp, mark uint64) []uint64 {
	var a []uint64
	add := func(v uint64) {
		if !slices.Contains(a, v) {
			a = append(a, v)
		}
	}
	if mark == 0 {
		add(0) // the initial zeroes
	}
	for _, op := range ops {
		if op.ret <= mark {
			continue // definitely older than a request that supersedes it
		}
		if op.kind != cTrim {
			add(op.value())
			continue
		}
		add(0)
		for _, o := range ops {
			if o.kind != cTrim {
				add(o.value())
			}
		}
	}
	return a
}

// afterCrash is what the cell at a may hold after the cut; trimmed
// reports that a trim not older than the newest durable request governs
// it (so any value the cell ever had is allowed).
func (h *concHist) afterCrash(a int64) (allowed []uint64, ops []*cOp, trimmed bool) {
	ops = h.cellOps(a)
	var mark uint64
	for _, op := range ops {
		if h.covered(op) {
			mark = max(mark, op.inv)
		}
	}
	for _, op := range ops {
		trimmed = trimmed || op.kind == cTrim && op.ret > mark
	}
	return allowedValues(ops, mark), ops, trimmed
}

// live is what a read (inv, ret) of the cell at a may return.
func (h *concHist) live(a int64, inv, ret uint64) []uint64 {
	var ops []*cOp
	var mark uint64
	for _, op := range h.cellOps(a) {
		if op.inv > ret {
			continue // invoked after the read returned
		}
		ops = append(ops, op)
		if op.ret < inv {
			mark = max(mark, op.inv)
		}
	}
	return allowedValues(ops, mark)
}

// describe lists the ops on a cell for a violation message.
func (h *concHist) describe(ops []*cOp) string {
	var b strings.Builder
	for i, op := range ops {
		if i == 8 {
			fmt.Fprintf(&b, "; ... %d more", len(ops)-i)
			break
		}
		if i > 0 {
			b.WriteString("; ")
		}
		b.WriteString(op.String())
		if h.covered(op) {
			b.WriteString(" covered")
		}
	}
	return b.String()
}

// cutConfig is one randomized configuration of the concurrent test.
type cutConfig struct {
	fo      FormatOptions
	opts    Options
	cache   int64
	back    int64
	clients int
	ops     int   // per client
	uStart  int64 // client 0's own region: [uStart, back)
	hot     int64 // half the ranges fall in [0, hot)
}

func randomCutConfig(r *rand.Rand) cutConfig {
	bucket := int64(16 << 10 << r.IntN(2))
	nb := int64(8 + r.IntN(8))
	cfg := cutConfig{
		fo:      FormatOptions{BlockSize: []int{512, 4096}[r.IntN(2)], BucketSize: bucket, JournalSize: int64(16+r.IntN(32)) * metaBlock},
		back:    int64(512<<10) << r.IntN(2),
		clients: 4 + r.IntN(5),
		ops:     40 + r.IntN(80),
	}
	cfg.uStart = cfg.back - cfg.back/8
	cfg.hot = 128 << 10
	cfg.cache = nb*bucket + 2*metaBlock + cfg.fo.JournalSize + 2*alignUp(ckptHdrSize+align8(nb)+(2*nb*bucket/int64(cfg.fo.BlockSize)+64)*ckptExtSize, metaBlock)
	cfg.opts = Options{
		Mode:       []Mode{Writeback, Writeback, Writeback, Writethrough, Writearound, None}[r.IntN(6)],
		PromoteAll: r.IntN(2) == 0,
		Writeback: writeback.Config{TargetPercent: 1, LowWatermark: -1, IdleAfter: time.Millisecond,
			UpdateInterval: 5 * time.Millisecond, BatchTime: 5 * time.Millisecond, RetryMin: time.Millisecond, RetryMax: 5 * time.Millisecond,
			MaxGap: 256 << 10, MaxWrite: int64(16<<10) << r.IntN(3), MaxInFlight: 1 + r.IntN(8)},
		CheckpointInterval: time.Duration(2+r.IntN(20)) * time.Millisecond,
	}
	if r.IntN(2) == 0 {
		cfg.opts.SequentialCutoff = int64(16<<10) << r.IntN(2)
	} else {
		cfg.opts.SequentialCutoff = -1
	}
	if r.IntN(3) == 0 {
		cfg.opts.RAMCache = 256 << 10
	}
	return cfg
}

// cutResult is the outcome of one concurrent cut.
type cutResult struct {
	violations []string
	model      storage.LossModel
	cfg        cutConfig
	cutAt      int64
	reachedCut bool
	storageOps int64
	report     [2]storage.CutReport
	hung       bool
	torn       int // clean extents differing from the backing only where the cut tore a backing sector
	stats      Stats
	wb         writeback.Stats
}

var concModels = []storage.LossModel{storage.LoseUnsynced, storage.LoseRandom, storage.LoseTorn, storage.KeepUnsynced}

// concModel is the loss model of a seed, so that -seed replays it.
func concModel(seed uint64) storage.LossModel { return concModels[seed>>7%uint64(len(concModels))] }

// runConcCut runs one concurrent workload, cuts the power of both
// devices at one instant at a random storage operation, recovers and
// checks.
func runConcCut(seed uint64, model storage.LossModel, brk breakMode) cutResult {
	r := rng(seed)
	cfg := randomCutConfig(r)
	res := cutResult{model: model, cfg: cfg}
	var failMu sync.Mutex
	fail := func(format string, a ...any) {
		failMu.Lock()
		defer failMu.Unlock()
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
	// About 85% of the cuts land inside the workload (a client request
	// costs 2-3 storage operations here, background work adds more);
	// the others come when the clients are done and the background
	// still runs.
	res.cutAt = r.Int64N(int64(cfg.clients*cfg.ops) * 3)
	var (
		count   atomic.Int64
		once    sync.Once
		newC    *storage.Crash
		newB    *storage.Crash
		cutDone atomic.Bool
	)
	cut := func() {
		once.Do(func() {
			devs, reps := storage.PowerCutAll(model, cutRng, cdev, bdev)
			newC, newB = devs[0], devs[1]
			res.report = [2]storage.CutReport(reps)
			cutDone.Store(true)
		})
	}
	var tr *concTrace
	if *flagTrace != "" {
		tr = &concTrace{}
	}
	hook := func(storage.Op) {
		if count.Add(1)-1 == res.cutAt {
			cut()
		}
	}
	if tr != nil {
		cdev.SetHook(func(op storage.Op) { tr.devOp("cachedev", op); hook(op) })
		bdev.SetHook(func(op storage.Op) { tr.devOp("backing", op); hook(op) })
	} else {
		cdev.SetHook(hook)
		bdev.SetHook(hook)
	}

	h := &concHist{ackDurable: model == storage.KeepUnsynced, logs: make([]concLog, cfg.clients)}
	opts := cfg.opts
	opts.BackingID = testBackingID
	hooks := testHooks{brk: brk}
	if tr != nil {
		hooks.trace = tr.add
	}
	c, err := open(cdev, bdev, opts, hooks)
	if err == nil {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		var wg sync.WaitGroup
		var nextID atomic.Uint64
		for k := range cfg.clients {
			cr := rng(mix(seed, 0xc11e, uint64(k)))
			wg.Go(func() { concClient(ctx, c, cr, k, cfg, h, &h.logs[k], &nextID, fail) })
		}
		done := make(chan struct{})
		go func() { wg.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(60 * time.Second):
			buf := make([]byte, 1<<20)
			buf = buf[:runtime.Stack(buf, true)]
			fail("hang: the clients did not finish in 60 s (cut reached: %v); goroutines:\n%s", cutDone.Load(), buf)
			res.hung = true
			cancel()
			return res
		}
		cancel()
		res.stats = c.Stats()
		res.wb = c.WritebackStats()
		// Clients done: cut now if the count did not get there, with the
		// background still running.
		res.reachedCut = cutDone.Load()
		cut()
		c.Close() // fails after the cut, but stops the background and the RAM tier
	} else if !errors.Is(err, storage.ErrPoweredOff) {
		fail("open: %v", err)
	}
	res.storageOps = count.Load()
	cut()
	h.index(cfg.back / sectorSize)

	// Live reads.
	for _, l := range h.logs {
		for _, rd := range l.reads {
			for j, id := range rd.ids {
				a := rd.off + int64(j)*cellSize
				if al := h.live(a, rd.inv, rd.ret); !slices.Contains(al, id) {
					fail("live read by client %d [%d+%d) (inv %d ret %d): sector %d cell %d holds write %d, allowed %v; ops on the cell: %s",
						rd.client, rd.off, rd.n, rd.inv, rd.ret, a/sectorSize, a%sectorSize/cellSize, id, al, h.describe(h.cellOps(a)))
					if tr != nil {
						tr.dump(fmt.Sprintf("seed %d: live read by client %d [%d+%d): sector %d cell %d holds write %d, allowed %v; ops on the cell: %s",
							seed, rd.client, rd.off, rd.n, a/sectorSize, a%sectorSize/cellSize, id, al, h.describe(h.cellOps(a))), a/sectorSize*sectorSize, sectorSize)
					}
					break
				}
			}
		}
	}

	// Recovery: offline check, reopen, clean extents against the
	// backing, every sector against the oracle.
	if rep, err := Check(newC, newB); err != nil {
		fail("check after cut: %v (%+v)", err, rep)
	}
	opts2 := opts
	opts2.RAMCache = 0
	if tr != nil {
		tr.add(-1, 0, "=== power cut; recovery:")
		testReplayTrace = tr.add
	}
	c2, err := open(newC, newB, opts2, testHooks{brk: brk, noBackground: true}) // no trace
	testReplayTrace = nil
	if err != nil {
		fail("reopen: %v", err)
		return res
	}
	defer c2.Close()
	// The recovered cache's invariants (generations, live bytes, clean
	// extents); checkCleanExtents below excuses a garbage sector the cut
	// put on the backing, which Verify cannot tell apart.
	if !res.report[1].Garbage {
		if err := c2.Verify(); err != nil {
			fail("verify after recovery: %v", err)
		}
	}
	res.torn = checkCleanExtents(c2, h, res.report[1], func(format string, a ...any) {
		fail(format, a...)
		if tr != nil && len(a) > 0 {
			if e, ok := a[0].(btreeExtent); ok {
				tr.dump(fmt.Sprintf("seed %d: "+format, append([]any{seed}, a...)...), e.Off, e.Len)
			}
		}
	})
	buf := make([]byte, 64<<10)
	for off := int64(0); off < cfg.back; off += int64(len(buf)) {
		if err := c2.ReadAt(buf, off); err != nil {
			fail("read after recovery at %d: %v", off, err)
			return res
		}
	sectors:
		for i := int64(0); i < int64(len(buf)); i += sectorSize {
			s := (off + i) / sectorSize
			for cell := range cellsPerSector {
				a := off + i + int64(cell)*cellSize
				id, err := cellID(buf[i+int64(cell)*cellSize:], s, cell)
				if err != nil {
					// The backing itself tore a sector that a request
					// not covered passed through to it: what a raw disk
					// does (as in runCut).
					if rep := res.report[1]; rep.Garbage && rep.GarbageOff/sectorSize == s && h.uncoveredOn(s) {
						continue sectors
					}
					_, ops, _ := h.afterCrash(a)
					fail("%v; ops on the cell: %s", err, h.describe(ops))
					continue sectors
				}
				if al, ops, _ := h.afterCrash(a); !slices.Contains(al, id) {
					fail("sector %d cell %d holds write %d; allowed %v; ops on the cell: %s", s, cell, id, al, h.describe(ops))
					continue sectors
				}
			}
		}
	}
	if err := c2.Close(); err != nil {
		fail("close after recovery: %v", err)
	}
	if rep, err := Check(newC, newB); err != nil {
		fail("check after reopen: %v (%+v)", err, rep)
	}
	return res
}

// uncoveredOn reports whether a request not covered touched sector s.
func (h *concHist) uncoveredOn(s int64) bool {
	for _, i := range h.bySector[s] {
		if !h.covered(&h.ops[i]) {
			return true
		}
	}
	return false
}

// checkCleanExtents compares every clean extent of the reopened cache
// with the backing. A cell where they differ is a violation, unless the
// cut filled that very sector of the backing with garbage (torn): the
// flusher's gap-fill rewrites clean data on the backing with the bytes
// it already holds, and a torn write of it on a real disk can damage
// them (torn counts those extents; doc.go names the limit).
func checkCleanExtents(c2 *Cache, h *concHist, rep storage.CutReport, fail func(string, ...any)) (torn int) {
	var es []btreeExtent
	c2.mu.Lock()
	c2.mu.idx.Ascend(0, func(e btreeExtent) bool {
		if !e.Dirty {
			es = append(es, e)
		}
		return true
	})
	c2.mu.Unlock()
	for _, e := range es {
		cb, bb := make([]byte, e.Len), make([]byte, e.Len)
		if err := c2.dev.ReadAt(cb, e.Loc); err != nil {
			fail("read clean extent %v: %v", e, err)
			continue
		}
		if err := c2.back.ReadAt(bb, e.Off); err != nil {
			fail("read backing under clean extent %v: %v", e, err)
			continue
		}
		if bytes.Equal(cb, bb) {
			continue
		}
		excused := false
		for i := int64(0); i < e.Len; i += cellSize {
			if bytes.Equal(cb[i:i+cellSize], bb[i:i+cellSize]) {
				continue
			}
			a := e.Off + i
			s, cell := a/sectorSize, int(a%sectorSize/cellSize)
			if rep.Garbage && rep.GarbageOff/sectorSize == s {
				excused = true
				continue
			}
			_, ops, _ := h.afterCrash(a)
			cid, cerr := cellID(cb[i:], s, cell)
			bid, berr := cellID(bb[i:], s, cell)
			cs, bs := fmt.Sprint(cid), fmt.Sprint(bid)
			if cerr != nil {
				cs = cerr.Error()
			}
			if berr != nil {
				bs = berr.Error()
			}
			fail("clean extent %v differs from the backing: sector %d cell %d: cache holds %s, backing %s; ops on the cell: %s",
				e, s, cell, cs, bs, h.describe(ops))
			break
		}
		if excused {
			torn++
		}
	}
	return torn
}

// concClient is one client: ops requests from its own stream, stopping
// at the first error (the power cut).
func concClient(ctx context.Context, c *Cache, r *rand.Rand, k int, cfg cutConfig, h *concHist, l *concLog, nextID *atomic.Uint64, fail func(string, ...any)) {
	shared := cfg.uStart // clients other than 0 write below it
	var seqNext int64 = -1
	// rangeIn picks a sector-aligned range of up to maxSectors in
	// [lo, hi), in the hot zone half the time when it lies inside.
	rangeIn := func(lo, hi, maxSectors int64) (int64, int64) {
		if lo == 0 && r.IntN(2) == 0 {
			hi = min(hi, cfg.hot)
		}
		s := lo/sectorSize + r.Int64N((hi-lo)/sectorSize)
		n := min(1+r.Int64N(maxSectors), hi/sectorSize-s)
		return s * sectorSize, n * sectorSize
	}
	writeRange := func(maxSectors int64) (int64, int64) {
		if k == 0 && r.IntN(2) == 0 {
			return rangeIn(cfg.uStart, cfg.back, maxSectors)
		}
		return rangeIn(0, shared, maxSectors)
	}
	// issue stamps op and runs do. The mode read just before (with the
	// SetMode calls in flight meanwhile) tells whether the request may
	// have run in writethrough.
	issue := func(op cOp, do func() error) error {
		op.wtInv = c.Mode() == Writethrough
		op.inv = h.stamp()
		err := do()
		if err == nil {
			op.ret = h.stamp()
			if op.fua {
				h.flushed(op.inv)
			}
		} else {
			op.ret = never
		}
		l.ops = append(l.ops, op)
		return err
	}
	for i := 0; i < cfg.ops; i++ {
		var err error
		switch x := r.IntN(100); {
		case x < 43: // write: sometimes sequential, sometimes FUA, client 0 sometimes unaligned
			off, n := writeRange([]int64{16, 32, 64}[r.IntN(3)])
			lo, hi := int64(0), shared
			if off >= cfg.uStart {
				lo, hi = cfg.uStart, cfg.back
			}
			if seqNext >= lo && r.IntN(2) == 0 && seqNext+n <= hi {
				off = seqNext
			}
			if off >= cfg.uStart && r.IntN(2) == 0 {
				// Unaligned, in cells: shift the start and/or trim the end.
				a := off + r.Int64N(cellsPerSector)*cellSize
				e := off + n - r.Int64N(cellsPerSector)*cellSize
				if e > a && (a%sectorSize != 0 || e%sectorSize != 0) {
					off, n = a, e-a
				}
			}
			seqNext = off + n
			op := cOp{kind: cWrite, client: k, off: off, n: n, id: nextID.Add(1), fua: r.IntN(8) == 0}
			var fl storage.Flags
			if op.fua {
				fl = storage.FUA
			}
			p := cellPayload(off, n, op.id)
			err = issue(op, func() error { return c.WriteAt(p, off, fl) })
		case x < 51:
			inv := h.stamp()
			if err = c.Flush(); err == nil {
				h.flushed(inv)
			}
		case x < 56: // trim
			off, n := writeRange(64)
			op := cOp{kind: cTrim, client: k, off: off, n: n, fua: r.IntN(8) == 0}
			var fl storage.Flags
			if op.fua {
				fl = storage.FUA
			}
			err = issue(op, func() error { return c.Trim(off, n, fl) })
		case x < 62: // zero, sometimes over more than a bucket (zeroDirty)
			off, n := writeRange([]int64{32, 64, 2 * cfg.fo.BucketSize / sectorSize}[r.IntN(3)])
			op := cOp{kind: cZero, client: k, off: off, n: n, fua: r.IntN(4) == 0}
			var fl storage.Flags
			if op.fua {
				fl = storage.FUA
			}
			err = issue(op, func() error { return c.Zero(off, n, fl) })
		case x < 84: // read, checked after the run
			off, n := rangeIn(0, cfg.back, 64)
			buf := make([]byte, n)
			inv := h.stamp()
			if err = c.ReadAt(buf, off); err == nil {
				rd := cRead{client: k, off: off, n: n, inv: inv, ret: h.stamp(), ids: make([]uint64, n/cellSize)}
				for j := range rd.ids {
					a := off + int64(j)*cellSize
					id, e := cellID(buf[j*cellSize:], a/sectorSize, int(a%sectorSize/cellSize))
					if e != nil {
						fail("live read by client %d: %v", k, e)
						return
					}
					rd.ids[j] = id
				}
				l.reads = append(l.reads, rd)
			}
		case x < 91:
			off, n := rangeIn(0, cfg.back, 64)
			err = c.Prefetch(off, n)
		case x < 94:
			err = c.Checkpoint()
		case x < 97:
			c.GCStep(r.IntN(2) == 0)
		default:
			m := modeCall{mode: []Mode{Writeback, Writeback, Writethrough, Writearound, None}[r.IntN(5)], inv: h.stamp(), ret: never}
			err = c.SetMode(ctx, m.mode)
			if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled) {
				err = nil
			}
			if err == nil {
				m.ret = h.stamp()
			}
			l.modes = append(l.modes, m)
		}
		if err != nil {
			if !errors.Is(err, storage.ErrPoweredOff) && !errors.Is(err, ErrFailed) {
				fail("client %d op %d: %v", k, i, err)
			}
			return
		}
	}
}

// concCuts is the number of cuts of TestPowerCutConcurrent: -cuts, else
// 500 (200 with -short), about 10 s on two cores.
func concCuts() int {
	if *flagCuts > 0 {
		return *flagCuts
	}
	if testing.Short() {
		return 200
	}
	return 500
}

// TestPowerCutConcurrent: power cuts under concurrency, see above. Cut 0
// uses the master seed itself, so -seed S -cuts 1 runs the cut of seed S
// again (same configuration, request streams, loss model and cut index;
// not the same interleaving).
func TestPowerCutConcurrent(t *testing.T) {
	master := testseed.Get(t)
	n := concCuts()
	start := time.Now()
	var (
		reached, torn int
		ops           int64
		perModel      = map[storage.LossModel]int{}
		sum           Stats
		filled        int64
	)
	for i := range n {
		seed := master
		if i > 0 {
			seed = mix(master, 0xc0c, uint64(i))
		}
		model := concModel(seed)
		res := runConcCut(seed, model, breakNone)
		if len(res.violations) > 0 {
			t.Fatalf("cut %d (%s, %d clients, mode %s, cut at storage op %d of %d, reached in the workload: %v), seed %d\n"+
				"replay (same workload and cut index; the interleaving depends on timing, so it may need several runs): go test ./cache -run '^TestPowerCutConcurrent$' -count=1 -seed %d -cuts 1\n%s\ncut reports: %+v",
				i, model, res.cfg.clients, res.cfg.opts.Mode, res.cutAt, res.storageOps, res.reachedCut, seed, seed,
				strings.Join(res.violations, "\n"), res.report)
		}
		perModel[model]++
		if res.reachedCut {
			reached++
		}
		ops += res.storageOps
		torn += res.torn
		sum.Promotions += res.stats.Promotions
		sum.GCRuns += res.stats.GCRuns
		sum.EvictedBytes += res.stats.EvictedBytes
		sum.Checkpoints += res.stats.Checkpoints
		sum.Bypasses += res.stats.Bypasses
		sum.ThrashBypasses += res.stats.ThrashBypasses
		sum.RMW += res.stats.RMW
		sum.WritebackBytes += res.stats.WritebackBytes
		sum.BucketsFreed += res.stats.BucketsFreed
		filled += res.wb.FilledBytes
	}
	t.Logf("%d cuts in %v (%d inside the workload; per model %v), 0 violations; %d storage ops; "+
		"clean extents differing from the backing only at a sector the cut tore: %d",
		n, time.Since(start).Round(time.Millisecond), reached, perModel, ops, torn)
	t.Logf("work done before the cuts: %d promotions, %d GC runs, %d bytes evicted, %d buckets freed, %d checkpoints, "+
		"%d bypasses (%d of them around a thrashing cache), %d read-modify-writes, %d bytes written back, %d of them gap fill",
		sum.Promotions, sum.GCRuns, sum.EvictedBytes, sum.BucketsFreed, sum.Checkpoints, sum.Bypasses, sum.ThrashBypasses, sum.RMW, sum.WritebackBytes, filled)
	if n >= 300 && sum.ThrashBypasses == 0 {
		t.Errorf("no write went around a thrashing cache in %d cuts: the cuts no longer cover that path", n)
	}
}

// TestPowerCutConcurrentCatchesBrokenOrdering: the concurrent harness can
// fail. Each switch breaks one ordering rule; within a budget of cuts the
// test must report a violation.
func TestPowerCutConcurrentCatchesBrokenOrdering(t *testing.T) {
	master := testseed.Get(t)
	const budget = 300
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
			for i := range budget {
				seed := mix(master, 0xb0c+uint64(tc.brk), uint64(i))
				res := runConcCut(seed, tc.model, tc.brk)
				if res.hung {
					t.Fatalf("cut %d (seed %d) hung:\n%s", i, seed, res.violations[0])
				}
				if len(res.violations) > 0 {
					t.Logf("caught at cut %d (seed %d): %s", i, seed, res.violations[0])
					return
				}
			}
			t.Fatalf("broken ordering %q went unnoticed in %d concurrent cuts", tc.name, budget)
		})
	}
}
