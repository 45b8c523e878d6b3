package control

// control.go: the control API: Stats, the HTTP handler, access checks, the
// socket server and the client.

import (
	"bufio"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/nbdcache/nbdcache/cache"
	"github.com/nbdcache/nbdcache/nbd"
	"github.com/nbdcache/nbdcache/unixsock"
	"github.com/nbdcache/nbdcache/writeback"
)

// Stats is what `nbdcache stats` shows: the counters of the server, the
// remote backing, the cache and its writeback, each the type its package
// produces, with the JSON names it gives them (one flat object), and the
// figures derived from them (CacheFigures). Byte counts are bytes; rates are bytes per
// second; ratios are in [0, 1]. The embedded parts are nil where there is
// no such thing (no cache, a local backing).
type Stats struct {
	Mode          string  `json:"mode"`
	UptimeSeconds float64 `json:"uptime_seconds"`

	ServerStats
	*RemoteStats
	*CacheStats
	*WritebackStats
	*CacheFigures

	// What the flusher is doing, and its last error's message (a failing
	// backing).
	WritebackState     string `json:"writeback_state,omitempty"`
	WritebackLastError string `json:"writeback_last_error,omitempty"`
	// An NBD backing (--backing nbd://): "up" or "down" (empty for a
	// local one).
	BackingState string `json:"backing_state,omitempty"`
}

// CacheFigures are derived from the cache's counters and the flusher's.
type CacheFigures struct {
	HitRatio float64 `json:"hit_ratio"` // hits, and half of the partial hits, per read
	// Of the cache's buckets, those in use.
	Occupancy float64 `json:"occupancy"`
	// GC's write amplification: bytes GC moved per byte clients wrote.
	GCWriteAmp float64 `json:"gc_write_amplification"`
	// Backing flushes: the flusher's, GC's cleaning passes', and those
	// journal commits needed, shared where they ask at once (the cache
	// counts them all). Over a fast backing each costs the writes that go
	// to it (bench/flushfloor.sh).
	BackingFlushes int64 `json:"backing_flushes"`
	CacheErrors    int64 `json:"cache_errors"` // cache device read and write errors
}

// The parts of Stats, named so that they can be embedded side by side.
type (
	ServerStats    = nbd.Stats
	RemoteStats    = nbd.RemoteStats
	CacheStats     = cache.Stats
	WritebackStats = writeback.Stats
)

// NewStats puts the parts together and derives the rest. remote, c and wb
// may be nil.
func NewStats(uptime time.Duration, srv nbd.Stats, remote *nbd.RemoteStats, c *cache.Stats, wb *writeback.Stats) Stats {
	s := Stats{Mode: "direct", UptimeSeconds: uptime.Seconds(), ServerStats: srv, RemoteStats: remote, CacheStats: c, WritebackStats: wb}
	if remote != nil {
		s.BackingState = "up"
		if !remote.Connected {
			s.BackingState = "down"
		}
	}
	if c != nil {
		s.Mode = c.Mode.String()
		f := &CacheFigures{BackingFlushes: c.BackingFlushes, CacheErrors: c.CacheReadErrors + c.CacheWriteErrors}
		if reads := c.Hits + c.Misses + c.PartialHits; reads > 0 {
			f.HitRatio = (float64(c.Hits) + float64(c.PartialHits)/2) / float64(reads)
		}
		if c.Buckets > 0 {
			f.Occupancy = float64(c.Buckets-c.FreeBuckets) / float64(c.Buckets)
		}
		if c.WriteBytes > 0 {
			f.GCWriteAmp = float64(c.GCMovedBytes) / float64(c.WriteBytes)
		}
		s.CacheFigures = f
	}
	if wb != nil {
		s.WritebackState = wb.Mode.String()
		if wb.LastError != nil {
			s.WritebackLastError = wb.LastError.Error()
		}
	}
	return s
}

// Progress is one line of a drain's progress.
type Progress struct {
	Done  int64  `json:"done"`
	Total int64  `json:"total"`
	Error string `json:"error,omitempty"`
	// Stopped: the drain ended because the server is stopping (Error
	// says so too); what was not written back stays dirty in the cache.
	Stopped bool `json:"stopped,omitempty"`
}

// ErrStopped: the server stopped, or went away, before the drain was
// complete. The data not written back stays dirty, and safe, in the cache.
var ErrStopped = errors.New("the server stopped during the drain")

// Target is what the daemon exposes to the control socket.
type Target interface {
	Stats() Stats
	// Drain writes back every dirty byte and syncs the backing.
	Drain(ctx context.Context, progress func(done, total int64)) error
	// SetMode switches the cache mode.
	SetMode(ctx context.Context, mode string) error
}

