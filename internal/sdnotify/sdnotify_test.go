package sdnotify

import (
	"net"
	"path/filepath"
	"testing"
	"time"
)

// TestNotify: a fake NOTIFY_SOCKET, as systemd binds it, receives the
// datagram; with the variable unset nothing is sent and nothing fails.
func TestNotify(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "")
	if sent, err := Notify(Ready); sent || err != nil {
		t.Fatalf("unset NOTIFY_SOCKET: sent %v, %v", sent, err)
	}
	for _, name := range []string{filepath.Join(t.TempDir(), "notify"), "@nbdcache-sdnotify-test-" + t.Name()} {
		l, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: name, Net: "unixgram"})
		if err != nil {
			t.Fatal(err)
		}
		t.Setenv("NOTIFY_SOCKET", name)
		if sent, err := Notify(Ready); !sent || err != nil {
			t.Fatalf("%s: sent %v, %v", name, sent, err)
		}
		buf := make([]byte, 256)
		l.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, err := l.Read(buf)
		if err != nil || string(buf[:n]) != Ready {
			t.Fatalf("%s: received %q, %v", name, buf[:n], err)
		}
		l.Close()
	}
	t.Setenv("NOTIFY_SOCKET", "relative")
	if _, err := Notify(Ready); err == nil {
		t.Fatal("a relative NOTIFY_SOCKET accepted")
	}
}
