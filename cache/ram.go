package cache

// ram.go: the RAM tier: copies of whole 4 KiB pages of cached extents,
// kept in a ristretto cache. An entry records the version of the extent it
// was read from; it is served only for a piece of the same version, so a
// write (which always gets a new version) can never be answered from an
// older copy, and ristretto's asynchronous sets and evictions cannot make
// it stale.

const ramPage = 4096

type ramEntry struct {
	ver  uint64
	data []byte
}

// ramGet fills dst from the RAM tier if every page of the piece is there
// with the piece's version.
func (c *Cache) ramGet(pc readPiece, dst []byte) bool {
	if c.ram == nil || pc.off%ramPage != 0 || pc.n%ramPage != 0 {
		return false
	}
	for i := int64(0); i < pc.n; i += ramPage {
		e, ok := c.ram.Get(uint64((pc.off + i) / ramPage))
		if !ok || e.ver != pc.ver {
			return false
		}
		copy(dst[i:i+ramPage], e.data)
	}
	return true
}

// ramPut stores the whole pages of a piece just read from the cache device.
func (c *Cache) ramPut(pc readPiece, src []byte) {
	if c.ram == nil {
		return
	}
	first := alignUp(pc.off, ramPage)
	for p := first; p+ramPage <= pc.off+pc.n; p += ramPage {
		d := make([]byte, ramPage)
		copy(d, src[p-pc.off:])
		c.ram.Set(uint64(p/ramPage), ramEntry{ver: pc.ver, data: d}, ramPage)
	}
}
