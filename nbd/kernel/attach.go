package kernel

// attach.go: Attach: a /dev/nbdN device served in process over socketpairs,
// and the healing of its connections.

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// AttachConfig configures Attach.
type AttachConfig struct {
	// Config is what the kernel is told. Index AnyIndex lets the kernel
	// pick a free device (netlink) or takes the first free one (ioctl).
	Config
	// Connections is the number of socketpairs (default 1). With more
	// than one, ServerFlags should carry FlagCanMultiConn.
	Connections int
	// Reconnect hands fresh sockets to the connected device Index whose
	// server died (NBD_CMD_RECONFIGURE), instead of connecting it. The
	// filesystem on it lives on. Netlink only.
	Reconnect bool
	// ForceIoctl uses the ioctl interface even when netlink is there.
	ForceIoctl bool
	// Shape is written to sysfs once the device is connected.
	Shape Shape
	// Module says how to load nbd when it is missing.
	Module ModuleConfig
	// SocketBuffer sizes SO_SNDBUF and SO_RCVBUF of both ends of each
	// socketpair (default 4 MiB; 0 keeps it, <0 leaves the system's).
	SocketBuffer int
	// Serve serves the server end of one socketpair in the background and
	// closes it when done (nbd.Server.ServeNegotiated). Required.
	Serve func(net.Conn) error
	// Logger (default: discard).
	Logger *slog.Logger
}

// Attachment is a device attached to this process's server.
//
// Every server-side connection is tracked: Done is closed once all of
// them ended. A connection that ends without the kernel having sent
// NBD_CMD_DISC on it died (a request timed out and the kernel gave the
// socket up, or the server dropped it); on the netlink path the
// attachment then hands the kernel a fresh socketpair in its place
// (NBD_CMD_RECONFIGURE), unless Disconnect or Release was called.
type Attachment struct {
	cfg   AttachConfig
	log   *slog.Logger
	index int
	mode  string
	nl    *Netlink
	ioctl *IoctlDevice
	done  chan struct{}

	mu struct {
		sync.Mutex
		open      int         // server-side connections not yet closed
		stopping  bool        // Disconnect or Release called: no healing
		requested bool        // some connection received NBD_CMD_DISC
		heals     []time.Time // recent reconnects, to stop a loop
	}
}

// Attach loads nbd if needed, makes the socketpairs, starts serving
// their server ends with cfg.Serve, and hands the other ends to the
// kernel: over generic netlink, or with ioctls when the netlink family is
// missing. It then applies cfg.Shape.
func Attach(ctx context.Context, cfg AttachConfig) (*Attachment, error) {
	if cfg.Serve == nil {
		return nil, fmt.Errorf("%w: no Serve function", ErrInvalid)
	}
	if cfg.Connections <= 0 {
		cfg.Connections = 1
	}
	if cfg.SocketBuffer == 0 {
		cfg.SocketBuffer = 4 << 20
	}
	if cfg.Reconnect && cfg.Index < 0 {
		return nil, fmt.Errorf("%w: a reconnect needs the device", ErrInvalid)
	}
	a := &Attachment{cfg: cfg, log: cfg.Logger, index: cfg.Index, done: make(chan struct{})}
	if a.log == nil {
		a.log = slog.New(slog.DiscardHandler)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := LoadModule(cfg.Module); err != nil {
		return nil, err
	}
	nl, err := chooseInterface(cfg, DialNetlink, a.log)
	if err != nil {
		return nil, err
	}
	a.nl = nl

	kernelEnds, err := a.startConns(cfg.Connections)
	if err != nil {
		a.closeNetlink()
		return nil, err
	}
	defer closeFiles(kernelEnds) // the kernel holds its own references
	switch {
	case a.nl != nil && cfg.Reconnect:
		a.mode = "netlink"
		err = a.nl.Reconfigure(cfg.Config, kernelEnds)
	case a.nl != nil:
		a.mode = "netlink"
		a.index, err = a.nl.Connect(cfg.Config, kernelEnds)
	default:
		a.mode = "ioctl"
		if a.index == AnyIndex {
			a.index, err = FreeIndex(cfg.Module.SysDir)
			if err != nil {
				break
			}
		}
		c := cfg.Config
		c.Index = a.index
		a.ioctl, err = ConnectIoctl(DevicePath(a.index), c, kernelEnds)
	}
	if err != nil {
		a.Release()
		a.closeNetlink()
		return nil, err
	}
	if a.ioctl != nil {
		go a.watchIoctl()
	}
	if err := Tune(cfg.Module.SysDir, a.index, cfg.Shape); err != nil {
		a.log.Warn("could not shape the device fully", "err", err)
	}
	return a, nil
}

// chooseInterface picks how to talk to the driver: the netlink
// connection dial returns, or nil for ioctls when ForceIoctl is set or the
// nbd netlink family is missing. A reconnect has no ioctl form.
func chooseInterface(cfg AttachConfig, dial func() (*Netlink, error), log *slog.Logger) (*Netlink, error) {
	if !cfg.ForceIoctl {
		nl, err := dial()
		if err == nil {
			return nl, nil
		}
		if !errors.Is(err, ErrNoNetlink) {
			return nil, err
		}
		if !cfg.Reconnect {
			log.Warn("no nbd netlink family; falling back to ioctls (no reconnect possible)", "err", err)
		}
	}
	if cfg.Reconnect {
		return nil, fmt.Errorf("%w: reconnect needs the netlink interface", ErrUnsupported)
	}
	return nil, nil
}

// Index is the device's number N; Path is /dev/nbdN.
func (a *Attachment) Index() int   { return a.index }
func (a *Attachment) Path() string { return DevicePath(a.index) }

// Mode is "netlink" or "ioctl".
func (a *Attachment) Mode() string { return a.mode }

// Done is closed when every server-side connection has ended.
func (a *Attachment) Done() <-chan struct{} { return a.done }

// DisconnectRequested reports whether the kernel sent NBD_CMD_DISC (a
// disconnect asked for by `nbdcache detach`, nbd-client -d, or
// Disconnect). When Done is closed without it, the connections died and
// the device waits for a reconnect.
func (a *Attachment) DisconnectRequested() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.mu.requested
}

