package main

import (
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
)

// listenAddr is a parsed --listen value: unix:PATH or HOST:PORT.
type listenAddr struct {
	network, addr string
}

func (a listenAddr) String() string {
	if a.network == "unix" {
		return "unix:" + a.addr
	}
	return a.addr
}

func parseListen(s string) (listenAddr, error) {
	if p, ok := strings.CutPrefix(s, "unix:"); ok {
		if p == "" {
			return listenAddr{}, fmt.Errorf("%w: empty unix socket path in %q", errUsage, s)
		}
		return listenAddr{"unix", p}, nil
	}
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return listenAddr{}, fmt.Errorf("%w: --listen %q: want unix:PATH or HOST:PORT (%v)", errUsage, s, err)
	}
	if host == "" {
		// ":10809" would listen on every interface; that must be asked
		// for explicitly, as 0.0.0.0:PORT or [::]:PORT.
		return listenAddr{}, fmt.Errorf("%w: --listen %q has no host; use 127.0.0.1:%s, or 0.0.0.0:%s to listen on all interfaces", errUsage, s, port, port)
	}
	return listenAddr{"tcp", s}, nil
}

// listen opens the socket. A stale unix socket left by a dead server is
// removed; a live one is refused.
func listen(a listenAddr) (net.Listener, error) {
	if a.network == "unix" {
		if fi, err := os.Lstat(a.addr); err == nil && fi.Mode()&os.ModeSocket != 0 {
			if c, err := net.Dial("unix", a.addr); err == nil {
				c.Close()
				return nil, fmt.Errorf("%s: another server is listening there", a.addr)
			}
			if err := os.Remove(a.addr); err != nil && !errors.Is(err, os.ErrNotExist) {
				return nil, err
			}
		}
	}
	return net.Listen(a.network, a.addr)
}
