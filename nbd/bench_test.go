package nbd

import (
	"bufio"
	"encoding/binary"
	"io"
	"net"
	"path/filepath"
	"testing"

	"github.com/nbdcache/nbdcache/storage"
)

// benchPipelined drives one connection over a unix socket with depth
// requests in flight, like fio at QD depth, and reports the cost per
// request of client and server together.
func benchPipelined(b *testing.B, typ uint16, size uint32, depth int) {
	benchPipelinedOn(b, storage.NewMem(256<<20), typ, size, depth)
}

// batchMem is a memory device that takes writes in batches, one after
// another: the read loop then runs WRITEs itself, as on a cache.
type batchMem struct{ *storage.Mem }

func (m batchMem) WriteBatch(ws []storage.BatchWrite) {
	for i := range ws {
		ws[i].Err = m.WriteAt(ws[i].P, ws[i].Off, ws[i].Flags)
	}
}

func benchPipelinedOn(b *testing.B, dev storage.Device, typ uint16, size uint32, depth int) {
	s, err := NewServer(Config{Exports: []Export{{Device: dev}}})
	if err != nil {
		b.Fatal(err)
	}
	sock := filepath.Join(b.TempDir(), "s")
	l, err := net.Listen("unix", sock)
	if err != nil {
		b.Fatal(err)
	}
	go s.Serve(l)
	defer s.Shutdown(b.Context())
	nc, err := net.Dial("unix", sock)
	if err != nil {
		b.Fatal(err)
	}
	defer nc.Close()
	c := newRawClient(b, nc)
	c.connect("", false)
	r := bufio.NewReaderSize(nc, 256<<10)
	payload := make([]byte, size)
	slots := uint64(dev.Size()) / uint64(size)
	var hdr [requestHeaderSize]byte
	send := func(i int) {
		req := request{typ: typ, cookie: uint64(i), offset: (uint64(i) * 7919 % slots) * uint64(size), length: size}
		appendRequest(hdr[:0], req)
		nc.Write(hdr[:])
		if typ == cmdWrite {
			nc.Write(payload)
		}
	}
	var rh [simpleReplySize]byte
	recv := func() {
		if _, err := io.ReadFull(r, rh[:]); err != nil {
			b.Fatal(err)
		}
		if e := binary.BigEndian.Uint32(rh[4:]); e != 0 {
			b.Fatalf("errno %d", e)
		}
		if typ == cmdRead {
			if _, err := io.ReadFull(r, payload); err != nil {
				b.Fatal(err)
			}
		}
	}
	b.SetBytes(int64(size))
	b.ReportAllocs()
	b.ResetTimer()
	sent := 0
	for ; sent < depth && sent < b.N; sent++ {
		send(sent)
	}
	for done := 0; done < b.N; done++ {
		recv()
		if sent < b.N {
			send(sent)
			sent++
		}
	}
}

func BenchmarkRead4KQD32(b *testing.B)  { benchPipelined(b, cmdRead, 4096, 32) }
func BenchmarkWrite4KQD32(b *testing.B) { benchPipelined(b, cmdWrite, 4096, 32) }
func BenchmarkRead1MQD8(b *testing.B)   { benchPipelined(b, cmdRead, 1<<20, 8) }

// BenchmarkWrite4KQD32Batch: WRITEs that the read loop runs in batches.
func BenchmarkWrite4KQD32Batch(b *testing.B) {
	benchPipelinedOn(b, batchMem{storage.NewMem(256 << 20)}, cmdWrite, 4096, 32)
}
