package nbd

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/nbdcache/nbdcache/storage"
)

const testSize = 4 << 20

// startServer serves exports on a loopback listener and returns its
// address. The server is shut down when the test ends.
func startServer(t testing.TB, exports ...Export) (*Server, string) {
	t.Helper()
	return startServerConfig(t, Config{Exports: exports, HandshakeTimeout: 2 * time.Second})
}

// startServerConfig is startServer with a whole configuration; without
// exports it serves one 4 MiB memory device.
func startServerConfig(t testing.TB, cfg Config) (*Server, string) {
	t.Helper()
	if len(cfg.Exports) == 0 {
		cfg.Exports = []Export{{Name: "", Device: storage.NewMem(testSize)}}
	}
	s, err := NewServer(cfg)
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve(l) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := s.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
		if err := <-done; !errors.Is(err, ErrServerClosed) {
			t.Errorf("Serve returned %v", err)
		}
	})
	return s, l.Addr().String()
}

func dial(t testing.TB, addr string) *rawClient {
	t.Helper()
	nc, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nc.Close() })
	return newRawClient(t, nc)
}

func TestRequestRoundTrip(t *testing.T) {
	in := request{flags: 0x1f, typ: cmdWriteZeroes, cookie: 0xdeadbeefcafe, offset: 1 << 40, length: 123456}
	b := appendRequest(nil, in)
	if len(b) != requestHeaderSize {
		t.Fatalf("header is %d bytes", len(b))
	}
	out, err := parseRequest(b)
	if err != nil || out != in {
		t.Fatalf("round trip: %+v, %v", out, err)
	}
	b[0] ^= 1
	var bm errBadMagic
	if _, err := parseRequest(b); !errors.As(err, &bm) {
		t.Fatalf("bad magic accepted: %v", err)
	}
}

