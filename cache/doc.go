// Package cache is the product: a storage.Device made of a fast cache
// device and a slow backing device, bcache-style. In write-back mode it
// takes writes at cache speed and keeps every flushed byte through a crash;
// it never serves garbage; Check tells the truth about its state offline.
//
// # Layout on the cache device
//
//	offset                      size              contents
//	0                           4 KiB             superblock copy A
//	4 KiB                       4 KiB             superblock copy B (same contents)
//	8 KiB                       CkptSize          checkpoint slot 0
//	8 KiB + CkptSize            CkptSize          checkpoint slot 1
//	JournalOff                  JournalSize       journal ring of 4 KiB blocks
//	DataOff                     NBuckets*Bucket   data buckets, written append-only
//
// Superblock (little endian; crc32c Castagnoli over bytes 0..151):
//
//	off  size  field
//	0    8     magic "NBDCACHE"
//	8    4     format version (2; 1 still opens)
//	12   4     header length (152)
//	16   16    cache UUID
//	32   16    backing ID (must match Options.BackingID)
//	48   8     backing size          96   8  journal offset
//	56   8     cache device size     104  8  journal size
//	64   8     block size            112  8  data offset
//	72   8     bucket size           120  8  number of buckets
//	80   8     checkpoint offset     128  4  state: 0 clean (no dirty data), 1 dirty
//	88   8     checkpoint slot size  136  8  sequence (newest valid copy wins)
//	152  4     crc32c
//	512  2     length of the backing path hint (0: none)
//	514  n     the backing's path when the cache was last formatted, served
//	           or rebound (for messages only; never used to find it)
//	2044 4     crc32c of bytes 512..2043 (a hint that fails it reads as none)
//
// Decoding checks magic, then version, then checksum, then the geometry
// (regions in order, aligned, inside the device), like bbolt's
// Meta.Validate. Both copies are written with a sync after each, so one is
// always whole.
//
// Journal block (4 KiB; crc32c seeded with the crc of the cache UUID, so
// blocks of an earlier format never validate):
//
//	off   size  field
//	0     4     magic "NBDJ"
//	4     4     record count (<= 101)
//	8     8     sequence number
//	16    4     prev: the crc of the block before, or the checkpoint's seed
//	20    4     durable: seq-d+1, where every block below d was durable
//	            when this one was written (0: not known, as in version 1)
//	24    40*n  records
//	4064  8     ckpt: the sequence of the checkpoint that was durable when
//	            this block was written (0: not known, as in blocks written
//	            before the field existed; it lies past the last record,
//	            where those blocks hold zeroes)
//	4072  20    zero
//	4092  4     crc32c of bytes 0..4091
//
// Record (40 bytes): type (1 insert, 2 delete, 3 clean, 4 replace), gen,
// dirty, 0, length in sectors (u32), offset (u64), cache location (u64),
// version (u64), crc32c of the data at the location (u32), zero (u32).
//
// Checkpoint slot: a 64-byte header (magic "NBDCCKPT", checkpoint sequence,
// first journal sequence and ring slot to replay, chain seed, bucket count,
// next version, extent count, body crc, header crc) then the body: one
// generation byte per bucket (padded to 8) and 32 bytes per extent
// (offset u64, length in sectors u32, gen, dirty, 0, 0, location u64,
// version u64), sorted. A slot holds 2*data/BlockSize+64 extents; the
// write path treats the cache as full at 3/4 of that. Format writes
// checkpoint 1 to slot 0 and zeroes the first block of slot 1; after that
// checkpoints alternate between the slots (odd sequences in slot 0).
//
// # Invariants
//
//   - Data buckets are append-only: live data is never overwritten in
//     place, so a torn or lost write can only lose the newest, unflushed
//     version.
//   - A journal record never makes data visible that did not reach the
//     disk: every insert and replace record carries the crc32c of its data,
//     and recovery drops a record whose data fails it. Because of that, data
//     and journal blocks go out without a sync in between, and one sync of
//     the cache device per group commit serves every FLUSH and FUA waiting
//     (the design's "one fdatasync per FLUSH"). Recovery tests only the
//     records beyond the durable frontier (the newest block's durable
//     field): below it a sync covered the block, and so the data written
//     before its records were appended. So start-up reads the data of the
//     unsynced tail only, not of everything since the checkpoint. Check
//     tests every record, and names a durable one whose data fails.
//   - An acknowledged write survives a process kill: before a write, zero
//     or trim is acknowledged, every record it appended is published,
//     i.e. written to the cache device without a sync (the open block as
//     it stands, rewritten longer in the same slot by the next publish or
//     seal). The operating system keeps it, and the next Open replays it.
//     A block is never rewritten once a sync covered it: commit seals the
//     open block before writing it. One journal writer at a time; a
//     commit's sync does not hold up publishes.
//   - A FLUSH makes durable every record appended before the last
//     acknowledgement that began before it (journal.acked), and flushes
//     the backing's direct writes. Records the cache appended after that
//     for its own work (clean marks, promotions, GC) need no sync: any
//     durable prefix of the journal recovers, and losing them loses no
//     acknowledged write. With nothing acknowledged unsynced, a FLUSH
//     syncs nothing. After QuietCommit (10 ms) with no client write (into
//     the cache or around it), quietLoop does what a FLUSH would, at most
//     every 100 ms.
//   - Recovery stops at the first journal block that fails its checksum,
//     its sequence or its chain (prev): the torn tail. Unless a valid block
//     after it (in the next 256 slots, before an earlier lap) says it was
//     written when that block was already durable: then the block was
//     damaged after a sync, the flushed writes from it on would be lost,
//     and Open and Check fail with ErrCorrupt instead. Sequence numbers
//     only grow, so a block of an earlier lap of the ring never matches;
//     the chain, reseeded with a random value by the checkpoint every
//     Open writes, keeps blocks of an earlier life (beyond a torn tail)
//     from ever being replayed. Other checkpoints continue the chain (their
//     seed is the crc of the block before their first one), so the journal
//     stays replayable from the older checkpoint while a newer one is
//     being written.
//   - Bucket reuse: a bucket emptied by GC, eviction or overwrites gets a
//     new generation and becomes "pending"; it is handed out again only
//     after a checkpoint that no longer refers to its old contents is
//     durable. So no record in the replayable journal (and no extent of the
//     loaded checkpoint) points at a reused bucket: the data checksum test
//     at replay is exact, and a flushed write can never be lost to GC.
//     It follows that replay from the newest durable checkpoint never
//     meets a record whose generation differs from the checkpoint's for
//     its bucket (a bucket's generation changes when it becomes pending,
//     before any checkpoint that frees it is taken): such a record means
//     that a newer checkpoint was lost, and is ErrCorrupt, never skipped
//     as stale. Each bucket also has an in-memory epoch that readers
//     revalidate after reading, so a read that raced with reuse is
//     retried rather than served.
//   - Checkpoint slots: recovery loads the newest valid one. The other
//     slot may be unused (all zeroes, next to checkpoint 1 of Format),
//     valid and older, or invalid. Invalid is legitimate when a power cut
//     tore a checkpoint write (never durable: the journal stays
//     replayable from the older one, as above) or when the older
//     checkpoint was damaged; it is not when the newer checkpoint was
//     durable and damaged since: the journal has moved on from the older
//     one, and buckets it freed hold new data. Every journal block says
//     which checkpoint was durable when it was written (ckpt), so when
//     the other slot is invalid recovery reads the whole ring: a valid
//     block with a ckpt above the loaded checkpoint proves a newer one
//     was durable, and Open and Check fail with ErrCorrupt, naming the
//     slot and the block. Without such a block the cache opens, Open
//     logs a warning and Check lists it; nothing was lost, since any
//     write after the newer checkpoint was durable would have left a
//     block saying so. A block on the replayed chain whose ckpt is above
//     the loaded checkpoint is ErrCorrupt too.
//   - Dirty data is never bypassed: a range holding dirty extents, or being
//     written back, is always written into the cache (as dirty), whatever
//     the mode, so a writeback in flight can never land stale data over a
//     newer direct write to the backing. Two exceptions: a trim deletes
//     dirty extents too (bcache's discard) but leaves ranges being written
//     back alone, and a dirty extent it would cut in two stays whole, so
//     after it a sector may read as zeroes or as any data it held before;
//     a zero over a bucket or more of dirty data works as a writeback of
//     zeroes (the range registered as being written back, the backing
//     zeroed and flushed, then the extents deleted), so it does not fill
//     the cache with zeroes.
//   - The backing writes over a range exclude each other: a writeback
//     (ReadCached to MarkClean or ReleaseCached, gap-fill of clean extents
//     included, and zeroDirty) and a direct write (passthrough, from its
//     deletion until its backing write and what follows it, such as
//     writethrough's clean copy, are done). A direct write decides that its
//     range is not pinned a second time, under the same hold of mu that
//     registers it and deletes the extents: the decision made before it
//     left mu (in enter, which may block or run a checkpoint) is void by
//     then. It waits for a writeback in flight over its range, and goes
//     into the cache when dirty data landed meanwhile (errPinned).
//   - Before anything is written to the backing directly (bypass,
//     writethrough, writearound, trim, zero), the extents over the range are
//     deleted and that deletion is committed: a clean extent that outlived a
//     crash over newer backing data would be stale. A clean extent that
//     reaches past the range is deleted whole, so the deletion never adds
//     an extent. A clean record that follows a backing write is committed
//     only after a backing flush (the commit flushes the backing first
//     when backing writes happened).
//   - A promotion copies what a read got from the backing. Every backing
//     write over the read's range that starts after the read looked the
//     range up (a direct write, a writeback, zeroDirty) voids it
//     (promoGuard), and the insert re-checks, under mu, that the guard
//     holds and that the index has nothing over the range. A write that
//     landed dirty, was written back, marked clean and evicted during the
//     read leaves the index empty again, but its writeback voided the
//     guard.
//   - The index never holds more extents than a checkpoint slot: every
//     change that can add extents checks for room under the same hold of
//     mu (roomLocked, see alloc.go); foreground writes stop caching at 3/4
//     of it and evict clean extents; Open writes back what a replay
//     rebuilt beyond it (fitIndex).
//   - Writeback's MarkClean is a compare-and-swap on the version, journaled
//     after the backing write is durable; a lost race counts as a collision.
//     Its record names the whole range written back, so at replay it
//     cleans more than it did when an insert that collided with it is
//     dropped (its data never reached the disk): the piece that insert
//     displaced comes back, clean, over backing bytes the insert's own
//     writeback may have changed. A record that collided therefore counts
//     as removing a clean extent (settleCleanGone): the next backing write
//     makes it durable first, and the inserts and data before it.
//
// # Ordering and locking
//
// One mutex (mu) guards the index, the bucket table and the journal's
// in-memory state; it is never held across I/O. What it guards is grouped
// by owner, each type in its own file with its invariants: mu.j, the
// journal and its writer's turn (journal.go; commit.go drives it, and
// ring.go admits operations against the ring's room); mu.space, the buckets, their lists and the
// allocators (space.go); mu.admit, the admission policy's state
// (admission.go). The index, the range holds (mu.wb, mu.direct,
// mu.promos) and the checkpoint's place stay on Cache: they are the glue
// that orders the owners' changes. Outside mu: health, the backing's
// measured latency and reachability (backing.go, atomics), and the
// flusher (package writeback), through which every writeback goes.
//
// Lock order, outermost first (a lock is never taken while one after it
// is held):
//
//	rmwMu → gcPass → the flusher's turn (Exclusive) → ckpt → sbMu → mu
//
// The flusher's own mutex comes before mu (it asks DirtyBytes and Shedding
// under it, and BackingSeeks, which takes no lock), and nothing takes it
// under mu (Kick and NoteForeground take no lock; TimedSeeks only a leaf
// mutex of the flusher's write times). Below mu only leaves: the group
// writer's mutex. The shared backing flush (bflush.go) takes mu inside
// the flush, without its own mutex held, so flushBacking is never called
// with mu held. Operations
// that append journal records (at most one each) hold a slot of a
// semaphore (enter/leave) of ring/8 slots. A checkpoint (one at a time, ckMu) holds
// mu only for its snapshot, and covers exactly the journal before its
// first block JSeq:
//
//	under mu: seal the open block → JSeq; encode index and generations;
//	          note the pending buckets
//	commit (blocks before JSeq and the snapshot's data durable)
//	write the slot not holding the durable checkpoint → sync
//	under mu: the ring starts at JSeq; the noted pending buckets are free
//
// Writes, commits and FLUSHes go on meanwhile, into the ring after JSeq.
// The first operation that finds the ring half full writes the checkpoint;
// the others carry on, and an operation waits only when the ring is so
// full that the operations in flight could overwrite a block the durable
// checkpoint still needs. Writers that run out of space at once, and the
// background loop, share one checkpoint (checkpointIf re-checks the need
// under ckpt). A checkpoint is also written after recovery, at Close, and
// by the background loop when the last one is CheckpointInterval old (1
// minute) and the journal has grown by more than a few blocks since, so a
// trickle of writes never leaves a long journal to replay.
// The data of concurrent writes reaches the cache device through a
// group writer (groupWriter): the first writer yields once, then writes
// every run of adjacent chunks that joined it with one WriteAt and wakes
// the others; each returns only once its own data is on the device, so
// the order "data written, then the record appended" holds per write.
// Reads take mu only to look up and to revalidate, so reads of
// different ranges run in parallel; a clean piece whose cache read fails
// is read from the backing.
//
// # Policy
//
//   - Modes: writeback (default), writethrough, writearound, none,
//     switchable with SetMode; leaving writeback drains.
//   - Sequential cutoff (4 MiB): 16 streams detected by address; a stream
//     longer than the cutoff bypasses the cache (reads are not promoted).
//   - Read promotion: a miss is copied in the second time its 64 KiB region
//     misses within a window (a TinyLFU-style doorkeeper with aging), so
//     one-time scans do not evict the working set; Prefetch (NBD CACHE)
//     promotes unconditionally, and makes room as a write does (a read
//     miss takes free space only). A promotion is dropped if any backing
//     write over its range started meanwhile or the range got cached.
//   - RAM tier (ristretto): copies of 4 KiB pages tagged with the version
//     of the extent they came from, served only for that version, so it can
//     never be stale. It holds copies of dirty pieces too: it is never the
//     only copy.
//   - Space: when free buckets run short, GC compacts the emptiest buckets
//     (below GCPercent, 80%, live; foreground allocation leaves it a
//     reserve of 1/32 of the buckets to move live data into);
//     eviction drops the clean data of the oldest buckets (moving their
//     dirty data); the background loop frees pending buckets by a
//     checkpoint a batch at a time (reuseBatch: a checkpoint writes the
//     whole index); a writer that finds no space frees them by a
//     checkpoint at once, runs GC/eviction, and otherwise bypasses to the backing
//     (after writing back, itself, any dirty data the range overlaps), so a
//     full cache never deadlocks.
//   - Background: the writeback package's Flusher (rate controller,
//     watermarks) drives writeback through the Source methods; a small loop
//     keeps free buckets available, and asks the cache device to start
//     writing each bucket that filled (storage.WritebackStarter), so that
//     the sync of a checkpoint, which writers out of space wait for, finds
//     little left to write.
//
// # Known limits
//
// A checkpoint still writes the whole index (O(extents)), and encodes it
// under mu (about 0.3 ms per 32k extents: btreeidx has no O(1) clone yet);
// bucket reuse waits for a checkpoint; a GC pass walks the whole index.
// Data checksums live only in journal records: Check verifies the data the
// journal covers, but data covered by a checkpoint is verified neither by
// Check nor on read, so bit rot there is not detected (metadata corruption
// is). The last synced journal block, damaged when no block was written
// after it, cannot be told from a torn tail: its records are lost without
// a word (a later block's durable field is what proves a block was
// synced). The flusher's gap-fill rewrites clean data on the backing
// with the bytes it already holds: a disk that tears a sector of that
// write in a power cut damages data the cache holds clean. Eviction
// spares a clean extent until the backing flush that follows its gap
// fill, so the clean copy survives such a cut, and reads serve it; but
// recovery does not know the backing's copy was damaged, and evicting
// the clean copy later exposes the damage. Unaligned writes are serialized
// among themselves (read-modify-
// write). Direct writes over overlapping ranges are serialized among
// themselves too.
package cache
