package nbd

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
	"net"
	"testing"
	"time"
)

// rawClient speaks the protocol byte by byte, so that tests can send what
// real clients never would.
type rawClient struct {
	t  testing.TB
	nc net.Conn
	r  *bufio.Reader
	w  *bufio.Writer

	structured bool
	size       uint64
	tflags     uint16
	infos      map[uint16][]byte
}

func newRawClient(t testing.TB, nc net.Conn) *rawClient {
	nc.SetDeadline(time.Now().Add(20 * time.Second))
	return &rawClient{t: t, nc: nc, r: bufio.NewReader(nc), w: bufio.NewWriter(nc), infos: map[uint16][]byte{}}
}

func (c *rawClient) read(n int) []byte {
	c.t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(c.r, b); err != nil {
		c.t.Fatalf("read %d bytes: %v", n, err)
	}
	return b
}

func (c *rawClient) send(b []byte) {
	c.t.Helper()
	if _, err := c.w.Write(b); err != nil {
		c.t.Fatal(err)
	}
	if err := c.w.Flush(); err != nil {
		c.t.Fatal(err)
	}
}

// greet reads the server greeting and sends client flags.
func (c *rawClient) greet() {
	c.t.Helper()
	g := c.read(18)
	if binary.BigEndian.Uint64(g) != magicNBD || binary.BigEndian.Uint64(g[8:]) != magicIHaveOpt {
		c.t.Fatalf("bad greeting % x", g)
	}
	if f := binary.BigEndian.Uint16(g[16:]); f != flagFixedNewstyle|flagNoZeroes {
		c.t.Fatalf("handshake flags %#x", f)
	}
	c.send(binary.BigEndian.AppendUint32(nil, clientFixedNewstyle|clientNoZeroes))
}

func (c *rawClient) sendOpt(opt uint32, data []byte) {
	b := binary.BigEndian.AppendUint64(nil, magicIHaveOpt)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	c.send(append(b, data...))
}

type optReply struct {
	opt, typ uint32
	data     []byte
}

func (c *rawClient) readOptReply() optReply {
	c.t.Helper()
	h := c.read(20)
	if m := binary.BigEndian.Uint64(h); m != magicOptReply {
		c.t.Fatalf("bad option reply magic %#x", m)
	}
	n := binary.BigEndian.Uint32(h[16:])
	return optReply{binary.BigEndian.Uint32(h[8:]), binary.BigEndian.Uint32(h[12:]), c.read(int(n))}
}

func infoPayload(name string, infos ...uint16) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(infos)))
	for _, i := range infos {
		b = binary.BigEndian.AppendUint16(b, i)
	}
	return b
}

func metaPayload(name string, queries ...string) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint32(b, uint32(len(queries)))
	for _, q := range queries {
		b = binary.BigEndian.AppendUint32(b, uint32(len(q)))
		b = append(b, q...)
	}
	return b
}

// connect greets and negotiates: structured replies and base:allocation
// if structured, then NBD_OPT_GO on export.
func (c *rawClient) connect(export string, structured bool) {
	c.t.Helper()
	c.greet()
	if structured {
		c.sendOpt(optStructuredReply, nil)
		if r := c.readOptReply(); r.typ != repAck {
			c.t.Fatalf("STRUCTURED_REPLY: reply %#x", r.typ)
		}
		c.structured = true
		c.sendOpt(optSetMetaContext, metaPayload(export, metaBaseAllocation))
		r := c.readOptReply()
		if r.typ != repMetaContext || string(r.data[4:]) != metaBaseAllocation {
			c.t.Fatalf("SET_META_CONTEXT: reply %#x %q", r.typ, r.data)
		}
		if r := c.readOptReply(); r.typ != repAck {
			c.t.Fatalf("SET_META_CONTEXT: final reply %#x", r.typ)
		}
	}
	c.sendOpt(optGo, infoPayload(export, infoBlockSize, infoName))
	for {
		r := c.readOptReply()
		switch r.typ {
		case repInfo:
			it := binary.BigEndian.Uint16(r.data)
			c.infos[it] = r.data[2:]
			if it == infoExport {
				c.size = binary.BigEndian.Uint64(r.data[2:])
				c.tflags = binary.BigEndian.Uint16(r.data[10:])
			}
		case repAck:
			return
		default:
			c.t.Fatalf("GO: reply %#x %q", r.typ, r.data)
		}
	}
}

func (c *rawClient) request(typ, flags uint16, cookie, off uint64, length uint32, payload []byte) {
	c.t.Helper()
	b := appendRequest(nil, request{flags: flags, typ: typ, cookie: cookie, offset: off, length: length})
	c.send(append(b, payload...))
}

// reply is one whole reply, simple or structured (chunks joined).
type reply struct {
	cookie uint64
	errno  uint32
	msg    string
	data   []byte // READ data or BLOCK_STATUS payload
	holes  int    // hole chunks received
	chunks int
}

// readReply reads one complete reply; for READ it needs the length.
func (c *rawClient) readReply(readLen map[uint64]int) reply {
	c.t.Helper()
	m := binary.BigEndian.Uint32(c.read(4))
	switch m {
	case magicSimpleReply:
		h := c.read(12)
		rp := reply{errno: binary.BigEndian.Uint32(h), cookie: binary.BigEndian.Uint64(h[4:])}
		if n, ok := readLen[rp.cookie]; ok && rp.errno == 0 {
			rp.data = c.read(n)
		}
		return rp
	case magicStructReply:
		var rp reply
		for {
			h := c.read(16)
			flags := binary.BigEndian.Uint16(h)
			typ := binary.BigEndian.Uint16(h[2:])
			rp.cookie = binary.BigEndian.Uint64(h[4:])
			p := c.read(int(binary.BigEndian.Uint32(h[12:])))
			switch typ {
			case replyTypeOffsetData:
				rp.data = append(rp.data, p[8:]...)
			case replyTypeOffsetHole:
				rp.data = append(rp.data, make([]byte, binary.BigEndian.Uint32(p[8:]))...)
				rp.holes++
			case replyTypeBlockStatus:
				rp.data = p
			case replyTypeError:
				rp.errno = binary.BigEndian.Uint32(p)
				rp.msg = string(p[6 : 6+binary.BigEndian.Uint16(p[4:])])
			case replyTypeNone:
			default:
				c.t.Fatalf("unexpected chunk type %d", typ)
			}
			rp.chunks++
			if flags&replyFlagDone != 0 {
				return rp
			}
			if m := binary.BigEndian.Uint32(c.read(4)); m != magicStructReply {
				c.t.Fatalf("bad chunk magic %#x", m)
			}
		}
	}
	c.t.Fatalf("bad reply magic %#x", m)
	return reply{}
}

func (c *rawClient) String() string { return fmt.Sprintf("client(size=%d)", c.size) }
