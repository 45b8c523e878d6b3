package cache

import (
	"sync"
	"testing"

	"github.com/nbdcache/nbdcache/storage"
	"github.com/nbdcache/nbdcache/writeback"
)

// firstWrite records how many bytes rd had read, since base, when the
// device it wraps saw its first write after armed.
type firstWrite struct {
	storage.Device
	rd          *countReads
	mu          sync.Mutex
	armed, seen bool
	base, at    int64
}

func (d *firstWrite) WriteAt(p []byte, off int64, f storage.Flags) error {
	d.mu.Lock()
	if d.armed && !d.seen {
		d.seen = true
		d.at = d.rd.bytes.Load() - d.base
	}
	d.mu.Unlock()
	return d.Device.WriteAt(p, off, f)
}

// TestGCWritebackReadsAheadAWindow: a GC cleaning pass hands all its
// victims' dirty pieces to one WriteBack: a sixteenth of the cache, or a
// quarter over a disk. Off a disk the flusher reads them ahead a window
// at a time (a quarter of BatchBytes, at least MaxWrite: here MaxWrite,
// 1 MiB), and the next window beside the writes of one, so at most two
// windows are read (and held in memory) before the first backing write;
// over a disk it reads each span just before its write. Found by review: the first read-ahead read all
// of them first, 30 MiB of a 120 MiB cache, and would have held a
// quarter of a large cache in memory.
func TestGCWritebackReadsAheadAWindow(t *testing.T) {
	const window = 2 << 20
	for _, disk := range []bool{false, true} {
		t.Run(map[bool]string{false: "fast", true: "disk"}[disk], func(t *testing.T) {
			rd := &countReads{Device: storage.NewMem(128 << 20)}
			fw := &firstWrite{Device: storage.NewMem(1 << 30), rd: rd}
			d := devPair{rd, fw}
			if err := Format(d.cache, d.back, FormatOptions{BackingID: testBackingID, BucketSize: 256 << 10}); err != nil {
				t.Fatal(err)
			}
			c := openStillT(t, d, Options{SequentialCutoff: -1, Writeback: writeback.Config{BatchBytes: window}})
			defer c.Close()
			lowFree := c.lowFree()
			for off := int64(0); ; off += 128 << 10 { // scattered: extents do not merge
				c.mu.Lock()
				free := len(c.mu.space.free) + len(c.mu.space.pending)
				c.mu.Unlock()
				if free < lowFree {
					break
				}
				if err := c.WriteAt(payload(off, 64<<10, 1), off, 0); err != nil {
					t.Fatal(err)
				}
			}
			if disk {
				c.health.nanos.Store(slowBackingNanos * 2)
			}
			fw.mu.Lock()
			fw.base = rd.bytes.Load()
			fw.armed = true
			fw.mu.Unlock()
			freed, _ := c.gc(true, true)
			st := c.Stats()
			t.Logf("%d buckets, %d freed, %d MiB cleaned; %d KiB read before the first backing write", c.sb.NBuckets, freed, st.GCCleanedBytes>>20, fw.at>>10)
			limit := int64(2 << 20) // two windows of MaxWrite
			if disk {
				limit = 8 * 64 << 10 // a span for each of the MaxInFlight jobs under way
			}
			if freed == 0 || st.GCCleanedBytes <= 2*window {
				t.Fatalf("GC cleaned %d bytes and freed %d buckets: too little to show a window", st.GCCleanedBytes, freed)
			}
			if fw.at > limit {
				t.Errorf("%d KiB read from the cache before the first backing write, want at most %d", fw.at>>10, limit>>10)
			}
		})
	}
}
