package main

// listen.go: --listen: parsing its address and listening on it, and the unix
// socket permission flags.

import (
	"flag"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"

	"github.com/nbdcache/nbdcache/nbd"
	"github.com/nbdcache/nbdcache/unixsock"
)

// listenAddr is a parsed --listen value: unix:PATH or HOST:PORT, or an
// NBD URI naming one of them (export and tls from the URI).
type listenAddr struct {
	network, addr string
	export        string // from a URI's path, or ""
	tls           bool   // an nbds:// or nbds+unix:// URI
}

func (a listenAddr) String() string {
	if a.network == "unix" {
		return "unix:" + a.addr
	}
	return a.addr
}

func parseListen(s string) (listenAddr, error) {
	if strings.HasPrefix(s, "nbd") && strings.Contains(s, "://") {
		return parseListenURI(s)
	}
	if p, ok := strings.CutPrefix(s, "unix:"); ok {
		if p == "" {
			return listenAddr{}, fmt.Errorf("%w: empty unix socket path in %q", errUsage, s)
		}
		return listenAddr{network: "unix", addr: p}, nil
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
	return listenAddr{network: "tcp", addr: s}, nil
}

// parseListenURI reads --listen in the NBD URI form that clients are
// given (nbd.ParseURI: nbd://HOST[:PORT][/EXPORT], nbd+unix:///[EXPORT]?
// socket=PATH, and the nbds forms). As with HOST:PORT, a URI with no host
// is refused: all interfaces must be asked for.
func parseListenURI(s string) (listenAddr, error) {
	u, err := nbd.ParseURI(s)
	if err != nil {
		return listenAddr{}, fmt.Errorf("%w: --listen: %v", errUsage, err)
	}
	if host, _, _ := net.SplitHostPort(u.Addr); u.Network == "tcp" && host == "" {
		return listenAddr{}, fmt.Errorf("%w: --listen %q has no host; name one, or 0.0.0.0 to listen on all interfaces", errUsage, s)
	}
	return listenAddr{network: u.Network, addr: u.Addr, export: u.Export, tls: u.TLS}, nil
}

// listen opens the socket. A unix socket is created with perm (never
// looser, not even for an instant); a stale one left by a dead server is
// replaced, a live one refused.
func listen(a listenAddr, perm unixsock.Perm) (net.Listener, error) {
	if a.network == "unix" {
		return unixsock.Listen(a.addr, perm)
	}
	return net.Listen(a.network, a.addr)
}

// socketFlags set who may connect to the NBD unix sockets (--listen
// unix:PATH).
type socketFlags struct {
	mode  string
	group string
}

func (f *socketFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.mode, "socket-mode", "", "permissions of the --listen unix sockets, in octal `MODE` (default 0600, or 0660 with --socket-group)")
	fs.StringVar(&f.group, "socket-group", "", "give the --listen unix sockets the group `GROUP` (a name or gid)")
}

func (f *socketFlags) perm() (unixsock.Perm, error) {
	p := unixsock.Owner
	if f.group != "" {
		gid, err := unixsock.LookupGroup(f.group)
		if err != nil {
			return p, fmt.Errorf("%w: --socket-group: %v", errUsage, err)
		}
		p = unixsock.Perm{Mode: 0o660, GID: gid}
	}
	if f.mode != "" {
		m, err := strconv.ParseUint(f.mode, 8, 32)
		if err != nil || m > 0o777 || m&0o600 != 0o600 {
			return p, fmt.Errorf("%w: --socket-mode %q: want octal permissions that let the owner read and write, such as 0600 or 0660", errUsage, f.mode)
		}
		p.Mode = os.FileMode(m)
	}
	return p, nil
}
