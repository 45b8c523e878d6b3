package nbd

// remote_handshake.go: the client's side of negotiation (handshakeClient).

import (
	"bufio"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
)

// handshakeClient negotiates an export on nc as a client: fixed newstyle,
// STARTTLS when the URI asks for TLS, structured replies and the
// base:allocation meta context when offered, then NBD_OPT_GO with the
// block-size request. It returns the connection to use from then on (the
// TLS one, if any).
func handshakeClient(nc net.Conn, u URI, tlsCfg *tls.Config) (info exportInfo, conn net.Conn, structured, meta bool, err error) {
	conn = nc
	br := bufio.NewReader(nc)
	var b [18]byte
	if _, err := io.ReadFull(br, b[:]); err != nil {
		return info, nil, false, false, fmt.Errorf("greeting: %w", err)
	}
	if binary.BigEndian.Uint64(b[:]) != magicNBD || binary.BigEndian.Uint64(b[8:]) != magicIHaveOpt {
		return info, nil, false, false, errors.New("not a fixed-newstyle NBD server (oldstyle is not supported)")
	}
	hflags := binary.BigEndian.Uint16(b[16:])
	if hflags&flagFixedNewstyle == 0 {
		return info, nil, false, false, errors.New("the server does not speak fixed newstyle")
	}
	cflags := uint32(clientFixedNewstyle)
	if hflags&flagNoZeroes != 0 {
		cflags |= clientNoZeroes
	}
	if _, err := nc.Write(binary.BigEndian.AppendUint32(nil, cflags)); err != nil {
		return info, nil, false, false, err
	}
	o := &optClient{r: br, w: nc}
	if u.TLS {
		typ, data, err := o.ask(optStartTLS, nil)
		if err != nil {
			return info, nil, false, false, err
		}
		if typ != repAck {
			return info, nil, false, false, fmt.Errorf("STARTTLS refused: %s", optErr(typ, data))
		}
		if br.Buffered() > 0 {
			return info, nil, false, false, errors.New("the server sent bytes after its STARTTLS reply")
		}
		cfg := tlsCfg.Clone()
		if cfg.ServerName == "" {
			switch {
			case u.TLSHostname != "":
				cfg.ServerName = u.TLSHostname
			case u.Network == "tcp":
				cfg.ServerName, _, _ = net.SplitHostPort(u.Addr)
			default:
				verifyChainOnly(cfg)
			}
		}
		tc := tls.Client(nc, cfg)
		if err := tc.Handshake(); err != nil {
			return info, nil, false, false, fmt.Errorf("TLS: %w", err)
		}
		conn = tc
		br = bufio.NewReader(tc)
		o = &optClient{r: br, w: tc}
	}
	typ, data, err := o.ask(optStructuredReply, nil)
	if err != nil {
		return info, nil, false, false, err
	}
	structured = typ == repAck
	if !structured && typ&repErrBit == 0 {
		return info, nil, false, false, fmt.Errorf("STRUCTURED_REPLY: unexpected reply %d", typ)
	}
	_ = data
	name := []byte(u.Export)
	if structured {
		q := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
		q = append(q, name...)
		q = binary.BigEndian.AppendUint32(q, 1)
		q = binary.BigEndian.AppendUint32(q, uint32(len(metaBaseAllocation)))
		q = append(q, metaBaseAllocation...)
		if err := o.send(optSetMetaContext, q); err != nil {
			return info, nil, false, false, err
		}
		for {
			typ, data, err := o.reply(optSetMetaContext)
			if err != nil {
				return info, nil, false, false, err
			}
			if typ == repMetaContext && len(data) >= 4 && string(data[4:]) == metaBaseAllocation {
				meta = true
				continue
			}
			if typ == repMetaContext {
				continue
			}
			break // ACK, or an error: no meta context
		}
	}
	// NBD_OPT_GO: the export name, and one info request (block size).
	q := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	q = append(q, name...)
	q = binary.BigEndian.AppendUint16(q, 1)
	q = binary.BigEndian.AppendUint16(q, infoBlockSize)
	if err := o.send(optGo, q); err != nil {
		return info, nil, false, false, err
	}
	info.minBlock, info.prefBlock, info.maxBlock = 1, 4096, 32<<20
	gotExport := false
	for {
		typ, data, err := o.reply(optGo)
		if err != nil {
			return info, nil, false, false, err
		}
		if typ == repAck {
			break
		}
		if typ&repErrBit != 0 {
			return info, nil, false, false, fmt.Errorf("export %q: %s", u.Export, optErr(typ, data))
		}
		if typ != repInfo || len(data) < 2 {
			continue
		}
		switch binary.BigEndian.Uint16(data) {
		case infoExport:
			if len(data) != 12 {
				return info, nil, false, false, errors.New("bad NBD_INFO_EXPORT")
			}
			info.size, info.tflags = binary.BigEndian.Uint64(data[2:]), binary.BigEndian.Uint16(data[10:])
			gotExport = true
		case infoBlockSize:
			if len(data) != 14 {
				return info, nil, false, false, errors.New("bad NBD_INFO_BLOCK_SIZE")
			}
			info.minBlock, info.prefBlock, info.maxBlock = binary.BigEndian.Uint32(data[2:]), binary.BigEndian.Uint32(data[6:]), binary.BigEndian.Uint32(data[10:])
		}
	}
	if !gotExport {
		return info, nil, false, false, errors.New("NBD_OPT_GO ended without NBD_INFO_EXPORT")
	}
	if info.maxBlock == 0 || info.maxBlock > 32<<20 {
		info.maxBlock = 32 << 20
	}
	if br.Buffered() > 0 {
		return info, nil, false, false, errors.New("the server sent bytes after NBD_OPT_GO")
	}
	return info, conn, structured, meta, nil
}

