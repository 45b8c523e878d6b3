package control

import (
	"context"
	"errors"
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
	stop, err := Serve(path, Handler(ft))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stop() })
	if _, err := Serve(path, Handler(ft)); err == nil {
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