// ErrNoCache is returned by a Target without a cache for the cache
// operations; it maps to 409 Conflict.
var ErrNoCache = errors.New("control: this server runs without a cache")

// Handler serves the API for t.
func Handler(t Target) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/stats", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, t.Stats())
	})
	mux.HandleFunc("POST /v1/drain", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/x-ndjson")
		w.WriteHeader(http.StatusOK)
		enc := json.NewEncoder(w)
		fl, _ := w.(http.Flusher)
		var last time.Time
		var final Progress
		sent := Progress{Done: -1}
		send := func(p Progress) {
			if p == sent {
				return
			}
			sent = p
			enc.Encode(p)
			if fl != nil {
				fl.Flush()
			}
		}
		err := t.Drain(r.Context(), func(done, total int64) {
			final = Progress{Done: done, Total: total}
			if now := time.Now(); now.Sub(last) >= 100*time.Millisecond {
				last = now
				send(final)
			}
		})
		if err != nil {
			p := Progress{Done: final.Done, Total: final.Total, Error: err.Error()}
			if r.Context().Err() != nil { // the server is stopping (Serve's stop), or the client left
				p.Stopped, p.Error = true, ErrStopped.Error()
			}
			send(p)
			return
		}
		final.Done = final.Total // the drain is complete
		send(final)
	})
	mux.HandleFunc("POST /v1/mode", func(w http.ResponseWriter, r *http.Request) {
		if err := t.SetMode(r.Context(), r.URL.Query().Get("mode")); err != nil {
			writeError(w, err)
			return
		}
		writeJSON(w, http.StatusOK, map[string]string{"mode": r.URL.Query().Get("mode")})
	})
	return mux
}

// Register adds more endpoints (such as the fault commands) to h, which
// must come from Handler.
func Register(h http.Handler, pattern string, fn http.HandlerFunc) {
	h.(*http.ServeMux).HandleFunc(pattern, fn)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

// WriteError answers with err as {"error": ...}: 409 for ErrNoCache, 400
// for anything wrapping ErrBadRequest, 500 otherwise.
func writeError(w http.ResponseWriter, err error) {
	status := http.StatusInternalServerError
	switch {
	case errors.Is(err, ErrNoCache):
		status = http.StatusConflict
	case errors.Is(err, ErrBadRequest):
		status = http.StatusBadRequest
	}
	writeJSON(w, status, map[string]string{"error": err.Error()})
}

// WriteError is writeError for endpoints registered from outside.
func WriteError(w http.ResponseWriter, err error) { writeError(w, err) }

// WriteJSON answers 200 with v, for endpoints registered from outside.
func WriteJSON(w http.ResponseWriter, v any) { writeJSON(w, http.StatusOK, v) }

// ErrBadRequest marks a request the Target refuses as malformed.
var ErrBadRequest = errors.New("control: bad request")

// Access says who may use a control socket. The server's own user and
// root always may.
type Access struct {
	// GID, if not negative, is a group whose members may use the socket
	// too: the socket is created 0660 with that group. Otherwise it is
	// created 0600.
	GID int
}

// OwnerOnly lets only the server's user (and root) in.
var OwnerOnly = Access{GID: -1}

// Allowed is the control socket's policy: may a peer with cred use a
// server running as euid?
func (a Access) Allowed(cred unixsock.Cred, euid int) bool {
	return cred.UID == euid || cred.UID == 0 || (a.GID >= 0 && cred.InGroup(a.GID))
}

// ErrForbidden is the answer (403) to a peer the socket's Access refuses.
var ErrForbidden = errors.New("control: permission denied")

type peerKey struct{}

// peer is what ConnContext learned about a connection.
type peer struct {
	cred unixsock.Cred
	err  error
}

// Serve serves h on the unix socket at path in the background and returns
// the function that stops it (waiting up to 5 s for requests in progress)
// and removes the socket file. A stale socket file is replaced. The socket
// is created with the permissions a calls for (unixsock.Listen: never
// looser, not even for an instant), and every connection's peer, as the
// kernel recorded it (SO_PEERCRED), must pass a.Allowed before any
// request is handled: the mode keeps others out, the check holds even if
// the mode is loosened.
func Serve(path string, h http.Handler, a Access) (stop func() error, err error) {
	perm := unixsock.Owner
	if a.GID >= 0 {
		perm = unixsock.Perm{Mode: 0o660, GID: a.GID}
	}
	l, err := unixsock.Listen(path, perm)
	if err != nil {
		return nil, fmt.Errorf("control socket %s: %w", path, err)
	}
	euid := os.Geteuid()
	guarded := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p, _ := r.Context().Value(peerKey{}).(peer)
		if p.err != nil || !a.Allowed(p.cred, euid) {
			msg := fmt.Sprintf("%v: uid %d may not use this control socket (the server runs as uid %d; see --control-group)", ErrForbidden, p.cred.UID, euid)
			if p.err != nil {
				msg = fmt.Sprintf("%v: %v", ErrForbidden, p.err)
			}
			writeJSON(w, http.StatusForbidden, map[string]string{"error": msg})
			return
		}
		h.ServeHTTP(w, r)
	})
	// Requests' contexts end when stop is called: a drain in progress
	// then reports that the server stopped, rather than the client
	// seeing its connection cut.
	base, stopping := context.WithCancel(context.Background())
	srv := &http.Server{
		Handler:           guarded,
		ReadHeaderTimeout: 10 * time.Second,
		BaseContext:       func(net.Listener) context.Context { return base },
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			cred, err := unixsock.PeerCred(c)
			return context.WithValue(ctx, peerKey{}, peer{cred, err})
		},
	}
	go srv.Serve(l)
	return func() error {
		stopping()
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		err := srv.Shutdown(sctx)
		os.Remove(path)
		return err
	}, nil
}

