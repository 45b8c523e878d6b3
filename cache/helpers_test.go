package cache

import (
	"encoding/binary"
	"flag"
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/nbdcache/nbdcache/storage"
)

var flagCuts = flag.Int("cuts", 0, "power-cut points for TestPowerCut (default 1200; e.g. 100000 for a long run), the timed power-cut tests and TestPowerCutConcurrent (default 500)")

var testBackingID = [16]byte{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16}

// sector content: self-describing, so a read names the write it came from.
//
//	0   8  LBA (sector number)
//	8   8  write id
//	16  .. pattern derived from (id, LBA)
func fillSector(b []byte, lba int64, id uint64) {
	binary.LittleEndian.PutUint64(b[0:], uint64(lba))
	binary.LittleEndian.PutUint64(b[8:], id)
	x := id*0x9e3779b97f4a7c15 ^ uint64(lba)*0xbf58476d1ce4e5b9
	for i := 16; i < sectorSize; i += 8 {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		binary.LittleEndian.PutUint64(b[i:], x)
	}
}

// sectorID identifies the write a sector holds: 0 for zeroes; an error for
// garbage or another sector's data.
func sectorID(b []byte, lba int64) (uint64, error) {
	zero := true
	for _, v := range b {
		if v != 0 {
			zero = false
			break
		}
	}
	if zero {
		return 0, nil
	}
	id := binary.LittleEndian.Uint64(b[8:])
	if got := int64(binary.LittleEndian.Uint64(b[0:])); got != lba {
		return 0, fmt.Errorf("sector %d holds data of sector %d (write %d)", lba, got, id)
	}
	want := make([]byte, sectorSize)
	fillSector(want, lba, id)
	if string(want) != string(b) {
		return 0, fmt.Errorf("sector %d holds garbage (claims write %d)", lba, id)
	}
	return id, nil
}

func payload(off, n int64, id uint64) []byte {
	p := make([]byte, n)
	for i := int64(0); i < n; i += sectorSize {
		fillSector(p[i:i+sectorSize], (off+i)/sectorSize, id)
	}
	return p
}

type devPair struct {
	cache, back storage.Device
}

func formatMem(t testing.TB, cacheSize, backSize int64, fo FormatOptions) devPair {
	t.Helper()
	d := devPair{storage.NewMem(cacheSize), storage.NewMem(backSize)}
	fo.BackingID = testBackingID
	if err := Format(d.cache, d.back, fo); err != nil {
		t.Fatal(err)
	}
	return d
}

func openT(t testing.TB, d devPair, o Options) *Cache {
	t.Helper()
	return openHooked(t, d, o, testHooks{})
}

// openStillT is openT with no background work (testHooks.noBackground).
func openStillT(t testing.TB, d devPair, o Options) *Cache {
	t.Helper()
	return openHooked(t, d, o, testHooks{noBackground: true})
}

// openStill is Open with no background work (testHooks.noBackground):
// writeback, GC and checkpoints happen only when the test or the cache's
// need for space or journal room asks.
func openStill(cacheDev, backing storage.Device, o Options) (*Cache, error) {
	return open(cacheDev, backing, o, testHooks{noBackground: true})
}

// openHooked is openT with test seams (hooks.go).
func openHooked(t testing.TB, d devPair, o Options, h testHooks) *Cache {
	t.Helper()
	o.BackingID = testBackingID
	c, err := open(d.cache, d.back, o, h)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// closeChecked verifies c's invariants live, closes it and requires the
// deep check (clean extents equal to the backing) to pass on its devices.
func closeChecked(t testing.TB, c *Cache, d devPair) {
	t.Helper()
	if err := c.Verify(); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := CheckDeep(d.cache, d.back); err != nil {
		t.Fatal(err)
	}
}

func rng(seed uint64) *rand.Rand { return rand.New(rand.NewPCG(seed, seed^0x5eed)) }

// writebackStep writes back up to about maxBytes of dirty data from the
// cursor on, in address order, through the writeback engine (the
// flusher's WriteBack, as GC's cleaning does), and returns the cursor
// after what it took (0 once nothing is left after from) and the bytes it
// took. Tests drive writeback with it when no background runs.
func writebackStep(c *Cache, from, maxBytes int64) (next, taken int64, err error) {
	var es []btreeExtent
	next = from
	c.DirtyExtents(from, func(e btreeExtent) bool {
		if taken >= maxBytes {
			return false
		}
		es = append(es, e)
		taken += e.Len
		next = e.End()
		return true
	})
	if len(es) == 0 {
		return 0, 0, nil // wrap around
	}
	if _, err := c.flusher.WriteBack(es, nil); err != nil {
		return next, 0, fmt.Errorf("cache: writeback: %w", err)
	}
	return next, taken, nil
}

// openCrashStill formats a cache of cacheSize bytes over a backing of
// backSize, both storage.Crash devices (a power cut can be played on
// them), and opens it with the hooks given (o.BackingID is set).
func openCrashStill(t testing.TB, cacheSize, backSize int64, fo FormatOptions, o Options, h testHooks) (*Cache, *storage.Crash, *storage.Crash) {
	t.Helper()
	cdev, bdev := storage.NewCrash(cacheSize), storage.NewCrash(backSize)
	fo.BackingID, o.BackingID = testBackingID, testBackingID
	if err := Format(cdev, bdev, fo); err != nil {
		t.Fatal(err)
	}
	c, err := open(cdev, bdev, o, h)
	if err != nil {
		t.Fatal(err)
	}
	return c, cdev, bdev
}
