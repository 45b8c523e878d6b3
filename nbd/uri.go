package nbd

// uri.go: URI, NBD URIs as libnbd and qemu write them.

import (
	"fmt"
	"net"
	"net/url"
	"strings"
)

// URI is a parsed NBD URI, as libnbd and qemu write them
// (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/uri.md):
//
//	nbd://HOST[:PORT]/EXPORT        TCP (port 10809 by default)
//	nbds://HOST[:PORT]/EXPORT       TCP with TLS
//	nbd+unix:///EXPORT?socket=PATH  a unix socket
//	nbds+unix:///EXPORT?socket=PATH a unix socket with TLS
type URI struct {
	Network string // "tcp" or "unix"
	Addr    string // HOST:PORT or the socket's path
	Export  string
	TLS     bool
	// TLSHostname (?tls-hostname=NAME, as in libnbd) is the name the
	// server's certificate must carry. By default: the host of a TCP
	// URI; over a unix socket, none (the chain alone is verified, as
	// libnbd does). It names no other export: String leaves it out.
	TLSHostname string
}

// DefaultPort is NBD's IANA port.
const DefaultPort = "10809"

// IsURI reports whether s looks like an NBD URI (rather than a path).
func IsURI(s string) bool {
	for _, p := range []string{"nbd://", "nbds://", "nbd+unix://", "nbds+unix://"} {
		if strings.HasPrefix(s, p) {
			return true
		}
	}
	return false
}

// ParseURI reads an NBD URI.
func ParseURI(s string) (URI, error) {
	u, err := url.Parse(s)
	if err != nil {
		return URI{}, fmt.Errorf("nbd: URI %q: %w", s, err)
	}
	var r URI
	switch u.Scheme {
	case "nbd", "nbds":
		r.Network = "tcp"
		if u.Host == "" {
			return URI{}, fmt.Errorf("nbd: URI %q: no host", s)
		}
		host, port := u.Hostname(), u.Port()
		if port == "" {
			port = DefaultPort
		}
		r.Addr = net.JoinHostPort(host, port)
	case "nbd+unix", "nbds+unix":
		r.Network = "unix"
		if u.Host != "" {
			return URI{}, fmt.Errorf("nbd: URI %q: a unix URI has no host (nbd+unix:///EXPORT?socket=PATH)", s)
		}
		r.Addr = u.Query().Get("socket")
		if r.Addr == "" {
			return URI{}, fmt.Errorf("nbd: URI %q: no socket=PATH", s)
		}
	default:
		return URI{}, fmt.Errorf("nbd: URI %q: scheme %q is not nbd, nbds, nbd+unix or nbds+unix", s, u.Scheme)
	}
	r.TLS = strings.HasPrefix(u.Scheme, "nbds")
	r.TLSHostname = u.Query().Get("tls-hostname")
	r.Export = strings.TrimPrefix(u.Path, "/")
	return r, nil
}

// String writes the URI back in its canonical form.
func (u URI) String() string {
	s := "nbd"
	if u.TLS {
		s = "nbds"
	}
	exp := (&url.URL{Path: u.Export}).EscapedPath()
	if u.Network == "unix" {
		return s + "+unix:///" + exp + "?socket=" + strings.ReplaceAll(url.QueryEscape(u.Addr), "%2F", "/")
	}
	return s + "://" + u.Addr + "/" + exp
}
