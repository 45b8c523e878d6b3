package kernel

import (
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"testing"
	"time"

	"github.com/mdlayher/genetlink"
	"github.com/mdlayher/netlink"
	"github.com/nbdcache/nbdcache/test/testseed"
)

// request encodes a simple NBD request header (and payload for WRITE).
func request(typ uint16, length uint32, payload bool) []byte {
	b := make([]byte, 28)
	binary.BigEndian.PutUint32(b[0:4], requestMagic)
	binary.BigEndian.PutUint16(b[6:8], typ)
	binary.BigEndian.PutUint64(b[8:16], 42)
	binary.BigEndian.PutUint32(b[24:28], length)
	if payload {
		p := make([]byte, length)
		for i := range p {
			// payload bytes that look like a DISC header, to catch a
			// sniffer that does not skip payloads
			p[i] = []byte{0x25, 0x60, 0x95, 0x13, 0, 0, 0, 2}[i%8]
		}
		b = append(b, p...)
	}
	return b
}

// TestSnifferModel feeds random request streams, cut at random places,
// and compares what the sniffer saw with the model: DISC was seen iff a
// DISC header was fed completely.
func TestSnifferModel(t *testing.T) {
	seed := testseed.Get(t)
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	for iter := range 500 {
		var stream []byte
		discAt := -1 // offset just after the DISC header
		n := r.IntN(20)
		for range n {
			switch r.IntN(5) {
			case 0, 1: // WRITE with payload
				stream = append(stream, request(nbdCmdWrite, uint32(r.IntN(9000)), true)...)
			case 2: // READ
				stream = append(stream, request(0, uint32(r.IntN(1<<20)), false)...)
			case 3: // FLUSH, TRIM
				stream = append(stream, request(uint16(3+r.IntN(2)), uint32(r.IntN(1<<20)), false)...)
			case 4:
				if discAt < 0 && r.IntN(3) == 0 {
					stream = append(stream, request(nbdCmdDisc, 0, false)...)
					discAt = len(stream)
				}
			}
		}
		var s sniffer
		fed := 0
		for fed < len(stream) {
			k := 1 + r.IntN(min(len(stream)-fed, 4096))
			s.feed(stream[fed : fed+k])
			fed += k
			want := discAt >= 0 && fed >= discAt
			if s.disc.Load() != want {
				t.Fatalf("iter %d: after %d of %d bytes (DISC ends at %d) disc=%v", iter, fed, len(stream), discAt, s.disc.Load())
			}
			if s.served.Load() != (fed >= 28) {
				t.Fatalf("iter %d: after %d bytes served=%v", iter, fed, s.served.Load())
			}
		}
		if s.broken {
			t.Fatalf("iter %d: sniffer lost the stream", iter)
		}
	}
	var s sniffer
	s.feed([]byte("garbage that is no request header....."))
	if !s.broken || s.disc.Load() {
		t.Fatal("garbage not detected")
	}
}

// TestTrackedConnsDone: Done closes only when every connection closed,
// and a DISC marks the disconnect as requested; without netlink no
// replacement is attempted.
func TestTrackedConnsDone(t *testing.T) {
	served := make(chan net.Conn, 4)
	a := &Attachment{done: make(chan struct{}), cfg: AttachConfig{Connections: 2,
		Serve: func(c net.Conn) error { served <- c; return nil }}}
	var peers []net.Conn
	for range 2 {
		c1, c2 := net.Pipe()
		if err := a.serve(c1); err != nil {
			t.Fatal(err)
		}
		peers = append(peers, c2)
	}
	c := <-served
	d := <-served
	// The kernel sends DISC on the first connection.
	go peers[0].Write(request(nbdCmdDisc, 0, false))
	buf := make([]byte, 28)
	if _, err := io.ReadFull(c, buf); err != nil {
		t.Fatal(err)
	}
	c.Close()
	c.Close() // counted once
	select {
	case <-a.Done():
		t.Fatal("done with a connection still open")
	default:
	}
	if !a.DisconnectRequested() {
		t.Fatal("DISC not noticed")
	}
	d.Close()
	select {
	case <-a.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("not done after every connection closed")
	}
}

func TestSocketpair(t *testing.T) {
	k, s, err := socketpair(1 << 20)
	if err != nil {
		t.Fatal(err)
	}
	defer k.Close()
	defer s.Close()
	go k.Write([]byte("ping"))
	buf := make([]byte, 4)
	if _, err := io.ReadFull(s, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("read %q, %v", buf, err)
	}
}

