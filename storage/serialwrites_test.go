package storage

import (
	"testing"
	"time"
)

// TestSerialWritesFollowsWriteTime: the mutex comes into use once writes
// average over serialOn, stays in use between the two thresholds, and is
// dropped once they average under serialOff; a lone slow write among fast
// ones does not turn it on.
func TestSerialWritesFollowsWriteTime(t *testing.T) {
	var s serialWrites
	feed := func(d time.Duration, n int) {
		for range n {
			s.note(d)
		}
	}
	feed(2*time.Microsecond, 100)
	if s.on.Load() {
		t.Fatal("on after fast writes")
	}
	feed(40*time.Microsecond, 1)
	if s.on.Load() {
		t.Fatal("one slow write among fast ones turned it on")
	}
	feed(40*time.Microsecond, 100)
	if !s.on.Load() {
		t.Fatalf("off after slow writes (average %v)", time.Duration(s.avg.Load()))
	}
	feed(12*time.Microsecond, 100)
	if !s.on.Load() {
		t.Fatalf("dropped between the thresholds (average %v)", time.Duration(s.avg.Load()))
	}
	feed(2*time.Microsecond, 100)
	if s.on.Load() {
		t.Fatalf("still on after fast writes (average %v)", time.Duration(s.avg.Load()))
	}
	// begin/end pair up with the mutex as the state says.
	feed(40*time.Microsecond, 100)
	locked, start := s.begin()
	if !locked || s.mu.TryLock() {
		t.Fatal("begin did not take the mutex while on")
	}
	s.end(locked, start)
	if !s.mu.TryLock() {
		t.Fatal("end did not release the mutex")
	}
	s.mu.Unlock()
}
