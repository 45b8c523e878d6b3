package nbd

// remote.go: Remote, an NBD export as a storage.Device: the client side of
// transmission.

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nbdcache/nbdcache/storage"
)

// Remote is an NBD export reached over the network, as a storage.Device:
// the client side of the protocol, for a cache in front of remote storage.
//
// It negotiates fixed newstyle with NBD_OPT_GO (asking for the block-size
// constraints), STARTTLS for nbds URIs, structured replies and the
// base:allocation meta context when the server offers them. Requests are
// pipelined: each call sends its request and waits for its own reply,
// which one reader goroutine per connection matches by cookie. With
// Connections > 1 and a server that allows multi-conn, requests spread
// over several connections. READ and WRITE larger than the server's
// maximum block size are split.
//
// A connection that fails fails the requests in flight on it (their
// outcome is unknown, as after any I/O error). The next request redials,
// no more often than once per RedialBackoff: a remote that comes back is
// used again without a restart.
type Remote struct {
	cfg    RemoteConfig
	uri    URI
	size   int64
	tflags uint16
	// block-size constraints: the smallest unit, the preferred one and the
	// largest payload.
	minBlock, prefBlock, maxBlock uint32

	conns []*remoteConn
	mu    sync.Mutex // guards next and closed
	next  int
	// closed is set by Close.
	closed bool
}

// RemoteConfig configures DialRemote.
type RemoteConfig struct {
	// TLS is used for nbds URIs (ServerName defaults to the URI's host).
	TLS *tls.Config
	// DialTimeout bounds a dial with its handshake (default 10 s).
	DialTimeout time.Duration
	// Connections is how many connections to open when the server allows
	// multi-conn (default 1).
	Connections int
	// RedialBackoff is the least time between two dials of a failed
	// connection (default 1 s).
	RedialBackoff time.Duration
	// Timeout is how long a request waits for a lost connection to come
	// back before it fails (default 0: it fails at once). Requests in
	// flight when the connection dropped fail at once either way: their
	// outcome is unknown.
	Timeout time.Duration
	Logger  *slog.Logger
}

var _ storage.Device = (*Remote)(nil)
var _ storage.Extenter = (*Remote)(nil)

// ErrRemote marks errors the remote server returned for a request; it
// wraps the errno it sent (errors.Is(err, unix.EIO), ...).
var ErrRemote = errors.New("nbd: remote")

// DialRemote connects to the export uri names.
func DialRemote(ctx context.Context, uri string, cfg RemoteConfig) (*Remote, error) {
	u, err := ParseURI(uri)
	if err != nil {
		return nil, err
	}
	if u.TLS && cfg.TLS == nil {
		return nil, fmt.Errorf("nbd: %s: an nbds URI needs a TLS configuration", uri)
	}
	if cfg.DialTimeout <= 0 {
		cfg.DialTimeout = 10 * time.Second
	}
	if cfg.Connections <= 0 {
		cfg.Connections = 1
	}
	if cfg.RedialBackoff <= 0 {
		cfg.RedialBackoff = time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	r := &Remote{cfg: cfg, uri: u}
	first := &remoteConn{r: r}
	info, err := first.dial(ctx)
	if err != nil {
		return nil, err
	}
	r.size, r.tflags = int64(info.size), info.tflags
	r.minBlock, r.prefBlock, r.maxBlock = info.minBlock, info.prefBlock, info.maxBlock
	if r.minBlock > 512 {
		first.close()
		return nil, fmt.Errorf("nbd: %s: the export's minimum block size is %d; only up to 512 is supported", uri, r.minBlock)
	}
	r.conns = []*remoteConn{first}
	if r.tflags&tflagCanMultiConn != 0 {
		for range cfg.Connections - 1 {
			c := &remoteConn{r: r}
			if _, err := c.dial(ctx); err != nil {
				r.Close()
				return nil, err
			}
			r.conns = append(r.conns, c)
		}
	}
	return r, nil
}

// RemoteStats is the state of a Remote's connections.
type RemoteStats struct {
	Connected   bool    `json:"backing_connected"`    // every connection is up
	DownSeconds float64 `json:"backing_down_seconds"` // how long the current outage has lasted (0: none)
	Outages     int64   `json:"backing_outages"`      // connections lost since the start
	Reconnects  int64   `json:"backing_reconnects"`   // connections dialled again
}

// Reachable reports whether every connection to the remote is up
// (storage.Reachability): false from a lost connection until a redial
// succeeds.
func (r *Remote) Reachable() bool { return r.Stats().Connected }

// Stats reports the connections' state.
func (r *Remote) Stats() RemoteStats {
	st := RemoteStats{Connected: true}
	var since time.Time
	for _, c := range r.conns {
		c.mu.Lock()
		if c.err != nil || c.nc == nil {
			st.Connected = false
			if since.IsZero() || c.downSince.Before(since) {
				since = c.downSince
			}
		}
		st.Outages += c.outages
		st.Reconnects += c.reconnects
		c.mu.Unlock()
	}
	if !st.Connected && !since.IsZero() {
		st.DownSeconds = time.Since(since).Seconds()
	}
	return st
}

// URI is the remote's canonical URI.
func (r *Remote) URI() URI { return r.uri }

// Size implements storage.Device.
func (r *Remote) Size() int64 { return r.size }

// Caps implements storage.Device.
func (r *Remote) Caps() storage.Caps {
	return storage.Caps{
		ReadOnly:   r.tflags&tflagReadOnly != 0,
		Flush:      r.tflags&tflagSendFlush != 0,
		FUA:        r.tflags&tflagSendFUA != 0,
		Trim:       r.tflags&tflagSendTrim != 0,
		Zero:       r.tflags&tflagSendWriteZeroes != 0,
		FastZero:   r.tflags&tflagSendFastZero != 0,
		Rotational: r.tflags&tflagRotational != 0,
		BlockSize:  max(512, int(r.prefBlock)),
	}
}

// conn picks the connection for the next request, round robin.
func (r *Remote) conn() (*remoteConn, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil, storage.ErrClosed
	}
	c := r.conns[r.next%len(r.conns)]
	r.next++
	return c, nil
}

