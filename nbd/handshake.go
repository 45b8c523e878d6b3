package nbd

// handshake.go: the server's side of negotiation: the options, STARTTLS, and
// info and meta context requests.

import (
	"bufio"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"strings"
)

// Limits on what a client may send during negotiation. They are checked
// before anything is allocated.
const (
	maxOptionLength = 64 << 10 // an option's payload
	maxStringLength = 4096     // export names, queries (the spec's MUST)
	maxInfoRequests = 64
	maxMetaQueries  = 128
)

var (
	errAbort         = errors.New("nbd: client aborted the negotiation")
	errBadHandshake  = errors.New("nbd: bad handshake")
	errUnknownExport = errors.New("nbd: unknown export")
	errTLSRequired   = errors.New("nbd: TLS is required")
	errTLSHandshake  = errors.New("nbd: TLS handshake failed")
)

// session is the state that negotiation hands to the transmission phase.
type session struct {
	export     *Export
	structured bool // structured replies negotiated
	meta       bool // base:allocation selected
	noZeroes   bool
}

// negotiate runs the fixed newstyle handshake, reading from r and
// writing to c.w. It returns the negotiated session and the reader that
// transmission continues from (a new one if TLS started), or an error
// after which the connection must close.
//
// TLS (Config.TLS): NBD_OPT_STARTTLS is answered with an ACK, then the
// TLS handshake runs on the raw socket, and from then on c.rw, c.w and
// the returned reader go through TLS. Two rules keep plaintext out of the
// TLS session:
//   - bytes the client sent behind NBD_OPT_STARTTLS that already sit in
//     the plaintext reader's buffer are discarded with that reader, never
//     read as if they came through TLS (the class of postfix's
//     CVE-2011-0411): after the handshake, options are read only from a
//     new reader over the TLS connection;
//   - everything negotiated before TLS (structured replies, the meta
//     context) is forgotten (the spec's MUST; nbdkit's CVE-2021-3716).
//
// With Config.TLSRequired, until TLS is up every option but STARTTLS and
// ABORT gets NBD_REP_ERR_TLS_REQD, and NBD_OPT_EXPORT_NAME, which cannot
// be refused, ends the connection: no export name, size or flag is sent
// in plaintext.
func (c *conn) negotiate(r *bufio.Reader) (*session, *bufio.Reader, error) {
	s, w := c.s, c.w
	var hdr [18]byte
	binary.BigEndian.PutUint64(hdr[0:], magicNBD)
	binary.BigEndian.PutUint64(hdr[8:], magicIHaveOpt)
	binary.BigEndian.PutUint16(hdr[16:], flagFixedNewstyle|flagNoZeroes)
	if _, err := w.Write(hdr[:]); err != nil {
		return nil, nil, err
	}
	if err := w.Flush(); err != nil {
		return nil, nil, err
	}
	var cf [4]byte
	if _, err := io.ReadFull(r, cf[:]); err != nil {
		return nil, nil, err
	}
	cflags := binary.BigEndian.Uint32(cf[:])
	if cflags&^(clientFixedNewstyle|clientNoZeroes) != 0 {
		return nil, nil, fmt.Errorf("%w: unknown client flags %#x", errBadHandshake, cflags)
	}
	if cflags&clientFixedNewstyle == 0 {
		return nil, nil, fmt.Errorf("%w: client does not speak fixed newstyle", errBadHandshake)
	}
	ss := &session{noZeroes: cflags&clientNoZeroes != 0}
	var metaExport string // the export SET_META_CONTEXT was negotiated for
	for {
		var oh [16]byte
		if _, err := io.ReadFull(r, oh[:]); err != nil {
			return nil, nil, err
		}
		if m := binary.BigEndian.Uint64(oh[0:]); m != magicIHaveOpt {
			return nil, nil, fmt.Errorf("%w: bad option magic %#x", errBadHandshake, m)
		}
		opt := binary.BigEndian.Uint32(oh[8:])
		length := binary.BigEndian.Uint32(oh[12:])
		if length > maxOptionLength {
			// Too big to be honest: drop the connection rather than
			// read an attacker-chosen amount.
			return nil, nil, fmt.Errorf("%w: option %d of %d bytes", errBadHandshake, opt, length)
		}
		data := make([]byte, length)
		if _, err := io.ReadFull(r, data); err != nil {
			return nil, nil, err
		}
		if s.tlsRequired && c.tc == nil && opt != optStartTLS && opt != optAbort {
			if opt == optExportName {
				return nil, nil, fmt.Errorf("%w: NBD_OPT_EXPORT_NAME before STARTTLS", errTLSRequired)
			}
			if err := writeOptReply(w, opt, repErrTLSReqd, []byte("TLS is required: send NBD_OPT_STARTTLS first")); err != nil {
				return nil, nil, err
			}
			if err := w.Flush(); err != nil {
				return nil, nil, err
			}
			continue
		}
		if opt == optStartTLS {
			started, err := c.startTLS(r, len(data))
			if err != nil {
				return nil, nil, err
			}
			if started {
				// Nothing from the plaintext phase survives.
				r = bufio.NewReaderSize(c.rw, negotiateBufSize)
				w = c.w
				ss = &session{noZeroes: ss.noZeroes}
				metaExport = ""
			}
			continue
		}
		if opt == optExportName {
			ex := s.lookup(string(data))
			if ex == nil {
				return nil, nil, fmt.Errorf("%w: %q", errUnknownExport, data)
			}
			ss.export = ex
			var b []byte
			b = binary.BigEndian.AppendUint64(b, uint64(ex.Device.Size()))
			b = binary.BigEndian.AppendUint16(b, s.transmissionFlags(ex, ss))
			if !ss.noZeroes {
				b = append(b, make([]byte, 124)...)
			}
			if _, err := w.Write(b); err != nil {
				return nil, nil, err
			}
			if ss.meta && metaExport != ex.Name {
				ss.meta = false
			}
			return ss, r, w.Flush()
		}
		done, err := s.option(w, ss, opt, data, &metaExport)
		if err != nil {
			return nil, nil, err
		}
		if err := w.Flush(); err != nil {
			return nil, nil, err
		}
		if done {
			if ss.meta && metaExport != ss.export.Name {
				ss.meta = false
			}
			return ss, r, nil
		}
	}
}

