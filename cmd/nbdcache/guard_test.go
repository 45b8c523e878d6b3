package main

import (
	"errors"
	"flag"
	"fmt"
	"testing"

	"github.com/nbdcache/nbdcache/cache"
	"github.com/nbdcache/nbdcache/storage"
)

// TestExitStatus: each sentinel, however wrapped or explained, gives its
// exit status; corruption wins over a wrong backing.
func TestExitStatus(t *testing.T) {
	for _, c := range []struct {
		err  error
		want int
	}{
		{nil, exitOK},
		{flag.ErrHelp, exitOK},
		{fmt.Errorf("%w: bad flag", errUsage), exitUsage},
		{fmt.Errorf("%w: 2 problems", errCheckFailed), exitError},
		{explain(cache.ErrWrongBacking, "wrong backing: ..."), exitWrongBacking},
		{fmt.Errorf("opening: %w", cache.ErrWrongBacking), exitWrongBacking},
		{explain(&storage.InUseError{Path: "c.img"}, "in use"), exitInUse},
		{explain(errRefused, "refusing"), exitRefused},
		{errors.New("anything else"), exitError},
	} {
		if got := exitStatus(c.err); got != c.want {
			t.Errorf("exitStatus(%v) = %d, want %d", c.err, got, c.want)
		}
	}
}
