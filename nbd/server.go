package nbd

// server.go: Server: its Config and exports, accepting connections,
// shutdown, and Stats.

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"math/bits"
	"net"
	"net/netip"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nbdcache/nbdcache/storage"
)

// Export is one device offered to clients under a name.
type Export struct {
	Name        string
	Description string
	Device      storage.Device
	ReadOnly    bool
}

// Config configures a Server.
type Config struct {
	// Exports offered. The first is also the default export, reached with
	// the empty name. At least one is required.
	Exports []Export
	// HandshakeTimeout bounds the whole negotiation phase of a connection
	// (default 10 s, qemu's limit since CVE-2024-7409).
	HandshakeTimeout time.Duration
	// MaxPayload is the largest READ or WRITE payload accepted and the
	// advertised maximum block size (default 32 MiB). It is lowered to
	// the largest power of two within a connection's share of the
	// buffer budget (BufferBudget/4), so that any valid request can get
	// its buffer.
	MaxPayload uint32
	// BufferBudget bounds the memory of request buffers (READ data, WRITE
	// payloads, BLOCK_STATUS replies) across all connections together
	// (default 256 MiB, at least 1 MiB). A request that does not fit
	// waits, first come first served; one connection may hold at most a
	// quarter of it. Up to an eighth of it is kept as one small lane per
	// allowed connection (at most 1 MiB each), which serves that
	// connection's small requests when the rest is taken. Without a
	// connection limit there are no lanes, and with thousands of allowed
	// connections they shrink below 4 KiB and vanish: small requests then
	// queue like any other.
	BufferBudget int64
	// MaxConnections bounds the connections open at once, negotiating or
	// not (default 32; negative: no limit). A connection over the limit
	// is closed at once, before the greeting. Connections handed over
	// with ServeNegotiated (the kernel's) count but are never refused.
	MaxConnections int
	// MaxInFlight bounds the requests of one connection between reading
	// their header and sending their reply (default 64). At the limit the
	// server stops reading that connection until a reply has gone out.
	MaxInFlight int
	// WriteTimeout bounds each write of replies to a client (default
	// 30 s; negative: none; a write gets between 7/8 of it and all of
	// it, see deadlineWriter). A client that reads nothing for that long
	// is disconnected and its buffers freed. Connections handed over
	// with ServeNegotiated have no write timeout: their peer is the
	// kernel.
	WriteTimeout time.Duration
	// ReadTimeout bounds the arrival of a WRITE's payload once its header
	// has been read (default 30 s; negative: none; between 7/8 of it and
	// all of it, see conn.readPayload). A client that
	// announces a payload and stalls is disconnected. Waiting for the
	// next request header has no time limit.
	ReadTimeout time.Duration
	// IdleTimeout closes a connection that has no request in flight and
	// sends none for that long (between one and two of it, see
	// conn.readHeader; default 0: never). It frees the connection's slot
	// under MaxConnections. Connections handed over with
	// ServeNegotiated have none.
	IdleTimeout time.Duration
	// Allow, if not empty, lists the networks TCP clients may connect
	// from; any other client is closed at once, before the greeting.
	// Unix-socket clients are not checked (the socket's mode guards
	// them).
	Allow []netip.Prefix
	// TLS, if set, offers NBD_OPT_STARTTLS with this configuration (its
	// certificates, and ClientAuth/ClientCAs to verify clients). Its
	// MinVersion is raised to TLS 1.2, the spec's minimum. Connections
	// handed over with ServeNegotiated never use TLS.
	TLS *tls.Config
	// TLSRequired refuses everything but NBD_OPT_STARTTLS and
	// NBD_OPT_ABORT until TLS is up (the spec's FORCEDTLS mode), so that
	// nothing about the exports is told in plaintext. It needs TLS.
	TLSRequired bool
	// Logger receives connection-level events (default: discard).
	Logger *slog.Logger
	// Observer, if set, sees every request answered (metrics).
	Observer Observer
}

