package unixsock

import (
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestListenMode(t *testing.T) {
	old := unix.Umask(0) // the umask plays no part
	defer unix.Umask(old)
	dir := t.TempDir()
	for _, tc := range []struct {
		perm Perm
		want os.FileMode
	}{{Owner, 0o600}, {Perm{}, 0o600}, {Perm{Mode: 0o660, GID: -1}, 0o660}} {
		p := filepath.Join(dir, "s")
		l, err := Listen(p, tc.perm)
		if err != nil {
			t.Fatal(err)
		}
		fi, err := os.Lstat(p)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != tc.want {
			t.Errorf("socket mode %v, want %v", fi.Mode(), tc.want)
		}
		c, err := net.Dial("unix", p)
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
		l.Close()
		if _, err := os.Lstat(p); err != nil {
			t.Fatalf("closing the listener removed the socket: %v", err)
		}
		os.Remove(p)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Errorf("left behind: %v", ents)
	}
}

func TestListenGroup(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to give a socket another group")
	}
	p := filepath.Join(t.TempDir(), "s")
	l, err := Listen(p, Perm{Mode: 0o660, GID: 65534})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	fi, err := os.Lstat(p)
	if err != nil {
		t.Fatal(err)
	}
	if st := fi.Sys().(*syscall.Stat_t); st.Gid != 65534 || fi.Mode().Perm() != 0o660 {
		t.Fatalf("group %d mode %v", st.Gid, fi.Mode())
	}
}

func TestListenReplacesOnlyStaleSockets(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "file")
	os.WriteFile(file, []byte("precious"), 0o644)
	if _, err := Listen(file, Owner); !errors.Is(err, ErrNotSocket) {
		t.Fatalf("over a regular file: %v", err)
	}
	if b, _ := os.ReadFile(file); string(b) != "precious" {
		t.Fatal("the file was touched")
	}
	p := filepath.Join(dir, "s")
	live, err := Listen(p, Owner)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Listen(p, Owner); !errors.Is(err, ErrInUse) {
		t.Fatalf("over a live socket: %v", err)
	}
	live.Close() // the file stays: now a stale socket
	l, err := Listen(p, Owner)
	if err != nil {
		t.Fatalf("over a stale socket: %v", err)
	}
	l.Close()
}

// TestPeerCred: the kernel's record of the peer, for this process and for
// a client running as nobody (setpriv; root only).
func TestPeerCred(t *testing.T) {
	// Not t.TempDir: its parent is private, and nobody must reach the
	// socket.
	dir, err := os.MkdirTemp("", "unixsock-test-")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)
	os.Chmod(dir, 0o711)
	p := filepath.Join(dir, "s")
	l, err := Listen(p, Perm{Mode: 0o666, GID: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	accepted := make(chan Cred, 1)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			cred, err := PeerCred(c)
			if err != nil {
				t.Error(err)
			}
			accepted <- cred
			c.Close()
		}
	}()
	c, err := net.Dial("unix", p)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	cred := recv(t, accepted)
	if cred.UID != os.Getuid() || cred.GID != os.Getgid() || cred.PID != os.Getpid() {
		t.Fatalf("own credentials: %+v", cred)
	}
	if !cred.InGroup(os.Getgid()) {
		t.Fatal("InGroup misses the primary group")
	}

	if os.Geteuid() != 0 {
		t.Skip("needs root to connect as another user")
	}
	setpriv, err := exec.LookPath("setpriv")
	if err != nil {
		t.Skip("setpriv (util-linux) not installed")
	}
	py := "/usr/bin/python3"
	if _, err := os.Stat(py); err != nil {
		t.Skip("no /usr/bin/python3")
	}
	cmd := exec.Command(setpriv, "--reuid", "65534", "--regid", "65534", "--groups", "65533", py, "-c",
		"import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.recv(1)", p)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("connecting as nobody: %v\n%s", err, out)
	}
	cred = recv(t, accepted)
	if cred.UID != 65534 || cred.GID != 65534 || !cred.InGroup(65533) || cred.InGroup(0) {
		t.Fatalf("nobody's credentials: %+v", cred)
	}
}

func recv(t *testing.T, ch <-chan Cred) Cred {
	t.Helper()
	select {
	case c := <-ch:
		return c
	case <-time.After(10 * time.Second):
		t.Fatal("no connection accepted")
	}
	return Cred{}
}

func TestNotUnix(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	if _, err := PeerCred(a); !errors.Is(err, ErrNotUnix) {
		t.Fatal(err)
	}
}
