package main

// metrics.go: the server's Prometheus metrics and the endpoint that serves
// them.

import (
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"sync/atomic"
	"time"

	"github.com/nbdcache/nbdcache/cache"
	"github.com/nbdcache/nbdcache/metrics"
	"github.com/nbdcache/nbdcache/nbd"
	"github.com/nbdcache/nbdcache/unixsock"
	"github.com/nbdcache/nbdcache/writeback"
)

// serverMetrics makes the metrics of a server over st; srv is set once
// the server exists (its Config needs the observer first).
func serverMetrics(st *openedStorage, srv *atomic.Pointer[nbd.Server]) *metrics.Metrics {
	return metrics.New(metrics.Sources{
		Server: func() nbd.Stats {
			if s := srv.Load(); s != nil {
				return s.Stats()
			}
			return nbd.Stats{}
		},
		Cache: func() (cache.Stats, bool) {
			if c := st.liveCache(); c != nil {
				return c.Stats(), true
			}
			return cache.Stats{}, false
		},
		Writeback: func() (writeback.Stats, bool) {
			if c := st.liveCache(); c != nil {
				return c.WritebackStats(), true
			}
			return writeback.Stats{}, false
		},
		Backing: func() (nbd.RemoteStats, bool) {
			if st.remote != nil {
				return st.remote.Stats(), true
			}
			return nbd.RemoteStats{}, false
		},
	})
}

// serveMetrics serves /metrics on addr (HOST:PORT or unix:PATH, the
// latter created with perm) until stop is called.
func serveMetrics(addr string, m *metrics.Metrics, perm unixsock.Perm, log *slog.Logger) (bound string, stop func(), err error) {
	a, err := parseListen(addr)
	if err != nil {
		return "", nil, fmt.Errorf("%w: --metrics: want HOST:PORT or unix:PATH", errUsage)
	}
	l, err := listen(a, perm)
	if err != nil {
		return "", nil, fmt.Errorf("--metrics: %w", err)
	}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", m.Handler())
	hs := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		if err := hs.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("metrics listener failed", "err", err)
		}
	}()
	bound = listenString(a, l)
	return bound, func() {
		hs.Close()
		if a.network == "unix" {
			os.Remove(a.addr)
		}
	}, nil
}