// Observer sees each request the server answers: its command ("READ",
// "WRITE", ...), the time from its dispatch to its reply, and the error
// of the reply ("" for success, else its name, such as "EIO"). Requests
// refused before dispatch (bad flags, out of range) are seen with a zero
// duration. It is called on the request's goroutine, concurrently, and
// must be cheap.
type Observer interface {
	Request(command string, took time.Duration, errno string)
}

// ErrServerClosed is returned by Serve after Shutdown.
var ErrServerClosed = errors.New("nbd: server closed")

// Server serves exports over NBD. It is safe for concurrent use.
type Server struct {
	exports          []*Export
	log              *slog.Logger
	handshakeTimeout time.Duration
	minBlock         uint32
	preferredBlock   uint32
	maxPayload       uint32
	maxConns         int
	maxInFlight      int
	writeTimeout     time.Duration
	readTimeout      time.Duration
	idleTimeout      time.Duration
	allow            []netip.Prefix
	tls              *tls.Config
	tlsRequired      bool
	bufs             *arena
	connShare        int64  // the most buffer bytes one connection may hold
	lanes            *arena // one block of laneSize per allowed connection, or nil
	laneSize         int
	scratch          chan struct{} // scratch slots (conn.scratchCalls)
	zeroes           func() []byte
	stats            counters
	observer         Observer

	mu struct {
		sync.Mutex
		closing   bool
		listeners map[net.Listener]struct{}
		conns     map[*conn]struct{}
	}
	connWG sync.WaitGroup
}

