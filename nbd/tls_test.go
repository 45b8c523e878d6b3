package nbd

import (
	"bytes"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"io"
	"testing"
	"time"

	"github.com/nbdcache/nbdcache/internal/testcert"
	"github.com/nbdcache/nbdcache/storage"
)

// tlsExports are two named exports, so that a leak of either name shows.
func tlsExports() []Export {
	return []Export{
		{Name: "secret-disk", Description: "do not tell", Device: storage.NewMem(testSize)},
		{Name: "other", Device: storage.NewMem(testSize)},
	}
}

// startTLS sends NBD_OPT_STARTTLS, expects the ACK, runs the client side
// of the TLS handshake with cfg and returns a client speaking through it.
func (c *rawClient) startTLS(cfg *tls.Config) (*rawClient, error) {
	c.t.Helper()
	c.sendOpt(optStartTLS, nil)
	if r := c.readOptReply(); r.typ != repAck || len(r.data) != 0 {
		c.t.Fatalf("STARTTLS: reply %#x %q", r.typ, r.data)
	}
	tc := tls.Client(c.nc, cfg)
	if err := tc.Handshake(); err != nil {
		return nil, err
	}
	return newRawClient(c.t, tc), nil
}

// connectAfterGreeting is connect without the greeting (already done).
func (c *rawClient) connectAfterGreeting(export string, structured bool) {
	c.t.Helper()
	if structured {
		c.sendOpt(optStructuredReply, nil)
		if r := c.readOptReply(); r.typ != repAck {
			c.t.Fatalf("STRUCTURED_REPLY: %#x", r.typ)
		}
		c.structured = true
	}
	c.sendOpt(optGo, infoPayload(export))
	for {
		r := c.readOptReply()
		if r.opt != optGo {
			c.t.Fatalf("a reply to option %d (type %#x) where GO's were due", r.opt, r.typ)
		}
		switch r.typ {
		case repInfo:
			if binary.BigEndian.Uint16(r.data) == infoExport {
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

// TestTLSRequired: before TLS, every option but STARTTLS and ABORT is
// refused with TLS_REQD and nothing about the exports is said; EXPORT_NAME
// ends the connection; after STARTTLS everything works, and a second
// STARTTLS is invalid.
func TestTLSRequired(t *testing.T) {
	certs := testcert.New(t)
	_, addr := startServerConfig(t, Config{Exports: tlsExports(), TLS: certs.ServerConfig(t, false), TLSRequired: true})

	c := dial(t, addr)
	c.greet()
	for _, o := range []struct {
		opt  uint32
		data []byte
	}{
		{optList, nil},
		{optInfo, infoPayload("secret-disk", infoName, infoDescription)},
		{optGo, infoPayload("")},
		{optStructuredReply, nil},
		{optListMetaContext, metaPayload("secret-disk")},
		{99, nil},
	} {
		c.sendOpt(o.opt, o.data)
		r := c.readOptReply()
		if r.typ != repErrTLSReqd || r.opt != o.opt {
			t.Errorf("option %d before TLS: reply %#x", o.opt, r.typ)
		}
		for _, leak := range []string{"secret-disk", "other", "do not tell"} {
			if bytes.Contains(r.data, []byte(leak)) {
				t.Errorf("option %d before TLS leaked %q: %q", o.opt, leak, r.data)
			}
		}
	}
	c.sendOpt(optAbort, nil)
	if r := c.readOptReply(); r.typ != repAck {
		t.Fatalf("ABORT before TLS: %#x", r.typ)
	}

	// EXPORT_NAME cannot be refused: the server hangs up, saying nothing.
	c = dial(t, addr)
	c.greet()
	c.sendOpt(optExportName, []byte("secret-disk"))
	c.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := io.Copy(io.Discard, c.r); n != 0 || err != nil {
		t.Fatalf("EXPORT_NAME before TLS: %d bytes, %v", n, err)
	}

	// Through TLS.
	c = dial(t, addr)
	c.greet()
	tc, err := c.startTLS(certs.ClientConfig(t, nil))
	if err != nil {
		t.Fatal(err)
	}
	tc.sendOpt(optStartTLS, nil)
	if r := tc.readOptReply(); r.typ != repErrInvalid {
		t.Fatalf("a second STARTTLS: %#x", r.typ)
	}
	tc.sendOpt(optList, nil)
	var names []string
	for r := tc.readOptReply(); r.typ != repAck; r = tc.readOptReply() {
		names = append(names, string(r.data[4:4+binary.BigEndian.Uint32(r.data)]))
	}
	if len(names) != 2 {
		t.Fatalf("LIST through TLS: %q", names)
	}
	tc.connectAfterGreeting("secret-disk", true)
	data := bytes.Repeat([]byte{0xc3}, 8192)
	tc.request(cmdWrite, cflagFUA, 1, 4096, uint32(len(data)), data)
	if r := tc.readReply(nil); r.errno != 0 {
		t.Fatal(r)
	}
	tc.request(cmdRead, 0, 2, 4096, uint32(len(data)), nil)
	if r := tc.readReply(nil); r.errno != 0 || !bytes.Equal(r.data, data) {
		t.Fatalf("read through TLS: errno %d", r.errno)
	}
	tc.request(cmdDisc, 0, 3, 0, 0, nil)
	// The server ends the TLS session properly: close_notify, then EOF.
	if _, err := tc.r.ReadByte(); !errors.Is(err, io.EOF) {
		t.Fatalf("after DISC: %v, want EOF after close_notify", err)
	}
}

// TestTLSForgetsPlaintextNegotiation: structured replies and a meta
// context negotiated in plaintext do not survive STARTTLS (nbdkit's
// CVE-2021-3716).
func TestTLSForgetsPlaintextNegotiation(t *testing.T) {
	certs := testcert.New(t)
	_, addr := startServerConfig(t, Config{Exports: tlsExports(), TLS: certs.ServerConfig(t, false)})
	c := dial(t, addr)
	c.greet()
	c.sendOpt(optStructuredReply, nil)
	if r := c.readOptReply(); r.typ != repAck {
		t.Fatalf("plaintext STRUCTURED_REPLY: %#x", r.typ)
	}
	c.sendOpt(optSetMetaContext, metaPayload("secret-disk", metaBaseAllocation))
	if r := c.readOptReply(); r.typ != repMetaContext {
		t.Fatalf("plaintext SET_META_CONTEXT: %#x", r.typ)
	}
	c.readOptReply() // ACK
	tc, err := c.startTLS(certs.ClientConfig(t, nil))
	if err != nil {
		t.Fatal(err)
	}
	tc.connectAfterGreeting("secret-disk", false)
	if tc.tflags&tflagSendDF != 0 {
		t.Fatal("structured replies negotiated before TLS survived it (DF offered)")
	}
	tc.request(cmdRead, 0, 1, 0, 4096, nil)
	if m := binary.BigEndian.Uint32(tc.read(4)); m != magicSimpleReply {
		t.Fatalf("READ reply magic %#x: structured replies survived TLS", m)
	}
	tc.read(12 + 4096)
	tc.request(cmdBlockStatus, 0, 2, 0, 4096, nil)
	if r := tc.readReply(nil); r.errno != errInval {
		t.Fatalf("BLOCK_STATUS with the plaintext meta context: errno %d, want EINVAL", r.errno)
	}
}

// TestTLSDiscardsPlaintextBehindStartTLS: an option the client (or a man
// in the middle) sent in plaintext right behind NBD_OPT_STARTTLS is
// dropped, not read as the first thing inside TLS (postfix's
// CVE-2011-0411 class).
func TestTLSDiscardsPlaintextBehindStartTLS(t *testing.T) {
	certs := testcert.New(t)
	_, addr := startServerConfig(t, Config{Exports: tlsExports(), TLS: certs.ServerConfig(t, false), TLSRequired: true})
	c := dial(t, addr)
	c.greet()
	opt := func(o uint32, d []byte) []byte {
		b := binary.BigEndian.AppendUint64(nil, magicIHaveOpt)
		b = binary.BigEndian.AppendUint32(b, o)
		b = binary.BigEndian.AppendUint32(b, uint32(len(d)))
		return append(b, d...)
	}
	// One write: STARTTLS and an injected STRUCTURED_REPLY.
	c.send(append(opt(optStartTLS, nil), opt(optStructuredReply, nil)...))
	if r := c.readOptReply(); r.typ != repAck || r.opt != optStartTLS {
		t.Fatalf("STARTTLS: %#x for %d", r.typ, r.opt)
	}
	tc := tls.Client(c.nc, certs.ClientConfig(t, nil))
	if err := tc.Handshake(); err != nil {
		t.Fatalf("handshake (the injected bytes were read as TLS?): %v", err)
	}
	tr := newRawClient(t, tc)
	tr.connectAfterGreeting("secret-disk", false) // the first reply must be GO's
	if tr.tflags&tflagSendDF != 0 {
		t.Fatal("the injected STRUCTURED_REPLY took effect inside TLS")
	}
}

// TestTLSClientCertificates: with client verification, a client without a
// certificate, or with one from another CA, fails the handshake.
func TestTLSClientCertificates(t *testing.T) {
	certs := testcert.New(t)
	_, addr := startServerConfig(t, Config{Exports: tlsExports(), TLS: certs.ServerConfig(t, true), TLSRequired: true})
	for _, tc := range []struct {
		name string
		pair *testcert.Pair
		ok   bool
	}{{"none", nil, false}, {"rogue", &certs.Rogue, false}, {"valid", &certs.Client, true}} {
		c := dial(t, addr)
		c.greet()
		tr, err := c.startTLS(certs.ClientConfig(t, tc.pair))
		if err == nil {
			// TLS 1.3: the client learns of a refused certificate on
			// its first read.
			tr.sendOpt(optList, nil)
			tr.nc.SetReadDeadline(time.Now().Add(5 * time.Second))
			_, err = io.ReadFull(tr.r, make([]byte, 20))
		}
		if (err == nil) != tc.ok {
			t.Errorf("client certificate %s: %v", tc.name, err)
		}
	}
}

// TestTLSNotConfigured: STARTTLS is refused, and the session goes on.
func TestTLSNotConfigured(t *testing.T) {
	_, addr := startServer(t)
	c := dial(t, addr)
	c.greet()
	c.sendOpt(optStartTLS, nil)
	if r := c.readOptReply(); r.typ != repErrUnsup {
		t.Fatalf("STARTTLS without TLS: %#x", r.typ)
	}
	c.sendOpt(optGo, infoPayload(""))
	for r := c.readOptReply(); r.typ != repAck; r = c.readOptReply() {
		if r.typ != repInfo {
			t.Fatalf("GO after a refused STARTTLS: %#x", r.typ)
		}
	}
	if _, err := NewServer(Config{Exports: tlsExports(), TLSRequired: true}); err == nil {
		t.Fatal("TLSRequired without TLS accepted")
	}
}