func TestNegotiation(t *testing.T) {
	_, addr := startServer(t,
		Export{Name: "a", Description: "first", Device: storage.NewMem(testSize)},
		Export{Name: "b", Device: storage.NewMem(2 * testSize), ReadOnly: true})

	t.Run("list", func(t *testing.T) {
		c := dial(t, addr)
		c.greet()
		c.sendOpt(optList, nil)
		var names []string
		for {
			r := c.readOptReply()
			if r.typ == repAck {
				break
			}
			if r.typ != repServer {
				t.Fatalf("reply %#x", r.typ)
			}
			n := binary.BigEndian.Uint32(r.data)
			names = append(names, string(r.data[4:4+n]))
		}
		if len(names) != 2 || names[0] != "a" || names[1] != "b" {
			t.Fatalf("LIST gave %q", names)
		}
	})
	t.Run("info-unknown-export", func(t *testing.T) {
		c := dial(t, addr)
		c.greet()
		c.sendOpt(optInfo, infoPayload("nope"))
		if r := c.readOptReply(); r.typ != repErrUnknown {
			t.Fatalf("INFO of unknown export: %#x", r.typ)
		}
		// The connection survives: GO still works.
		c.sendOpt(optGo, infoPayload("b"))
		for r := c.readOptReply(); r.typ != repAck; r = c.readOptReply() {
			if r.typ != repInfo {
				t.Fatalf("GO: %#x", r.typ)
			}
		}
	})
	t.Run("go", func(t *testing.T) {
		c := dial(t, addr)
		c.connect("b", true)
		if c.size != 2*testSize {
			t.Errorf("size %d", c.size)
		}
		want := uint16(tflagHasFlags | tflagReadOnly | tflagSendFlush | tflagSendFUA | tflagSendTrim |
			tflagSendWriteZeroes | tflagSendDF | tflagCanMultiConn | tflagSendCache | tflagSendFastZero)
		if c.tflags != want {
			t.Errorf("transmission flags %#x, want %#x", c.tflags, want)
		}
		bs := c.infos[infoBlockSize]
		if len(bs) != 12 || binary.BigEndian.Uint32(bs) != 1 || binary.BigEndian.Uint32(bs[4:]) != 4096 || binary.BigEndian.Uint32(bs[8:]) != 32<<20 {
			t.Errorf("block sizes % x", bs)
		}
		if string(c.infos[infoName]) != "b" {
			t.Errorf("name info %q", c.infos[infoName])
		}
	})
	t.Run("unsupported-option", func(t *testing.T) {
		c := dial(t, addr)
		c.greet()
		for _, opt := range []uint32{optStartTLS, 11, 0x7fff} {
			c.sendOpt(opt, nil)
			if r := c.readOptReply(); r.typ != repErrUnsup || r.opt != opt {
				t.Fatalf("option %d: reply %#x", opt, r.typ)
			}
		}
	})
	t.Run("set-meta-needs-structured", func(t *testing.T) {
		c := dial(t, addr)
		c.greet()
		c.sendOpt(optSetMetaContext, metaPayload("a", metaBaseAllocation))
		if r := c.readOptReply(); r.typ != repErrInvalid {
			t.Fatalf("reply %#x", r.typ)
		}
	})
	t.Run("list-meta", func(t *testing.T) {
		c := dial(t, addr)
		c.greet()
		c.sendOpt(optListMetaContext, metaPayload("a"))
		r := c.readOptReply()
		if r.typ != repMetaContext || string(r.data[4:]) != metaBaseAllocation {
			t.Fatalf("reply %#x %q", r.typ, r.data)
		}
		if r := c.readOptReply(); r.typ != repAck {
			t.Fatalf("final %#x", r.typ)
		}
	})
	t.Run("abort", func(t *testing.T) {
		c := dial(t, addr)
		c.greet()
		c.sendOpt(optAbort, nil)
		if r := c.readOptReply(); r.typ != repAck || r.opt != optAbort {
			t.Fatalf("ABORT: reply %#x for option %d", r.typ, r.opt)
		}
		c.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.r.ReadByte(); !errors.Is(err, io.EOF) {
			t.Fatalf("the server did not close the connection after ABORT: %v", err)
		}
	})
	t.Run("export-name", func(t *testing.T) {
		c := dial(t, addr)
		c.greet()
		c.sendOpt(optExportName, []byte("a"))
		b := c.read(10)
		if binary.BigEndian.Uint64(b) != testSize {
			t.Fatalf("size % x", b)
		}
		c.request(cmdWrite, 0, 1, 0, 3, []byte("abc"))
		if r := c.readReply(nil); r.errno != 0 || r.cookie != 1 {
			t.Fatalf("write: %+v", r)
		}
	})
	t.Run("garbage-costs-one-connection", func(t *testing.T) {
		c := dial(t, addr)
		c.read(18)
		c.send([]byte("GET / HTTP/1.1\r\n\r\n"))
		c.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.r.ReadByte(); err == nil {
			t.Fatal("server answered garbage")
		}
		d := dial(t, addr)
		d.connect("a", false)
	})
}

func TestHandshakeTimeout(t *testing.T) {
	_, addr := startServer(t)
	start := time.Now()
	var idle []*rawClient
	for range 20 { // half-open clients must not block new ones
		idle = append(idle, dial(t, addr))
	}
	c := dial(t, addr)
	c.connect("", false)
	if time.Since(start) > time.Second {
		t.Errorf("a new client waited %v behind idle ones", time.Since(start))
	}
	idle[0].read(18)
	idle[0].nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := idle[0].r.ReadByte(); err == nil {
		t.Fatal("stalled client got data")
	}
	if d := time.Since(start); d < 2*time.Second || d > 8*time.Second {
		t.Errorf("stalled client dropped after %v, want ~2s", d)
	}
}

