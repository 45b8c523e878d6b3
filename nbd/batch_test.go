package nbd

import (
	"bytes"
	"fmt"
	"maps"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nbdcache/nbdcache/storage"
)

// batchDevice is a recordingDevice that takes writes in batches
// (storage.BatchWriter): it applies a batch's writes in order, failing
// those at the offsets in failAt, takes at least a millisecond, and logs
// the batch as one call of kind OpWrite with n = the batch's length once
// it is done (so a Flush that overtakes a batch is logged before it).
type batchDevice struct {
	*recordingDevice

	bmu    sync.Mutex
	sizes  []int          // every batch's length, in order
	fua    map[int64]bool // the offsets of the writes that carried FUA
	failAt map[int64]error
}

func (d *batchDevice) WriteBatch(ws []storage.BatchWrite) {
	d.bmu.Lock()
	d.sizes = append(d.sizes, len(ws))
	fail := d.failAt
	d.bmu.Unlock()
	for i := range ws {
		w := &ws[i]
		if w.Flags&storage.FUA != 0 {
			d.bmu.Lock()
			d.fua[w.Off] = true
			d.bmu.Unlock()
		}
		if err := fail[w.Off]; err != nil {
			w.Err = err
			continue
		}
		w.Err = d.inner.WriteAt(w.P, w.Off, w.Flags)
	}
	time.Sleep(time.Millisecond) // a slow device: the window a misordered Flush would take
	d.record(call{kind: storage.OpWrite, off: -1, n: int64(len(ws))})
}

func (d *batchDevice) batchSizes() []int {
	d.bmu.Lock()
	defer d.bmu.Unlock()
	return append([]int(nil), d.sizes...)
}

// TestWritesBatchPerRead: WRITEs that arrive together, in one socket
// write, reach a storage.BatchWriter in batches of more than one, never
// through WriteAt; each gets its own reply (its own errno where the device
// failed it, and the refusal of an invalid one in their midst), a FLUSH
// sent behind them reaches the device after all of them, and every byte
// lands. Under a tiny in-flight limit and a buffer budget smaller than the
// pipelined payloads, the connection still answers everything (the batch
// runs before the read loop waits for a slot or a buffer). The run is
// seeded; the seed is printed.
func TestWritesBatchPerRead(t *testing.T) {
	seed := rand.Uint64()
	t.Logf("seed %d", seed)
	for _, tc := range []struct {
		name       string
		cfg        Config
		structured bool
		writes     int
		maxBlocks  int // a write is 1 to maxBlocks 4 KiB blocks
	}{
		{"defaults", Config{}, true, 48, 4},
		{"simple replies", Config{}, false, 48, 4},
		{"in-flight limit 3", Config{MaxInFlight: 3}, true, 100, 4},
		// A quarter of the budget (the share) is less than the payloads
		// of one buffered read cost (blocks round up to powers of two).
		{"small budget", Config{BufferBudget: 1 << 20, MaxConnections: 1}, true, 200, 24},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, 1))
			mem := storage.NewMem(testSize)
			dev := &batchDevice{recordingDevice: newRecordingDevice(mem), failAt: map[int64]error{}, fua: map[int64]bool{}}
			cfg := tc.cfg
			cfg.Exports = []Export{{Device: dev}}
			_, addr := startServerConfig(t, cfg)
			c := dial(t, addr)
			c.connect("", tc.structured)

			want := make([]byte, testSize)
			wantErr := map[uint64]uint32{}
			wantFUA := map[int64]bool{}
			var stream []byte
			blocks := testSize / 4096
			for i, b := range rng.Perm(blocks)[:tc.writes] {
				cookie := uint64(i + 1)
				off := int64(b) * 4096
				n := 4096 * (1 + rng.IntN(tc.maxBlocks))
				if off+int64(n) > testSize {
					n = int(testSize - off)
				}
				p := make([]byte, n)
				for j := range p {
					p[j] = byte(rng.Uint32())
				}
				var flags uint16
				switch rng.IntN(8) {
				case 0:
					flags = cflagFUA
				case 1:
					// Device failure: its reply carries its errno; its
					// bytes do not land.
					dev.failAt[off] = fmt.Errorf("injected: %w", unix.ENOSPC)
					wantErr[cookie] = errNoSpc
				case 2:
					// Invalid (past the end): refused before the device,
					// in the middle of a batch.
					off = testSize
					wantErr[cookie] = errNoSpc
				}
				if wantErr[cookie] == 0 {
					copy(want[off:], p)
				}
				if flags&cflagFUA != 0 {
					wantFUA[off] = true
				}
				stream = appendRequest(stream, request{flags: flags, typ: cmdWrite, cookie: cookie, offset: uint64(off), length: uint32(n)})
				stream = append(stream, p...)
			}
			flushCookie := uint64(tc.writes + 1)
			stream = appendRequest(stream, request{typ: cmdFlush, cookie: flushCookie})
			c.send(stream)

			seen := map[uint64]bool{}
			for range tc.writes + 1 {
				r := c.readReply(nil)
				if seen[r.cookie] {
					t.Fatalf("two replies for cookie %d", r.cookie)
				}
				seen[r.cookie] = true
				if r.errno != wantErr[r.cookie] {
					t.Errorf("cookie %d: errno %d, want %d (%s)", r.cookie, r.errno, wantErr[r.cookie], r.msg)
				}
			}
			calls := dev.take()
			var writes, batched int
			for i, cl := range calls {
				switch {
				case cl.kind == storage.OpWrite && cl.off == -1:
					batched += int(cl.n)
				case cl.kind == storage.OpWrite:
					writes++
				case cl.kind == storage.OpFlush && i != len(calls)-1:
					t.Errorf("the FLUSH reached the device before a batch: %v", calls)
				}
			}
			valid := tc.writes
			for _, e := range wantErr {
				if e == errNoSpc {
					valid--
				}
			}
			valid += len(dev.failAt)
			if writes != 0 || batched != valid {
				t.Errorf("device saw %d single writes and %d batched ones, want 0 and %d", writes, batched, valid)
			}
			sizes := dev.batchSizes()
			if len(sizes) == 0 || len(sizes) == valid {
				t.Errorf("batch sizes %v: the writes of one socket write never shared a batch", sizes)
			}
			t.Logf("%d writes in %d batches", valid, len(sizes))
			dev.bmu.Lock()
			if !maps.Equal(dev.fua, wantFUA) {
				t.Errorf("FUA reached the device at %v, want %v", dev.fua, wantFUA)
			}
			dev.bmu.Unlock()
			got := make([]byte, testSize)
			if err := mem.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("the device's bytes differ from the writes acknowledged")
			}
		})
	}
}
