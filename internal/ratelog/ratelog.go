// Package ratelog limits how often a log line repeats: a slog.Handler
// that passes at most Burst records of one message per Every, at warning
// level and above, and drops the rest. The count dropped is reported
// (attribute "suppressed") by the first record of that message in a later
// window, or, if the message does not come again, by a record of its own
// logged with the next warning of any kind after its window: so nothing
// is lost silently, though the last count waits for the next warning. A client that opens connections in a loop, or a
// backing that fails every request, so costs a few lines a second, not
// one per event.
//
// Records are grouped by their message, which in this code base is a
// constant string per call site; attributes do not split a group. Info
// and debug records (-v) pass unlimited.
package ratelog

// ratelog.go: Handler, the rate-limiting slog.Handler.

import (
	"context"
	"log/slog"
	"sync"
	"time"
)

// Handler wraps another handler. Handlers made from it by WithAttrs and
// WithGroup share its counts.
type Handler struct {
	next  slog.Handler
	every time.Duration
	burst int
	st    *state
}

type state struct {
	mu sync.Mutex
	m  map[string]*window
}

type window struct {
	start   time.Time
	passed  int
	dropped int
}

// New returns a handler that passes at most burst records of each
// message per every to next (burst >= 1, every > 0).
func New(next slog.Handler, burst int, every time.Duration) *Handler {
	return &Handler{next: next, every: every, burst: max(burst, 1), st: &state{m: map[string]*window{}}}
}

func (h *Handler) Enabled(ctx context.Context, l slog.Level) bool { return h.next.Enabled(ctx, l) }

func (h *Handler) Handle(ctx context.Context, r slog.Record) error {
	if r.Level < slog.LevelWarn {
		return h.next.Handle(ctx, r)
	}
	now := r.Time
	if now.IsZero() {
		now = time.Now()
	}
	h.st.mu.Lock()
	w := h.st.m[r.Message]
	if w == nil {
		w = &window{start: now}
		h.st.m[r.Message] = w
	}
	suppressed := 0
	if now.Sub(w.start) >= h.every {
		suppressed = w.dropped
		*w = window{start: now}
	}
	pass := w.passed < h.burst
	if pass {
		w.passed++
	} else {
		w.dropped++
	}
	// Other messages whose window ended with lines dropped: report them
	// now, since they may never come again.
	var late []slog.Record
	if pass {
		for msg, o := range h.st.m {
			if o != w && o.dropped > 0 && now.Sub(o.start) >= h.every {
				lr := slog.NewRecord(now, slog.LevelWarn, msg, 0)
				lr.AddAttrs(slog.Int("suppressed", o.dropped))
				late = append(late, lr)
				*o = window{start: now}
			}
		}
	}
	h.st.mu.Unlock()
	if !pass {
		return nil
	}
	for _, lr := range late {
		h.next.Handle(ctx, lr)
	}
	if suppressed > 0 {
		r = r.Clone()
		r.AddAttrs(slog.Int("suppressed", suppressed))
	}
	return h.next.Handle(ctx, r)
}

func (h *Handler) WithAttrs(as []slog.Attr) slog.Handler {
	c := *h
	c.next = h.next.WithAttrs(as)
	return &c
}

func (h *Handler) WithGroup(name string) slog.Handler {
	c := *h
	c.next = h.next.WithGroup(name)
	return &c
}
