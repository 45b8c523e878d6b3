package nbd

import (
	"bytes"
	"context"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nbdcache/nbdcache/internal/testcert"
	"github.com/nbdcache/nbdcache/storage"
	"github.com/nbdcache/nbdcache/storage/storagetest"
)

func TestParseURI(t *testing.T) {
	for in, want := range map[string]URI{
		"nbd://example.com/disk":                 {Network: "tcp", Addr: "example.com:10809", Export: "disk"},
		"nbd://[::1]:1234/":                      {Network: "tcp", Addr: "[::1]:1234"},
		"nbds://h:99/a%20b":                      {Network: "tcp", Addr: "h:99", Export: "a b", TLS: true},
		"nbd+unix:///e?socket=/run/x.sock":       {Network: "unix", Addr: "/run/x.sock", Export: "e"},
		"nbds+unix:///?socket=/tmp/s%20p/n.sock": {Network: "unix", Addr: "/tmp/s p/n.sock", TLS: true},
	} {
		got, err := ParseURI(in)
		if err != nil || got != want {
			t.Errorf("ParseURI(%q) = %+v, %v; want %+v", in, got, err, want)
			continue
		}
		if back, err := ParseURI(got.String()); err != nil || back != got {
			t.Errorf("%q: String() %q reads back as %+v, %v", in, got.String(), back, err)
		}
	}
	for _, bad := range []string{"http://x/y", "nbd:///disk", "nbd+unix://host/e?socket=/x", "nbd+unix:///e", "/dev/sda"} {
		if _, err := ParseURI(bad); err == nil {
			t.Errorf("ParseURI(%q) accepted", bad)
		}
	}
}

// serveUnix serves dev as export name on a fresh unix socket.
func serveUnix(t *testing.T, cfg Config) (sock string, srv *Server) {
	t.Helper()
	sock = filepath.Join(t.TempDir(), "nbd.sock")
	srv, err := NewServer(cfg)
	if err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(l)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
	})
	return sock, srv
}

func dialRemote(t *testing.T, uri string, cfg RemoteConfig) *Remote {
	t.Helper()
	r, err := DialRemote(context.Background(), uri, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close() })
	return r
}

// TestRemoteContract: a Remote over our own server passes the Device
// contract, with structured replies (and BLOCK_STATUS) and over several
// connections.
func TestRemoteContract(t *testing.T) {
	for _, conns := range []int{1, 3} {
		t.Run(strconv.Itoa(conns), func(t *testing.T) {
			storagetest.Run(t, func(t *testing.T, size int64) storage.Device {
				sock, _ := serveUnix(t, Config{Exports: []Export{{Name: "d", Device: storage.NewMem(size)}}})
				r := dialRemote(t, "nbd+unix:///d?socket="+sock, RemoteConfig{Connections: conns})
				if conns > 1 && len(r.conns) != conns {
					t.Fatalf("%d connections, want %d (the server offers multi-conn)", len(r.conns), conns)
				}
				return r
			})
		})
	}
}

