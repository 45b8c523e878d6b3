package cache

import (
	"flag"
	"fmt"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync"

	"github.com/nbdcache/nbdcache/storage"
)

var flagTrace = flag.String("trace", "", "TestPowerCutConcurrent: trace the cache's index, journal and device events, and write the history of a clean extent that differs from the backing to this file")

// concTrace collects the events of one concurrent cut (testHooks.trace,
// the devices' hooks, the replay at reopen).
type concTrace struct {
	mu  sync.Mutex
	evs []traceEv
}

type traceEv struct {
	seq    int
	off, n int64 // -1: global
	dev    bool  // a cache device operation: off, n are its location
	msg    string
}

func (t *concTrace) add(off, n int64, msg string) {
	t.mu.Lock()
	t.evs = append(t.evs, traceEv{seq: len(t.evs), off: off, n: n, msg: msg})
	t.mu.Unlock()
}

// devOp traces a write, zero, trim or flush of a device.
func (t *concTrace) devOp(name string, op storage.Op) {
	if op.Kind == storage.OpRead || op.Kind == storage.OpExtents {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	ev := traceEv{seq: len(t.evs), off: op.Off, n: op.Length, msg: fmt.Sprintf("%s %s [%d+%d) op %d", name, op.Kind, op.Off, op.Length, op.Index)}
	switch {
	case op.Kind == storage.OpFlush:
		ev.off = -1
	case name == "cachedev":
		ev.dev = true
	}
	t.evs = append(t.evs, ev)
}

var traceLoc = regexp.MustCompile(`\[(\d+)\+(\d+)\)@(\d+)`)

// dump writes the events about [off, off+n) to the trace file: those on
// the range, the cache device writes to the locations of its records, the
// commits, checkpoints and flushes.
func (t *concTrace) dump(header string, off, n int64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	type span struct{ a, b int64 }
	var locs []span
	for _, ev := range t.evs {
		if ev.off < 0 || ev.dev || !(ev.off < off+n && off < ev.off+ev.n) {
			continue
		}
		for _, m := range traceLoc.FindAllStringSubmatch(ev.msg, -1) {
			l, _ := strconv.ParseInt(m[2], 10, 64)
			a, _ := strconv.ParseInt(m[3], 10, 64)
			if a > 0 {
				locs = append(locs, span{a, a + l})
			}
		}
	}
	var b strings.Builder
	b.WriteString(header + "\n")
	for _, ev := range t.evs {
		show := false
		switch {
		case ev.off < 0:
			show = !strings.HasPrefix(ev.msg, "publish")
		case ev.dev:
			for _, s := range locs {
				if ev.off < s.b && s.a < ev.off+ev.n {
					show = true
				}
			}
			show = show || strings.Contains(ev.msg, "journal")
		default:
			show = ev.off < off+n && off < ev.off+ev.n
		}
		if show {
			fmt.Fprintf(&b, "%6d %s\n", ev.seq, ev.msg)
		}
	}
	f, err := os.OpenFile(*flagTrace, os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		return
	}
	defer f.Close()
	f.WriteString(b.String() + "\n")
}