// NewServer checks cfg and returns a server.
func NewServer(cfg Config) (*Server, error) {
	if len(cfg.Exports) == 0 {
		return nil, errors.New("nbd: no export configured")
	}
	s := &Server{
		log:              cfg.Logger,
		observer:         cfg.Observer,
		handshakeTimeout: cfg.HandshakeTimeout,
		minBlock:         1,
		preferredBlock:   4096,
		maxPayload:       cfg.MaxPayload,
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if s.handshakeTimeout <= 0 {
		s.handshakeTimeout = 10 * time.Second
	}
	if s.maxPayload == 0 {
		s.maxPayload = 32 << 20
	}
	if s.maxPayload < 4096 || s.maxPayload > 1<<30 {
		return nil, fmt.Errorf("nbd: maximum payload %d out of range [4096, 1 GiB]", s.maxPayload)
	}
	budget := cfg.BufferBudget
	if budget == 0 {
		budget = DefaultBufferBudget
	}
	if budget < 1<<20 || budget > 1<<40 {
		return nil, fmt.Errorf("nbd: buffer budget %d out of range [1 MiB, 1 TiB]", budget)
	}
	s.maxConns = cfg.MaxConnections
	if s.maxConns == 0 {
		s.maxConns = DefaultMaxConnections
	}
	// Each allowed connection's lane (conn.getBuf) comes out of the
	// budget: an eighth of it at most, a lane of at most maxLane.
	if s.maxConns > 0 {
		if per := min(budget/8/int64(s.maxConns), maxLane); per >= pageSize {
			s.laneSize = 1 << (bits.Len64(uint64(per)) - 1)
			s.lanes = newArena(int64(s.maxConns) * int64(s.laneSize))
		}
	}
	s.connShare = budget / 4
	if s.lanes != nil {
		budget -= int64(s.lanes.size)
	}
	s.bufs = newArena(budget)
	// Any valid request must be able to get its buffer: its block (the
	// next power of two) must fit in a connection's share.
	if limit := uint64(1) << (bits.Len64(uint64(s.connShare)) - 1); uint64(s.maxPayload) > limit {
		s.maxPayload = uint32(limit)
	}
	s.maxInFlight = cfg.MaxInFlight
	if s.maxInFlight <= 0 {
		s.maxInFlight = DefaultMaxInFlight
	}
	s.writeTimeout, s.readTimeout = cfg.WriteTimeout, cfg.ReadTimeout
	if s.writeTimeout == 0 {
		s.writeTimeout = DefaultIOTimeout
	}
	if s.readTimeout == 0 {
		s.readTimeout = DefaultIOTimeout
	}
	s.idleTimeout = max(cfg.IdleTimeout, 0)
	s.allow = cfg.Allow
	if cfg.TLSRequired && cfg.TLS == nil {
		return nil, errors.New("nbd: TLS required but not configured")
	}
	if cfg.TLS != nil {
		s.tls = cfg.TLS.Clone()
		s.tls.MinVersion = max(s.tls.MinVersion, tls.VersionTLS12)
		s.tlsRequired = cfg.TLSRequired
	}
	s.zeroes = sync.OnceValue(func() []byte { return make([]byte, zeroChunk) })
	s.scratch = make(chan struct{}, maxScratchCalls)
	seen := map[string]bool{}
	for i := range cfg.Exports {
		ex := cfg.Exports[i]
		if ex.Device == nil {
			return nil, fmt.Errorf("nbd: export %q has no device", ex.Name)
		}
		if len(ex.Name) > maxStringLength || len(ex.Description) > maxStringLength {
			return nil, fmt.Errorf("nbd: export name or description of %q too long", ex.Name)
		}
		if seen[ex.Name] {
			return nil, fmt.Errorf("nbd: export %q configured twice", ex.Name)
		}
		seen[ex.Name] = true
		if ex.Device.Caps().ReadOnly {
			ex.ReadOnly = true
		}
		s.exports = append(s.exports, &ex)
	}
	s.mu.listeners = map[net.Listener]struct{}{}
	s.mu.conns = map[*conn]struct{}{}
	// A server dropped without Shutdown still gives its mapping back.
	runtime.AddCleanup(s, (*arena).release, s.bufs)
	if s.lanes != nil {
		runtime.AddCleanup(s, (*arena).release, s.lanes)
	}
	return s, nil
}

// Defaults of Config.
const (
	DefaultBufferBudget   = 256 << 20
	DefaultMaxConnections = 32
	DefaultMaxInFlight    = 64
	DefaultIOTimeout      = 30 * time.Second
)

// MaxPayload is the largest READ or WRITE payload the server accepts: the
// maximum block size it advertises.
func (s *Server) MaxPayload() uint32 { return s.maxPayload }

// allowed reports whether a client at addr may connect (Config.Allow).
func (s *Server) allowed(addr net.Addr) bool {
	if len(s.allow) == 0 {
		return true
	}
	ta, ok := addr.(*net.TCPAddr)
	if !ok {
		return true // a unix socket: its file mode decides
	}
	ip, ok := netip.AddrFromSlice(ta.IP)
	if !ok {
		return false
	}
	ip = ip.Unmap()
	for _, p := range s.allow {
		if p.Contains(ip) {
			return true
		}
	}
	return false
}

// lookup finds an export by name; the empty name is the default export.
func (s *Server) lookup(name string) *Export {
	for _, ex := range s.exports {
		if ex.Name == name {
			return ex
		}
	}
	if name == "" {
		return s.exports[0]
	}
	return nil
}

func (s *Server) transmissionFlags(ex *Export, ss *session) uint16 {
	caps := ex.Device.Caps()
	f := uint16(tflagHasFlags | tflagSendFlush | tflagSendFUA | tflagSendWriteZeroes |
		tflagSendFastZero | tflagCanMultiConn | tflagSendCache)
	if ex.ReadOnly {
		f |= tflagReadOnly
	}
	if caps.Trim {
		f |= tflagSendTrim
	}
	if caps.Rotational {
		f |= tflagRotational
	}
	if ss.structured {
		f |= tflagSendDF
	}
	return f
}

// Serve accepts connections on l until Shutdown is called or l fails. It
// always closes l.
func (s *Server) Serve(l net.Listener) error {
	s.mu.Lock()
	if s.mu.closing {
		s.mu.Unlock()
		l.Close()
		return ErrServerClosed
	}
	s.mu.listeners[l] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.mu.listeners, l)
		s.mu.Unlock()
		l.Close()
	}()
	var backoff time.Duration
	for {
		nc, err := l.Accept()
		if err != nil {
			s.mu.Lock()
			closing := s.mu.closing
			s.mu.Unlock()
			if closing {
				return ErrServerClosed
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				// Out of file descriptors and the like: back off
				// rather than spin.
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				s.log.Warn("accept failed", "err", err, "retry_in", backoff)
				t := time.NewTimer(backoff)
				<-t.C
				continue
			}
			return err
		}
		backoff = 0
		s.ServeConn(nc)
	}
}

