package cache

// cache.go: Cache, its state and locks, Open, Close and the cache mode.

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/dgraph-io/ristretto/v2"
	"github.com/nbdcache/nbdcache/btreeidx"
	"github.com/nbdcache/nbdcache/storage"
	"github.com/nbdcache/nbdcache/writeback"
)

// inflightWB is a writeback in progress (ReadCached → MarkClean).
type inflightWB struct {
	off, end int64
	ver      uint64
}

// byteRange is [off, end) on the virtual device.
type byteRange struct{ off, end int64 }

func (r byteRange) overlaps(off, n int64) bool { return r.off < off+n && off < r.end }

// promoGuard is a read whose misses may be promoted: its data came from
// the backing, so any backing write over its range that starts after the
// read looked the range up makes that data possibly stale (void).
type promoGuard struct {
	byteRange
	void bool
}

// sealedBlock is a journal block waiting to be written.
type sealedBlock struct {
	seq  uint64
	pos  int64
	data []byte
}

// Cache is a storage.Device made of a cache device and a backing device.
// See doc.go.
type Cache struct {
	dev, back storage.Device
	sb        superblock // geometry is immutable; State and Seq under mu
	opts      Options
	test      testHooks // zero but in tests (hooks.go)
	log       *slog.Logger

	// ops bounds the index-changing operations in flight (enter/leave),
	// so that they cannot overrun the journal ring: a slot each (ring.go).
	ops  slotSem
	ckpt struct {
		sync.Mutex        // one checkpoint at a time; guards buf
		buf        []byte // the checkpoint being written, reused
	}
	gcPass struct {
		sync.Mutex              // one GC pass at a time
		cleaning   atomic.Int64 // GC passes writing their victims back now (gcWriteback)
	}
	rmwMu sync.Mutex // serializes unaligned read-modify-writes
	sbMu  sync.Mutex // serializes superblock writes

	dw     groupWriter   // the write path's data writes to dev
	health backingHealth // what the cache measured of its backing (backing.go)
	bflush flushGroup    // the backing's flushes, shared (bflush.go)

	ram *ristretto.Cache[uint64, ramEntry]
	// flusher is the writeback engine: every write of dirty data back to
	// the backing goes through it (its Run only with background work).
	flusher *writeback.Flusher

	stats counters

	// bypassHint: the last write decided (decideLocked) went around a
	// thrashing cache. Only a hint, read without mu: WriteBatch then
	// starts with bypassRun, which decides again under the lock.
	bypassHint atomic.Bool

	bg struct { // the background loop and the flusher's Run
		cancel context.CancelFunc // nil without background work (testHooks.noBackground)
		done   sync.WaitGroup
		kick   chan struct{}
		// startWB asks for startWriteback alone: a bucket was sealed, or
		// unstarted bytes were written since the last ask.
		startWB   chan struct{}
		unstarted atomic.Int64
		// lastStartAsk is when startWB was last asked for, as time
		// since epoch (kickStartWriteback).
		lastStartAsk atomic.Int64
		epoch        time.Time
		// quiet: the first write acknowledged since quietLoop last
		// looked arms it (quietArmed) and wakes the loop, which commits
		// once acknowledgements stop for QuietCommit.
		quiet      chan struct{}
		quietArmed atomic.Bool
	}

	mu struct {
		sync.Mutex
		idx     *btreeidx.Index
		space   space // the buckets (space.go)
		nextVer uint64
		mode    Mode
		closed  bool
		failed  error // sticky: a commit failed

		j journal // the journal (journal.go)

		ckptSeq  uint64
		ckptSlot int // slot of the durable checkpoint

		// The backing writes in flight, by range: writebacks (wb, from
		// ReadCached to MarkClean or ReleaseCached, and zeroDirty) and
		// direct writes (direct: passthrough, from its deletion to the
		// end of its backing write and what follows it). The two
		// exclude each other over a range, and every start voids the
		// promotions under way over its range (promos). wbCond is
		// signalled whenever one ends.
		wb         wbSet
		direct     []byteRange
		promos     []*promoGuard
		wbCond     sync.Cond
		holdsEnded uint64 // writebacks and direct writes ended so far
		// reservedExt: index extents that directOver writes in flight may
		// add when they drop what they superseded, and that batch runs
		// will add when they insert (roomLocked counts them).
		reservedExt int64

		admit admitter // admission's state (admission.go)
	}
}

