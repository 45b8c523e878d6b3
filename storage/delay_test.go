package storage

import (
	"testing"
	"testing/synctest"
	"time"
)

// TestDelayLatency measures, in virtual time, what each kind of request
// costs as latencies are set, changed and cleared.
func TestDelayLatency(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		d := NewDelay(NewMem(1 << 20))
		buf := make([]byte, 4096)
		calls := map[OpKind]func() error{
			OpRead:  func() error { return d.ReadAt(buf, 0) },
			OpWrite: func() error { return d.WriteAt(buf, 0, 0) },
			OpFlush: d.Flush,
			OpTrim:  func() error { return d.Trim(0, 4096, 0) },
			OpZero:  func() error { return d.Zero(0, 4096, 0) },
			OpExtents: func() error {
				return d.Extents(0, 4096, func(Extent) bool { return true })
			},
		}
		cost := func(k OpKind) time.Duration {
			start := time.Now()
			if err := calls[k](); err != nil {
				t.Fatal(err)
			}
			return time.Since(start)
		}
		expect := func(want map[OpKind]time.Duration) {
			t.Helper()
			for k := range calls {
				if got := cost(k); got != want[k] {
					t.Errorf("%v took %v, want %v", k, got, want[k])
				}
				if got := d.Latency(k); got != want[k] {
					t.Errorf("Latency(%v) = %v, want %v", k, got, want[k])
				}
			}
		}
		expect(nil)
		d.Set(OpRead|OpFlush, 5*time.Millisecond)
		expect(map[OpKind]time.Duration{OpRead: 5 * time.Millisecond, OpFlush: 5 * time.Millisecond})
		d.Set(OpWrite, 20*time.Millisecond)
		d.Set(OpFlush, 0)
		expect(map[OpKind]time.Duration{OpRead: 5 * time.Millisecond, OpWrite: 20 * time.Millisecond})
		d.Set(0, time.Second)
		expect(map[OpKind]time.Duration{OpRead: time.Second, OpWrite: time.Second, OpFlush: time.Second,
			OpTrim: time.Second, OpZero: time.Second, OpExtents: time.Second})
		d.Clear()
		expect(nil)

		// Concurrent requests wait side by side, not one after another.
		d.Set(OpRead, 10*time.Millisecond)
		start := time.Now()
		done := make(chan error)
		for range 8 {
			go func() { done <- d.ReadAt(make([]byte, 512), 0) }()
		}
		for range 8 {
			if err := <-done; err != nil {
				t.Fatal(err)
			}
		}
		if got := time.Since(start); got != 10*time.Millisecond {
			t.Errorf("8 concurrent reads took %v, want 10ms", got)
		}
	})
}