// Disconnect asks the kernel to disconnect the device. The kernel sends
// NBD_CMD_DISC on every connection and shuts them down; Done follows.
func (a *Attachment) Disconnect() error {
	a.Release()
	if a.ioctl != nil {
		return a.ioctl.Disconnect()
	}
	return a.nl.Disconnect(a.index)
}

// Release stops the attachment from replacing dead connections, without
// disconnecting: for a hand-over to a new server (attach --reconnect).
func (a *Attachment) Release() {
	a.mu.Lock()
	a.mu.stopping = true
	a.mu.Unlock()
}

// Close releases the netlink socket or the device file. It does not
// disconnect.
func (a *Attachment) Close() error {
	a.Release()
	a.closeNetlink()
	if a.ioctl != nil {
		select {
		case <-a.ioctl.Done():
			return a.ioctl.Close()
		default:
			// NBD_DO_IT still runs; closing the file under it would
			// not stop it. The process exit does.
		}
	}
	return nil
}

func (a *Attachment) closeNetlink() {
	if a.nl != nil {
		a.nl.Close()
	}
}

func (a *Attachment) watchIoctl() {
	if err := a.ioctl.Wait(); err != nil {
		a.log.Warn("NBD_DO_IT ended with an error", "err", err)
	}
}

// startConns makes n socketpairs, serves the server ends and returns the
// kernel ends.
func (a *Attachment) startConns(n int) ([]*os.File, error) {
	var kernelEnds []*os.File
	for range n {
		k, s, err := socketpair(a.cfg.SocketBuffer)
		if err != nil {
			closeFiles(kernelEnds)
			return nil, err
		}
		if err := a.serve(s); err != nil {
			k.Close()
			closeFiles(kernelEnds)
			return nil, err
		}
		kernelEnds = append(kernelEnds, k)
	}
	return kernelEnds, nil
}

// serve tracks and serves one server end.
func (a *Attachment) serve(s net.Conn) error {
	a.mu.Lock()
	a.mu.open++
	a.mu.Unlock()
	tc := &trackedConn{nc: s, a: a}
	if err := a.cfg.Serve(tc); err != nil {
		tc.Close()
		return err
	}
	return nil
}

// connEnded is called once per closed server-side connection; served
// says whether the kernel sent any request on it.
func (a *Attachment) connEnded(disc, served bool) {
	a.mu.Lock()
	if disc {
		a.mu.requested = true
	}
	heal := a.shouldHealLocked(disc, served)
	if heal {
		a.mu.open++ // the replacement, counted before this one goes
	}
	a.mu.open--
	last := a.mu.open == 0
	a.mu.Unlock()
	if heal {
		go a.heal()
	}
	if last {
		close(a.done)
	}
}

// shouldHealLocked decides whether a connection that ended gets a
// replacement: not after a disconnect or Release, not without netlink.
// A connection that served requests (one the server dropped, as a power
// cut in fault mode does) is always replaced; one that died before its
// first request counts against allowHealLocked's budget, so that a
// replacement the kernel keeps dropping at once does not make us spin.
func (a *Attachment) shouldHealLocked(disc, served bool) bool {
	if disc || a.mu.stopping || a.mu.requested || a.nl == nil {
		return false
	}
	return served || a.allowHealLocked()
}

// allowHealLocked bounds reconnects of connections that never served to 4
// per connection a minute.
func (a *Attachment) allowHealLocked() bool {
	now := time.Now()
	keep := a.mu.heals[:0]
	for _, t := range a.mu.heals {
		if now.Sub(t) < time.Minute {
			keep = append(keep, t)
		}
	}
	a.mu.heals = keep
	if len(keep) >= 4*a.cfg.Connections {
		a.log.Error("connections keep dying; no more reconnects", "device", a.Path())
		return false
	}
	a.mu.heals = append(a.mu.heals, now)
	return true
}

