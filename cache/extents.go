package cache

// extents.go: Extents, the cache's answer to NBD BLOCK_STATUS.

import (
	"github.com/nbdcache/nbdcache/storage"
)

var _ storage.Extenter = (*Cache)(nil)

// Extents reports allocation for NBD BLOCK_STATUS: ranges the cache holds
// are data; elsewhere the backing's answer if it has one, else data.
func (c *Cache) Extents(off, length int64, fn func(storage.Extent) bool) error {
	if err := storage.CheckRange(c.Size(), off, length); err != nil {
		return err
	}
	if length == 0 {
		return nil
	}
	// Cached ranges, merged.
	var cached [][2]int64
	c.mu.Lock()
	c.mu.idx.Lookup(off, length, func(e btreeExtent) bool {
		if n := len(cached); n > 0 && cached[n-1][1] == e.Off {
			cached[n-1][1] = e.End()
		} else {
			cached = append(cached, [2]int64{e.Off, e.End()})
		}
		return true
	})
	c.mu.Unlock()
	ext, ok := c.back.(storage.Extenter)
	if !ok || len(cached) > 0 && cached[0][0] <= off {
		// Report the first run only: data up to the next boundary.
		end := off + length
		if len(cached) > 0 && cached[0][0] <= off {
			end = min(end, cached[0][1])
		} else if len(cached) > 0 {
			end = cached[0][0]
		}
		fn(storage.Extent{Length: end - off})
		return nil
	}
	// The backing's view up to the first cached range.
	end := off + length
	if len(cached) > 0 {
		end = cached[0][0]
	}
	return ext.Extents(off, end-off, fn)
}