// startTLS answers NBD_OPT_STARTTLS (with n bytes of option data) and, if
// it accepted, runs the TLS handshake and switches c.rw and c.w to TLS.
// started is false when it refused with an error reply and the plaintext
// session goes on.
func (c *conn) startTLS(r *bufio.Reader, n int) (started bool, err error) {
	refuse := func(typ uint32, msg string) (bool, error) {
		if err := writeOptReply(c.w, optStartTLS, typ, []byte(msg)); err != nil {
			return false, err
		}
		return false, c.w.Flush()
	}
	switch {
	case c.s.tls == nil || c.trusted:
		return refuse(repErrUnsup, "TLS is not configured on this server")
	case c.tc != nil:
		return refuse(repErrInvalid, "TLS is already active")
	case n != 0:
		return refuse(repErrInvalid, "NBD_OPT_STARTTLS takes no data")
	}
	if err := writeOptReply(c.w, optStartTLS, repAck, nil); err != nil {
		return false, err
	}
	if err := c.w.Flush(); err != nil {
		return false, err
	}
	if k := r.Buffered(); k > 0 {
		// Sent in plaintext behind STARTTLS, before our ACK: it must
		// not be taken for data from inside the TLS session.
		r.Discard(k)
		c.s.log.Info("discarded plaintext sent behind NBD_OPT_STARTTLS", "remote", remote(c.nc), "bytes", k)
	}
	tc := tls.Server(c.nc, c.s.tls)
	if err := tc.Handshake(); err != nil { // within the negotiation deadline
		return false, fmt.Errorf("%w: %v", errTLSHandshake, err)
	}
	c.tc, c.rw = tc, tc
	c.w = bufio.NewWriterSize(tc, negotiateBufSize)
	return true, nil
}

// writeOptReply writes one option reply to w.
func writeOptReply(w *bufio.Writer, opt, typ uint32, payload []byte) error {
	if _, err := w.Write(appendOptReply(nil, opt, typ, uint32(len(payload)))); err != nil {
		return err
	}
	_, err := w.Write(payload)
	return err
}