// heal replaces a dead connection with a fresh socketpair. Its slot in
// the open count was taken by connEnded.
func (a *Attachment) heal() {
	k, s, err := socketpair(a.cfg.SocketBuffer)
	if err != nil {
		a.log.Error("reconnect: socketpair", "err", err)
		a.connEnded(true, false)
		return
	}
	defer k.Close()
	tc := &trackedConn{nc: s, a: a}
	if err := a.cfg.Serve(tc); err != nil {
		a.log.Error("reconnect: serve", "err", err)
		tc.markFinal()
		tc.Close()
		return
	}
	c := a.cfg.Config
	c.Index = a.index
	if err := a.nl.Reconfigure(c, []*os.File{k}); err != nil {
		a.log.Error("reconnect: the kernel refused a fresh socket", "device", a.Path(), "err", err)
		tc.markFinal()
		tc.Close()
		return
	}
	a.log.Warn("a connection died; handed the kernel a fresh one", "device", a.Path())
}

// socketpair returns the kernel's end as a file and the server's as a
// net.Conn. Both are close-on-exec.
func socketpair(buf int) (*os.File, net.Conn, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("kernel: socketpair: %w", err)
	}
	if buf > 0 {
		for _, fd := range fds {
			for _, opt := range [][2]int{{unix.SO_SNDBUFFORCE, unix.SO_SNDBUF}, {unix.SO_RCVBUFFORCE, unix.SO_RCVBUF}} {
				if unix.SetsockoptInt(fd, unix.SOL_SOCKET, opt[0], buf) != nil {
					unix.SetsockoptInt(fd, unix.SOL_SOCKET, opt[1], buf)
				}
			}
		}
	}
	k := os.NewFile(uintptr(fds[0]), "nbd-kernel-end")
	sf := os.NewFile(uintptr(fds[1]), "nbd-server-end")
	s, err := net.FileConn(sf)
	sf.Close()
	if err != nil {
		k.Close()
		return nil, nil, fmt.Errorf("kernel: socketpair: %w", err)
	}
	return k, s, nil
}

func closeFiles(fs []*os.File) {
	for _, f := range fs {
		f.Close()
	}
}

// trackedConn is a server-side connection that tells its Attachment when
// it closes and whether the kernel sent NBD_CMD_DISC on it. It writes out
// every net.Conn method.
type trackedConn struct {
	nc    net.Conn
	a     *Attachment
	sniff sniffer
	final atomic.Bool // closing it must not trigger a reconnect
	once  sync.Once
}

func (t *trackedConn) Read(p []byte) (int, error) {
	n, err := t.nc.Read(p)
	t.sniff.feed(p[:n])
	return n, err
}

func (t *trackedConn) Write(p []byte) (int, error)        { return t.nc.Write(p) }
func (t *trackedConn) LocalAddr() net.Addr                { return t.nc.LocalAddr() }
func (t *trackedConn) RemoteAddr() net.Addr               { return t.nc.RemoteAddr() }
func (t *trackedConn) SetDeadline(d time.Time) error      { return t.nc.SetDeadline(d) }
func (t *trackedConn) SetReadDeadline(d time.Time) error  { return t.nc.SetReadDeadline(d) }
func (t *trackedConn) SetWriteDeadline(d time.Time) error { return t.nc.SetWriteDeadline(d) }

func (t *trackedConn) markFinal() { t.final.Store(true) }

func (t *trackedConn) Close() error {
	err := t.nc.Close()
	t.once.Do(func() { t.a.connEnded(t.sniff.disc.Load() || t.final.Load(), t.sniff.served.Load()) })
	return err
}

// sniffer follows the request stream the kernel writes (28-byte simple
// request headers, WRITE payloads) to notice NBD_CMD_DISC. Read is
// called from one goroutine; disc is read from others.
type sniffer struct {
	hdr    [28]byte
	have   int   // header bytes collected
	skip   int64 // payload bytes still to pass
	broken bool  // lost track of the stream: stop looking
	disc   atomic.Bool
	served atomic.Bool // a whole request header arrived
}

const (
	requestMagic = 0x25609513
	nbdCmdWrite  = 1
	nbdCmdDisc   = 2
)

func (s *sniffer) feed(p []byte) {
	for len(p) > 0 && !s.broken {
		if s.skip > 0 {
			n := int64(len(p))
			if n > s.skip {
				n = s.skip
			}
			s.skip -= n
			p = p[n:]
			continue
		}
		n := copy(s.hdr[s.have:], p)
		s.have += n
		p = p[n:]
		if s.have < len(s.hdr) {
			return
		}
		s.have = 0
		if binary.BigEndian.Uint32(s.hdr[0:4]) != requestMagic {
			s.broken = true
			return
		}
		if !s.served.Load() {
			s.served.Store(true)
		}
		switch binary.BigEndian.Uint16(s.hdr[6:8]) {
		case nbdCmdWrite:
			s.skip = int64(binary.BigEndian.Uint32(s.hdr[24:28]))
		case nbdCmdDisc:
			s.disc.Store(true)
		}
	}
}
