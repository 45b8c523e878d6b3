package nbd

import (
	"bytes"
	"encoding/binary"
	"io"
	"net"
	"testing"
	"time"

	"github.com/nbdcache/nbdcache/internal/testcert"
	"github.com/nbdcache/nbdcache/storage"
)

// scriptConn is a net.Conn whose client side is a fixed byte string: the
// server reads the script and its replies go nowhere.
type scriptConn struct {
	r io.Reader
}

func (c *scriptConn) Read(p []byte) (int, error)       { return c.r.Read(p) }
func (c *scriptConn) Write(p []byte) (int, error)      { return len(p), nil }
func (c *scriptConn) Close() error                     { return nil }
func (c *scriptConn) LocalAddr() net.Addr              { return nil }
func (c *scriptConn) RemoteAddr() net.Addr             { return nil }
func (c *scriptConn) SetDeadline(time.Time) error      { return nil }
func (c *scriptConn) SetReadDeadline(time.Time) error  { return nil }
func (c *scriptConn) SetWriteDeadline(time.Time) error { return nil }

// seedSession builds a well-formed client transcript: greeting flags,
// options, then transmission requests.
func seedSession(structured bool, reqs ...[]byte) []byte {
	var b []byte
	b = binary.BigEndian.AppendUint32(b, clientFixedNewstyle|clientNoZeroes)
	opt := func(o uint32, d []byte) {
		b = binary.BigEndian.AppendUint64(b, magicIHaveOpt)
		b = binary.BigEndian.AppendUint32(b, o)
		b = binary.BigEndian.AppendUint32(b, uint32(len(d)))
		b = append(b, d...)
	}
	opt(optList, nil)
	opt(optInfo, infoPayload("", infoBlockSize, infoName, infoDescription))
	if structured {
		opt(optStructuredReply, nil)
		opt(optListMetaContext, metaPayload("", "base:"))
		opt(optSetMetaContext, metaPayload("", metaBaseAllocation))
	}
	opt(optGo, infoPayload("", infoBlockSize))
	for _, r := range reqs {
		b = append(b, r...)
	}
	return b
}

func req(typ, flags uint16, off uint64, length uint32, payload []byte) []byte {
	return append(appendRequest(nil, request{flags: flags, typ: typ, cookie: uint64(typ), offset: off, length: length}), payload...)
}

// FuzzSession feeds arbitrary client bytes to a connection: handshake and
// transmission. The server must neither panic nor hang, and must leave
// the device's bytes alone outside what the requests wrote.
func FuzzSession(f *testing.F) {
	f.Add(seedSession(false))
	f.Add(seedSession(true,
		req(cmdWrite, cflagFUA, 0, 8, []byte("abcdefgh")),
		req(cmdRead, cflagDF, 0, 8, nil),
		req(cmdBlockStatus, cflagReqOne, 0, 4096, nil),
		req(cmdWriteZeroes, cflagNoHole|cflagFastZero, 512, 512, nil),
		req(cmdTrim, 0, 0, 4096, nil),
		req(cmdFlush, 0, 0, 0, nil),
		req(cmdCache, 0, 0, 4096, nil),
		req(cmdDisc, 0, 0, 0, nil)))
	f.Add(seedSession(false, req(cmdWrite, 0, 1<<62, 16, make([]byte, 16)), req(99, 0, 0, 0, nil)))
	f.Add([]byte{0, 0, 0, 3})
	f.Add(append(binary.BigEndian.AppendUint32(nil, 1), bytes.Repeat([]byte{0xff}, 40)...))
	f.Fuzz(func(t *testing.T, script []byte) {
		s, err := NewServer(Config{Exports: []Export{{Device: storage.NewMem(64 << 10)}}, MaxPayload: 64 << 10})
		if err != nil {
			t.Fatal(err)
		}
		c := newConn(s, &scriptConn{r: bytes.NewReader(script)}, nil)
		done := make(chan struct{})
		go func() {
			c.serve()
			c.abort()
			close(done)
		}()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("connection did not finish on a finite script")
		}
	})
}