func TestCommands(t *testing.T) {
	for _, structured := range []bool{false, true} {
		name := "simple"
		if structured {
			name = "structured"
		}
		t.Run(name, func(t *testing.T) {
			mem := storage.NewMem(testSize)
			_, addr := startServer(t, Export{Device: mem})
			c := dial(t, addr)
			c.connect("", structured)
			pat := bytes.Repeat([]byte{0xa5}, 8192)
			c.request(cmdWrite, cflagFUA, 1, 4096, 8192, pat)
			if r := c.readReply(nil); r.errno != 0 {
				t.Fatalf("write: %+v", r)
			}
			c.request(cmdRead, 0, 2, 4096, 8192, nil)
			if r := c.readReply(map[uint64]int{2: 8192}); r.errno != 0 || !bytes.Equal(r.data, pat) {
				t.Fatalf("read back: errno %d, %d bytes", r.errno, len(r.data))
			}
			c.request(cmdFlush, 0, 3, 0, 0, nil)
			if r := c.readReply(nil); r.errno != 0 {
				t.Fatalf("flush: %+v", r)
			}
			c.request(cmdWriteZeroes, cflagNoHole, 4, 4096, 4096, nil)
			c.request(cmdTrim, 0, 5, 8192, 4096, nil)
			c.request(cmdCache, 0, 6, 0, 4096, nil)
			for range 3 {
				if r := c.readReply(nil); r.errno != 0 {
					t.Fatalf("reply %+v", r)
				}
			}
			got := make([]byte, 8192)
			mem.ReadAt(got, 4096)
			if !bytes.Equal(got, make([]byte, 8192)) {
				t.Fatal("zero/trim did not reach the device")
			}
			if structured {
				c.request(cmdBlockStatus, 0, 7, 0, testSize, nil)
				r := c.readReply(nil)
				if r.errno != 0 || len(r.data) < 12 || binary.BigEndian.Uint32(r.data) != metaContextID {
					t.Fatalf("block status %+v", r)
				}
				var total uint64
				for d := r.data[4:]; len(d) >= 8; d = d[8:] {
					total += uint64(binary.BigEndian.Uint32(d))
				}
				if total != testSize {
					t.Errorf("descriptors cover %d bytes", total)
				}
				c.request(cmdBlockStatus, cflagReqOne, 8, 0, testSize, nil)
				if r := c.readReply(nil); len(r.data) != 12 {
					t.Errorf("REQ_ONE gave %d bytes", len(r.data))
				}
			}
		})
	}
}

// TestErrors drives every error the spec names; after each the connection
// is still usable and the device is untouched.
func TestErrors(t *testing.T) {
	mem := storage.NewMem(testSize)
	ro := storage.NewMem(testSize)
	nt := storage.NewMem(testSize)
	_, addr := startServer(t, Export{Name: "rw", Device: mem}, Export{Name: "ro", Device: ro, ReadOnly: true},
		Export{Name: "notrim", Device: noTrim{nt}})
	big := uint32(33 << 20)
	cases := []struct {
		name       string
		export     string
		structured bool
		typ, flags uint16
		off        uint64
		length     uint32
		payload    []byte
		want       uint32
	}{
		{"read-past-end", "rw", false, cmdRead, 0, testSize - 512, 1024, nil, errInval},
		{"read-offset-huge", "rw", false, cmdRead, 0, 1 << 63, 512, nil, errInval},
		{"write-past-end", "rw", false, cmdWrite, 0, testSize, 512, make([]byte, 512), errNoSpc},
		{"zero-past-end", "rw", false, cmdWriteZeroes, 0, testSize, 512, nil, errNoSpc},
		{"trim-past-end", "rw", false, cmdTrim, 0, testSize, 512, nil, errInval},
		{"write-read-only", "ro", false, cmdWrite, 0, 0, 512, make([]byte, 512), errPerm},
		{"trim-read-only", "ro", false, cmdTrim, 0, 0, 512, nil, errPerm},
		{"zero-read-only", "ro", false, cmdWriteZeroes, 0, 0, 512, nil, errPerm},
		{"unknown-flag", "rw", false, cmdRead, 1 << 9, 0, 512, nil, errInval},
		{"no-hole-on-write", "rw", false, cmdWrite, cflagNoHole, 0, 512, make([]byte, 512), errInval},
		{"df-without-structured", "rw", false, cmdRead, cflagDF, 0, 512, nil, errInval},
		{"flush-with-offset", "rw", false, cmdFlush, 0, 512, 0, nil, errInval},
		{"unknown-command", "rw", false, 42, 0, 0, 0, nil, errInval},
		{"block-status-without-meta", "rw", false, cmdBlockStatus, 0, 0, 512, nil, errInval},
		{"oversize-read", "rw", false, cmdRead, 0, 0, big, nil, errInval},
		{"oversize-read-df", "rw", true, cmdRead, cflagDF, 0, big, nil, errOverflow},
		{"oversize-write", "rw", false, cmdWrite, 0, 0, big, make([]byte, big), errInval},
		{"structured-error", "rw", true, cmdRead, 0, testSize, 512, nil, errInval},
		{"trim-not-offered", "notrim", false, cmdTrim, 0, 0, 512, nil, errNotSup},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := dial(t, addr)
			c.connect(tc.export, tc.structured)
			if tc.export == "notrim" && c.tflags&tflagSendTrim != 0 {
				t.Fatalf("TRIM offered by a device without it (flags %#x)", c.tflags)
			}
			c.request(tc.typ, tc.flags, 99, tc.off, tc.length, tc.payload)
			r := c.readReply(nil)
			if r.errno != tc.want || r.cookie != 99 {
				t.Fatalf("errno %d cookie %d, want errno %d", r.errno, r.cookie, tc.want)
			}
			if tc.structured && r.msg == "" {
				t.Error("structured error without a message")
			}
			// Still usable.
			c.request(cmdRead, 0, 100, 0, 512, nil)
			if r := c.readReply(map[uint64]int{100: 512}); r.errno != 0 || r.cookie != 100 {
				t.Fatalf("connection unusable after the error: %+v", r)
			}
		})
	}
	for _, m := range []*storage.Mem{mem, ro, nt} {
		var n int64
		m.Extents(0, testSize, func(e storage.Extent) bool {
			if !e.Hole {
				n += e.Length
			}
			return true
		})
		if n != 0 {
			t.Errorf("a rejected request touched %d bytes", n)
		}
	}
}

