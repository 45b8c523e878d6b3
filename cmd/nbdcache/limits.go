package main

// limits.go: the flags that bound what clients can make the server spend
// (nbd.Config's limits).

import (
	"flag"
	"fmt"
	"net/netip"
	"strings"
	"time"

	"github.com/nbdcache/nbdcache/nbd"
)

// limitFlags bound what clients can make the server spend: memory,
// connections, time. They map one to one onto nbd.Config.
type limitFlags struct {
	bufferBudget   int64
	maxConnections int
	maxInFlight    int
	writeTimeout   time.Duration
	readTimeout    time.Duration
	idleTimeout    time.Duration
	allow          []netip.Prefix
}

func (f *limitFlags) register(fs *flag.FlagSet) {
	f.bufferBudget = nbd.DefaultBufferBudget
	fs.Var(sizeFlag{&f.bufferBudget}, "buffer-budget", "memory for request buffers across all clients, `SIZE` (at least 1M); one connection may use a quarter, and the maximum block size is at most that")
	fs.IntVar(&f.maxConnections, "max-connections", nbd.DefaultMaxConnections, "connections open at once, negotiating or not, `N` (0: no limit); more are closed before the greeting")
	fs.IntVar(&f.maxInFlight, "max-inflight", nbd.DefaultMaxInFlight, "requests in flight per connection, `N`; at the limit the server stops reading that connection")
	fs.DurationVar(&f.writeTimeout, "write-timeout", nbd.DefaultIOTimeout, "drop a client whose replies wait this long to be read, `DURATION` (0: never)")
	fs.DurationVar(&f.readTimeout, "read-timeout", nbd.DefaultIOTimeout, "drop a client whose WRITE payload has not arrived this long after its header, `DURATION` (0: never)")
	fs.DurationVar(&f.idleTimeout, "idle-timeout", 0, "close a client that has sent nothing and waits for nothing this long, `DURATION` (0: never); frees its --max-connections slot")
	fs.Func("allow", "accept TCP clients only from `CIDR` (an address or a network); repeatable (default: any client that can reach the listener)", func(s string) error {
		p, err := parseAllow(s)
		if err != nil {
			return err
		}
		f.allow = append(f.allow, p)
		return nil
	})
}

// parseAllow reads an --allow value: a network (10.0.0.0/8, fd00::/8) or
// one address.
func parseAllow(s string) (netip.Prefix, error) {
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return netip.Prefix{}, fmt.Errorf("%w: --allow %q: %v", errUsage, s, err)
		}
		if p != p.Masked() {
			return netip.Prefix{}, fmt.Errorf("%w: --allow %q has host bits set; did you mean %s?", errUsage, s, p.Masked())
		}
		return p, nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("%w: --allow %q: want an address or CIDR network", errUsage, s)
	}
	a = a.Unmap()
	return netip.PrefixFrom(a, a.BitLen()), nil
}

// apply copies the limits into cfg, checking them.
func (f *limitFlags) apply(cfg *nbd.Config) error {
	if f.bufferBudget < 1<<20 {
		return fmt.Errorf("%w: --buffer-budget %d: want at least 1M", errUsage, f.bufferBudget)
	}
	if f.maxConnections < 0 || f.maxInFlight < 1 {
		return fmt.Errorf("%w: --max-connections must be 0 or more, --max-inflight 1 or more", errUsage)
	}
	if f.writeTimeout < 0 || f.readTimeout < 0 || f.idleTimeout < 0 {
		return fmt.Errorf("%w: --write-timeout, --read-timeout and --idle-timeout must not be negative", errUsage)
	}
	cfg.BufferBudget = f.bufferBudget
	cfg.MaxConnections = f.maxConnections
	if f.maxConnections == 0 {
		cfg.MaxConnections = -1
	}
	cfg.MaxInFlight = f.maxInFlight
	cfg.WriteTimeout, cfg.ReadTimeout = f.writeTimeout, f.readTimeout
	if f.writeTimeout == 0 {
		cfg.WriteTimeout = -1
	}
	if f.readTimeout == 0 {
		cfg.ReadTimeout = -1
	}
	cfg.IdleTimeout = f.idleTimeout
	cfg.Allow = f.allow
	return nil
}
