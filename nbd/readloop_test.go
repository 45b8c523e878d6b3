package nbd

// Read-loop regressions found by review of the run-to-completion path (issue 17).

import (
	"bytes"
	"fmt"
	"testing"
	"time"

	"github.com/nbdcache/nbdcache/cache"
	"github.com/nbdcache/nbdcache/storage"
)

// slowExtents is a backing whose Extents waits (a remote backing's
// BLOCK_STATUS round trip, or one that hangs while it reconnects).
type slowExtents struct {
	storage.Device
	release chan struct{}
}

func (d *slowExtents) Extents(off, n int64, fn func(storage.Extent) bool) error {
	<-d.release
	fn(storage.Extent{Length: n})
	return nil
}

// TestInlineReadLooksUpHolesAfterData: a structured READ of 64-128 KiB over
// a range the cache does not hold goes to a worker without the read loop
// asking the backing for its holes (a remote backing's BLOCK_STATUS round
// trip, or a hang while it reconnects), so a cached 4 KiB READ behind it
// on the same connection is answered at once. Before, readInline looked
// the holes up first, on the read loop.
func TestInlineReadLooksUpHolesAfterData(t *testing.T) {
	const size = 16 << 20
	id := [16]byte{1}
	cd := storage.NewMem(64 << 20)
	back := &slowExtents{Device: storage.NewMem(size), release: make(chan struct{})}
	if err := cache.Format(cd, back, cache.FormatOptions{BucketSize: 1 << 20, BackingID: id}); err != nil {
		t.Fatal(err)
	}
	c, err := cache.Open(cd, back, cache.Options{BackingID: id, SequentialCutoff: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.WriteAt(make([]byte, 4096), 0, storage.FUA); err != nil {
		t.Fatal(err)
	}
	_, addr := startServerConfig(t, Config{Exports: []Export{{Device: c}}})
	cl := dial(t, addr)
	cl.connect("", true)
	var stream []byte
	stream = appendRequest(stream, request{typ: cmdRead, cookie: 1, offset: 8 << 20, length: 64 << 10})
	stream = appendRequest(stream, request{typ: cmdRead, cookie: 2, offset: 0, length: 4096})
	cl.send(stream)
	got := make(chan uint64, 2)
	go func() {
		for range 2 {
			got <- cl.readReply(nil).cookie
		}
	}()
	n := 0
	select {
	case ck := <-got:
		n++
		t.Logf("first reply: cookie %d", ck)
	case <-time.After(2 * time.Second):
		t.Errorf("the cached 4 KiB READ got no reply in 2 s: the read loop waits on the backing's Extents")
	}
	close(back.release)
	for ; n < 2; n++ {
		<-got
	}
}

// wgate: a Mem (a NoWaitReader, so READs run inline) whose writes at
// blockAt wait for release, and whose flushes wait for flush.
type wgate struct {
	*storage.Mem
	blockAt        int64
	release, flush chan struct{}
}

func (g *wgate) WriteAt(p []byte, off int64, f storage.Flags) error {
	if off == g.blockAt {
		<-g.release
	}
	return g.Mem.WriteAt(p, off, f)
}
func (g *wgate) Flush() error { <-g.flush; return g.Mem.Flush() }

// TestInlineRepliesLeaveBeforeWaitingForABuffer: the reply of a READ the
// read loop answered goes out before the loop waits for the next WRITE's
// buffer. Before, it settled there only with a batch gathered, and the
// reply sat in the write buffer until a worker finished. (A stale flusher
// kick sometimes rescued the reply, so the scenario is tried 20 times; the
// sleeps let the server read what was sent before the next step.)
func TestInlineRepliesLeaveBeforeWaitingForABuffer(t *testing.T) {
	for try := range 20 {
		if stalled := unflushedWhileGetBuf(t); stalled != "" {
			t.Fatalf("try %d: %s", try, stalled)
		}
	}
}

func unflushedWhileGetBuf(t *testing.T) string {
	dev := &wgate{Mem: storage.NewMem(testSize), blockAt: 2 << 20, release: make(chan struct{}), flush: make(chan struct{})}
	_, addr := startServerConfig(t, Config{Exports: []Export{{Device: dev}}, BufferBudget: 1 << 20, MaxInFlight: 3})
	c := dial(t, addr)
	c.connect("", false)
	// A worker holds half the share (128 of 256 KiB); two FLUSHes fill the
	// in-flight limit, so the read loop stops at READ 4.
	var s []byte
	s = append(appendRequest(s, request{typ: cmdWrite, cookie: 1, offset: 2 << 20, length: 128 << 10}), make([]byte, 128<<10)...)
	s = appendRequest(s, request{typ: cmdFlush, cookie: 2})
	s = appendRequest(s, request{typ: cmdFlush, cookie: 3})
	s = appendRequest(s, request{typ: cmdRead, cookie: 4, offset: 4096, length: 4096})
	c.send(s)
	time.Sleep(50 * time.Millisecond)
	// READ 5 (served from memory), then a WRITE whose 256 KiB block does
	// not fit what is left of the share; both in the socket before the
	// loop reads on.
	s = appendRequest(nil, request{typ: cmdRead, cookie: 5, offset: 0, length: 4096})
	s = append(appendRequest(s, request{typ: cmdWrite, cookie: 6, offset: 0, length: 132 << 10}), make([]byte, 132<<10)...)
	c.send(s)
	time.Sleep(50 * time.Millisecond)
	got := make(chan uint64, 6)
	go func() {
		for range 6 {
			got <- c.readReply(map[uint64]int{4: 4096, 5: 4096}).cookie
		}
	}()
	close(dev.flush)
	n, msg := 0, ""
	deadline := time.After(time.Second)
wait:
	for {
		select {
		case ck := <-got:
			n++
			if ck == 5 {
				break wait
			}
		case <-deadline:
			msg = fmt.Sprint("READ 5 got no reply in 1 s: it sits in the write buffer while the read loop waits for WRITE 6's buffer")
			break wait
		}
	}
	close(dev.release)
	for ; n < 6; n++ {
		<-got
	}
	return msg
}

// idleFlusher is a Mem that says a FLUSH has nothing to do
// (storage.NoWaitFlusher), and whose Flush waits for release.
type idleFlusher struct {
	*storage.Mem
	release chan struct{}
}

func (d *idleFlusher) FlushNoWait() bool { return true }
func (d *idleFlusher) Flush() error      { <-d.release; return d.Mem.Flush() }

// TestFlushWithNothingToDoAnsweredInline: a FLUSH the device says has
// nothing to make durable is answered on the read loop, without a worker
// and without calling Flush (here a Flush would wait until the end).
func TestFlushWithNothingToDoAnsweredInline(t *testing.T) {
	dev := &idleFlusher{Mem: storage.NewMem(testSize), release: make(chan struct{})}
	defer close(dev.release)
	_, addr := startServerConfig(t, Config{Exports: []Export{{Device: dev}}})
	c := dial(t, addr)
	c.connect("", false)
	c.send(appendRequest(nil, request{typ: cmdFlush, cookie: 7}))
	got := make(chan uint64, 1)
	go func() { got <- c.readReply(nil).cookie }()
	select {
	case ck := <-got:
		if ck != 7 {
			t.Fatalf("reply for cookie %d, want 7", ck)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("the FLUSH with nothing to do got no reply in 2 s: it went to a worker's Flush")
	}
}

// TestInlineFlushCoversTheBatch: WRITEs and a FLUSH in one socket read, to
// a cache on crash devices: the read loop runs the WRITEs as a batch and
// only then asks whether the FLUSH has anything to do, so the FLUSH makes
// them durable and a power cut after its reply keeps them all. (Tried 10
// times, each on a new cache: the stream may arrive in more than one
// read, and then the batch runs before the FLUSH is read anyway. With the
// order right the FLUSH always goes to a worker, the batch being unsynced:
// only mutant inline-flush-before-batch takes the inline path here. No
// quiet commit, which could sync the batch before the cut.)
func TestInlineFlushCoversTheBatch(t *testing.T) {
	for try := range 10 {
		if lost := flushCoversBatch(t); lost > 0 {
			t.Fatalf("try %d: %d WRITEs acknowledged before the FLUSH's reply lost in the cut", try, lost)
		}
	}
}

func flushCoversBatch(t *testing.T) (lost int) {
	id := [16]byte{7}
	cd, bd := storage.NewCrash(16<<20), storage.NewCrash(testSize)
	if err := cache.Format(cd, bd, cache.FormatOptions{BucketSize: 1 << 20, BackingID: id}); err != nil {
		t.Fatal(err)
	}
	c, err := cache.Open(cd, bd, cache.Options{BackingID: id, SequentialCutoff: -1, QuietCommit: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// A FUA write first: everything acknowledged so far is durable, so
	// a FLUSH read before the batch ran would find nothing to do.
	if err := c.WriteAt(make([]byte, 4096), 1<<20, storage.FUA); err != nil {
		t.Fatal(err)
	}
	_, addr := startServerConfig(t, Config{Exports: []Export{{Device: c}}})
	cl := dial(t, addr)
	cl.connect("", false)
	const n = 4
	data := func(i int) []byte { return bytes.Repeat([]byte{byte(i + 1)}, 4096) }
	var s []byte
	for i := range n {
		s = append(appendRequest(s, request{typ: cmdWrite, cookie: uint64(i + 1), offset: uint64(i) * 4096, length: 4096}), data(i)...)
	}
	s = appendRequest(s, request{typ: cmdFlush, cookie: 100})
	cl.send(s)
	for range n + 1 {
		if r := cl.readReply(nil); r.errno != 0 {
			t.Fatalf("cookie %d: errno %d", r.cookie, r.errno)
		}
	}
	devs, _ := storage.PowerCutAll(storage.LoseUnsynced, nil, cd, bd)
	c2, err := cache.Open(devs[0], devs[1], cache.Options{BackingID: id, SequentialCutoff: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	got := make([]byte, 4096)
	for i := range n {
		if err := c2.ReadAt(got, int64(i)*4096); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, data(i)) {
			lost++
		}
	}
	return lost
}