// ServeConn serves one already-connected client in a new goroutine,
// starting with the handshake. The connection is closed when the client
// disconnects or the server shuts down. A client outside Config.Allow, or
// over Config.MaxConnections, is closed at once without a byte sent.
func (s *Server) ServeConn(nc net.Conn) {
	if !s.allowed(nc.RemoteAddr()) {
		s.stats.refused.Add(1)
		s.log.Info("connection refused: not in --allow", "remote", remote(nc))
		nc.Close()
		return
	}
	s.serveConn(newConn(s, nc, nil))
}

// ServeNegotiated serves a connection whose handshake happened elsewhere,
// such as one end of a socketpair handed to the kernel's nbd driver with
// netlink: transmission starts at once, with simple replies, on the named
// export. Use Info to learn the size and flags to hand to the kernel.
func (s *Server) ServeNegotiated(nc net.Conn, export string) error {
	ex := s.lookup(export)
	if ex == nil {
		return fmt.Errorf("%w: %q", errUnknownExport, export)
	}
	s.serveConn(newConn(s, nc, &session{export: ex}))
	return nil
}

// ExportInfo describes an export as a client sees it after negotiation.
type ExportInfo struct {
	Size int64
	// Flags are the NBD transmission flags (without structured replies),
	// as the kernel's NBD_ATTR_SERVER_FLAGS wants them.
	Flags uint16
	// BlockSize is the device's preferred I/O size.
	BlockSize int
}

// Info reports what a client of the named export is told.
func (s *Server) Info(export string) (ExportInfo, error) {
	ex := s.lookup(export)
	if ex == nil {
		return ExportInfo{}, fmt.Errorf("%w: %q", errUnknownExport, export)
	}
	return ExportInfo{Size: ex.Device.Size(), Flags: s.transmissionFlags(ex, &session{}), BlockSize: ex.Device.Caps().BlockSize}, nil
}

func (s *Server) serveConn(c *conn) {
	nc := c.nc
	s.mu.Lock()
	if s.mu.closing {
		s.mu.Unlock()
		nc.Close()
		return
	}
	if s.maxConns > 0 && len(s.mu.conns) >= s.maxConns && !c.trusted {
		s.mu.Unlock()
		s.stats.refused.Add(1)
		s.log.Warn("connection refused: too many connections", "remote", remote(nc), "max", s.maxConns)
		nc.Close()
		return
	}
	s.mu.conns[c] = struct{}{}
	s.connWG.Add(1)
	s.mu.Unlock()
	s.stats.connections.Add(1)
	go func() {
		defer s.connWG.Done()
		c.serve()
		// The slot is free before the client can see the close, so
		// that a client that saw it can connect again at once.
		s.mu.Lock()
		delete(s.mu.conns, c)
		s.mu.Unlock()
		c.abort()
	}()
}

// Shutdown stops accepting connections, stops reading new requests,
// waits for the requests in flight to be answered, and closes every
// connection. If ctx ends first, the remaining connections are closed
// at once and ctx's error is returned. Devices are not flushed: that is
// the owner's job, after Shutdown returns.
func (s *Server) Shutdown(ctx context.Context) error {
	defer func() {
		// Every connection is gone: no buffer is in use.
		s.bufs.release()
		if s.lanes != nil {
			s.lanes.release()
		}
	}()
	s.mu.Lock()
	s.mu.closing = true
	for l := range s.mu.listeners {
		l.Close()
	}
	for c := range s.mu.conns {
		c.stopReading()
	}
	s.mu.Unlock()
	done := make(chan struct{})
	go func() {
		s.connWG.Wait()
		close(done)
	}()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		s.mu.Lock()
		for c := range s.mu.conns {
			c.abort()
		}
		s.mu.Unlock()
		<-done
		return ctx.Err()
	}
}