// TestRemoteMatchesServer: what a Remote reports and does is what the
// served device has and gets: size, caps, holes as BLOCK_STATUS, FUA
// and errors mapped back.
func TestRemoteMatchesServer(t *testing.T) {
	mem := storage.NewMem(8 << 20)
	sock, _ := serveUnix(t, Config{Exports: []Export{{Name: "", Device: mem}}})
	r := dialRemote(t, "nbd+unix:///?socket="+sock, RemoteConfig{})
	if r.Size() != 8<<20 {
		t.Fatalf("size %d", r.Size())
	}
	caps := r.Caps()
	if !caps.Flush || !caps.FUA || !caps.Trim || !caps.Zero || caps.ReadOnly {
		t.Errorf("caps %+v", caps)
	}
	p := bytes.Repeat([]byte{0xab}, 1<<20)
	if err := r.WriteAt(p, 1<<20, storage.FUA); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 1<<20)
	if err := mem.ReadAt(got, 1<<20); err != nil || !bytes.Equal(got, p) {
		t.Fatal("the write did not land on the served device", err)
	}
	var exts []storage.Extent
	if err := r.Extents(0, 4<<20, func(e storage.Extent) bool { exts = append(exts, e); return true }); err != nil {
		t.Fatal(err)
	}
	if len(exts) < 2 || !exts[0].Hole || exts[0].Length != 1<<20 || exts[1].Hole {
		t.Errorf("extents %+v: want a 1 MiB hole, then data", exts)
	}
	if err := r.ReadAt(make([]byte, 10), 8<<20-5); !errors.Is(err, storage.ErrOutOfRange) {
		t.Errorf("read past the end: %v", err)
	}
	ro := storage.NewMem(1 << 20)
	sock2, _ := serveUnix(t, Config{Exports: []Export{{Name: "ro", Device: ro, ReadOnly: true}}})
	r2 := dialRemote(t, "nbd+unix:///ro?socket="+sock2, RemoteConfig{})
	if !r2.Caps().ReadOnly {
		t.Error("a read-only export is not read-only")
	}
	if err := r2.WriteAt(make([]byte, 512), 0, 0); !errors.Is(err, storage.ErrReadOnly) {
		t.Errorf("write to a read-only export: %v", err)
	}
	if _, err := DialRemote(context.Background(), "nbd+unix:///nope?socket="+sock2, RemoteConfig{}); err == nil {
		t.Error("an unknown export was accepted")
	}
}

// TestRemoteTLS: nbds+unix with the server's CA; a client that does not
// trust it fails.
func TestRemoteTLS(t *testing.T) {
	certs := testcert.New(t)
	sock, _ := serveUnix(t, Config{Exports: []Export{{Name: "s", Device: storage.NewMem(1 << 20)}}, TLS: certs.ServerConfig(t, false), TLSRequired: true})
	cfg := certs.ClientConfig(t, nil)
	cfg.ServerName = "localhost"
	r := dialRemote(t, "nbds+unix:///s?socket="+sock, RemoteConfig{TLS: cfg})
	if err := r.WriteAt(bytes.Repeat([]byte{1}, 4096), 0, storage.FUA); err != nil {
		t.Fatal(err)
	}
	if _, err := DialRemote(context.Background(), "nbd+unix:///s?socket="+sock, RemoteConfig{}); err == nil {
		t.Error("a plaintext client got through TLSRequired")
	}
}

// TestRemoteReconnects: the server goes away (requests fail with an
// error, never a hang) and comes back on the same socket: the Remote
// redials on its own and serves again, with the data.
func TestRemoteReconnects(t *testing.T) {
	mem := storage.NewMem(1 << 20)
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	start := func() *Server {
		srv, err := NewServer(Config{Exports: []Export{{Device: mem}}})
		if err != nil {
			t.Fatal(err)
		}
		os.Remove(sock)
		l, err := net.Listen("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		go srv.Serve(l)
		return srv
	}
	stop := func(s *Server) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		s.Shutdown(ctx)
	}
	srv := start()
	r := dialRemote(t, "nbd+unix:///?socket="+sock, RemoteConfig{RedialBackoff: 50 * time.Millisecond})
	if err := r.WriteAt(bytes.Repeat([]byte{7}, 4096), 0, storage.FUA); err != nil {
		t.Fatal(err)
	}
	stop(srv)
	deadline := time.Now().Add(10 * time.Second)
	for r.ReadAt(make([]byte, 512), 0) == nil {
		if time.Now().After(deadline) {
			t.Fatal("reads still succeed with the server gone")
		}
	}
	if st := r.Stats(); st.Connected || st.Outages != 1 {
		t.Errorf("stats while the server is gone: %+v", st)
	}
	srv = start()
	defer stop(srv)
	got := make([]byte, 4096)
	var err error
	for {
		if err = r.ReadAt(got, 0); err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond) // the redial backoff runs on the clock
	}
	if err != nil || !bytes.Equal(got, bytes.Repeat([]byte{7}, 4096)) {
		t.Fatalf("after the server came back: %v", err)
	}
	if st := r.Stats(); !st.Connected || st.Outages != 1 || st.Reconnects != 1 || st.DownSeconds != 0 {
		t.Errorf("stats after one outage: %+v", st)
	}
}

