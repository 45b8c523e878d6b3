package control

import (
	"os"

	"context"
	"errors"
	"github.com/nbdcache/nbdcache/unixsock"
	"path/filepath"
	"testing"
)

type fakeTarget struct {
	mode     string
	drainErr error
	steps    int64
}

func (f *fakeTarget) Stats() Stats { return Stats{Mode: f.mode, DirtyBytes: 42} }

func (f *fakeTarget) Drain(ctx context.Context, progress func(done, total int64)) error {
	for i := int64(0); i <= f.steps; i++ {
		progress(i, f.steps)
	}
	return f.drainErr
}

func (f *fakeTarget) SetMode(ctx context.Context, mode string) error {
	switch mode {
	case "writeback", "writethrough":
		f.mode = mode
		return nil
	case "nocache":
		return ErrNoCache
	}
	return ErrBadRequest
}

func serve(t *testing.T, ft *fakeTarget) *Client {
	t.Helper()
	path := filepath.Join(t.TempDir(), "ctl.sock")
	stop, err := Serve(path, Handler(ft), OwnerOnly)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stop() })
	if _, err := Serve(path, Handler(ft), OwnerOnly); err == nil {
		t.Fatal("a second server took over a live socket")
	}
	return Dial(path)
}

func TestControl(t *testing.T) {
	ctx := context.Background()
	ft := &fakeTarget{mode: "writeback", steps: 5}
	c := serve(t, ft)
	s, err := c.Stats(ctx)
	if err != nil || s.Mode != "writeback" || s.DirtyBytes != 42 {
		t.Fatalf("stats %+v, %v", s, err)
	}
	if err := c.SetMode(ctx, "writethrough"); err != nil || ft.mode != "writethrough" {
		t.Fatalf("mode: %v (%s)", err, ft.mode)
	}
	for mode, status := range map[string]int{"bogus": 400, "nocache": 409} {
		var re *RemoteError
		if err := c.SetMode(ctx, mode); !errors.As(err, &re) || re.Status != status {
			t.Errorf("mode %q: %v, want status %d", mode, err, status)
		}
	}
	var last Progress
	if err := c.Drain(ctx, func(p Progress) { last = p }); err != nil || last.Done != 5 || last.Total != 5 {
		t.Fatalf("drain: %v, last %+v", err, last)
	}
	ft.steps = 0
	if err := c.Drain(ctx, nil); err != nil {
		t.Fatalf("drain of nothing: %v", err)
	}
	ft.drainErr = errors.New("backing on fire")
	var re *RemoteError
	if err := c.Drain(ctx, nil); !errors.As(err, &re) || re.Msg != "backing on fire" {
		t.Fatalf("failed drain: %v", err)
	}
}

func TestParseAddr(t *testing.T) {
	if p, err := ParseAddr("unix:/run/x.sock"); err != nil || p != "/run/x.sock" {
		t.Fatal(p, err)
	}
	for _, bad := range []string{"", "unix:", "/run/x.sock", "127.0.0.1:9"} {
		if _, err := ParseAddr(bad); !errors.Is(err, ErrBadRequest) {
			t.Errorf("%q accepted", bad)
		}
	}
}

// TestAccess is the control socket's policy: the server's user, root, and
// the members of the --control-group, if any.
func TestAccess(t *testing.T) {
	const euid = 1000
	for _, tc := range []struct {
		a    Access
		cred unixsock.Cred
		want bool
	}{
		{OwnerOnly, unixsock.Cred{UID: euid, GID: 5}, true},
		{OwnerOnly, unixsock.Cred{UID: 0, GID: 0}, true},
		{OwnerOnly, unixsock.Cred{UID: 1001, GID: 5}, false},
		{OwnerOnly, unixsock.Cred{UID: 1001, GID: 0, Groups: []int{0}}, false}, // root's group is not root
		{Access{GID: 50}, unixsock.Cred{UID: 1001, GID: 50}, true},
		{Access{GID: 50}, unixsock.Cred{UID: 1001, GID: 5, Groups: []int{7, 50}}, true},
		{Access{GID: 50}, unixsock.Cred{UID: 1001, GID: 5, Groups: []int{7}}, false},
	} {
		if got := tc.a.Allowed(tc.cred, euid); got != tc.want {
			t.Errorf("%+v, peer %+v: allowed %v, want %v", tc.a, tc.cred, got, tc.want)
		}
	}
}

// TestSocketMode: 0600 by default, 0660 with the control group.
func TestSocketMode(t *testing.T) {
	for _, tc := range []struct {
		a    Access
		mode os.FileMode
	}{{OwnerOnly, 0o600}, {Access{GID: os.Getgid()}, 0o660}} {
		path := filepath.Join(t.TempDir(), "ctl.sock")
		stop, err := Serve(path, Handler(&fakeTarget{}), tc.a)
		if err != nil {
			t.Fatal(err)
		}
		fi, err := os.Lstat(path)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != tc.mode {
			t.Errorf("%+v: mode %v, want %v", tc.a, fi.Mode().Perm(), tc.mode)
		}
		stop()
	}
}

type blockTarget struct{ fakeTarget }

// Drain reports some progress, then runs until its request ends.
func (b *blockTarget) Drain(ctx context.Context, progress func(done, total int64)) error {
	progress(1, 10)
	<-ctx.Done()
	return ctx.Err()
}

// TestDrainClientCancelIsNotServerStopped: a drain the client gives up on
// (Ctrl-C) ends with the client's own context error, not ErrStopped ("the
// server stopped"), which would be false. (Found by review.)
func TestDrainClientCancelIsNotServerStopped(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ctl.sock")
	stop, err := Serve(path, Handler(&blockTarget{}), OwnerOnly)
	if err != nil {
		t.Fatal(err)
	}
	defer stop()
	ctx, cancel := context.WithCancel(context.Background())
	err = Dial(path).Drain(ctx, func(Progress) { cancel() })
	if !errors.Is(err, context.Canceled) || errors.Is(err, ErrStopped) {
		t.Fatalf("the client's own cancel: %v", err)
	}
}
