package cache

// wbstats.go: WritebackStats, the writeback engine's figures.

import "github.com/nbdcache/nbdcache/writeback"

// WritebackStats reports the writeback engine's figures (rate, target,
// merged backing writes, flushes): the background flusher's batches and
// the cache's own writebacks (GC's cleaning, the write-back before a
// bypass, Drain), which all go through it.
func (c *Cache) WritebackStats() writeback.Stats { return c.flusher.Stats() }