// option answers one option other than EXPORT_NAME. done reports that
// transmission starts (NBD_OPT_GO succeeded).
func (s *Server) option(w *bufio.Writer, ss *session, opt uint32, data []byte, metaExport *string) (done bool, err error) {
	reply := func(typ uint32, payload []byte) error {
		_, err := w.Write(append(appendOptReply(nil, opt, typ, uint32(len(payload))), payload...))
		return err
	}
	replyErr := func(typ uint32, msg string) error {
		if len(msg) > maxStringLength {
			msg = msg[:maxStringLength]
		}
		return reply(typ, []byte(msg))
	}
	switch opt {
	case optAbort:
		_ = reply(repAck, nil)
		_ = w.Flush()
		return false, errAbort

	case optList:
		if len(data) != 0 {
			return false, replyErr(repErrInvalid, "NBD_OPT_LIST takes no data")
		}
		for _, ex := range s.exports {
			p := binary.BigEndian.AppendUint32(nil, uint32(len(ex.Name)))
			p = append(p, ex.Name...)
			p = append(p, ex.Description...)
			if err := reply(repServer, p); err != nil {
				return false, err
			}
		}
		return false, reply(repAck, nil)

	case optStructuredReply:
		if len(data) != 0 {
			return false, replyErr(repErrInvalid, "NBD_OPT_STRUCTURED_REPLY takes no data")
		}
		ss.structured = true
		return false, reply(repAck, nil)

	case optInfo, optGo:
		name, infos, perr := parseInfoRequest(data)
		if perr != nil {
			return false, replyErr(repErrInvalid, perr.Error())
		}
		ex := s.lookup(name)
		if ex == nil {
			return false, replyErr(repErrUnknown, fmt.Sprintf("unknown export %q", name))
		}
		var p []byte
		p = binary.BigEndian.AppendUint16(p, infoExport)
		p = binary.BigEndian.AppendUint64(p, uint64(ex.Device.Size()))
		p = binary.BigEndian.AppendUint16(p, s.transmissionFlags(ex, ss))
		if err := reply(repInfo, p); err != nil {
			return false, err
		}
		// Block sizes are sent whether or not they were asked for: the
		// spec allows it, and clients that did not ask still benefit.
		p = binary.BigEndian.AppendUint16(p[:0], infoBlockSize)
		p = binary.BigEndian.AppendUint32(p, s.minBlock)
		p = binary.BigEndian.AppendUint32(p, s.preferredBlock)
		p = binary.BigEndian.AppendUint32(p, s.maxPayload)
		if err := reply(repInfo, p); err != nil {
			return false, err
		}
		for _, it := range infos {
			switch it {
			case infoName:
				p = binary.BigEndian.AppendUint16(p[:0], infoName)
				p = append(p, ex.Name...)
			case infoDescription:
				if ex.Description == "" {
					continue
				}
				p = binary.BigEndian.AppendUint16(p[:0], infoDescription)
				p = append(p, ex.Description...)
			default:
				continue
			}
			if err := reply(repInfo, p); err != nil {
				return false, err
			}
		}
		if err := reply(repAck, nil); err != nil {
			return false, err
		}
		if opt == optGo {
			ss.export = ex
			return true, nil
		}
		return false, nil

	case optListMetaContext, optSetMetaContext:
		name, queries, perr := parseMetaRequest(data)
		if perr != nil {
			return false, replyErr(repErrInvalid, perr.Error())
		}
		if opt == optSetMetaContext && !ss.structured {
			return false, replyErr(repErrInvalid, "structured replies must be negotiated first")
		}
		if s.lookup(name) == nil {
			return false, replyErr(repErrUnknown, fmt.Sprintf("unknown export %q", name))
		}
		selected := false
		if opt == optListMetaContext && len(queries) == 0 {
			selected = true
		}
		for _, q := range queries {
			if q == metaBaseAllocation || (opt == optListMetaContext && (q == "base:" || q == "base")) {
				selected = true
			}
		}
		if opt == optSetMetaContext {
			ss.meta = selected
			*metaExport = name
		}
		if selected {
			p := binary.BigEndian.AppendUint32(nil, metaContextID)
			p = append(p, metaBaseAllocation...)
			if err := reply(repMetaContext, p); err != nil {
				return false, err
			}
		}
		return false, reply(repAck, nil)

	}
	return false, replyErr(repErrUnsup, fmt.Sprintf("option %d is not supported", opt))
}

var errShortOption = errors.New("option data too short")

// parseInfoRequest decodes the payload of NBD_OPT_INFO and NBD_OPT_GO.
func parseInfoRequest(d []byte) (name string, infos []uint16, err error) {
	if len(d) < 4 {
		return "", nil, errShortOption
	}
	n := binary.BigEndian.Uint32(d)
	d = d[4:]
	if n > maxStringLength || uint32(len(d)) < n+2 {
		return "", nil, fmt.Errorf("bad export name length %d", n)
	}
	name, d = string(d[:n]), d[n:]
	count := binary.BigEndian.Uint16(d)
	d = d[2:]
	if count > maxInfoRequests || len(d) != int(count)*2 {
		return "", nil, fmt.Errorf("bad information request count %d", count)
	}
	infos = make([]uint16, count)
	for i := range infos {
		infos[i] = binary.BigEndian.Uint16(d[2*i:])
	}
	return name, infos, nil
}

// parseMetaRequest decodes the payload of LIST/SET_META_CONTEXT.
func parseMetaRequest(d []byte) (name string, queries []string, err error) {
	if len(d) < 4 {
		return "", nil, errShortOption
	}
	n := binary.BigEndian.Uint32(d)
	d = d[4:]
	if n > maxStringLength || uint32(len(d)) < n+4 {
		return "", nil, fmt.Errorf("bad export name length %d", n)
	}
	name, d = string(d[:n]), d[n:]
	count := binary.BigEndian.Uint32(d)
	d = d[4:]
	if count > maxMetaQueries {
		return "", nil, fmt.Errorf("too many queries (%d)", count)
	}
	for i := uint32(0); i < count; i++ {
		if len(d) < 4 {
			return "", nil, errShortOption
		}
		l := binary.BigEndian.Uint32(d)
		d = d[4:]
		if l > maxStringLength || uint32(len(d)) < l {
			return "", nil, fmt.Errorf("bad query length %d", l)
		}
		q := string(d[:l])
		if strings.IndexByte(q, 0) >= 0 {
			return "", nil, errors.New("query contains NUL")
		}
		queries = append(queries, q)
		d = d[l:]
	}
	if len(d) != 0 {
		return "", nil, errors.New("trailing bytes after the queries")
	}
	return name, queries, nil
}