var (
	_ storage.Device        = (*Cache)(nil)
	_ storage.Prefetcher    = (*Cache)(nil)
	_ storage.NoWaitFlusher = (*Cache)(nil)
	_ writeback.Source      = (*Cache)(nil)
	_ writeback.Releaser    = (*Cache)(nil)
)

// Open recovers the cache on cacheDev (superblock → checkpoint → journal
// replay) and returns it ready to serve.
func Open(cacheDev, backing storage.Device, opts Options) (*Cache, error) {
	return open(cacheDev, backing, opts, testHooks{})
}

// open is Open with test seams (hooks.go).
func open(cacheDev, backing storage.Device, opts Options, h testHooks) (*Cache, error) {
	if err := opts.fill(); err != nil {
		return nil, err
	}
	sb, err := readSuper(cacheDev)
	if err != nil {
		return nil, err
	}
	if sb.BackingID != opts.BackingID {
		return nil, fmt.Errorf("%w: superblock names backing %x, given %x", ErrWrongBacking, sb.BackingID, opts.BackingID)
	}
	if sb.BackingSize != backing.Size() {
		return nil, fmt.Errorf("%w: superblock backing size %d, device has %d", ErrWrongBacking, sb.BackingSize, backing.Size())
	}
	st, err := loadState(cacheDev, sb, h.brk, opts.Logger, false)
	if err != nil {
		return nil, err
	}
	if opts.BackingPath != "" {
		sb.BackingPath = opts.BackingPath // written with the dirty state below
	}
	c := &Cache{dev: cacheDev, back: backing, sb: *sb, opts: opts, test: h, log: opts.Logger}
	c.dw.init(cacheDev, &c.stats.dataWrites)
	slots := sb.journalSlots()
	// The operations in flight may add a block each, so a quarter of the
	// ring (slots/8 operations, with the margin ringFullLocked keeps)
	// stays for them while a checkpoint started at half full is written.
	c.ops.init(int(max(1, slots/8)))
	c.bg.kick = make(chan struct{}, 1)
	c.bg.startWB = make(chan struct{}, 1)
	c.bg.epoch = time.Now()
	c.bg.lastStartAsk.Store(int64(-earlyWritebackGap))
	c.bg.quiet = make(chan struct{}, 1)
	c.mu.wbCond.L = &c.mu.Mutex
	c.mu.wb = newWBSet()
	c.mu.idx = st.idx
	c.mu.nextVer = st.nextVer
	c.mu.mode = opts.Mode
	c.mu.j.init(&c.mu.Mutex, st.jseq, st.jpos, st.jprev)
	c.mu.ckptSeq = st.ckptSeq
	c.mu.ckptSlot = st.ckptSlot
	c.mu.admit = newAdmitter(c.opts)
	c.stats.replayed.Store(st.replayed)
	c.stats.replayDropped.Store(st.dropped)
	c.mu.space.init(&c.sb, st.buckets, &c.mu.Mutex, &c.stats.bucketsFreed, !h.noBackground)
	if opts.RAMCache > 0 {
		ram, err := ristretto.NewCache(&ristretto.Config[uint64, ramEntry]{
			NumCounters: max(opts.RAMCache/ramPage*10, 1000),
			MaxCost:     opts.RAMCache,
			BufferItems: 64,
		})
		if err != nil {
			return nil, fmt.Errorf("cache: ram tier: %w", err)
		}
		c.ram = ram
	}
	if err := c.fitIndex(); err != nil {
		c.closeRAM()
		return nil, err
	}
	// A checkpoint right away: the replayed journal (torn tail and all)
	// is never read again, and the ring starts afresh with a new seed.
	c.ckpt.Lock()
	err = c.checkpointLocked(true)
	c.ckpt.Unlock()
	if err != nil {
		c.closeRAM()
		return nil, err
	}
	sb.State = stateDirty
	sb.Seq++
	c.sb.State, c.sb.Seq = sb.State, sb.Seq
	if err := writeSuper(cacheDev, sb); err != nil {
		c.closeRAM()
		return nil, err
	}
	c.log.Info("cache: opened", "extents", st.idx.Len(), "dirty_bytes", st.idx.DirtyBytes(),
		"replayed_records", st.replayed, "dropped_records", st.dropped, "mode", opts.Mode.String())
	wcfg := opts.Writeback
	if wcfg.TargetPercent == 0 {
		wcfg.TargetPercent = opts.WritebackPercent
	}
	if wcfg.Logger == nil {
		wcfg.Logger = c.log
	}
	if err := wcfg.Validate(); err != nil {
		c.closeRAM()
		return nil, fmt.Errorf("%w: %w", ErrBadOption, err)
	}
	c.flusher = writeback.New(c, backing, wcfg)
	c.health.assume(backing.Caps())
	if !h.noBackground {
		ctx, cancel := context.WithCancel(context.Background())
		c.bg.cancel = cancel
		c.bg.done.Add(2)
		if opts.QuietCommit > 0 {
			c.bg.done.Add(1)
			go c.quietLoop(ctx)
		}
		go c.background(ctx)
		go func() {
			defer c.bg.done.Done()
			c.flusher.Run(ctx)
		}()
	}
	return c, nil
}

