package cache

import "sync/atomic"

// counters are the live counters behind Stats.
type counters struct {
	reads, readBytes, hits, misses, partialHits, ramHits, readRetries atomic.Int64
	writes, writeBytes, cachedBytes, bypasses, rmw, fua, flushes      atomic.Int64
	batched                                                           atomic.Int64 // writes that went in a WriteBatch run
	thrashBypasses                                                    atomic.Int64
	trims, zeros, promotions, promotedBytes, noSpace                  atomic.Int64
	cacheReadErrors, cacheWriteErrors, backingWriteBytes              atomic.Int64
	journalRecords, journalBlocks, commits, commitWaits, publishes    atomic.Int64
	backingFlushes, checkpoints, checkpointBytes, checkpointsSkipped  atomic.Int64
	gcRuns, gcMovedBytes, gcCleanedBytes, evictedBytes, bucketsFreed  atomic.Int64
	writebackBytes, writebackCollisions, dataWrites                   atomic.Int64
	replayed, replayDropped, directWaits, roomWaits                   atomic.Int64
}

// Stats is a snapshot of the cache's figures. Byte counts are bytes;
// request counts are requests.
type Stats struct {
	Mode Mode

	Reads, ReadBytes    int64
	Hits                int64 // reads served wholly from the cache (device or RAM)
	Misses              int64 // reads served wholly from the backing
	PartialHits         int64 // reads served from both
	RAMHits             int64 // pieces served from the RAM tier
	ReadRetries         int64 // reads redone because their bucket was emptied under them
	Writes, WriteBytes  int64
	CachedWriteBytes    int64 // bytes written into the cache (writes, zeroes and promotions)
	Bypasses            int64 // requests sent to the backing by mode, cutoff, a thrashing cache or a full one
	ThrashBypasses      int64 // writes that missed a thrashing cache and went around it (thrashDetector)
	DirectWaits         int64 // direct backing writes that waited for a writeback (or another direct write) of their range
	RoomWaits           int64 // writes that found the cache full over a slow backing and waited for room
	RMW                 int64 // unaligned writes done by read-modify-write
	BatchedWrites       int64 // writes that went in one go with others (WriteBatch)
	FUA, Flushes        int64
	Trims, Zeros        int64
	Promotions          int64 // read misses copied into the cache
	PromotedBytes       int64
	NoSpace             int64 // allocations that found the cache full
	CacheReadErrors     int64 // cache device read errors (clean data fell back to the backing)
	CacheWriteErrors    int64
	DataWrites          int64 // cache device writes of the write path's data (adjacent ones of concurrent writers merge)
	BackingWriteBytes   int64 // foreground bytes written to the backing
	BackingWriteNanos   int64 // recent average backing write (bypasses, cleaning) per 4 KiB; above 1 ms the backing counts as a disk
	DirtyBytes          int64
	CachedBytes         int64 // bytes in the index
	Extents             int64
	CapacityBytes       int64
	FreeBuckets         int64
	PendingBuckets      int64 // emptied, reusable after the next checkpoint
	Buckets             int64
	JournalRecords      int64
	JournalBlocks       int64
	JournalUsedBlocks   int64 // blocks since the last checkpoint
	JournalSlots        int64
	Commits             int64 // group commits that wrote the journal
	CommitWaits         int64 // waits for another committer (group commit sharing)
	Publishes           int64 // journal writes without a sync that made acknowledged writes survive a kill
	BackingFlushes      int64 // backing flushes by the cache itself: commits, Drain's last, zeroing dirty data (the writeback engine counts its own: WritebackStats)
	Checkpoints         int64
	CheckpointBytes     int64
	CheckpointsSkipped  int64 // asked for, but made unneeded by a checkpoint that ran meanwhile
	GCRuns              int64
	GCMovedBytes        int64 // dirty bytes GC moved to other buckets (never clean ones)
	GCCleanedBytes      int64 // dirty bytes GC wrote back to the backing to drop them instead
	EvictedBytes        int64
	BucketsFreed        int64
	WritebackBytes      int64 // bytes marked clean after writeback
	WritebackCollisions int64 // bytes rewritten while being written back (CAS lost)
	WritebackInFlight   int64
	ReplayedRecords     int64 // journal records applied by the last recovery
	ReplayDropped       int64 // records dropped by it (data never became durable)
	Failed              bool  // a journal commit failed; writes are refused
}

