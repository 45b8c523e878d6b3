package cache

// journal.go: the journal's state (journal) and its writer's turn:
// records are appended to an open block under Cache.mu, blocks are sealed
// into a ring of slots, and one writer at a time (the turn) publishes or
// commits them. commit.go drives it.

import (
	"slices"
	"sync"
)

// journal is the journal's state, Cache.mu.j. Cache.mu guards every field;
// bufs belong to the goroutine holding the writer's turn (writing), which
// uses them outside the lock too, from take to written or giveBack.
//
// Invariants, under Cache.mu:
//   - open holds n records (n < jRecsPerBlk); its header is written when
//     it is sealed or published. Sealed blocks wait in sealed, in
//     sequence order, until a writer's turn writes them; nextSeq is the
//     sequence the open block will get and head its ring slot; prev is the
//     chain value (crc) of the last sealed block.
//   - startSeq <= durable <= nextSeq: the ring holds the blocks from
//     startSeq (the first the durable checkpoint does not cover) on, and
//     every block before durable is synced. synced <= visible <= appended
//     count records: written to the device and synced, written, appended.
//   - bFlushed <= bWrites: direct backing writes done, and of them those a
//     backing flush has covered. cleanDep is the last record appended that
//     depends on a backing write not flushed when it was appended;
//     cleanGone, where records that removed a clean extent lie (goneSet).
//     dropClean marks the index change being journaled as one such.
//   - At most one writer's turn (writing) at a time, and at most one sync
//     of the cache device (syncing); cond is signalled when either ends.
type journal struct {
	open      []byte // the open block: n records encoded, header not yet
	n         int
	sealed    []sealedBlock
	nextSeq   uint64 // seq the next sealed block gets
	prev      uint32 // chain value of the last sealed block
	head      int64  // ring slot of the next sealed block
	startSeq  uint64 // first block after the durable checkpoint
	durable   uint64 // every block with seq < durable is durable
	appended  uint64 // records appended since Open
	visible   uint64 // records written to the device (not all synced)
	synced    uint64 // every record appended before this count is durable
	acked     uint64 // appended when the last acknowledgement began (jkind.acks): what a FLUSH must make durable
	cleanDep  uint64 // appended after the last record that depends on an unflushed backing write (a clean insert; directOver's drop of the dirty data it superseded)
	cleanGone goneSet
	dropClean bool // the index change being journaled removed a clean extent
	writing   bool // a journal writer holds the turn (writeJournal)
	syncing   bool // a commit is syncing the cache device
	cond      sync.Cond

	bWrites, bFlushed uint64 // backing writes done / covered by a flush

	// bufs are the writer's turn's buffers, used only by the goroutine
	// that holds the turn (writing), for the blocks it writes and the copy
	// of the open block that a publish writes.
	bufs struct {
		blocks []sealedBlock
		pub    []byte
	}
}

// init makes j the journal of a ring that goes on after block seq-1 (at
// slot pos, with chain value prev), guarded by mu.
func (j *journal) init(mu *sync.Mutex, seq uint64, pos int64, prev uint32) {
	j.nextSeq, j.head, j.prev, j.startSeq, j.durable = seq, pos, prev, seq, seq
	j.open, j.bufs.pub = make([]byte, metaBlock), make([]byte, metaBlock)
	j.cond.L = mu
}

// add encodes r into the open block and reports whether the block is full.
func (j *journal) add(r record) (full bool) {
	r.encode(j.open[jHdrSize+j.n*jRecSize:])
	j.n++
	j.appended++
	if r.Type == recInsert && !r.Dirty && j.backingUnflushed() {
		j.cleanDep = j.appended
	}
	if j.dropClean {
		j.cleanGone.add(r.Off, r.Len, j.appended)
		j.dropClean = false
	}
	return j.n >= jRecsPerBlk
}

// backingUnflushed reports whether a direct backing write is done that no
// backing flush has covered yet.
func (j *journal) backingUnflushed() bool { return j.bWrites > j.bFlushed }

// seal turns the open block into a sealed block with the next sequence
// number, chained to the block before; the ring has slots slots, and
// ckptSeq is the durable checkpoint the header names. It reports false
// when the open block is empty.
func (j *journal) seal(salt uint32, slots int64, ckptSeq uint64) bool {
	if j.n == 0 {
		return false
	}
	data := j.open
	sum := finishJBlock(data, salt, j.nextSeq, j.prev, j.n, j.durable, ckptSeq)
	j.sealed = append(j.sealed, sealedBlock{seq: j.nextSeq, pos: j.head, data: data})
	j.prev = sum
	j.nextSeq++
	j.head = (j.head + 1) % slots
	j.open, j.n = make([]byte, metaBlock), 0
	return true
}

// usedSlots is the number of ring slots holding blocks the newest durable
// checkpoint does not cover, sealed or not.
func (j *journal) usedSlots() int64 { return int64(j.nextSeq-j.startSeq) + 1 }

// turn is one journal writer's turn: what take gave it to write, and
// where the journal will be once it is written (and, for a commit,
// synced). A commit's turn outlives the writer's turn (written), through
// its sync, while a publisher may take the next: it is the caller's own
// copy. blocks and pub are journal.bufs, the turn's until written.
type turn struct {
	sync   bool
	blocks []sealedBlock // sealed blocks, then the published open block
	pub    []byte        // the copy of the open block that a publish writes
	// The published open block's header, finished outside the lock
	// (openN 0: none; openSeq is the open block's sequence either way).
	openN                          int
	openSeq, openDurable, openCkpt uint64
	openPrev                       uint32
	// After the writes: every record before visible is written; a backing
	// flush first (needB) covers the backing writes before bNow. After the
	// sync (needSync): every block before durable is durable, and every
	// record before visible synced.
	durable, visible, bNow uint64
	needB, needSync        bool
}