// TestHealReplacesDeadConnection: a connection that ends without a DISC
// is replaced with a fresh socket through RECONFIGURE, Done stays open,
// and nothing is replaced after Release.
func TestHealReplacesDeadConnection(t *testing.T) {
	reconf := make(chan []byte, 8)
	n := fakeKernel(t, func(greq genetlink.Message, _ netlink.Message) ([]genetlink.Message, error) {
		if greq.Header.Command == cmdReconfigure {
			reconf <- greq.Data
		}
		return []genetlink.Message{{}}, nil
	})
	served := make(chan net.Conn, 8)
	a := &Attachment{done: make(chan struct{}), nl: n, index: 3, log: slog.New(slog.DiscardHandler),
		cfg: AttachConfig{Connections: 1, Config: Config{Index: 3, Backend: "b", DeadConnTimeout: time.Minute},
			Serve: func(c net.Conn) error { served <- c; return nil }}}
	c1, c2 := net.Pipe()
	defer c2.Close()
	if err := a.serve(c1); err != nil {
		t.Fatal(err)
	}
	(<-served).Close() // the kernel gave the socket up: no DISC
	var data []byte
	select {
	case data = <-reconf:
	case <-time.After(10 * time.Second):
		t.Fatal("no RECONFIGURE after a dead connection")
	}
	ad, err := netlink.NewAttributeDecoder(data)
	if err != nil {
		t.Fatal(err)
	}
	var index uint32 = 99
	socks := 0
	for ad.Next() {
		switch ad.Type() {
		case attrIndex:
			index = ad.Uint32()
		case attrSockets:
			ad.Nested(func(nad *netlink.AttributeDecoder) error {
				for nad.Next() {
					socks++
				}
				return nil
			})
		}
	}
	if index != 3 || socks != 1 {
		t.Fatalf("reconfigure index %d with %d sockets, want 3 and 1", index, socks)
	}
	repl := <-served
	select {
	case <-a.Done():
		t.Fatal("done while the replacement is open")
	default:
	}
	a.Release()
	repl.Close()
	select {
	case <-a.Done():
	case <-time.After(10 * time.Second):
		t.Fatal("not done after the replacement closed")
	}
	select {
	case <-reconf:
		t.Fatal("replaced a connection after Release")
	default:
	}
}

// TestChooseInterface: netlink when it is there; ioctls when asked or
// when the family is missing; a reconnect without netlink is refused;
// any other netlink failure is passed on, not papered over with ioctls.
func TestChooseInterface(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	nl := &Netlink{}
	other := errors.New("netlink socket: permission denied")
	for _, tc := range []struct {
		name      string
		cfg       AttachConfig
		dialErr   error
		wantNL    bool
		wantErr   error
		wantDials int
	}{
		{"netlink", AttachConfig{}, nil, true, nil, 1},
		{"no family: ioctls", AttachConfig{}, ErrNoNetlink, false, nil, 1},
		{"forced ioctls", AttachConfig{ForceIoctl: true}, nil, false, nil, 0},
		{"reconnect over netlink", AttachConfig{Reconnect: true}, nil, true, nil, 1},
		{"reconnect without family", AttachConfig{Reconnect: true}, ErrNoNetlink, false, ErrUnsupported, 1},
		{"reconnect with forced ioctls", AttachConfig{Reconnect: true, ForceIoctl: true}, nil, false, ErrUnsupported, 0},
		{"other netlink error", AttachConfig{}, other, false, other, 1},
	} {
		dials := 0
		got, err := chooseInterface(tc.cfg, func() (*Netlink, error) {
			dials++
			if tc.dialErr != nil {
				return nil, tc.dialErr
			}
			return nl, nil
		}, log)
		if (got != nil) != tc.wantNL || dials != tc.wantDials {
			t.Errorf("%s: netlink %v after %d dials, want %v after %d", tc.name, got != nil, dials, tc.wantNL, tc.wantDials)
		}
		if (tc.wantErr == nil) != (err == nil) || (tc.wantErr != nil && !errors.Is(err, tc.wantErr)) {
			t.Errorf("%s: error %v, want %v", tc.name, err, tc.wantErr)
		}
	}
}

// TestHealBudget: connections that served requests (dropped by the
// server, as fault mode's power cuts do) are always replaced; ones that
// died before their first request only 4 times per connection a minute;
// none after a disconnect or without netlink.
func TestHealBudget(t *testing.T) {
	a := &Attachment{cfg: AttachConfig{Connections: 2}, nl: &Netlink{}, log: slog.New(slog.DiscardHandler)}
	for i := range 100 {
		if !a.shouldHealLocked(false, true) {
			t.Fatalf("served connection %d was not replaced", i)
		}
	}
	n := 0
	for a.shouldHealLocked(false, false) {
		n++
		if n > 100 {
			break
		}
	}
	if n != 8 {
		t.Errorf("%d replacements of connections that never served, want 4 per connection (8)", n)
	}
	if !a.shouldHealLocked(false, true) {
		t.Error("a served connection was not replaced once the budget was spent")
	}
	if a.shouldHealLocked(true, true) {
		t.Error("a connection ended by NBD_CMD_DISC was replaced")
	}
	a.nl = nil
	if a.shouldHealLocked(false, true) {
		t.Error("replaced without netlink")
	}
}
