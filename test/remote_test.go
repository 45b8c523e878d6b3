package test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nbdcache/nbdcache/internal/testcert"
)

// startNbdkit runs nbdkit with args on a fresh unix socket and returns the
// socket; it stops with the test.
func startNbdkit(t *testing.T, args ...string) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "kit.sock")
	startNbdkitOn(t, sock, args...)
	return sock
}

// startNbdkitOn runs nbdkit with args on the unix socket sock and returns
// a function that kills it.
func startNbdkitOn(t *testing.T, sock string, args ...string) (kill func()) {
	t.Helper()
	pidFile := filepath.Join(t.TempDir(), "kit.pid")
	cmd := exec.Command(tool(t, "nbdkit"), append([]string{"--foreground", "--exit-with-parent", "-P", pidFile, "-U", sock}, args...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	kill = func() { cmd.Process.Kill(); cmd.Wait() }
	t.Cleanup(kill)
	// nbdkit writes its pid file once it listens.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if _, err := os.Stat(pidFile); err == nil {
			return kill
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
	if out, code := nbdcache(t, "check", "--cache", cache, "--backing", remote); code != 0 {
		t.Errorf("check with its NBD backing: exit %d\n%s", code, out)
	}
}

// fileRemote is nbdkit's file plugin serving img on a unix socket, for
// outage tests: kill stops it, restart serves the same file on the same
// socket again.
type fileRemote struct {
	t         *testing.T
	img, sock string
	uri       string
	kill      func()
}

func startFileRemote(t *testing.T, size int64) *fileRemote {
	r := &fileRemote{t: t, img: sparseFile(t, "remote.img", size), sock: filepath.Join(t.TempDir(), "kit.sock")}
	r.uri = "nbd+unix:///?socket=" + r.sock
	r.kill = startNbdkitOn(t, r.sock, "file", r.img)
	return r
}

func (r *fileRemote) restart() {
	os.Remove(r.sock) // nbdkit was killed: its socket is left behind
	r.kill = startNbdkitOn(r.t, r.sock, "file", r.img)
}

// TestRemoteBackingOutage: the remote (nbdkit's file plugin) is killed
// while the cache serves: writes and FLUSH are still acknowledged, cached
// data still reads, stats say the backing is down. Once it is back on
// the same socket, the drain writes everything to it.
func TestRemoteBackingOutage(t *testing.T) {
	qemuIO := tool(t, "qemu-io")
	remote := startFileRemote(t, 32*mib)
	cache := sparseFile(t, "cache.img", 16*mib)
	ctl := "unix:" + filepath.Join(t.TempDir(), "ctl.sock")
	s := startServe(t, "--backing", remote.uri, "--cache", cache, "--format", "--control", ctl, "--backing-timeout", "1s")
	defer s.stop()
	run(t, qemuIO, "-f", "raw", "-c", "write -P 0x11 0 1M", "-c", "flush", s.uri)
	remote.kill()
	run(t, qemuIO, "-f", "raw", "-c", "write -P 0x22 4M 2M", "-c", "flush", "-c", "read -P 0x11 0 1M", "-c", "read -P 0x22 4M 2M", s.uri)
	// An uncached read waits --backing-timeout for the remote, then
	// fails with EIO.
	began := time.Now()
	rd, err := exec.Command(qemuIO, "-f", "raw", "-c", "read 20M 4k", s.uri).CombinedOutput()
	if err == nil || !strings.Contains(string(rd), "Input/output error") {
		t.Errorf("an uncached read during the outage: %v\n%s", err, rd)
	}
	if waited := time.Since(began); waited < 900*time.Millisecond {
		t.Errorf("it failed after %v, before --backing-timeout 1s", waited)
	}
	backing := func() (state string, outages int64) {
		out, code := nbdcache(t, "stats", "--json", "--control", ctl)
		var st struct {
			State   string `json:"backing_state"`
			Outages int64  `json:"backing_outages"`
		}
		if err := json.Unmarshal([]byte(out), &st); code != 0 || err != nil {
			t.Fatalf("stats: %d %v\n%s", code, err, out)
		}
		return st.State, st.Outages
	}
	if state, _ := backing(); state != "down" {
		t.Errorf("stats during the outage: backing %q", state)
	}
	remote.restart()
	if out, code := nbdcache(t, "flush", "--drain", "--control", ctl); code != 0 {
		t.Fatalf("drain after the remote came back: %d\n%s", code, out)
	}
	got, _ := os.ReadFile(remote.img)
	if !bytes.Equal(got[:mib], bytes.Repeat([]byte{0x11}, mib)) || !bytes.Equal(got[4*mib:6*mib], bytes.Repeat([]byte{0x22}, 2*mib)) {
		t.Fatal("the remote's file does not hold what was written during the outage")
	}
	if state, outages := backing(); state != "up" || outages == 0 {
		t.Errorf("stats after the outage: backing %q, %d connections lost", state, outages)
	}
}

// TestRemoteOutageFullCache: the cache fills with dirty data while the
// remote is away. A write that finds it full waits for the remote up to
// --backing-timeout, then fails with ENOSPC ("No space left on device"),
// not EIO: nothing is damaged, and everything acknowledged before still
// reads back. Once the remote is back, the drain writes it all there.
func TestRemoteOutageFullCache(t *testing.T) {
	qemuIO := tool(t, "qemu-io")
	remote := startFileRemote(t, 64*mib)
	ctl := "unix:" + filepath.Join(t.TempDir(), "ctl.sock")
	s := startServe(t, "--backing", remote.uri, "--cache", sparseFile(t, "cache.img", 16*mib), "--format",
		"--control", ctl, "--backing-timeout", "1s")
	defer s.stop()
	remote.kill()
	// 4 MiB writes until one fails: the cache holds less than 16 MiB.
	written := 0
	for ; written < 16; written++ {
		out, err := exec.Command(qemuIO, "-f", "raw", "-c", fmt.Sprintf("write -P 0x%x %dM 4M", 0x20+written, 4*written), s.uri).CombinedOutput()
		if err == nil && !strings.Contains(string(out), "error") {
			continue
		}
		if !strings.Contains(string(out), "No space left on device") {
			t.Fatalf("write %d, the cache full and the remote away: %v\n%s", written, err, out)
		}
		break
	}
	if written == 0 || written == 16 {
		t.Fatalf("%d writes of 4 MiB were taken before one failed; want some, then ENOSPC", written)
	}
	t.Logf("%d writes of 4 MiB taken during the outage, then ENOSPC", written)
	for i := range written {
		run(t, qemuIO, "-f", "raw", "-c", fmt.Sprintf("read -P 0x%x %dM 4M", 0x20+i, 4*i), s.uri)
	}
	remote.restart()
	if out, code := nbdcache(t, "flush", "--drain", "--control", ctl); code != 0 {
		t.Fatalf("drain after the remote came back: %d\n%s", code, out)
	}
	got, _ := os.ReadFile(remote.img)
	for i := range written {
		if !bytes.Equal(got[4*i*mib:4*(i+1)*mib], bytes.Repeat([]byte{byte(0x20 + i)}, 4*mib)) {
			t.Fatalf("the remote lacks write %d after the drain", i)
		}
	}
}

// TestRemoteOfflineCommands: format, check and rebind take an NBD URI
// backing as they take a file: format binds a cache to the URI, serve
// then opens it without --format, check passes it (deep too) and refuses
// another export as another backing (exit 3), and rebind moves the cache
// to that export, after which check passes with it.
func TestRemoteOfflineCommands(t *testing.T) {
	qemuIO := tool(t, "qemu-io")
	remote := "nbd+unix:///?socket=" + startNbdkit(t, "memory", "64M")
	other := "nbd+unix:///?socket=" + startNbdkit(t, "memory", "64M")
	cache := sparseFile(t, "cache.img", 16*mib)
	if out, code := nbdcache(t, "format", "--cache", cache, "--backing", remote); code != 0 || !strings.Contains(out, "formatted") {
		t.Fatalf("format with a remote backing: exit %d\n%s", code, out)
	}
	s := startServe(t, "--backing", remote, "--cache", cache)
	run(t, qemuIO, "-f", "raw", "-c", "write -P 0x6b 1M 256k", "-c", "flush", s.uri)
	s.stop()
	for _, args := range [][]string{{}, {"--deep"}} {
		if out, code := nbdcache(t, append([]string{"check", "--cache", cache, "--backing", remote}, args...)...); code != 0 {
			t.Fatalf("check %v with its remote backing: exit %d\n%s", args, code, out)
		}
	}
	if out, code := nbdcache(t, "check", "--cache", cache, "--backing", other); code != 3 {
		t.Fatalf("check with another export: exit %d, want 3 (another backing)\n%s", code, out)
	}
	if out, code := nbdcache(t, "rebind", "--cache", cache, "--backing", other); code != 0 || !strings.Contains(out, "rebound") {
		t.Fatalf("rebind to another export: exit %d\n%s", code, out)
	}
	if out, code := nbdcache(t, "check", "--cache", cache, "--backing", other); code != 0 {
		t.Fatalf("check after the rebind: exit %d\n%s", code, out)
	}
}

// TestRemoteTLSNbdkit: the remote's own TLS. nbdkit serves with
// --tls=require; nbdcache reaches it as nbds+unix:// with the client's
// certificate folder (the chain verified, no host name over a unix
// socket, as libnbd does). Data written through the cache and drained is
// on the remote, read back over TLS by nbdcopy; a plain nbd+unix://
// backing is refused by nbdkit, and serve fails to start.
func TestRemoteTLSNbdkit(t *testing.T) {
	qemuIO := tool(t, "qemu-io")
	nbdcopy := tool(t, "nbdcopy")
	certs := testcert.New(t)
	kit := startNbdkit(t, "--tls=require", "--tls-certificates="+certs.ServerDir(t), "memory", "16M")
	clientDir := certs.ClientDir(t, nil)
	remote := "nbds+unix:///?socket=" + kit
	if out, code := nbdcache(t, "serve", "--cache", sparseFile(t, "c0.img", 8*mib), "--format", "--backing", "nbd+unix:///?socket="+kit,
		"--listen", "unix:"+filepath.Join(t.TempDir(), "x.sock")); code == 0 {
		t.Fatalf("serve with a plaintext backing against nbdkit --tls=require started:\n%s", out)
	}
	ctl := "unix:" + filepath.Join(t.TempDir(), "ctl.sock")
	s := startServe(t, "--cache", sparseFile(t, "cache.img", 8*mib), "--format", "--backing", remote,
		"--backing-tls-certificates", clientDir, "--control", ctl)
	run(t, qemuIO, "-f", "raw", "-c", "write -P 0x3c 2M 512k", "-c", "flush", s.uri)
	if out, code := nbdcache(t, "flush", "--drain", "--control", ctl); code != 0 {
		t.Fatalf("flush --drain: exit %d\n%s", code, out)
	}
	s.stop()
	img := filepath.Join(t.TempDir(), "remote.img")
	run(t, nbdcopy, remote+"&tls-certificates="+clientDir, img)
	b, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(b[2*mib:2*mib+512<<10], bytes.Repeat([]byte{0x3c}, 512<<10)) || !bytes.Equal(b[:2*mib], make([]byte, 2*mib)) {
		t.Fatal("the remote, read back over TLS, does not hold what was written through the cache")
	}
}

// TestRemoteOutagesUnderFio: fio writes and verifies through the cache
// while the remote (nbdkit's file plugin) dies and comes back three
// times. Writes land in the cache and are acknowledged, the writeback
// pauses and resumes on its own, fio's verify pass reads back every
// block, and after a drain fio verifies the same data on the remote
// itself, with nbdcache out of the way.
func TestRemoteOutagesUnderFio(t *testing.T) {
	fio := tool(t, "fio")
	remote := startFileRemote(t, 64*mib)
	cache := sparseFile(t, "cache.img", 64*mib)
	ctl := "unix:" + filepath.Join(t.TempDir(), "ctl.sock")
	// A low writeback target, so that the writeback runs, and meets the
	// outages, while fio writes.
	s := startServe(t, "--backing", remote.uri, "--cache", cache, "--format", "--control", ctl,
		"--backing-timeout", "2s", "--writeback-percent", "1")
	defer s.stop()
	job := []string{"--name=outage", "--ioengine=nbd", "--rw=randwrite", "--bs=4k", "--iodepth=16",
		"--size=24M", "--verify=crc32c", "--verify_fatal=1", "--verify_state_save=0", "--randrepeat=1"}
	out := filepath.Join(t.TempDir(), "fio.txt")
	// 6144 writes at 1500 a second: about 4 s, across the outages.
	fioDone := make(chan error, 1)
	var fioOut []byte
	go func() {
		var err error
		fioOut, err = exec.Command(fio, append(job, "--uri="+s.uri, "--rate_iops=1500", "--do_verify=1", "--output="+out)...).CombinedOutput()
		fioDone <- err
	}()
	for range 3 {
		time.Sleep(400 * time.Millisecond)
		remote.kill()
		time.Sleep(400 * time.Millisecond)
		remote.restart()
	}
	if err := <-fioDone; err != nil {
		report, _ := os.ReadFile(out)
		t.Fatalf("fio through the outages: %v\n%s%s", err, fioOut, report)
	}
	st := run(t, binary, "stats", "--json", "--control", ctl)
	var stats struct {
		Outages int64 `json:"backing_outages"`
		Errors  int64 `json:"writeback_errors"`
		Written int64 `json:"writeback_bytes"`
	}
	if err := json.Unmarshal([]byte(st), &stats); err != nil {
		t.Fatal(err)
	}
	if stats.Outages == 0 || stats.Written == 0 {
		t.Errorf("the outages did not meet the writeback: %+v", stats)
	}
	t.Logf("after fio: %+v", stats)
	run(t, binary, "flush", "--drain", "--control", ctl)
	// The remote alone now holds what fio wrote.
	run(t, fio, append(job, "--uri="+remote.uri, "--verify_only", "--output="+out)...)
}

// TestRemotePowerCutDuringOutage: fault mode with a remote backing. The
// remote is another machine, with power of its own: a cut of the cache's
// machine leaves it alone. Here the cuts come while the remote is down:
// what was FLUSHed before each cut survives it and is served from the
// cache, and once the remote is back the drain puts it all there.
func TestRemotePowerCutDuringOutage(t *testing.T) {
	qemuIO := tool(t, "qemu-io")
	remote := startFileRemote(t, 32*mib)
	cache := sparseFile(t, "cache.img", 16*mib)
	ctl := "unix:" + filepath.Join(t.TempDir(), "ctl.sock")
	s := startServe(t, "--backing", remote.uri, "--cache", cache, "--format", "--faults", "--control", ctl, "--backing-timeout", "1s")
	defer s.stop()
	run(t, qemuIO, "-f", "raw", "-c", "write -P 0x10 0 1M", "-c", "flush", s.uri)
	remote.kill()
	for i, model := range []string{"unflushed", "torn", "random"} {
		p := 0x11 + i
		off := (i + 1) * 2 // MiB
		// Synced, then a write no FLUSH covers, then the cut.
		run(t, qemuIO, "-f", "raw", "-c", fmt.Sprintf("write -P %d %dM 1M", p, off), "-c", "flush",
			"-c", fmt.Sprintf("write -P 0x77 %dM 1M", off+1), s.uri)
		out := run(t, binary, "ctl", "--control", ctl, "power-cut", "--model", model, "--seed", fmt.Sprint(i+1))
		if strings.Contains(out, "backing:") {
			t.Errorf("the cut reached the remote backing:\n%s", out)
		}
		run(t, qemuIO, "-f", "raw", "-c", "read -P 0x10 0 1M", "-c", fmt.Sprintf("read -P %d %dM 1M", p, off), s.uri)
	}
	remote.restart()
	run(t, binary, "flush", "--drain", "--control", ctl)
	got, err := os.ReadFile(remote.img)
	if err != nil {
		t.Fatal(err)
	}
	for i := range 4 {
		off := i * 2 * mib
		if want := bytes.Repeat([]byte{byte(0x10 + i)}, mib); !bytes.Equal(got[off:off+mib], want) {
			t.Errorf("the remote at %d MiB does not hold pattern %#x after the drain", off/mib, 0x10+i)
		}
	}
}
