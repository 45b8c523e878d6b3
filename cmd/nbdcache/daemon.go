package main

// daemon.go: the running server as the control socket's Target, the control
// flags, and the drain on detach.

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"time"

	"github.com/nbdcache/nbdcache/cache"
	"github.com/nbdcache/nbdcache/control"
	"github.com/nbdcache/nbdcache/faults"
	"github.com/nbdcache/nbdcache/metrics"
	"github.com/nbdcache/nbdcache/nbd"
	"github.com/nbdcache/nbdcache/unixsock"
	"github.com/nbdcache/nbdcache/writeback"
)

// daemon is what the control socket sees of a running server: the one
// place where every counter of the process is gathered.
type daemon struct {
	srv     *nbd.Server
	st      *openedStorage
	started time.Time
	metrics *metrics.Metrics // nil: the control socket serves no /metrics
}

var _ control.Target = (*daemon)(nil)

func (d *daemon) Stats() control.Stats {
	var remote *nbd.RemoteStats
	if r := d.st.remote; r != nil {
		rs := r.Stats()
		remote = &rs
	}
	var cs *cache.Stats
	var ws *writeback.Stats
	if c := d.st.liveCache(); c != nil {
		s, w := c.Stats(), c.WritebackStats()
		cs, ws = &s, &w
	}
	return control.NewStats(time.Since(d.started), d.srv.Stats(), remote, cs, ws)
}

func (d *daemon) Drain(ctx context.Context, progress func(done, total int64)) error {
	c := d.st.liveCache()
	if c == nil {
		// Without a cache there is nothing to write back: a flush is
		// the whole drain.
		progress(0, 0)
		return d.st.dev.Flush()
	}
	return c.Drain(ctx, progress)
}

func (d *daemon) SetMode(ctx context.Context, mode string) error {
	c := d.st.liveCache()
	if c == nil {
		return control.ErrNoCache
	}
	m, err := cache.ParseMode(mode)
	if err != nil {
		return fmt.Errorf("%w: %v", control.ErrBadRequest, err)
	}
	if err := c.SetMode(ctx, m); err != nil {
		if errors.Is(err, cache.ErrBadMode) {
			return fmt.Errorf("%w: %v", control.ErrBadRequest, err)
		}
		return err
	}
	return nil
}

// controlFlags choose the control socket and who may use it. serve and
// attach share them.
type controlFlags struct {
	addr  string
	group string
}

func (f *controlFlags) register(fs *flag.FlagSet, what string) {
	fs.StringVar(&f.addr, "control", "", "serve the control socket ("+what+") on `unix:PATH`; it is created 0600, and only the server's user and root may use it")
	fs.StringVar(&f.group, "control-group", "", "let members of `GROUP` (a name or gid) use the control socket too: it is created 0660 with that group")
}

// access checks the flags and returns who may use the socket.
func (f *controlFlags) access() (control.Access, error) {
	if f.group == "" {
		return control.OwnerOnly, nil
	}
	if f.addr == "" {
		return control.Access{}, fmt.Errorf("%w: --control-group needs --control", errUsage)
	}
	gid, err := unixsock.LookupGroup(f.group)
	if err != nil {
		return control.Access{}, fmt.Errorf("%w: --control-group: %v", errUsage, err)
	}
	return control.Access{GID: gid}, nil
}

// startControl serves the control socket for d; the fault endpoints
// answer only in fault mode. serve and attach share it.
func startControl(f controlFlags, d *daemon) (stop func() error, err error) {
	path, err := control.ParseAddr(f.addr)
	if err != nil {
		return nil, fmt.Errorf("%w: --control: %v", errUsage, err)
	}
	a, err := f.access()
	if err != nil {
		return nil, err
	}
	h := control.Handler(d)
	if d.metrics != nil {
		control.Register(h, "GET /metrics", d.metrics.Handler().ServeHTTP)
	}
	faults.Register(h, d.st.rig)
	return control.Serve(path, h, a)
}

// drainOnDetach writes back every dirty byte before a clean detach, so
// that the backing alone is the whole disk afterwards.
func drainOnDetach(ctx context.Context, st *openedStorage, log *slog.Logger) error {
	c := st.liveCache() // fault mode replaces the cache at every power cut
	if c == nil {
		if st.rig != nil && st.rig.Status().Off {
			log.Warn("the power is off (ctl power-cut --off): the dirty data stays in the cache")
		}
		return nil
	}
	if c.DirtyBytes() == 0 {
		return nil
	}
	log.Warn("writing back the dirty data before detaching (SIGINT or SIGTERM again stops it; the rest stays in the cache)", "bytes", c.DirtyBytes())
	start := time.Now()
	var total int64
	err := c.Drain(ctx, func(done, t int64) { total = t })
	if err != nil {
		return fmt.Errorf("draining the cache before detaching: %w (the dirty data stays safe in the cache)", err)
	}
	log.Info("drained the cache", "bytes", total, "seconds", time.Since(start).Seconds())
	return nil
}
