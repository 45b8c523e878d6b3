package main

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestRunStopsTheCommandsChildren: serve stopped (SIGTERM: its context)
// while --run's command runs stops what the command started too, not only
// its shell. (Found by review: a `sleep` the shell had started ran on as
// an orphan.)
func TestRunStopsTheCommandsChildren(t *testing.T) {
	dir := t.TempDir()
	backing := filepath.Join(dir, "b.img")
	if err := os.WriteFile(backing, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	marker := filepath.Join(dir, "alive")
	started := filepath.Join(dir, "started")
	out, err := os.Create(filepath.Join(dir, "out"))
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan int, 1)
	go func() {
		done <- run(ctx, []string{"serve", "--backing", backing, "--listen", "unix:" + filepath.Join(dir, "s.sock"),
			"--run", "touch " + started + "; sh -c 'sleep 2; touch " + marker + "'; true"}, out, out)
	}()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if _, err := os.Stat(started); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the --run command did not start")
		}
	}
	cancel()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("serve did not stop")
	}
	time.Sleep(3 * time.Second) // past the moment the orphan would touch the marker
	if _, err := os.Stat(marker); err == nil {
		t.Fatal("serve stopped, but a process the --run command started ran on")
	}
}