// TestRemoteNbdkit: against nbdkit (memory plugin), the reference server.
func TestRemoteNbdkit(t *testing.T) {
	nbdkit, err := exec.LookPath("nbdkit")
	if err != nil {
		t.Skip("nbdkit not installed (make test installs it)")
	}
	sock := filepath.Join(t.TempDir(), "kit.sock")
	cmd := exec.Command(nbdkit, "--foreground", "--exit-with-parent", "-U", sock, "memory", "16M")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(sock); err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond) // nbdkit has no readiness signal without --run
	}
	storagetest.Run(t, func(t *testing.T, size int64) storage.Device {
		r := dialRemote(t, "nbd+unix:///?socket="+sock, RemoteConfig{Connections: 2})
		if err := r.Zero(0, r.Size(), 0); err != nil {
			t.Fatal(err)
		}
		return &sized{r, size}
	})
	r := dialRemote(t, "nbd+unix:///?socket="+sock, RemoteConfig{})
	if err := r.WriteAt(make([]byte, 512), 16<<20, 0); !errors.Is(err, storage.ErrOutOfRange) {
		t.Errorf("write past the end: %v", err)
	}
}

// sized shows the first size bytes of a device (the contract suite wants
// a device of its own size; nbdkit's is fixed).
type sized struct {
	*Remote
	size int64
}

func (s *sized) Size() int64 { return s.size }
func (s *sized) ReadAt(p []byte, off int64) error {
	if err := storage.CheckRange(s.size, off, int64(len(p))); err != nil {
		return err
	}
	return s.Remote.ReadAt(p, off)
}
func (s *sized) WriteAt(p []byte, off int64, f storage.Flags) error {
	if err := storage.CheckRange(s.size, off, int64(len(p))); err != nil {
		return err
	}
	return s.Remote.WriteAt(p, off, f)
}
func (s *sized) Trim(off, n int64, f storage.Flags) error {
	if err := storage.CheckRange(s.size, off, n); err != nil {
		return err
	}
	return s.Remote.Trim(off, n, f)
}
func (s *sized) Zero(off, n int64, f storage.Flags) error {
	if err := storage.CheckRange(s.size, off, n); err != nil {
		return err
	}
	return s.Remote.Zero(off, n, f)
}
func (s *sized) Extents(off, n int64, fn func(storage.Extent) bool) error {
	if err := storage.CheckRange(s.size, off, n); err != nil {
		return err
	}
	return s.Remote.Extents(off, n, fn)
}

// TestRemoteTimeout: with Timeout, a request made while the server is
// away waits for it; if it comes back in time the request succeeds, else
// it fails with EIO once the timeout has passed.
func TestRemoteTimeout(t *testing.T) {
	mem := storage.NewMem(1 << 20)
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	start := func() *Server {
		srv, err := NewServer(Config{Exports: []Export{{Device: mem}}})
		if err != nil {
			t.Fatal(err)
		}
		os.Remove(sock)
		l, err := net.Listen("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		go srv.Serve(l)
		return srv
	}
	stop := func(s *Server) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		s.Shutdown(ctx)
	}
	srv := start()
	r := dialRemote(t, "nbd+unix:///?socket="+sock, RemoteConfig{RedialBackoff: 20 * time.Millisecond, Timeout: 3 * time.Second})
	stop(srv)
	r.ReadAt(make([]byte, 512), 0) // in flight when it died, or the first to see it
	back := make(chan *Server, 1)
	go func() {
		time.Sleep(300 * time.Millisecond) // the outage
		back <- start()
	}()
	began := time.Now()
	if err := r.ReadAt(make([]byte, 512), 0); err != nil {
		t.Fatalf("a read during a 300 ms outage, with a 3 s timeout: %v", err)
	}
	if waited := time.Since(began); waited < 100*time.Millisecond {
		t.Errorf("the read did not wait for the server (%v)", waited)
	}
	srv = <-back
	stop(srv)
	r.ReadAt(make([]byte, 512), 0)
	began = time.Now()
	err := r.ReadAt(make([]byte, 512), 0)
	if !errors.Is(err, unix.EIO) {
		t.Errorf("a read after the timeout: %v, want EIO", err)
	}
	if waited := time.Since(began); waited < 2*time.Second {
		t.Errorf("failed after %v, before the 3 s timeout", waited)
	}
}
