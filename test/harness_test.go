package test

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// binary is the nbdcache binary built once for the whole package.
var binary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "nbdcache-test-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binary = filepath.Join(dir, "nbdcache")
	build := exec.Command("go", "build", "-race", "-o", binary, "../cmd/nbdcache")
	if os.Getenv("NBDCACHE_TEST_NORACE") != "" {
		build = exec.Command("go", "build", "-o", binary, "../cmd/nbdcache")
	}
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "building nbdcache:", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// tool returns the path of an external program, skipping the test when it
// is missing (failing when NBDCACHE_REQUIRE_TOOLS is set).
func tool(t testing.TB, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		if os.Getenv("NBDCACHE_REQUIRE_TOOLS") != "" {
			t.Fatalf("%s is required but not installed (run `make deps`)", name)
		}
		t.Skipf("%s not installed", name)
	}
	return p
}

// python3 returns Debian's python3, which has the nbd module (a pyenv
// python earlier on PATH does not).
func python3(t testing.TB) string {
	t.Helper()
	tool(t, "nbdsh")
	for _, p := range []string{"/usr/bin/python3", "python3"} {
		if exec.Command(p, "-c", "import nbd").Run() == nil {
			return p
		}
	}
	if os.Getenv("NBDCACHE_REQUIRE_TOOLS") != "" {
		t.Fatal("no python3 with the nbd module (install python3-libnbd)")
	}
	t.Skip("no python3 with the nbd module")
	return ""
}

// server is a running `nbdcache serve`.
type server struct {
	t      testing.TB
	cmd    *exec.Cmd
	sock   string
	uri    string
	stdout *bytes.Buffer
	stderr *bytes.Buffer
	exited chan error
	// listening holds the "serving export ... on ADDR" lines, one per
	// listener, in --listen order.
	listening []string
}

// sparseFile creates a sparse file of size bytes in the test's folder.
func sparseFile(t testing.TB, name string, size int64) string {
	t.Helper()
	return sparseAt(t, filepath.Join(t.TempDir(), name), size)
}

// sparseAt creates a sparse file of size bytes at path.
func sparseAt(t testing.TB, path string, size int64) string {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	return path
}

// startServe starts `nbdcache serve ARGS --listen unix:SOCK` and waits
// for it to report that it is serving. It is stopped with SIGTERM at the
// end of the test, and must then exit 0.
func startServe(t testing.TB, args ...string) *server {
	t.Helper()
	return startServeBinary(t, binary, args...)
}

// startServeBinary is startServe with another build of nbdcache. It waits
// for the line about its own unix socket, which comes last, so that
// s.listening holds every "serving export" line.
func startServeBinary(t testing.TB, bin string, args ...string) *server {
	t.Helper()
	return startServeIn(t, bin, "", args...)
}

// startServeIn is startServeBinary run in the folder dir ("": the test's).
func startServeIn(t testing.TB, bin, dir string, args ...string) *server {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	s := &server{t: t, sock: sock, uri: "nbd+unix:///?socket=" + sock,
		stdout: new(bytes.Buffer), stderr: new(bytes.Buffer), exited: make(chan error, 1)}
	s.cmd = exec.Command(bin, append(append([]string{"serve"}, args...), "--listen", "unix:"+sock)...)
	s.cmd.Dir = dir
	s.cmd.Stderr = s.stderr
	out, err := s.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	ready := make(chan []string, 1)
	go func() {
		sc := bufio.NewScanner(out)
		signalled := false
		var listening []string
		for sc.Scan() {
			line := sc.Text()
			s.stdout.WriteString(line + "\n")
			if !signalled && strings.Contains(line, "serving export") {
				listening = append(listening, line)
				if strings.HasSuffix(line, " on unix:"+sock) {
					ready <- listening
					signalled = true
				}
			}
		}
		if !signalled {
			ready <- nil
		}
		io.Copy(io.Discard, out)
		s.exited <- s.cmd.Wait()
	}()
	select {
	case l := <-ready:
		if l == nil {
			t.Fatalf("nbdcache serve exited before serving:\n%s%s", s.stdout, s.stderr)
		}
		s.listening = l
	case <-time.After(60 * time.Second):
		s.cmd.Process.Kill()
		t.Fatalf("nbdcache serve did not start:\n%s%s", s.stdout, s.stderr)
	}
	t.Cleanup(func() { s.stop() })
	return s
}

// stop sends SIGTERM and requires a clean exit.
func (s *server) stop() {
	s.t.Helper()
	if s.cmd.ProcessState != nil {
		return
	}
	s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-s.exited:
		if err != nil {
			s.t.Errorf("nbdcache serve exited with %v:\n%s%s", err, s.stdout, s.stderr)
		}
	case <-time.After(60 * time.Second):
		s.cmd.Process.Kill()
		s.t.Errorf("nbdcache serve did not stop on SIGTERM:\n%s", s.stderr)
	}
}

// kill stops the server with SIGKILL (a crash of the process).
func (s *server) kill() {
	s.cmd.Process.Kill()
	<-s.exited
}

// run runs a command, failing the test with its output on error.
func run(t testing.TB, name string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = append(os.Environ(), "PATH=/usr/bin:/bin:"+os.Getenv("PATH"), "LIBNBD_DEBUG=0")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// start starts name in the background with its stdout and stderr in out;
// the caller Waits for it.
func start(t testing.TB, name string, args ...string) (cmd *exec.Cmd, out *bytes.Buffer) {
	t.Helper()
	cmd, out = exec.Command(name, args...), new(bytes.Buffer)
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	return cmd, out
}

// randomFile writes size pseudo-random bytes (from seed) to a new file.
func randomFile(t testing.TB, name string, size int, seed int64) (string, []byte) {
	t.Helper()
	data := make([]byte, size)
	x := uint64(seed)*0x9e3779b97f4a7c15 + 1
	for i := 0; i+8 <= size; i += 8 {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		for j := range 8 {
			data[i+j] = byte(x >> (8 * j))
		}
	}
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return p, data
}
