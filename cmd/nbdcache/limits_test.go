package main

import (
	"errors"
	"testing"
)

func TestParseAllow(t *testing.T) {
	for in, want := range map[string]string{
		"10.0.0.0/8": "10.0.0.0/8", "127.0.0.1": "127.0.0.1/32", "::1": "::1/128",
		"::ffff:192.0.2.1": "192.0.2.1/32", "fd00::/8": "fd00::/8",
	} {
		p, err := parseAllow(in)
		if err != nil || p.String() != want {
			t.Errorf("parseAllow(%q) = %v, %v; want %s", in, p, err, want)
		}
	}
	for _, bad := range []string{"10.0.0.1/8", "example.com", "10.0.0.0/33", ""} {
		if _, err := parseAllow(bad); !errors.Is(err, errUsage) {
			t.Errorf("parseAllow(%q): %v, want a usage error", bad, err)
		}
	}
}