// do sends one request and waits for its reply; dst receives READ data.
func (r *Remote) do(typ, flags uint16, off int64, n uint32, payload, dst []byte) error {
	c, err := r.conn()
	if err != nil {
		return err
	}
	return c.do(typ, flags, off, n, payload, dst, nil)
}

// chunks runs fn over [off, off+n) in pieces of at most the maximum
// payload.
func (r *Remote) chunks(off, n int64, fn func(off, n int64) error) error {
	step := int64(r.maxBlock)
	for n > 0 {
		m := min(n, step)
		if err := fn(off, m); err != nil {
			return err
		}
		off, n = off+m, n-m
	}
	return nil
}

// ReadAt implements storage.Device.
func (r *Remote) ReadAt(p []byte, off int64) error {
	if err := storage.CheckRange(r.size, off, int64(len(p))); err != nil {
		return err
	}
	return r.chunks(off, int64(len(p)), func(o, n int64) error {
		return r.do(cmdRead, 0, o, uint32(n), nil, p[o-off:o-off+n])
	})
}

// WriteAt implements storage.Device. FUA goes as the request flag when the
// server takes it, else as a FLUSH after the write.
func (r *Remote) WriteAt(p []byte, off int64, flags storage.Flags) error {
	if err := storage.CheckRange(r.size, off, int64(len(p))); err != nil {
		return err
	}
	if r.Caps().ReadOnly {
		return storage.ErrReadOnly
	}
	fl := r.fua(flags)
	err := r.chunks(off, int64(len(p)), func(o, n int64) error {
		return r.do(cmdWrite, fl, o, uint32(n), p[o-off:o-off+n], nil)
	})
	return r.afterFUA(err, flags)
}

func (r *Remote) fua(flags storage.Flags) uint16 {
	if flags&storage.FUA != 0 && r.tflags&tflagSendFUA != 0 {
		return cflagFUA
	}
	return 0
}

// afterFUA flushes after a FUA request the server could not flag.
func (r *Remote) afterFUA(err error, flags storage.Flags) error {
	if err == nil && flags&storage.FUA != 0 && r.tflags&tflagSendFUA == 0 {
		return r.Flush()
	}
	return err
}

// Flush implements storage.Device.
func (r *Remote) Flush() error {
	if r.tflags&tflagSendFlush == 0 {
		_, err := r.conn()
		return err
	}
	// Every connection's writes: with multi-conn a flush on one covers
	// them all (the server promised it), without it there is one.
	return r.do(cmdFlush, 0, 0, 0, nil, nil)
}