// Stats returns a snapshot.
func (c *Cache) Stats() Stats {
	s := Stats{
		Reads: c.stats.reads.Load(), ReadBytes: c.stats.readBytes.Load(), Hits: c.stats.hits.Load(),
		Misses: c.stats.misses.Load(), PartialHits: c.stats.partialHits.Load(), RAMHits: c.stats.ramHits.Load(),
		ReadRetries: c.stats.readRetries.Load(), Writes: c.stats.writes.Load(), WriteBytes: c.stats.writeBytes.Load(),
		CachedWriteBytes: c.stats.cachedBytes.Load(), Bypasses: c.stats.bypasses.Load(), ThrashBypasses: c.stats.thrashBypasses.Load(), RMW: c.stats.rmw.Load(), BatchedWrites: c.stats.batched.Load(),
		FUA: c.stats.fua.Load(), Flushes: c.stats.flushes.Load(), Trims: c.stats.trims.Load(), Zeros: c.stats.zeros.Load(),
		Promotions: c.stats.promotions.Load(), PromotedBytes: c.stats.promotedBytes.Load(), NoSpace: c.stats.noSpace.Load(),
		CacheReadErrors: c.stats.cacheReadErrors.Load(), CacheWriteErrors: c.stats.cacheWriteErrors.Load(), DataWrites: c.stats.dataWrites.Load(),
		BackingWriteBytes: c.stats.backingWriteBytes.Load(), JournalRecords: c.stats.journalRecords.Load(),
		JournalBlocks: c.stats.journalBlocks.Load(), Commits: c.stats.commits.Load(), CommitWaits: c.stats.commitWaits.Load(), Publishes: c.stats.publishes.Load(),
		BackingFlushes: c.stats.backingFlushes.Load(), Checkpoints: c.stats.checkpoints.Load(),
		CheckpointBytes: c.stats.checkpointBytes.Load(), CheckpointsSkipped: c.stats.checkpointsSkipped.Load(), GCRuns: c.stats.gcRuns.Load(), GCMovedBytes: c.stats.gcMovedBytes.Load(), GCCleanedBytes: c.stats.gcCleanedBytes.Load(),
		EvictedBytes: c.stats.evictedBytes.Load(), BucketsFreed: c.stats.bucketsFreed.Load(),
		WritebackBytes: c.stats.writebackBytes.Load(), WritebackCollisions: c.stats.writebackCollisions.Load(),
		ReplayedRecords: c.stats.replayed.Load(), ReplayDropped: c.stats.replayDropped.Load(), DirectWaits: c.stats.directWaits.Load(), RoomWaits: c.stats.roomWaits.Load(),
		CapacityBytes: c.CapacityBytes(), Buckets: c.sb.NBuckets, JournalSlots: c.sb.journalSlots(),
		BackingWriteNanos: c.health.nanos.Load(),
	}
	c.mu.Lock()
	s.Mode = c.mu.mode
	s.DirtyBytes = c.mu.idx.DirtyBytes()
	s.CachedBytes = c.mu.idx.Bytes()
	s.Extents = int64(c.mu.idx.Len())
	s.FreeBuckets = int64(len(c.mu.space.free))
	s.PendingBuckets = int64(len(c.mu.space.pending))
	s.JournalUsedBlocks = int64(c.mu.j.nextSeq - c.mu.j.startSeq)
	s.WritebackInFlight = int64(c.mu.wb.len())
	s.Failed = c.mu.failed != nil
	c.mu.Unlock()
	return s
}
