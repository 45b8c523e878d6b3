package cache

import "github.com/nbdcache/nbdcache/writeback"

// WritebackStats reports the background flusher's figures (rate, target,
// merged backing writes); ok is false when no flusher runs
// (Options.NoBackground).
func (c *Cache) WritebackStats() (s writeback.Stats, ok bool) {
	if c.flusher == nil {
		return writeback.Stats{}, false
	}
	return c.flusher.Stats(), true
}