// jkind is what a journal writer makes true of everything appended before
// it began: published (written to the cache device), committed (synced),
// or committed with the direct backing writes done before it flushed too
// (a client's FLUSH or FUA: bypassed writes are acknowledged writes). A
// commit of the cache's own (a checkpoint, settleCleanGone) needs the
// backing flushed only for records that depend on it (cleanDep). A
// client's FLUSH (jFlush) is jCommitBacking unless everything it must
// cover is durable already (journal.flushed).
type jkind uint8

const (
	jPublish jkind = iota
	jCommit
	jCommitBacking
	jFlush
)

func (k jkind) sync() bool { return k != jPublish }

// backing: the turn flushes the direct backing writes done before it.
func (k jkind) backing() bool { return k == jCommitBacking || k == jFlush }

// acks: the turn acknowledges the writes whose records were appended
// before it (a publish, or a FUA's commit).
func (k jkind) acks() bool { return k == jPublish || k == jCommitBacking }

// flushed reports whether a FLUSH now would find nothing to do: every
// record appended before the last acknowledgement began is durable, and
// every direct backing write done is flushed. Records appended since by
// the cache's own work (the flusher's clean marks, GC, promotions) need
// not be: the journal recovers from any durable prefix, and losing them
// loses no acknowledged write.
func (j *journal) flushed() bool { return j.synced >= j.acked && j.bFlushed >= j.bWrites }

// goal is what a journal writer must make true: the blocks sealed, the
// records appended and the backing writes done before it began.
type goal struct{ seq, appended, bWrites uint64 }

func (j *journal) goal() goal { return goal{j.nextSeq, j.appended, j.bWrites} }

// reached reports whether g needs no turn of kind k: its records are
// written, for a commit durable, and for jCommitBacking with the backing
// writes flushed.
func (j *journal) reached(g goal, k jkind) bool {
	return j.visible >= g.appended && (!k.sync() || j.durable >= g.seq && (!k.backing() || j.bFlushed >= g.bWrites))
}

// turnFree reports whether a writer may take the turn: no other writer,
// and for a commit no sync running either.
func (j *journal) turnFree(sync bool) bool { return !j.writing && !(sync && j.syncing) }

// backingFlushed records a backing flush that covered the first n direct
// backing writes (whoever flushed: a commit's turn, the flusher, GC).
func (j *journal) backingFlushed(n uint64) { j.bFlushed = max(j.bFlushed, n) }

// take gives the caller the writer's turn (turnFree must hold): the
// sealed blocks leave the queue for the turn (sealed keeps its array for
// the appenders), and a publish takes a copy of the open block, which
// stays open. ckptSeq is the durable checkpoint the open block's header
// names.
func (j *journal) take(k jkind, ckptSeq uint64) turn {
	sync := k.sync()
	j.writing = true
	j.syncing = j.syncing || sync
	t := turn{sync: sync, pub: j.bufs.pub, openSeq: j.nextSeq}
	t.blocks = append(j.bufs.blocks[:0], j.sealed...)
	clear(j.sealed)
	j.sealed = j.sealed[:0]
	if !sync && j.n > 0 {
		copy(t.pub, j.open)
		t.openN, t.openPrev, t.openDurable, t.openCkpt = j.n, j.prev, j.durable, ckptSeq
		t.blocks = append(t.blocks, sealedBlock{seq: t.openSeq, pos: j.head, data: t.pub})
	}
	t.durable, t.visible, t.bNow = j.nextSeq, j.appended, j.bWrites
	t.needB = t.bNow > j.bFlushed && (k.backing() || j.cleanDep > j.visible)
	t.needSync = sync && t.durable > j.durable
	return t
}

// finishOpen finishes the header and checksum of the published open
// block, outside the lock.
func (t *turn) finishOpen(salt uint32) {
	if t.openN > 0 {
		finishJBlock(t.pub, salt, t.openSeq, t.openPrev, t.openN, t.openDurable, t.openCkpt)
	}
}

// giveBack ends a turn that wrote nothing (its backing flush failed): the
// sealed blocks go back ahead of any sealed meanwhile (the open one is
// still open).
func (j *journal) giveBack(t *turn) {
	unwritten := slices.Clone(t.blocks[:len(t.blocks)-min(t.openN, 1)])
	j.sealed = append(unwritten, j.sealed...)
	j.writing = false
	if t.sync {
		j.syncing = false
	}
	j.release(t)
	j.cond.Broadcast()
}

// written records the turn's writes (err: they failed). A commit's turn
// goes on to its sync, still holding syncing, unless they failed.
func (j *journal) written(t *turn, err error) {
	j.writing = false
	if err == nil {
		j.visible = t.visible
		if t.needB {
			j.backingFlushed(t.bNow)
		}
	} else if t.sync {
		j.syncing = false
	}
	j.release(t)
}

// syncDone ends a commit's sync (err: it failed) and reports whether the
// turn's blocks are now durable.
func (j *journal) syncDone(t *turn, err error) bool {
	j.syncing = false
	if err != nil {
		return false
	}
	j.durable = t.durable
	j.synced = max(j.synced, t.visible)
	return true
}

// release takes the turn's buffers back, without its references to the
// blocks it wrote.
func (j *journal) release(t *turn) {
	clear(t.blocks)
	j.bufs.blocks, t.blocks, t.pub = t.blocks[:0], nil, nil
}