// DropConnections closes every open connection at once, as a power-cycled
// disk would: requests in flight get no reply. The server keeps accepting
// new connections. It returns the number of connections dropped.
func (s *Server) DropConnections() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	for c := range s.mu.conns {
		c.stopping.Store(true)
		c.abort()
	}
	return len(s.mu.conns)
}

// Stats is a snapshot of the server's counters.
type Stats struct {
	Connections   int64 `json:"connections"`        // accepted since start
	Active        int64 `json:"active_connections"` // open now
	Requests      int64 `json:"requests"`
	Errors        int64 `json:"request_errors"` // requests answered with an error
	BytesRead     int64 `json:"bytes_read"`
	BytesWritten  int64 `json:"bytes_written"`
	Reads         int64 `json:"client_reads"`
	Writes        int64 `json:"client_writes"`
	Flushes       int64 `json:"client_flushes"`
	Trims         int64 `json:"client_trims"`
	Zeroes        int64 `json:"client_zeroes"`
	BlockStatuses int64 `json:"client_block_statuses"`
	// Refused counts connections closed before the greeting: over
	// MaxConnections or outside Allow.
	Refused int64 `json:"refused_connections"`
	// TimedOut counts connections dropped by WriteTimeout (a client that
	// stopped reading replies) or ReadTimeout (a stalled payload).
	TimedOut int64 `json:"timed_out_connections"`
	// Idle counts connections closed by IdleTimeout.
	Idle int64 `json:"idle_connections"`
	// BufferBytes is the buffer budget in use now (the main arena and
	// the lanes), and BufferWaits the requests that had to wait for it.
	// BufferPeak is the main arena's high mark plus the lanes': an upper
	// bound on BufferBytes' high mark, which it reaches only if both
	// peaked at once.
	BufferBytes int64 `json:"buffer_bytes"`
	BufferPeak  int64 `json:"buffer_peak"`
	BufferWaits int64 `json:"buffer_waits"`
}

type counters struct {
	connections, requests, errors         atomic.Int64
	bytesRead, bytesWritten               atomic.Int64
	reads, writes, flushes, trims, zeroes atomic.Int64
	blockStatuses                         atomic.Int64
	refused, timedOut, idle               atomic.Int64
}

// Stats returns the server's counters.
func (s *Server) Stats() Stats {
	s.mu.Lock()
	active := int64(len(s.mu.conns))
	s.mu.Unlock()
	c := &s.stats
	as := s.bufs.stats()
	if s.lanes != nil {
		ls := s.lanes.stats()
		as.used += ls.used
		as.peak += ls.peak
	}
	return Stats{
		Connections: c.connections.Load(), Active: active,
		Requests: c.requests.Load(), Errors: c.errors.Load(),
		BytesRead: c.bytesRead.Load(), BytesWritten: c.bytesWritten.Load(),
		Reads: c.reads.Load(), Writes: c.writes.Load(), Flushes: c.flushes.Load(),
		Trims: c.trims.Load(), Zeroes: c.zeroes.Load(), BlockStatuses: c.blockStatuses.Load(),
		Refused: c.refused.Load(), TimedOut: c.timedOut.Load(), Idle: c.idle.Load(),
		BufferBytes: int64(as.used), BufferPeak: int64(as.peak), BufferWaits: as.waits,
	}
}

// Connection buffer sizes. In transmission they are large enough that a
// burst of small requests is parsed out of one read, and a burst of
// replies leaves in one write; a negotiating connection, which anyone may
// open, costs only the small ones.
const (
	ioBufSize        = 256 << 10
	negotiateBufSize = 4 << 10
)

// maxLane is the largest lane: a request up to this size is served
// promptly whatever other connections hold (conn.getBuf).
const maxLane = 1 << 20

// maxScratchCalls bounds the CACHE and WRITE_ZEROES device calls in
// progress across the server, in pieces of at most scratchChunk bytes
// (conn.scratchCalls).
const (
	maxScratchCalls = 4
	scratchChunk    = 32 << 20
)

// zeroChunk is the size of the shared zero buffer that WRITE_ZEROES writes
// when a device cannot zero natively.
const zeroChunk = 1 << 20