// noTrim is a device that cannot trim.
type noTrim struct{ *storage.Mem }

func (d noTrim) Caps() storage.Caps {
	c := d.Mem.Caps()
	c.Trim = false
	return c
}

// gate is a Device wrapper whose reads at one offset wait for a signal.
type gate struct {
	inner   storage.Device
	blockAt int64
	entered chan struct{} // optional: signalled when a read reaches blockAt
	release chan struct{}
}

func (g *gate) Size() int64        { return g.inner.Size() }
func (g *gate) Caps() storage.Caps { return g.inner.Caps() }
func (g *gate) Flush() error       { return g.inner.Flush() }
func (g *gate) Close() error       { return g.inner.Close() }
func (g *gate) ReadAt(p []byte, off int64) error {
	if off == g.blockAt {
		if g.entered != nil {
			g.entered <- struct{}{}
		}
		<-g.release
	}
	return g.inner.ReadAt(p, off)
}
func (g *gate) WriteAt(p []byte, off int64, f storage.Flags) error { return g.inner.WriteAt(p, off, f) }
func (g *gate) Trim(off, n int64, f storage.Flags) error           { return g.inner.Trim(off, n, f) }
func (g *gate) Zero(off, n int64, f storage.Flags) error           { return g.inner.Zero(off, n, f) }

func TestOutOfOrderReplies(t *testing.T) {
	g := &gate{inner: storage.NewMem(testSize), blockAt: 0, release: make(chan struct{})}
	_, addr := startServer(t, Export{Device: g})
	c := dial(t, addr)
	c.connect("", true)
	c.request(cmdRead, 0, 1, 0, 4096, nil) // blocks in the device
	lens := map[uint64]int{1: 4096}
	for i := uint64(2); i <= 64; i++ {
		c.request(cmdRead, 0, i, i*4096, 4096, nil)
		lens[i] = 4096
	}
	seen := map[uint64]bool{}
	for range 63 {
		r := c.readReply(lens)
		if r.cookie == 1 || r.errno != 0 {
			t.Fatalf("reply %d (errno %d) arrived while request 1 was blocked", r.cookie, r.errno)
		}
		seen[r.cookie] = true
	}
	close(g.release)
	if r := c.readReply(lens); r.cookie != 1 {
		t.Fatalf("last reply %d", r.cookie)
	}
	if len(seen) != 63 {
		t.Fatalf("%d distinct replies", len(seen))
	}
}