// FuzzRequest checks the request parser and validator on arbitrary
// headers: parse(encode(x)) == x, and validation never panics and never
// accepts a request outside the export.
func FuzzRequest(f *testing.F) {
	f.Add(req(cmdRead, 0, 0, 512, nil), false, false)
	f.Add(req(cmdWrite, cflagFUA, 4096, 4096, nil), true, false)
	f.Add(req(cmdBlockStatus, cflagReqOne, 0, 1, nil), true, true)
	f.Add(req(cmdWriteZeroes, cflagFastZero|cflagNoHole, 1<<20, 1<<20, nil), false, true)
	f.Fuzz(func(t *testing.T, hdr []byte, structured, ro bool) {
		if len(hdr) < requestHeaderSize {
			return
		}
		r, err := parseRequest(hdr)
		if err != nil {
			return
		}
		if got := appendRequest(nil, r); !bytes.Equal(got, hdr[:requestHeaderSize]) {
			t.Fatalf("re-encoding differs: % x vs % x", got, hdr[:requestHeaderSize])
		}
		const size = 1 << 20
		s, _ := NewServer(Config{Exports: []Export{{Device: storage.NewMem(size)}}})
		c := &conn{s: s, ss: &session{structured: structured, meta: structured}, dev: s.exports[0].Device, ro: ro}
		errno, _ := c.validate(r)
		if errno != 0 {
			return
		}
		switch r.typ {
		case cmdFlush:
			if r.offset != 0 || r.length != 0 {
				t.Fatal("FLUSH with a range accepted")
			}
		default:
			if r.offset+uint64(r.length) > size || r.offset > size {
				t.Fatalf("request beyond the export accepted: %+v", r)
			}
		}
		if ro && (r.typ == cmdWrite || r.typ == cmdTrim || r.typ == cmdWriteZeroes) {
			t.Fatal("write accepted on a read-only export")
		}
	})
}

// recordConn is scriptConn that keeps what the server wrote.
type recordConn struct {
	scriptConn
	out bytes.Buffer
}

func (c *recordConn) Write(p []byte) (int, error) { return c.out.Write(p) }

// FuzzTLSRequired feeds arbitrary client bytes to a server that requires
// TLS. A script cannot complete a TLS handshake, so everything the server
// writes is plaintext: it must never hold the export's name or
// description, nor its size.
func FuzzTLSRequired(f *testing.F) {
	f.Add(seedSession(true, req(cmdRead, 0, 0, 512, nil)))
	starttls := binary.BigEndian.AppendUint32(nil, clientFixedNewstyle|clientNoZeroes)
	starttls = binary.BigEndian.AppendUint64(starttls, magicIHaveOpt)
	starttls = binary.BigEndian.AppendUint32(starttls, optStartTLS)
	starttls = binary.BigEndian.AppendUint32(starttls, 0)
	f.Add(append(starttls, 0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5))
	f.Add(append(binary.BigEndian.AppendUint32(nil, clientFixedNewstyle), seedSession(false)[4:]...))
	cfg := testcert.New(f).ServerConfig(f, false)
	const name, desc, size = "secret-export-name", "secret description", 0x5ec7e700
	f.Fuzz(func(t *testing.T, script []byte) {
		s, err := NewServer(Config{Exports: []Export{{Name: name, Description: desc, Device: storage.NewMem(size)}},
			TLS: cfg, TLSRequired: true, HandshakeTimeout: time.Second})
		if err != nil {
			t.Fatal(err)
		}
		rc := &recordConn{scriptConn: scriptConn{r: bytes.NewReader(script)}}
		c := newConn(s, rc, nil)
		done := make(chan struct{})
		go func() {
			c.serve()
			close(done)
		}()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("connection did not finish on a finite script")
		}
		out := rc.out.Bytes()
		for _, leak := range [][]byte{[]byte(name), []byte(desc), binary.BigEndian.AppendUint64(nil, size)} {
			if bytes.Contains(out, leak) {
				t.Fatalf("the server sent %q in plaintext:\n% x", leak, out)
			}
		}
	})
}