// Trim implements storage.Device.
func (r *Remote) Trim(off, length int64, flags storage.Flags) error {
	if err := storage.CheckRange(r.size, off, length); err != nil {
		return err
	}
	if r.tflags&tflagSendTrim == 0 {
		return storage.ErrNotSupported
	}
	err := r.chunks(off, length, func(o, n int64) error {
		return r.do(cmdTrim, r.fua(flags), o, uint32(n), nil, nil)
	})
	return r.afterFUA(err, flags)
}

// Zero implements storage.Device: WRITE_ZEROES where the server has it,
// else zeroes written (or ErrNotSupported for FastZero).
func (r *Remote) Zero(off, length int64, flags storage.Flags) error {
	if err := storage.CheckRange(r.size, off, length); err != nil {
		return err
	}
	if r.tflags&tflagSendWriteZeroes == 0 {
		if flags&storage.FastZero != 0 {
			return storage.ErrNotSupported
		}
		z := make([]byte, min(length, 1<<20))
		err := r.chunks(off, length, func(o, n int64) error {
			for done := int64(0); done < n; {
				m := min(n-done, int64(len(z)))
				if err := r.do(cmdWrite, 0, o+done, uint32(m), z[:m], nil); err != nil {
					return err
				}
				done += m
			}
			return nil
		})
		return r.afterFUA(err, flags)
	}
	fl := r.fua(flags)
	if flags&storage.NoHole != 0 {
		fl |= cflagNoHole
	}
	if flags&storage.FastZero != 0 {
		if r.tflags&tflagSendFastZero == 0 {
			return storage.ErrNotSupported
		}
		fl |= cflagFastZero
	}
	err := r.chunks(off, length, func(o, n int64) error {
		return r.do(cmdWriteZeroes, fl, o, uint32(n), nil, nil)
	})
	return r.afterFUA(err, flags)
}

// Extents implements storage.Extenter with BLOCK_STATUS (base:allocation)
// when the server offers it, else reports data.
func (r *Remote) Extents(off, length int64, fn func(storage.Extent) bool) error {
	if err := storage.CheckRange(r.size, off, length); err != nil {
		return err
	}
	if length == 0 {
		return nil
	}
	c, err := r.conn()
	if err != nil {
		return err
	}
	if !c.meta {
		fn(storage.Extent{Length: length})
		return nil
	}
	n := uint32(min(length, 1<<30))
	var exts []storage.Extent
	if err := c.do(cmdBlockStatus, 0, off, n, nil, nil, &exts); err != nil {
		return err
	}
	if len(exts) == 0 {
		return fmt.Errorf("%w: BLOCK_STATUS at %d answered no extent", ErrRemote, off)
	}
	left := length
	for _, e := range exts {
		e.Length = min(e.Length, left)
		left -= e.Length
		if e.Length <= 0 || !fn(e) || left == 0 {
			break
		}
	}
	return nil
}

// Close implements storage.Device: it disconnects (NBD_CMD_DISC).
func (r *Remote) Close() error {
	r.mu.Lock()
	if r.closed {
		r.mu.Unlock()
		return nil
	}
	r.closed = true
	r.mu.Unlock()
	for _, c := range r.conns {
		c.close()
	}
	return nil
}

// exportInfo is what NBD_OPT_GO told about the export.
type exportInfo struct {
	size                          uint64
	tflags                        uint16
	minBlock, prefBlock, maxBlock uint32
}

// remoteConn is one connection of a Remote. mu guards the connection's
// state; wmu serializes the requests written to it.
type remoteConn struct {
	r    *Remote
	meta bool // base:allocation was negotiated (set at the first dial)

	wmu sync.Mutex
	mu  sync.Mutex
	nc  net.Conn
	w   *bufio.Writer
	// calls in flight by cookie; err is why the connection died (nil
	// while it lives); lastDial throttles redials.
	calls      map[uint64]*remoteCall
	cookie     uint64
	structured bool
	err        error
	lastDial   time.Time
	// downSince is when the connection was lost (while err is set);
	// outages and reconnects count losses and redials that worked.
	downSince           time.Time
	outages, reconnects int64
}

// remoteCall is one request waiting for its reply.
type remoteCall struct {
	typ  uint16
	off  uint64
	dst  []byte            // READ data
	got  uint64            // READ bytes the structured chunks covered
	exts *[]storage.Extent // BLOCK_STATUS
	done chan struct{}
	err  error
}

// errNotConnected is the state of a connection that has not dialled yet.
var errNotConnected = errors.New("nbd: remote: not connected")

