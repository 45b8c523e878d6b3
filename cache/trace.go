package cache

// trace.go: test-only tracing of the events that change the index or the
// journal's durability.

import "fmt"

// Test-only tracing (testHooks.trace): one line per event that changes
// the index or the journal's durability, with the byte range it concerns
// (off -1 for global events). Call sites check tracing() first, so the
// formatting costs nothing when it is off.

func (c *Cache) tracing() bool { return c.test.trace != nil }

func (c *Cache) tracef(off, n int64, format string, a ...any) {
	c.test.trace(off, n, fmt.Sprintf(format, a...))
}

var recNames = [...]string{"?", "insert", "delete", "clean", "replace"}

func recName(t uint8) string {
	if int(t) < len(recNames) {
		return recNames[t]
	}
	return "?"
}

// testReplayTrace, if set, is called by loadState for every record it
// meets (tests only; not safe for parallel tests).
var testReplayTrace func(off, n int64, msg string)
