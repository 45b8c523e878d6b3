package nbd

import (
	"bytes"
	"fmt"
	"io"
	"maps"
	"math/rand/v2"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"

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

// TestBatchedWriteCutShortLandsNothing: a batched WRITE whose payload
// never arrives whole (the client stops sending halfway) writes nothing,
// while the whole WRITE before it, read in the same batch, lands. The
// read loop takes a batched payload out of its read buffer without a copy
// only once all of it is there; a payload still arriving is read the
// usual way, which fails at the end of the stream.
func TestBatchedWriteCutShortLandsNothing(t *testing.T) {
	for _, cut := range []int{0, 1, 4095, 8191} {
		t.Run(fmt.Sprintf("cut=%d", cut), func(t *testing.T) {
			mem := storage.NewMem(testSize)
			dev := &batchDevice{recordingDevice: newRecordingDevice(mem), failAt: map[int64]error{}, fua: map[int64]bool{}}
			_, addr := startServerConfig(t, Config{Exports: []Export{{Device: dev}}})
			c := dial(t, addr)
			c.connect("", true)
			whole := bytes.Repeat([]byte{0xaa}, 4096)
			short := bytes.Repeat([]byte{0xbb}, 8192)
			stream := appendRequest(nil, request{typ: cmdWrite, cookie: 1, offset: 0, length: 4096})
			stream = append(stream, whole...)
			stream = appendRequest(stream, request{typ: cmdWrite, cookie: 2, offset: 65536, length: 8192})
			stream = append(stream, short[:cut]...)
			c.send(stream)
			if err := c.nc.(*net.TCPConn).CloseWrite(); err != nil {
				t.Fatal(err)
			}
			// The server answers what it ran and closes: read to the end.
			if _, err := io.Copy(io.Discard, c.r); err != nil {
				t.Fatal(err)
			}
			got := make([]byte, 65536+8192)
			if err := mem.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got[:4096], whole) {
				t.Error("the whole WRITE before the cut did not land")
			}
			if i := bytes.IndexFunc(got[65536:], func(r rune) bool { return r != 0 }); i >= 0 {
				t.Errorf("the WRITE cut short after %d of its 8192 bytes landed bytes (first at +%d)", cut, i)
			}
		})
	}
}

// alignedBatchDevice is a batchDevice that wants buffers aligned in memory
// (storage.AlignedWriter, as an O_DIRECT file) and counts the batched
// writes whose buffer is not page-aligned.
type alignedBatchDevice struct {
	*batchDevice
	unaligned, writes atomic.Int64
}

func (d *alignedBatchDevice) WantsAligned() bool { return true }

func (d *alignedBatchDevice) WriteBatch(ws []storage.BatchWrite) {
	for _, w := range ws {
		d.writes.Add(1)
		if uintptr(unsafe.Pointer(&w.P[0]))%4096 != 0 {
			d.unaligned.Add(1)
		}
	}
	d.batchDevice.WriteBatch(ws)
}

// TestBatchedPayloadsAlignedForDirect: a device that wants aligned buffers
// gets its batched payloads in buffers of the arena (page-aligned), not
// left in the read buffer, where a 28-byte header before each leaves them
// unaligned; every byte still lands.
func TestBatchedPayloadsAlignedForDirect(t *testing.T) {
	mem := storage.NewMem(testSize)
	dev := &alignedBatchDevice{batchDevice: &batchDevice{recordingDevice: newRecordingDevice(mem), failAt: map[int64]error{}, fua: map[int64]bool{}}}
	_, addr := startServerConfig(t, Config{Exports: []Export{{Device: dev}}})
	c := dial(t, addr)
	c.connect("", true)
	var stream []byte
	for i := range 32 {
		stream = appendRequest(stream, request{typ: cmdWrite, cookie: uint64(i + 1), offset: uint64(i) * 4096, length: 4096})
		stream = append(stream, bytes.Repeat([]byte{byte(i + 1)}, 4096)...)
	}
	c.send(stream)
	for range 32 {
		if r := c.readReply(nil); r.errno != 0 {
			t.Fatalf("WRITE %d: errno %d", r.cookie, r.errno)
		}
	}
	if dev.writes.Load() == 0 {
		t.Fatal("no write came through WriteBatch: the test shows nothing")
	}
	if n := dev.unaligned.Load(); n > 0 {
		t.Errorf("%d of %d batched payloads not page-aligned for a device that wants them aligned", n, dev.writes.Load())
	}
	got := make([]byte, 32*4096)
	if err := mem.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	for i := range 32 {
		if got[i*4096] != byte(i+1) || got[i*4096+4095] != byte(i+1) {
			t.Fatalf("block %d did not land", i)
		}
	}
}
