package test

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// startNbdkit runs nbdkit with args on a fresh unix socket and returns the
// socket; it stops with the test.
func startNbdkit(t *testing.T, args ...string) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "kit.sock")
	pidFile := filepath.Join(t.TempDir(), "kit.pid")
	cmd := exec.Command(tool(t, "nbdkit"), append([]string{"--foreground", "--exit-with-parent", "-P", pidFile, "-U", sock}, args...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	// nbdkit writes its pid file once it listens.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if _, err := os.Stat(pidFile); err == nil {
			return sock
		}
		if time.Now().After(deadline) {
			t.Fatalf("nbdkit did not start: %s", stderr.String())
		}
	}
}

// TestRemoteBacking: a write-back cache in front of an NBD export
// (nbdkit's memory plugin): data written through the cache reaches the
// remote after a drain, byte for byte; the cache is bound to the URI, so
// a restart reopens it and another URI is refused as another backing.
func TestRemoteBacking(t *testing.T) {
	qemuIO := tool(t, "qemu-io")
	kit := startNbdkit(t, "memory", "64M")
	remote := "nbd+unix:///?socket=" + kit
	cache := sparseFile(t, "cache.img", 16*mib)
	ctl := "unix:" + filepath.Join(t.TempDir(), "ctl.sock")
	s := startServe(t, "--backing", remote, "--cache", cache, "--format", "--control", ctl)
	src, data := randomFile(t, "src.img", 8*mib, 11)
	run(t, tool(t, "qemu-img"), "convert", "-n", "-f", "raw", "-O", "raw", src, s.uri)
	run(t, qemuIO, "-f", "raw", "-c", "write -P 0x77 40M 1M", "-c", "flush", s.uri)
	if out, code := nbdcache(t, "flush", "--drain", "--control", ctl); code != 0 {
		t.Fatalf("drain: %d\n%s", code, out)
	}
	// The remote itself, read directly, holds what was written.
	s.stop()
	direct := filepath.Join(t.TempDir(), "remote.img")
	run(t, tool(t, "nbdcopy"), remote, direct)
	img, _ := os.ReadFile(direct)
	if !bytes.Equal(img[:8*mib], data) || !bytes.Equal(img[40*mib:41*mib], bytes.Repeat([]byte{0x77}, mib)) {
		t.Fatal("the remote does not hold what was written through the cache")
	}

	s = startServe(t, "--backing", remote, "--cache", cache)
	run(t, qemuIO, "-f", "raw", "-c", "read -P 0x77 40M 1M", s.uri)
	got := filepath.Join(t.TempDir(), "got.img")
	run(t, tool(t, "nbdcopy"), s.uri, got)
	img, _ = os.ReadFile(got)
	if !bytes.Equal(img[:8*mib], data) {
		t.Fatal("the image read back through the cache differs")
	}
	s.stop()

	other := startNbdkit(t, "memory", "64M")
	out, code := nbdcache(t, "serve", "--backing", "nbd+unix:///?socket="+other, "--cache", cache, "--listen", "unix:"+filepath.Join(t.TempDir(), "x.sock"))
	if code != 3 || !strings.Contains(out, "wrong backing") {
		t.Errorf("a cache served over another export: exit %d\n%s", code, out)
	}
	if out, code := nbdcache(t, "check", "--cache", cache, "--backing", remote); code != 2 || !strings.Contains(out, "serve") {
		t.Errorf("check with an NBD backing: exit %d\n%s", code, out)
	}
}