// Client talks to a control socket.
type Client struct {
	hc *http.Client
}

// ParseAddr reads a --control value: unix:PATH.
func ParseAddr(s string) (string, error) {
	p, ok := strings.CutPrefix(s, "unix:")
	if !ok || p == "" {
		return "", fmt.Errorf("%w: control address %q: want unix:PATH", ErrBadRequest, s)
	}
	return p, nil
}

// Dial returns a client for the socket at path.
func Dial(path string) *Client {
	tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", path)
	}}
	return &Client{hc: &http.Client{Transport: tr}}
}

// Do sends a request and decodes a JSON answer into out (if not nil).
func (c *Client) Do(ctx context.Context, method, path string, q url.Values, out any) error {
	resp, err := c.send(ctx, method, path, q)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if out == nil {
		return nil
	}
	return json.NewDecoder(resp.Body).Decode(out)
}

func (c *Client) send(ctx context.Context, method, path string, q url.Values) (*http.Response, error) {
	u := "http://nbdcache" + path
	if len(q) > 0 {
		u += "?" + q.Encode()
	}
	req, err := http.NewRequestWithContext(ctx, method, u, nil)
	if err != nil {
		return nil, err
	}
	resp, err := c.hc.Do(req)
	if errors.Is(err, os.ErrPermission) {
		return nil, fmt.Errorf("control socket: %w (it is for the server's user and root, and the --control-group if the server has one)", err)
	}
	if err != nil {
		return nil, fmt.Errorf("control socket: %w (is `nbdcache serve --control` running?)", err)
	}
	if resp.StatusCode != http.StatusOK {
		defer resp.Body.Close()
		var e struct {
			Error string `json:"error"`
		}
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<16))
		if json.Unmarshal(b, &e) != nil || e.Error == "" {
			e.Error = strings.TrimSpace(string(b))
		}
		return nil, &RemoteError{Status: resp.StatusCode, Msg: e.Error}
	}
	return resp, nil
}

// RemoteError is an error the server answered with.
type RemoteError struct {
	Status int
	Msg    string
}

func (e *RemoteError) Error() string { return e.Msg }

// Stats fetches a snapshot.
func (c *Client) Stats(ctx context.Context) (Stats, error) {
	var s Stats
	err := c.Do(ctx, http.MethodGet, "/v1/stats", nil, &s)
	return s, err
}

// SetMode switches the cache mode.
func (c *Client) SetMode(ctx context.Context, mode string) error {
	return c.Do(ctx, http.MethodPost, "/v1/mode", url.Values{"mode": {mode}}, nil)
}

// Drain writes everything back, calling progress as lines arrive.
func (c *Client) Drain(ctx context.Context, progress func(Progress)) error {
	resp, err := c.send(ctx, http.MethodPost, "/v1/drain", nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	complete := false
	for sc.Scan() {
		var p Progress
		if err := json.Unmarshal(sc.Bytes(), &p); err != nil {
			return fmt.Errorf("control socket: bad progress line %q", sc.Text())
		}
		if p.Stopped {
			if progress != nil {
				progress(p)
			}
			return ErrStopped
		}
		if p.Error != "" {
			return &RemoteError{Status: http.StatusInternalServerError, Msg: p.Error}
		}
		complete = p.Done >= p.Total
		if progress != nil {
			progress(p)
		}
	}
	if ctx.Err() != nil {
		return ctx.Err() // the caller gave up (Ctrl-C); its request, and the drain, end with it
	}
	if err := sc.Err(); err != nil || !complete {
		// The connection was cut, or closed early: the server went away.
		return fmt.Errorf("%w (%v)", ErrStopped, cmp.Or(err, io.ErrUnexpectedEOF))
	}
	return nil
}
