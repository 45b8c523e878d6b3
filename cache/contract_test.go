package cache_test

import (
	"testing"

	"github.com/nbdcache/nbdcache/cache"
	"github.com/nbdcache/nbdcache/storage"
	"github.com/nbdcache/nbdcache/storage/storagetest"
)

// TestDeviceContract runs the storage.Device contract on the cache in each
// mode, with its background work running and a cache device smaller than
// the backing (GC, eviction and bypasses happen during the suite), as
// nbd serves it.
func TestDeviceContract(t *testing.T) {
	for _, m := range []cache.Mode{cache.Writeback, cache.Writethrough, cache.Writearound, cache.None} {
		t.Run(m.String(), func(t *testing.T) {
			storagetest.Run(t, func(t *testing.T, size int64) storage.Device {
				id := [16]byte{7}
				cdev, bdev := storage.NewMem(512<<10), storage.NewMem(size)
				if err := cache.Format(cdev, bdev, cache.FormatOptions{BackingID: id, BucketSize: 32 << 10}); err != nil {
					t.Fatal(err)
				}
				c, err := cache.Open(cdev, bdev, cache.Options{BackingID: id, Mode: m, PromoteAll: true})
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { c.Close() })
				return c
			}, storagetest.Options{TrimKeeps: true})
		})
	}
}
