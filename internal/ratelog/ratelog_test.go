package ratelog

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"
)

// TestRepeatsAreLimited: a warning repeated 1000 times in one window
// passes burst times; the first of the next window says how many were
// dropped; another message and info records are counted apart or not at
// all.
func TestRepeatsAreLimited(t *testing.T) {
	var buf bytes.Buffer
	h := New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelInfo}), 3, time.Second)
	log := slog.New(h).With("conn", 1)
	t0 := time.Date(2026, 12, 5, 0, 0, 0, 0, time.UTC)
	emit := func(at time.Time, l slog.Level, msg string) {
		r := slog.NewRecord(at, l, msg, 0)
		log.Handler().Handle(context.Background(), r)
	}
	for i := range 1000 {
		emit(t0.Add(time.Duration(i)*time.Millisecond/2), slog.LevelWarn, "connection refused")
		emit(t0, slog.LevelInfo, "connection opened")
	}
	emit(t0, slog.LevelError, "backing failed")
	emit(t0.Add(time.Second), slog.LevelWarn, "connection refused")
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	count := func(sub string) int {
		n := 0
		for _, l := range lines {
			if strings.Contains(l, sub) {
				n++
			}
		}
		return n
	}
	if n := count("connection refused"); n != 4 {
		t.Errorf("%d refusal lines, want 3 and the next window's 1:\n%s", n, buf.String())
	}
	if n := count("suppressed=997"); n != 1 {
		t.Errorf("want one line saying 997 were suppressed:\n%s", buf.String())
	}
	if n := count("connection opened"); n != 1000 {
		t.Errorf("%d info lines, want all 1000", n)
	}
	if n := count("backing failed"); n != 1 || count("conn=1") != len(lines) {
		t.Errorf("another message or the attributes were lost:\n%s", buf.String())
	}
}

// TestTrailingDropsAreReported: a burst of one warning that then stops
// (a client that hammered the server and went away) has its count
// reported with the next warning of any kind after its window. (Review
// finding: the count waited for the same message, which may never come.)
func TestTrailingDropsAreReported(t *testing.T) {
	var buf bytes.Buffer
	h := New(slog.NewTextHandler(&buf, nil), 5, time.Second)
	t0 := time.Date(2026, 12, 5, 0, 0, 0, 0, time.UTC)
	for i := range 1000 {
		h.Handle(context.Background(), slog.NewRecord(t0.Add(time.Duration(i)*time.Microsecond), slog.LevelWarn, "connection refused: too many connections", 0))
	}
	h.Handle(context.Background(), slog.NewRecord(t0.Add(time.Minute), slog.LevelWarn, "accept failed", 0))
	out := buf.String()
	if !strings.Contains(out, `msg="connection refused: too many connections" suppressed=995`) || !strings.Contains(out, "accept failed") {
		t.Fatalf("995 dropped refusals were not reported with the next warning:\n%s", out)
	}
}