// TestMultiConnFlush: writes on several connections, then a FLUSH on
// another; the device must have seen every write before the FLUSH reply.
// TestMultiConnFlush: a FLUSH on one connection makes durable the writes
// completed on every other one (NBD_FLAG_CAN_MULTI_CONN): after it, a
// power cut that drops everything unsynced keeps them all.
func TestMultiConnFlush(t *testing.T) {
	dev := storage.NewCrash(testSize)
	_, addr := startServer(t, Export{Device: dev})
	var wg sync.WaitGroup
	for i := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := dial(t, addr)
			c.connect("", false)
			for j := range 16 {
				off := uint64(i*16+j) * 4096
				c.request(cmdWrite, 0, uint64(j), off, 4096, bytes.Repeat([]byte{byte(i + 1)}, 4096))
			}
			for range 16 {
				if r := c.readReply(nil); r.errno != 0 {
					t.Errorf("write: %+v", r)
				}
			}
		}()
	}
	wg.Wait()
	c := dial(t, addr)
	c.connect("", false)
	c.request(cmdFlush, 0, 1, 0, 0, nil)
	if r := c.readReply(nil); r.errno != 0 {
		t.Fatal(r)
	}
	after, rep := dev.PowerCut(storage.LoseUnsynced, nil)
	buf := make([]byte, 4096)
	for i := range 64 {
		if err := after.ReadAt(buf, int64(i)*4096); err != nil {
			t.Fatal(err)
		}
		if buf[0] != byte(i/16+1) {
			t.Fatalf("block %d holds %d after the flush and a power cut (%+v)", i, buf[0], rep)
		}
	}
}

func TestShutdownFinishesInFlight(t *testing.T) {
	g := &gate{inner: storage.NewMem(testSize), blockAt: 8192, entered: make(chan struct{}), release: make(chan struct{})}
	s, err := NewServer(Config{Exports: []Export{{Device: g}}})
	if err != nil {
		t.Fatal(err)
	}
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	go s.Serve(l)
	c := dial(t, l.Addr().String())
	c.connect("", false)
	c.request(cmdRead, 0, 7, 8192, 4096, nil)
	<-g.entered
	done := make(chan error)
	go func() { done <- s.Shutdown(context.Background()) }()
	select {
	case <-done:
		t.Fatal("Shutdown returned with a request in flight")
	case <-time.After(100 * time.Millisecond):
	}
	close(g.release)
	if r := c.readReply(map[uint64]int{7: 4096}); r.errno != 0 || r.cookie != 7 {
		t.Fatalf("in-flight request: %+v", r)
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

func TestDropConnections(t *testing.T) {
	s, addr := startServer(t)
	a, b := dial(t, addr), dial(t, addr)
	a.connect("", false)
	b.connect("", true)
	if n := s.DropConnections(); n != 2 {
		t.Fatalf("dropped %d connections", n)
	}
	for _, c := range []*rawClient{a, b} {
		c.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.r.ReadByte(); err == nil {
			t.Fatal("a dropped connection still delivers data")
		}
	}
	c := dial(t, addr) // new clients are welcome
	c.connect("", false)
	c.request(cmdFlush, 0, 1, 0, 0, nil)
	if r := c.readReply(nil); r.errno != 0 {
		t.Fatal(r)
	}
}

// TestHoleChunks: a structured read over a sparse range sends hole chunks
// for the holes and data chunks for the data, in order, covering it all.
func TestHoleChunks(t *testing.T) {
	mem := storage.NewMem(testSize)
	pat := bytes.Repeat([]byte{7}, 64<<10)
	mem.WriteAt(pat, 256<<10, 0)
	_, addr := startServer(t, Export{Device: mem})
	c := dial(t, addr)
	c.connect("", true)
	c.request(cmdRead, 0, 1, 0, 1<<20, nil)
	r := c.readReply(nil)
	want := make([]byte, 1<<20)
	copy(want[256<<10:], pat)
	if r.errno != 0 || !bytes.Equal(r.data, want) {
		t.Fatalf("errno %d, %d bytes, equal %v", r.errno, len(r.data), bytes.Equal(r.data, want))
	}
	if r.holes != 2 || r.chunks != 3 {
		t.Errorf("%d chunks, %d holes; want 3 and 2", r.chunks, r.holes)
	}
	// DF: one data chunk.
	c.request(cmdRead, cflagDF, 2, 0, 1<<20, nil)
	if r := c.readReply(nil); r.holes != 0 || r.chunks != 1 || !bytes.Equal(r.data, want) {
		t.Errorf("DF read: %d chunks, %d holes", r.chunks, r.holes)
	}
	// Simple replies are unaffected.
	d := dial(t, addr)
	d.connect("", false)
	d.request(cmdRead, 0, 3, 0, 1<<20, nil)
	if r := d.readReply(map[uint64]int{3: 1 << 20}); !bytes.Equal(r.data, want) {
		t.Error("simple read differs")
	}
}