// dial connects and negotiates; on success the connection serves.
func (c *remoteConn) dial(ctx context.Context) (exportInfo, error) {
	r := c.r
	ctx, cancel := context.WithTimeout(ctx, r.cfg.DialTimeout)
	defer cancel()
	nc, err := (&net.Dialer{}).DialContext(ctx, r.uri.Network, r.uri.Addr)
	if err != nil {
		return exportInfo{}, fmt.Errorf("nbd: dial %s: %w", r.uri, err)
	}
	if dl, ok := ctx.Deadline(); ok {
		nc.SetDeadline(dl)
	}
	info, conn, structured, meta, err := handshakeClient(nc, r.uri, r.cfg.TLS)
	if err != nil {
		nc.Close()
		return exportInfo{}, fmt.Errorf("nbd: %s: %w", r.uri, err)
	}
	conn.SetDeadline(time.Time{})
	if r.size != 0 && (int64(info.size) != r.size || info.tflags != r.tflags) {
		conn.Close()
		return exportInfo{}, fmt.Errorf("nbd: %s: the export changed: %d bytes, flags %#x (was %d, %#x)", r.uri, info.size, info.tflags, r.size, r.tflags)
	}
	c.mu.Lock()
	if c.err != nil {
		c.reconnects++
	}
	c.nc, c.w, c.err = conn, bufio.NewWriterSize(conn, 64<<10), nil
	c.calls, c.structured = map[uint64]*remoteCall{}, structured
	if r.conns == nil {
		c.meta = meta // later dials must offer the same
	}
	c.mu.Unlock()
	go c.readLoop(conn, bufio.NewReaderSize(conn, 64<<10))
	return info, nil
}

// ensure returns a live connection, redialling a dead one (throttled).
func (c *remoteConn) ensure() error {
	c.mu.Lock()
	if c.err == nil && c.nc != nil {
		c.mu.Unlock()
		return nil
	}
	err := firstErr(c.err, errNotConnected)
	if time.Since(c.lastDial) < c.r.cfg.RedialBackoff {
		c.mu.Unlock()
		return err
	}
	c.lastDial = time.Now()
	c.mu.Unlock()
	if _, derr := c.dial(context.Background()); derr != nil {
		c.r.cfg.Logger.Warn("nbd: remote still unreachable", "uri", c.r.uri.String(), "err", derr)
		return fmt.Errorf("%w (redial: %v)", err, derr)
	}
	c.r.cfg.Logger.Info("nbd: remote reconnected", "uri", c.r.uri.String())
	return nil
}

func firstErr(a, b error) error {
	if a != nil {
		return a
	}
	return b
}

// connected waits up to the configured Timeout for the connection to be
// up, redialling as the backoff allows. A remote still unreachable then
// is storage.ErrUnavailable.
func (c *remoteConn) connected() error {
	err := c.ensure()
	if err == nil {
		return nil
	}
	deadline := time.Now().Add(c.r.cfg.Timeout)
	for err != nil && time.Now().Before(deadline) {
		c.r.mu.Lock()
		closed := c.r.closed
		c.r.mu.Unlock()
		if closed {
			return storage.ErrClosed
		}
		time.Sleep(min(c.r.cfg.RedialBackoff, time.Until(deadline)))
		err = c.ensure()
	}
	if err == nil || errors.Is(err, storage.ErrClosed) {
		return err
	}
	return fmt.Errorf("%w: %w", storage.ErrUnavailable, err)
}

// do sends a request and waits for its reply.
func (c *remoteConn) do(typ, flags uint16, off int64, n uint32, payload, dst []byte, exts *[]storage.Extent) error {
	if err := c.connected(); err != nil {
		return err
	}
	call := &remoteCall{typ: typ, off: uint64(off), dst: dst, exts: exts, done: make(chan struct{})}
	c.mu.Lock()
	if c.err != nil {
		err := c.err
		c.mu.Unlock()
		return err
	}
	c.cookie++
	cookie := c.cookie
	c.calls[cookie] = call
	w, nc := c.w, c.nc
	c.mu.Unlock()

	c.wmu.Lock()
	hdr := appendRequest(make([]byte, 0, requestHeaderSize), request{flags: flags, typ: typ, cookie: cookie, offset: uint64(off), length: n})
	_, err := w.Write(hdr)
	if err == nil && len(payload) > 0 {
		_, err = w.Write(payload)
	}
	if err == nil {
		err = w.Flush()
	}
	c.wmu.Unlock()
	if err != nil {
		c.fail(nc, fmt.Errorf("%w: nbd: remote %s: send: %w", unix.EIO, c.r.uri, err))
	}
	<-call.done
	return call.err
}

