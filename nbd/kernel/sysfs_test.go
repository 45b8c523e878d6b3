package kernel

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestParseDevice(t *testing.T) {
	for in, want := range map[string]int{"/dev/nbd0": 0, "nbd12": 12, "/dev/nbd7": 7} {
		got, err := ParseDevice(in)
		if err != nil || got != want {
			t.Errorf("ParseDevice(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "/dev/sda", "/dev/nbd", "/dev/nbd-1", "/dev/nbd01", "/dev/nbd0p1", "/dev/x/nbd0", "nbd 1"} {
		if _, err := ParseDevice(in); !errors.Is(err, ErrBadDevice) {
			t.Errorf("ParseDevice(%q) = %v, want ErrBadDevice", in, err)
		}
	}
	if DevicePath(3) != "/dev/nbd3" {
		t.Error(DevicePath(3))
	}
}

func fakeQueue(t *testing.T, sys string, n int, files map[string]string) string {
	t.Helper()
	q := filepath.Join(sys, "block", "nbd"+string(rune('0'+n)), "queue")
	must(t, os.MkdirAll(q, 0o755))
	for k, v := range files {
		must(t, os.WriteFile(filepath.Join(q, k), []byte(v), 0o644))
	}
	return q
}

func read(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	must(t, err)
	return strings.TrimSpace(string(b))
}

func TestTune(t *testing.T) {
	sys := t.TempDir()
	q := fakeQueue(t, sys, 0, map[string]string{"max_hw_sectors_kb": "512\n", "rotational": "0\n", "max_sectors_kb": "128\n"})
	err := Tune(sys, 0, Shape{Rotational: true, MaxSectorsKB: 1024, NrRequests: 64})
	if err != nil {
		t.Fatal(err)
	}
	if got := read(t, filepath.Join(q, "rotational")); got != "1" {
		t.Errorf("rotational %s", got)
	}
	if got := read(t, filepath.Join(q, "max_sectors_kb")); got != "512" {
		t.Errorf("max_sectors_kb %s, want clamped to 512", got)
	}
	if got := read(t, filepath.Join(q, "nr_requests")); got != "64" {
		t.Errorf("nr_requests %s", got)
	}
	// A device without a queue directory: every write fails, all reported.
	if err := Tune(sys, 5, Shape{MaxSectorsKB: 1}); err == nil {
		t.Error("no error for a missing device")
	}
}

func TestFreeIndexAndPID(t *testing.T) {
	sys := t.TempDir()
	for n, size := range []string{"2048", "0", "0"} {
		fakeQueue(t, sys, n, nil)
		must(t, os.WriteFile(filepath.Join(sys, "block", "nbd"+string(rune('0'+n)), "size"), []byte(size+"\n"), 0o644))
	}
	must(t, os.WriteFile(filepath.Join(sys, "block/nbd0/pid"), []byte("77\n"), 0o644))
	must(t, os.WriteFile(filepath.Join(sys, "block/nbd1/pid"), []byte("78\n"), 0o644)) // connecting, size not yet set
	if got, err := FreeIndex(sys); err != nil || got != 2 {
		t.Fatalf("FreeIndex = %d, %v; want 2", got, err)
	}
	if ServerPID(sys, 0) != 77 || ServerPID(sys, 2) != 0 {
		t.Fatalf("ServerPID: %d %d", ServerPID(sys, 0), ServerPID(sys, 2))
	}
	must(t, os.WriteFile(filepath.Join(sys, "block/nbd2/pid"), []byte("79\n"), 0o644))
	if _, err := FreeIndex(sys); !errors.Is(err, ErrBusy) {
		t.Fatalf("all busy: %v", err)
	}
}