func (c *Cache) closeRAM() {
	if c.ram != nil {
		c.ram.Close()
	}
}

// Close stops background work, commits the journal and writes a
// checkpoint. It does not write back: dirty data stays durable in the
// cache. It does not close the two devices.
func (c *Cache) Close() error {
	c.mu.Lock()
	if c.mu.closed {
		c.mu.Unlock()
		return ErrClosed
	}
	c.mu.closed = true
	c.mu.space.cond.Broadcast()
	c.mu.wbCond.Broadcast()
	c.mu.Unlock()
	if c.bg.cancel != nil {
		c.bg.cancel()
		c.bg.done.Wait()
	}
	err := c.Checkpoint()
	if err == nil {
		c.mu.Lock()
		dirty := c.mu.idx.DirtyBytes()
		c.mu.Unlock()
		err = c.setState(dirty == 0)
	}
	c.closeRAM()
	return err
}

// setState writes the superblock with the clean/dirty state word.
func (c *Cache) setState(clean bool) error {
	c.sbMu.Lock()
	defer c.sbMu.Unlock()
	c.mu.Lock()
	sb := c.sb
	sb.State = stateDirty
	if clean {
		sb.State = stateClean
	}
	sb.Seq++
	c.sb.Seq, c.sb.State = sb.Seq, sb.State
	c.mu.Unlock()
	return writeSuper(c.dev, &sb)
}

// Size is the size of the virtual device: the backing's.
func (c *Cache) Size() int64 { return c.sb.BackingSize }

// Caps: 512-byte requests are native; flush, FUA, trim and zero always.
func (c *Cache) Caps() storage.Caps {
	bc := c.back.Caps()
	return storage.Caps{Flush: true, FUA: true, Trim: true, Zero: true, FastZero: bc.FastZero,
		Rotational: false, BlockSize: sectorSize}
}

// Mode returns the current mode.
func (c *Cache) Mode() Mode {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.mu.mode
}

// SetMode switches the mode. Leaving writeback stops new dirty data, then
// drains what there is; on a drain error the mode stays switched and the
// error is returned (the remaining dirty data is still served and will be
// written back).
func (c *Cache) SetMode(ctx context.Context, m Mode) error {
	if m < Writeback || m > None {
		return fmt.Errorf("%w: %d", ErrBadMode, m)
	}
	c.mu.Lock()
	old := c.mu.mode
	c.mu.mode = m
	c.mu.Unlock()
	c.log.Info("cache: mode", "from", old.String(), "to", m.String())
	if m != Writeback {
		return c.Drain(ctx, nil)
	}
	return nil
}