// optClient sends options and reads their replies.
type optClient struct {
	r *bufio.Reader
	w io.Writer
}

func (o *optClient) send(opt uint32, data []byte) error {
	b := binary.BigEndian.AppendUint64(nil, magicIHaveOpt)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	_, err := o.w.Write(append(b, data...))
	return err
}

// reply reads one option reply to opt.
func (o *optClient) reply(opt uint32) (typ uint32, data []byte, err error) {
	var h [20]byte
	if _, err := io.ReadFull(o.r, h[:]); err != nil {
		return 0, nil, fmt.Errorf("option reply: %w", err)
	}
	if binary.BigEndian.Uint64(h[:]) != magicOptReply || binary.BigEndian.Uint32(h[8:]) != opt {
		return 0, nil, fmt.Errorf("bad reply to option %d", opt)
	}
	typ, n := binary.BigEndian.Uint32(h[12:]), binary.BigEndian.Uint32(h[16:])
	if n > 1<<20 {
		return 0, nil, fmt.Errorf("option %d: a reply of %d bytes", opt, n)
	}
	data = make([]byte, n)
	if _, err := io.ReadFull(o.r, data); err != nil {
		return 0, nil, err
	}
	return typ, data, nil
}

// ask sends an option and reads its one reply.
func (o *optClient) ask(opt uint32, data []byte) (uint32, []byte, error) {
	if err := o.send(opt, data); err != nil {
		return 0, nil, err
	}
	return o.reply(opt)
}

// optErr describes an option error reply.
func optErr(typ uint32, data []byte) string {
	names := map[uint32]string{repErrUnsup: "unsupported", repErrPolicy: "refused by policy", repErrInvalid: "invalid",
		repErrPlatform: "unsupported on this platform", repErrTLSReqd: "TLS required", repErrUnknown: "unknown export",
		repErrShutdown: "server shutting down", repErrTooBig: "too big"}
	s := names[typ]
	if s == "" {
		s = fmt.Sprintf("error %#x", typ)
	}
	if len(data) > 0 {
		s += ": " + string(data)
	}
	return s
}

// verifyChainOnly makes cfg verify the server's certificate chain against
// its RootCAs (the system's if nil) without a host name: what libnbd does
// over a unix socket, where the URI names no host. crypto/tls checks a
// name unless told to skip its whole verification, so the chain is
// verified here instead.
func verifyChainOnly(cfg *tls.Config) {
	roots := cfg.RootCAs
	cfg.InsecureSkipVerify = true
	cfg.VerifyConnection = func(cs tls.ConnectionState) error {
		if len(cs.PeerCertificates) == 0 {
			return errors.New("TLS: the server sent no certificate")
		}
		inter := x509.NewCertPool()
		for _, c := range cs.PeerCertificates[1:] {
			inter.AddCert(c)
		}
		_, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter})
		return err
	}
}
