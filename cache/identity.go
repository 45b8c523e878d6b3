package cache

// identity.go: whose cache a device holds, binding it to another backing,
// and the smallest cache device a geometry fits in.

import (
	"fmt"

	"github.com/nbdcache/nbdcache/storage"
)

// Identity is what a cache's superblock says about whose it is, read
// without recovering the cache.
type Identity struct {
	CacheID   [16]byte
	BackingID [16]byte
	// BackingPath is where the backing was when the cache was last
	// formatted, served or rebound; "" when not recorded (images made
	// before the hint existed).
	BackingPath string
	BackingSize int64
	CacheSize   int64
	// Clean: the superblock says the cache holds no dirty data. A cache
	// in use, or closed with dirty data, is not clean.
	Clean bool
}

// Identify reads the newest valid superblock copy of dev. It fails with
// ErrNotFormatted when neither copy has the magic, ErrCorrupt or
// ErrVersion when a copy has it but does not validate.
func Identify(dev storage.Device) (Identity, error) {
	sb, err := readSuper(dev)
	if err != nil {
		return Identity{}, err
	}
	return Identity{
		CacheID: sb.CacheID, BackingID: sb.BackingID, BackingPath: sb.BackingPath,
		BackingSize: sb.BackingSize, CacheSize: sb.CacheSize, Clean: sb.State == stateClean,
	}, nil
}

// Rebind binds the cache on dev to another backing: it writes the
// superblock with backingID and backingPath in place of the old ones, and
// changes nothing else, so dirty data, the journal and the checkpoints
// stay as they are and the next Open with that backing recovers them.
// It refuses, with ErrWrongBacking, a backing whose size is not the one
// the cache was formatted for: the cache's extents address that size.
//
// The caller vouches that backing holds the data the cache was in front
// of; nothing here can tell.
func Rebind(dev, backing storage.Device, backingID [16]byte, backingPath string) error {
	sb, err := readSuper(dev)
	if err != nil {
		return err
	}
	if sb.BackingSize != backing.Size() {
		return fmt.Errorf("%w: the cache was formatted for a backing of %d bytes, the given one has %d",
			ErrWrongBacking, sb.BackingSize, backing.Size())
	}
	sb.BackingID, sb.BackingPath = backingID, backingPath
	sb.Seq++
	return writeSuper(dev, sb)
}

// MinCacheSize returns the smallest cache device, in bytes, that Format
// accepts with these block and bucket sizes (0 for the defaults): room
// for the superblocks, two checkpoint slots, the smallest journal and
// minBuckets buckets. It returns 0 when the sizes fit no device.
func MinCacheSize(blockSize int, bucketSize int64) int64 {
	fits := func(size int64) bool {
		_, err := layout(size, sectorSize, blockSize, bucketSize, 0)
		return err == nil
	}
	// layout fits every size from some point on: more room never takes
	// a bucket away. Search the multiples of metaBlock.
	lo, hi := int64(0), int64(1)
	for !fits(hi * metaBlock) {
		if hi > 1<<40 {
			return 0
		}
		lo, hi = hi, 2*hi
	}
	for lo+1 < hi {
		mid := lo + (hi-lo)/2
		if fits(mid * metaBlock) {
			hi = mid
		} else {
			lo = mid
		}
	}
	return hi * metaBlock
}
