package cache

import (
	"bytes"
	"testing"

	"github.com/nbdcache/nbdcache/storage"
)

// TestFUAIsDurable: in every mode, a write or a zero with FUA is durable
// when it returns: a power cut right after it, which drops everything
// unsynced on both devices, keeps it. A trim with FUA ends with a sync of
// a device after the backing trim (a trimmed range may read back as its
// old data, so the cut alone proves nothing for it).
//
// It fails if the cache drops FUA anywhere between its entry points and
// the commit that makes a request durable (ack).
func TestFUAIsDurable(t *testing.T) {
	const off, n = 64 << 10, 8 << 10
	for _, mode := range []Mode{Writeback, Writethrough, Writearound, None} {
		for _, op := range []string{"write", "zero", "trim"} {
			t.Run(mode.String()+"/"+op, func(t *testing.T) {
				cdev, bdev := storage.NewCrash(4<<20), storage.NewCrash(1<<20)
				fo := FormatOptions{BackingID: testBackingID, BucketSize: 64 << 10, JournalSize: 32 * metaBlock}
				if err := Format(cdev, bdev, fo); err != nil {
					t.Fatal(err)
				}
				opts := Options{BackingID: testBackingID, Mode: mode, SequentialCutoff: -1}
				c, err := openStill(cdev, bdev, opts)
				if err != nil {
					t.Fatal(err)
				}
				// Old data, flushed, under the zero; an uncached range
				// for the trim.
				if op == "zero" {
					mustWrite(t, c, off, n, 1)
					mustFlush(t, c)
				}
				syncs := cdev.Stats().Syncs + bdev.Stats().Syncs
				want := payload(off, n, 2)
				switch op {
				case "write":
					err = c.WriteAt(want, off, storage.FUA)
				case "zero":
					want = make([]byte, n)
					err = c.Zero(off, n, storage.FUA)
				case "trim":
					err = c.Trim(off, n, storage.FUA)
				}
				if err != nil {
					t.Fatal(err)
				}
				if op == "trim" {
					if s := cdev.Stats().Syncs + bdev.Stats().Syncs; s == syncs {
						t.Fatal("a trim with FUA returned without a sync of either device")
					}
					if err := c.Close(); err != nil {
						t.Fatal(err)
					}
					return
				}
				devs, _ := storage.PowerCutAll(storage.LoseUnsynced, nil, cdev, bdev)
				c.Close() // fails after the cut
				c2, err := openStill(devs[0], devs[1], opts)
				if err != nil {
					t.Fatal(err)
				}
				got := make([]byte, n)
				if err := c2.ReadAt(got, off); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, want) {
					id, err := sectorID(got[:sectorSize], off/sectorSize)
					t.Fatalf("a %s with FUA was lost by a power cut right after it returned: sector %d holds write %d (%v)", op, off/sectorSize, id, err)
				}
				closeChecked(t, c2, devPair{devs[0], devs[1]})
			})
		}
	}
}