// fail ends the connection nc (if it is still the current one) and every
// call in flight on it.
func (c *remoteConn) fail(nc net.Conn, err error) {
	c.mu.Lock()
	if c.nc != nc || c.err != nil {
		c.mu.Unlock()
		return
	}
	c.err = err
	c.downSince = time.Now()
	if !errors.Is(err, storage.ErrClosed) {
		c.outages++
	}
	calls := c.calls
	c.calls = map[uint64]*remoteCall{}
	c.mu.Unlock()
	nc.Close()
	c.r.cfg.Logger.Warn("nbd: remote connection lost", "uri", c.r.uri.String(), "err", err, "requests_failed", len(calls))
	for _, call := range calls {
		call.err = err
		close(call.done)
	}
}

func (c *remoteConn) close() {
	c.mu.Lock()
	nc, w := c.nc, c.w
	alive := c.err == nil && nc != nil
	c.mu.Unlock()
	if alive {
		c.wmu.Lock()
		w.Write(appendRequest(nil, request{typ: cmdDisc}))
		w.Flush()
		c.wmu.Unlock()
		c.fail(nc, storage.ErrClosed)
	}
}

// take removes and returns the call of a cookie.
func (c *remoteConn) take(cookie uint64, last bool) *remoteCall {
	c.mu.Lock()
	defer c.mu.Unlock()
	call := c.calls[cookie]
	if last {
		delete(c.calls, cookie)
	}
	return call
}

// readLoop reads replies until the connection fails.
func (c *remoteConn) readLoop(nc net.Conn, br *bufio.Reader) {
	var hdr [structHeaderSize]byte
	for {
		err := c.readReply(br, hdr[:])
		if err != nil {
			c.fail(nc, fmt.Errorf("%w: nbd: remote %s: %w", unix.EIO, c.r.uri, err))
			return
		}
	}
}

// remoteErr is the error of a reply's errno.
func remoteErr(errno uint32, msg string) error {
	var e error = unix.Errno(errno)
	switch errno {
	case errNotSup:
		e = fmt.Errorf("%w: %w", storage.ErrNotSupported, unix.ENOTSUP)
	case errNoSpc:
		e = fmt.Errorf("%w: %w", storage.ErrNoSpace, unix.ENOSPC)
	case errPerm:
		e = fmt.Errorf("%w: %w", storage.ErrReadOnly, unix.EPERM)
	case errShutdown:
		// The remote is going away: to our clients an I/O error of the
		// backing, not a shutdown of this server.
		e = fmt.Errorf("%w (the remote is shutting down)", unix.EIO)
	}
	if msg != "" {
		return fmt.Errorf("%w: %w (%s)", ErrRemote, e, msg)
	}
	return fmt.Errorf("%w: %w", ErrRemote, e)
}

// readReply reads one simple reply or one structured chunk.
func (c *remoteConn) readReply(br *bufio.Reader, hdr []byte) error {
	if _, err := io.ReadFull(br, hdr[:4]); err != nil {
		return err
	}
	switch magic := binary.BigEndian.Uint32(hdr); magic {
	case magicSimpleReply:
		if _, err := io.ReadFull(br, hdr[4:simpleReplySize]); err != nil {
			return err
		}
		errno, cookie := binary.BigEndian.Uint32(hdr[4:]), binary.BigEndian.Uint64(hdr[8:])
		call := c.take(cookie, true)
		if call == nil {
			return fmt.Errorf("simple reply to unknown cookie %d", cookie)
		}
		if errno == 0 && call.typ == cmdRead {
			if _, err := io.ReadFull(br, call.dst); err != nil {
				call.err = err
				close(call.done)
				return err
			}
		}
		if errno != 0 {
			call.err = remoteErr(errno, "")
		}
		close(call.done)
		return nil
	case magicStructReply:
		if _, err := io.ReadFull(br, hdr[4:structHeaderSize]); err != nil {
			return err
		}
		flags, typ := binary.BigEndian.Uint16(hdr[4:]), binary.BigEndian.Uint16(hdr[6:])
		cookie, length := binary.BigEndian.Uint64(hdr[8:]), binary.BigEndian.Uint32(hdr[16:])
		last := flags&replyFlagDone != 0
		call := c.take(cookie, last)
		if call == nil {
			return fmt.Errorf("structured reply to unknown cookie %d", cookie)
		}
		err := c.chunk(br, call, typ, length)
		if err != nil && call.err == nil {
			call.err = err
		}
		if last && call.err == nil && call.typ == cmdRead && call.got != uint64(len(call.dst)) {
			// A successful READ's chunks must cover the range; what they
			// missed would be whatever the buffer held before.
			call.err = remoteErr(errIO, fmt.Sprintf("READ reply covered %d of %d bytes", call.got, len(call.dst)))
		}
		if last {
			close(call.done)
		}
		var proto protoError
		if errors.As(err, &proto) {
			return err // the stream is out of step
		}
		return nil
	default:
		return fmt.Errorf("bad reply magic %#x", magic)
	}
}

