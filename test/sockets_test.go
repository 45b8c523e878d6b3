package test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// asUser runs a command as uid and gid (no supplementary groups) through
// setpriv, and returns its combined output and whether it succeeded.
func asUser(t *testing.T, uid, gid string, name string, args ...string) (string, bool) {
	t.Helper()
	setpriv := tool(t, "setpriv")
	cmd := exec.Command(setpriv, append([]string{"--reuid", uid, "--regid", gid, "--clear-groups", name}, args...)...)
	cmd.Env = append(os.Environ(), "PATH=/usr/bin:/bin", "LIBNBD_DEBUG=0")
	out, err := cmd.CombinedOutput()
	return string(out), err == nil
}

// publicDir makes a folder that any user can traverse (t.TempDir's
// parent is private), removed at the end of the test.
func publicDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "nbdcache-sock-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o711); err != nil {
		t.Fatal(err)
	}
	return dir
}

func modeOf(t *testing.T, path string) (os.FileMode, uint32) {
	t.Helper()
	fi, err := os.Lstat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Mode().Perm(), fi.Sys().(*syscall.Stat_t).Gid
}

// TestSocketsOwnerOnly: the NBD and control sockets are created 0600 (the
// umask plays no part), another user cannot connect to either, and when
// the control socket's mode is loosened behind the server's back, the
// server still refuses that user by its credentials (SO_PEERCRED).
func TestSocketsOwnerOnly(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run clients as another user")
	}
	nbdinfo := tool(t, "nbdinfo")
	dir := publicDir(t)
	if err := os.Chmod(filepath.Dir(binary), 0o711); err != nil { // nobody runs the client
		t.Fatal(err)
	}
	sock, ctl := filepath.Join(dir, "nbd.sock"), filepath.Join(dir, "ctl")
	old := syscall.Umask(0)
	s := startServe(t, "--backing", sparseFile(t, "backing.img", 16*mib), "--listen", "unix:"+sock, "--control", "unix:"+ctl)
	syscall.Umask(old)
	for _, p := range []string{sock, ctl, s.sock} {
		if m, _ := modeOf(t, p); m != 0o600 {
			t.Errorf("%s: mode %v, want 0600", p, m)
		}
	}
	// Root and the owner (the same here) are served.
	run(t, nbdinfo, "nbd+unix:///?socket="+sock)
	run(t, binary, "stats", "--control", "unix:"+ctl)

	if out, ok := asUser(t, "65534", "65534", nbdinfo, "nbd+unix:///?socket="+sock); ok {
		t.Errorf("nobody reached the 0600 NBD socket:\n%s", out)
	}
	out, ok := asUser(t, "65534", "65534", binary, "stats", "--control", "unix:"+ctl)
	if ok || !strings.Contains(out, "permission denied") {
		t.Errorf("nobody and the 0600 control socket: ok=%v\n%s", ok, out)
	}
	if err := os.Chmod(ctl, 0o666); err != nil {
		t.Fatal(err)
	}
	out, ok = asUser(t, "65534", "65534", binary, "stats", "--control", "unix:"+ctl)
	if ok || !strings.Contains(out, "uid 65534 may not use this control socket") {
		t.Errorf("nobody through a loosened control socket: ok=%v\n%s", ok, out)
	}
	out, ok = asUser(t, "65534", "65534", binary, "mode", "--control", "unix:"+ctl, "writethrough")
	if ok {
		t.Errorf("nobody changed something through the control socket:\n%s", out)
	}
}

// TestSocketsGroup: --socket-mode/--socket-group open the NBD socket to a
// group, and --control-group lets that group's members use the control
// socket while other users stay out.
func TestSocketsGroup(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to run clients as another user")
	}
	nbdinfo := tool(t, "nbdinfo")
	dir := publicDir(t)
	if err := os.Chmod(filepath.Dir(binary), 0o711); err != nil {
		t.Fatal(err)
	}
	sock, ctl := filepath.Join(dir, "nbd.sock"), filepath.Join(dir, "ctl")
	startServe(t, "--backing", sparseFile(t, "backing.img", 16*mib), "--listen", "unix:"+sock,
		"--socket-group", "65534", "--control", "unix:"+ctl, "--control-group", "nogroup")
	for _, p := range []string{sock, ctl} {
		if m, gid := modeOf(t, p); m != 0o660 || gid != 65534 {
			t.Errorf("%s: mode %v group %d, want 0660 and 65534", p, m, gid)
		}
	}
	// A member of the group (nobody, whose group is nogroup) is served.
	if out, ok := asUser(t, "65534", "65534", nbdinfo, "nbd+unix:///?socket="+sock); !ok {
		t.Errorf("a member of --socket-group was refused:\n%s", out)
	}
	if out, ok := asUser(t, "65534", "65534", binary, "stats", "--control", "unix:"+ctl); !ok {
		t.Errorf("a member of --control-group was refused:\n%s", out)
	}
	// Someone else is not, even through a loosened mode.
	if out, ok := asUser(t, "65533", "65533", binary, "stats", "--control", "unix:"+ctl); ok {
		t.Errorf("a non-member used the control socket:\n%s", out)
	}
	os.Chmod(ctl, 0o666)
	out, ok := asUser(t, "65533", "65533", binary, "stats", "--control", "unix:"+ctl)
	if ok || !strings.Contains(out, "uid 65533 may not use this control socket") {
		t.Errorf("a non-member through a loosened control socket: ok=%v\n%s", ok, out)
	}

	// --socket-mode alone.
	open := filepath.Join(dir, "open.sock")
	startServe(t, "--backing", sparseFile(t, "other.img", 16*mib), "--listen", "unix:"+open, "--socket-mode", "0666")
	if m, _ := modeOf(t, open); m != 0o666 {
		t.Errorf("--socket-mode 0666 gave %v", m)
	}
	if out, ok := asUser(t, "65533", "65533", nbdinfo, "nbd+unix:///?socket="+open); !ok {
		t.Errorf("a 0666 socket refused another user:\n%s", out)
	}
}

// TestAllowFlag: --allow admits TCP clients from the listed networks only,
// before any byte of the handshake; unix-socket clients are not checked.
func TestAllowFlag(t *testing.T) {
	nbdinfo := tool(t, "nbdinfo")
	backing := sparseFile(t, "backing.img", 16*mib)
	s := startServe(t, "--backing", backing, "--listen", "127.0.0.1:0", "--allow", "192.0.2.0/24", "--allow", "2001:db8::/32")
	addr := s.listening[0][strings.LastIndex(s.listening[0], " ")+1:]
	cmd := exec.Command(nbdinfo, "nbd://"+addr)
	if out, err := cmd.CombinedOutput(); err == nil {
		t.Fatalf("a client outside --allow was served:\n%s", out)
	}
	run(t, nbdinfo, s.uri) // the unix socket
	s.stop()
	s = startServe(t, "--backing", backing, "--listen", "127.0.0.1:0", "--allow", "192.0.2.0/24", "--allow", "127.0.0.1")
	addr = s.listening[0][strings.LastIndex(s.listening[0], " ")+1:]
	run(t, nbdinfo, "nbd://"+addr)
}
