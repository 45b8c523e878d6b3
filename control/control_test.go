package control

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/nbdcache/nbdcache/cache"
	"github.com/nbdcache/nbdcache/nbd"
	"github.com/nbdcache/nbdcache/unixsock"
	"github.com/nbdcache/nbdcache/writeback"
)

type fakeTarget struct {
	mode     string
	drainErr error
	steps    int64
}

func (f *fakeTarget) Stats() Stats {
	return Stats{Mode: f.mode, CacheStats: &cache.Stats{DirtyBytes: 42}}
}

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

// TestStatsJSONNames: Stats is one flat JSON object made of its parts'
// own names. Two parts giving a field the same name would make
// encoding/json drop both without a word; every name of every part, and
// of Stats itself, must appear, each once.
func TestStatsJSONNames(t *testing.T) {
	s := NewStats(0, nbd.Stats{}, &nbd.RemoteStats{}, &cache.Stats{}, &writeback.Stats{})
	js, err := json.Marshal(s)
	if err != nil {
		t.Fatal(err)
	}
	var got map[string]any
	if err := json.Unmarshal(js, &got); err != nil {
		t.Fatal(err)
	}
	want := map[string]string{}
	var walk func(rt reflect.Type)
	walk = func(rt reflect.Type) {
		for i := range rt.NumField() {
			f := rt.Field(i)
			if f.Anonymous {
				if ft := f.Type; ft.Kind() == reflect.Pointer {
					walk(ft.Elem())
				} else {
					walk(ft)
				}
				continue
			}
			name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
			if name == "-" {
				continue
			}
			if name == "" {
				t.Errorf("%s.%s has no JSON name", rt, f.Name)
				continue
			}
			if other, ok := want[name]; ok {
				t.Errorf("%q names both %s and %s.%s", name, other, rt, f.Name)
			}
			want[name] = rt.String() + "." + f.Name
			if _, ok := got[name]; !ok && !strings.HasSuffix(f.Tag.Get("json"), ",omitempty") {
				t.Errorf("%q (%s) is missing from the JSON", name, want[name])
			}
		}
	}
	walk(reflect.TypeOf(s))
	for name := range got {
		if _, ok := want[name]; !ok {
			t.Errorf("the JSON has %q, which no field names", name)
		}
	}
	// Without a cache or a remote, their parts are left out.
	js, _ = json.Marshal(NewStats(0, nbd.Stats{}, nil, nil, nil))
	if strings.Contains(string(js), "dirty_bytes") || strings.Contains(string(js), "backing_outages") || strings.Contains(string(js), "occupancy") {
		t.Errorf("a server without a cache shows cache fields: %s", js)
	}
}