// maxRemoteChunk bounds the non-data chunks a remote may send (block
// status descriptors, error messages): a remote must not make us
// allocate what it announces.
const maxRemoteChunk = 1 << 20

// protoError is a reply the client cannot follow: the stream is lost.
type protoError struct{ msg string }

func (e protoError) Error() string { return "protocol error: " + e.msg }

// chunk handles the payload of one structured reply chunk for call.
func (c *remoteConn) chunk(br *bufio.Reader, call *remoteCall, typ uint16, length uint32) error {
	switch typ {
	case replyTypeNone:
		if length != 0 {
			return protoError{"NONE chunk with a payload"}
		}
		return nil
	case replyTypeOffsetData:
		var b [8]byte
		if length < 8 {
			return protoError{"short OFFSET_DATA chunk"}
		}
		if _, err := io.ReadFull(br, b[:]); err != nil {
			return protoError{err.Error()}
		}
		off, n := binary.BigEndian.Uint64(b[:]), uint64(length-8)
		if call.typ != cmdRead || off < call.off || off+n > call.off+uint64(len(call.dst)) {
			return protoError{"OFFSET_DATA outside the request"}
		}
		if _, err := io.ReadFull(br, call.dst[off-call.off:off-call.off+n]); err != nil {
			return protoError{err.Error()}
		}
		call.got += n
		return nil
	case replyTypeOffsetHole:
		var b [12]byte
		if length != 12 {
			return protoError{"bad OFFSET_HOLE chunk"}
		}
		if _, err := io.ReadFull(br, b[:]); err != nil {
			return protoError{err.Error()}
		}
		off, n := binary.BigEndian.Uint64(b[:]), uint64(binary.BigEndian.Uint32(b[8:]))
		if call.typ != cmdRead || off < call.off || off+n > call.off+uint64(len(call.dst)) {
			return protoError{"OFFSET_HOLE outside the request"}
		}
		clear(call.dst[off-call.off : off-call.off+n])
		call.got += n
		return nil
	case replyTypeBlockStatus:
		if length < 4 || (length-4)%8 != 0 || length > maxRemoteChunk {
			return protoError{"bad BLOCK_STATUS chunk"}
		}
		b := make([]byte, length)
		if _, err := io.ReadFull(br, b); err != nil {
			return protoError{err.Error()}
		}
		if call.exts != nil {
			for d := b[4:]; len(d) >= 8; d = d[8:] {
				st := binary.BigEndian.Uint32(d[4:])
				*call.exts = append(*call.exts, storage.Extent{Length: int64(binary.BigEndian.Uint32(d)),
					Hole: st&stateHole != 0, Zero: st&stateZero != 0})
			}
		}
		return nil
	case replyTypeError, replyTypeError + 1: // ERROR, ERROR_OFFSET
		if length < 6 || length > maxRemoteChunk {
			return protoError{"bad ERROR chunk"}
		}
		b := make([]byte, length)
		if _, err := io.ReadFull(br, b); err != nil {
			return protoError{err.Error()}
		}
		errno, mlen := binary.BigEndian.Uint32(b), int(binary.BigEndian.Uint16(b[4:]))
		msg := ""
		if 6+mlen <= len(b) {
			msg = string(b[6 : 6+mlen])
		}
		return remoteErr(errno, msg)
	}
	if typ&(1<<15) != 0 { // an unknown error type: the spec says treat as error
		if _, err := io.CopyN(io.Discard, br, int64(length)); err != nil {
			return protoError{err.Error()}
		}
		return remoteErr(errIO, fmt.Sprintf("unknown error chunk type %d", typ))
	}
	return protoError{fmt.Sprintf("unknown chunk type %d", typ)}
}
