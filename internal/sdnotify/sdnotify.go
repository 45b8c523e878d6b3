// Package sdnotify sends service state to systemd (sd_notify(3)): the
// datagram protocol on the socket named by $NOTIFY_SOCKET, which a unit of
// Type=notify sets. Outside such a unit the variable is unset and Notify
// does nothing.
package sdnotify

// sdnotify.go: Notify, and the messages nbdcache sends to systemd.

import (
	"fmt"
	"net"
	"os"
)

// Messages of the protocol that nbdcache sends.
const (
	Ready    = "READY=1"    // the export listens, or the device is attached
	Stopping = "STOPPING=1" // shutdown began
)

// Notify sends state (newline-separated VAR=VALUE assignments) to the
// socket $NOTIFY_SOCKET names, a path or, with a leading '@', an abstract
// socket. It reports whether it sent anything: false, with no error, when
// the variable is unset.
func Notify(state string) (bool, error) {
	name := os.Getenv("NOTIFY_SOCKET")
	if name == "" {
		return false, nil
	}
	if name[0] != '/' && name[0] != '@' {
		return false, fmt.Errorf("sdnotify: NOTIFY_SOCKET %q is neither a path nor an abstract socket", name)
	}
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: name, Net: "unixgram"})
	if err != nil {
		return false, fmt.Errorf("sdnotify: %w", err)
	}
	defer c.Close()
	if _, err := c.Write([]byte(state)); err != nil {
		return false, fmt.Errorf("sdnotify: %w", err)
	}
	return true, nil
}
