package cache

// stats.go: the cache's counters and Stats, their snapshot.

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
	quietCommits                                                      atomic.Int64
	backingFlushes, checkpoints, checkpointBytes, checkpointsSkipped  atomic.Int64
	gcRuns, gcMovedBytes, gcCleanedBytes, evictedBytes, bucketsFreed  atomic.Int64
	writebackBytes, writebackCollisions, dataWrites                   atomic.Int64
	replayed, replayDropped, directWaits, roomWaits                   atomic.Int64
}

// Stats is a snapshot of the cache's figures. Byte counts are bytes;
// request counts are requests.
type Stats struct {
	Mode Mode `json:"-"`

	Reads               int64 `json:"cache_reads"`
	ReadBytes           int64 `json:"cache_read_bytes"`
	Hits                int64 `json:"hits"`         // reads served wholly from the cache (device or RAM)
	Misses              int64 `json:"misses"`       // reads served wholly from the backing
	PartialHits         int64 `json:"partial_hits"` // reads served from both
	RAMHits             int64 `json:"ram_hits"`     // pieces served from the RAM tier
	ReadRetries         int64 `json:"read_retries"` // reads redone because their bucket was emptied under them
	Writes              int64 `json:"cache_writes"`
	WriteBytes          int64 `json:"cache_write_bytes"`
	CachedWriteBytes    int64 `json:"cached_write_bytes"` // bytes written into the cache (writes, zeroes and promotions)
	Bypasses            int64 `json:"bypasses"`           // requests sent to the backing by mode, cutoff, a thrashing cache or a full one
	ThrashBypasses      int64 `json:"thrash_bypasses"`    // writes that missed a thrashing cache and went around it (thrashDetector)
	DirectWaits         int64 `json:"direct_waits"`       // direct backing writes that waited for a writeback (or another direct write) of their range
	RoomWaits           int64 `json:"room_waits"`         // writes that found the cache full over a slow backing and waited for room
	RMW                 int64 `json:"rmw_writes"`         // unaligned writes done by read-modify-write
	BatchedWrites       int64 `json:"batched_writes"`     // writes that went in one go with others (WriteBatch)
	FUA                 int64 `json:"fua_requests"`
	Flushes             int64 `json:"cache_flushes"`
	Trims               int64 `json:"cache_trims"`
	Zeros               int64 `json:"cache_zeroes"`
	Promotions          int64 `json:"promotions"` // read misses copied into the cache
	PromotedBytes       int64 `json:"promoted_bytes"`
	NoSpace             int64 `json:"no_space"`          // allocations that found the cache full
	CacheReadErrors     int64 `json:"cache_read_errors"` // cache device read errors (clean data fell back to the backing)
	CacheWriteErrors    int64 `json:"cache_write_errors"`
	DataWrites          int64 `json:"data_writes"`             // cache device writes of the write path's data (adjacent ones of concurrent writers merge)
	BackingWriteBytes   int64 `json:"backing_write_bytes"`     // foreground bytes written to the backing
	BackingWriteNanos   int64 `json:"backing_write_ns_per_4k"` // recent average backing write (bypasses, cleaning) per 4 KiB; above 1 ms the backing counts as a disk
	CachedWriteNanos    int64 `json:"cached_write_ns_per_4k"`  // what a write into the cache cost per 4 KiB over the thrash detector's last window under pressure: its writer's time (waits for room included, shared among the writes in flight) and the background's making room
	Thrashing           bool  `json:"thrashing"`               // the cache steps aside for writes that miss it and sheds its data (thrashDetector)
	SlowerThanBacking   bool  `json:"slower_than_backing"`     // it does so because writes into it cost more than the backing's
	DirtyBytes          int64 `json:"dirty_bytes"`
	CachedBytes         int64 `json:"cached_bytes"` // bytes in the index
	Extents             int64 `json:"extents"`
	CapacityBytes       int64 `json:"capacity_bytes"`
	FreeBuckets         int64 `json:"free_buckets"`
	PendingBuckets      int64 `json:"pending_buckets"` // emptied, reusable after the next checkpoint
	Buckets             int64 `json:"buckets"`
	JournalRecords      int64 `json:"journal_records"`
	JournalBlocks       int64 `json:"journal_blocks"`
	JournalUsedBlocks   int64 `json:"journal_used_blocks"` // blocks since the last checkpoint
	JournalSlots        int64 `json:"journal_slots"`
	Commits             int64 `json:"journal_commits"`       // group commits that wrote the journal
	CommitWaits         int64 `json:"journal_commit_waits"`  // waits for another committer (group commit sharing)
	QuietCommits        int64 `json:"journal_quiet_commits"` // commits the background loop made once writes stopped (Options.QuietCommit)
	Publishes           int64 `json:"journal_publishes"`     // journal writes without a sync that made acknowledged writes survive a kill
	BackingFlushes      int64 `json:"cache_backing_flushes"` // every backing flush: the flusher's, GC's, commits', Drain's, zeroing dirty data's; one shared by several callers counts once (WritebackStats counts those the flusher asked for)
	Checkpoints         int64 `json:"checkpoints"`
	CheckpointBytes     int64 `json:"checkpoint_bytes"`
	CheckpointsSkipped  int64 `json:"checkpoints_skipped"` // asked for, but made unneeded by a checkpoint that ran meanwhile
	GCRuns              int64 `json:"gc_runs"`
	GCMovedBytes        int64 `json:"gc_moved_bytes"`   // dirty bytes GC moved to other buckets (never clean ones)
	GCCleanedBytes      int64 `json:"gc_cleaned_bytes"` // dirty bytes GC wrote back to the backing to drop them instead
	EvictedBytes        int64 `json:"evicted_bytes"`
	BucketsFreed        int64 `json:"buckets_freed"`
	WritebackBytes      int64 `json:"writeback_bytes"`          // bytes marked clean after writeback
	WritebackCollisions int64 `json:"clean_mark_refused_bytes"` // bytes rewritten while being written back (CAS lost)
	WritebackInFlight   int64 `json:"writeback_in_flight"`
	ReplayedRecords     int64 `json:"replayed_records"` // journal records applied by the last recovery
	ReplayDropped       int64 `json:"replay_dropped"`   // records dropped by it (data never became durable)
	Failed              bool  `json:"failed"`           // a journal commit failed; writes are refused
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
		JournalBlocks: c.stats.journalBlocks.Load(), Commits: c.stats.commits.Load(), CommitWaits: c.stats.commitWaits.Load(), QuietCommits: c.stats.quietCommits.Load(), Publishes: c.stats.publishes.Load(),
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
	s.Thrashing = c.thrashingLocked()
	s.SlowerThanBacking = s.Thrashing && c.mu.admit.thrash.slower
	s.CachedWriteNanos = c.mu.admit.thrash.cost
	c.mu.Unlock()
	return s
}
