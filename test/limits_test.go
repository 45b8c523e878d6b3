package test

import (
	"bufio"
	binenc "encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The memory bound, as the README states it: the server's resident set
// stays within its idle size plus --buffer-budget plus rssPerConn for
// every connection --max-connections allows. rssPerConn covers a
// negotiated connection's two 256 KiB socket buffers, its goroutines
// (up to --max-inflight workers) and the garbage a busy connection leaves
// for the collector. Measured in the worst case here (64 requests in
// flight on every connection): about 0.7 MiB per connection serving a
// file directly, 1.2 MiB through the cache.
const rssPerConn = 2 << 20

// hostile mixes, all on loopback, against a server with a 64 MiB budget
// (16 MiB per connection, 16 MiB maximum block size), 12 connections at
// most, and 4 s read and write timeouts. Each subtest measures the
// server's peak resident set (VmHWM, reset after start-up) and checks
// that a well-behaved client (qemu-io doing I/O, then nbdinfo) is served.
func TestHostileClients(t *testing.T) {
	qemuIO, nbdinfo := tool(t, "qemu-io"), tool(t, "nbdinfo")
	const (
		budget   = 64 << 20
		maxConns = 12
		timeout  = 4 * time.Second
		block    = 16 << 20 // the largest request: a quarter of the budget
	)
	bin := binaryNoRace(t)
	start := func(t *testing.T, extra ...string) (*server, string, int64) {
		ctl := filepath.Join(t.TempDir(), "ctl")
		args := append([]string{"--backing", sparseFile(t, "backing.img", 512*mib),
			"--buffer-budget", "64M", "--max-connections", strconv.Itoa(maxConns),
			"--write-timeout", timeout.String(), "--read-timeout", timeout.String(),
			"--control", "unix:" + ctl, "--listen", "127.0.0.1:0"}, extra...)
		s := startServeBinary(t, bin, args...)
		addr := s.listening[0][strings.LastIndex(s.listening[0], " ")+1:]
		run(t, nbdinfo, s.uri) // warm: the first client's allocations are part of idle
		base := rss(t, s, "VmRSS")
		resetPeak(t, s)
		return s, addr, base
	}
	// saturate takes the whole budget: four connections hold their share
	// each with READs they never read, and two WRITEs wait for room.
	saturate := func(t *testing.T, addr string) []net.Conn {
		var stalled []net.Conn
		for range 4 {
			stalled = append(stalled, stallReads(t, addr, block, 4))
		}
		for range 2 {
			stalled = append(stalled, stallWrite(t, addr, block))
		}
		return stalled
	}
	// good runs the well-behaved client and returns how long it took. Its
	// range lies beyond every hostile client's: their requests may run
	// at any time (NBD orders nothing across connections), and a
	// WRITE_ZEROES of theirs that ran between its write and its read
	// made "Pattern verification failed" once, when it wrote at 1M.
	good := func(t *testing.T, s *server) time.Duration {
		begin := time.Now()
		run(t, qemuIO, "-f", "raw", "-c", "write -P 0xab 448M 1M", "-c", "read -P 0xab 448M 1M", s.uri)
		run(t, nbdinfo, s.uri)
		return time.Since(begin)
	}
	check := func(t *testing.T, s *server, base int64, conns int) {
		peak := rss(t, s, "VmHWM")
		limit := base + budget + int64(conns)*rssPerConn
		st := serverStats(t, s)
		t.Logf("RSS: idle %.1f MiB, peak %.1f MiB, bound %.1f MiB (idle + %d MiB budget + %d × %d MiB); buffers peak %.1f MiB, waits %d, refused %d, timed out %d",
			mb(base), mb(peak), mb(limit), budget>>20, conns, rssPerConn>>20, mb(st.BufferPeak), st.BufferWaits, st.Refused, st.TimedOut)
		if peak > limit {
			t.Errorf("peak RSS %.1f MiB exceeds the bound %.1f MiB", mb(peak), mb(limit))
		}
		if st.BufferPeak > budget {
			t.Errorf("buffer peak %d over the budget", st.BufferPeak)
		}
	}

	// Two connections pin their share each with maximum-size READs whose
	// replies they never read, one stalls halfway through a maximum-size
	// WRITE, and idle connections fill every other slot while more
	// knock. A quarter of the budget is left, so a well-behaved client is
	// served at once.
	t.Run("room-left", func(t *testing.T) {
		s, addr, base := start(t)
		var stalled []net.Conn
		for range 2 {
			stalled = append(stalled, stallReads(t, addr, block, 8))
		}
		stalled = append(stalled, stallWrite(t, addr, block))
		var hogs []*rawNBD
		for range maxConns - 3 {
			hogs = append(hogs, dialNBD(t, addr))
		}
		for range 40 {
			if !refusedNBD(t, addr) {
				t.Fatal("a connection over --max-connections was greeted")
			}
		}
		for _, h := range hogs[:2] {
			h.disconnect(t) // room for qemu-io and nbdinfo, one after the other
		}
		if d := good(t, s); d > 3*time.Second {
			t.Errorf("the well-behaved client took %v", d)
		} else {
			t.Logf("well-behaved client served in %v", d.Round(time.Millisecond))
		}
		for _, nc := range stalled {
			waitDropped(t, nc, timeout+5*time.Second)
		}
		check(t, s, base, maxConns)
		if st := serverStats(t, s); st.Refused < 40 {
			t.Errorf("%d connections refused, want 40 or more", st.Refused)
		}
		// The refusals are logged a few a second, not one line each.
		s.stop()
		if n := strings.Count(s.stderr.String(), "too many connections"); n < 1 || n > 10 {
			t.Errorf("%d log lines about 40 refusals, want a few:\n%s", n, s.stderr)
		}
	})

	// Four connections hold the whole budget with READs they never read,
	// and two WRITEs wait for room behind them. The well-behaved client
	// waits in line until the write timeout drops the readers, and not
	// much longer. Through a write-back cache, whose own memory (index,
	// journal, writeback) must not grow with the hostile load.
	t.Run("saturated-cache", func(t *testing.T) {
		s, addr, base := start(t, "--cache", sparseFile(t, "cache.img", 256*mib), "--format")
		stalled := saturate(t, addr)
		d := good(t, s)
		t.Logf("well-behaved client served in %v (write timeout %v)", d.Round(time.Millisecond), timeout)
		if d > timeout+3*time.Second {
			t.Errorf("the well-behaved client took %v, more than the write timeout (%v) allows", d, timeout)
		}
		for _, nc := range stalled {
			waitDropped(t, nc, 2*timeout+5*time.Second)
		}
		check(t, s, base, maxConns)
		if st := serverStats(t, s); st.TimedOut < 4 || st.BufferWaits == 0 {
			t.Errorf("timed out %d, buffer waits %d: the budget was not exhausted as planned", st.TimedOut, st.BufferWaits)
		}
	})

	// Many requests in flight: connections that each keep --max-inflight
	// small READs or WRITEs waiting behind a reply they never read,
	// through the cache, so that every worker goroutine has been down the
	// cache's read or write path. This is what rssPerConn pays for.
	t.Run("many-small-cache", func(t *testing.T) {
		s, addr, base := start(t, "--cache", sparseFile(t, "cache.img", 256*mib), "--format")
		var stalled []net.Conn
		for i := range 3 { // 3 × (64 × 128 KiB) + 3 × (8 MiB + 63 × 64 KiB) = 60 MiB
			off := uint64(i) * (16 << 20)
			stalled = append(stalled, stallReads(t, addr, 128<<10, 128),
				flood(t, addr, off, 128, func(i int) (uint16, uint64, uint32) {
					return nbdCmdWrite, off + uint64(i)*(64<<10), 64 << 10
				}))
		}
		good(t, s)
		for _, nc := range stalled {
			waitDropped(t, nc, timeout+5*time.Second)
		}
		check(t, s, base, maxConns)
	})

	// Commands whose device calls allocate memory of their own, through
	// the cache: CACHE (a buffer per bucket warmed), WRITE_ZEROES on
	// dirty data (zeroes written a bucket at a time) and unaligned
	// maximum-size WRITEs (read-modify-written with a copy of the
	// payload, one at a time). The first two run at most 4 at a time
	// server-wide; the third is serialised by the cache.
	t.Run("device-scratch-cache", func(t *testing.T) {
		s, addr, base := start(t, "--cache", sparseFile(t, "cache.img", 256*mib), "--format")
		var stalled []net.Conn
		for i := range 3 {
			off := uint64(i) * (64 << 20)
			stalled = append(stalled, flood(t, addr, off, 128, func(i int) (uint16, uint64, uint32) {
				if i%2 == 0 {
					return nbdCache, off, 64 << 20
				}
				return nbdCmdWriteZeroes, off + 512 + uint64(i)*(1<<20), 1 << 20
			}))
		}
		unalignedWrites(t, addr, 200<<20+1, block-4096, 4)
		good(t, s)
		for _, nc := range stalled {
			waitDropped(t, nc, timeout+5*time.Second)
		}
		check(t, s, base, maxConns)
	})
}

func mb(n int64) float64 { return float64(n) / (1 << 20) }

// rss reads a field of /proc/PID/status (VmRSS, VmHWM) in bytes.
func rss(t *testing.T, s *server, field string) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", s.cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			if err != nil {
				t.Fatalf("%s: %q", field, line)
			}
			return kb << 10
		}
	}
	t.Fatalf("no %s in /proc/%d/status", field, s.cmd.Process.Pid)
	return 0
}

// resetPeak resets the process's VmHWM to its current RSS.
func resetPeak(t *testing.T, s *server) {
	t.Helper()
	if err := os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", s.cmd.Process.Pid), []byte("5"), 0); err != nil {
		t.Fatalf("resetting the peak RSS: %v", err)
	}
}

type nbdStats struct {
	BufferPeak  int64 `json:"buffer_peak"`
	BufferWaits int64 `json:"buffer_waits"`
	Refused     int64 `json:"refused_connections"`
	TimedOut    int64 `json:"timed_out_connections"`
}

// serverStats asks the control socket (the server's --control, the only
// one in its arguments).
func serverStats(t *testing.T, s *server) nbdStats {
	t.Helper()
	var ctl string
	for i, a := range s.cmd.Args {
		if a == "--control" {
			ctl = s.cmd.Args[i+1]
		}
	}
	out := run(t, binary, "stats", "--json", "--control", ctl)
	var st nbdStats
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("stats: %v\n%s", err, out)
	}
	return st
}

var noRace struct {
	once sync.Once
	path string
	err  error
}

// binaryNoRace is nbdcache built without the race detector, whose shadow
// memory would swamp the resident set this file measures.
func binaryNoRace(t *testing.T) string {
	t.Helper()
	if os.Getenv("NBDCACHE_TEST_NORACE") != "" {
		return binary
	}
	noRace.once.Do(func() {
		noRace.path = filepath.Join(filepath.Dir(binary), "nbdcache-norace")
		out, err := exec.Command("go", "build", "-o", noRace.path, "../cmd/nbdcache").CombinedOutput()
		if err != nil {
			noRace.err = fmt.Errorf("building nbdcache without -race: %v\n%s", err, out)
		}
	})
	if noRace.err != nil {
		t.Fatal(noRace.err)
	}
	return noRace.path
}

// rawNBD is a hostile client: it speaks just enough NBD to get into
// transmission, then sends what it likes. Every connection has a 60 s
// deadline, so nothing here waits forever.
type rawNBD struct {
	nc net.Conn
	r  *bufio.Reader
}

const (
	nbdMagicOpt       = 0x49484156454f5054
	nbdMagicReq       = 0x25609513
	nbdOptGo          = 7
	nbdRepAck         = 1
	nbdCmdRead        = 0
	nbdCmdWrite       = 1
	nbdCmdDisc        = 2
	nbdCache          = 5
	nbdCmdWriteZeroes = 6
	nbdGreeting       = 18
	nbdRepHdrSize     = 20
)

// dialTCP connects with a 4 KiB receive buffer, so that replies the client
// does not read fill the socket at once.
func dialTCP(t *testing.T, addr string) net.Conn {
	t.Helper()
	nc, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	nc.(*net.TCPConn).SetReadBuffer(4096)
	nc.SetDeadline(time.Now().Add(60 * time.Second))
	t.Cleanup(func() { nc.Close() })
	return nc
}

// dialNBD connects and negotiates the default export with NBD_OPT_GO.
func dialNBD(t *testing.T, addr string) *rawNBD {
	t.Helper()
	nc := dialTCP(t, addr)
	c := &rawNBD{nc: nc, r: bufio.NewReader(nc)}
	if _, err := io.ReadFull(c.r, make([]byte, nbdGreeting)); err != nil {
		t.Fatalf("greeting: %v", err)
	}
	b := binenc.BigEndian.AppendUint32(nil, 3) // fixed newstyle, no zeroes
	b = binenc.BigEndian.AppendUint64(b, nbdMagicOpt)
	b = binenc.BigEndian.AppendUint32(b, nbdOptGo)
	b = binenc.BigEndian.AppendUint32(b, 6)
	b = append(b, 0, 0, 0, 0, 0, 0) // empty name, no info requests
	if _, err := nc.Write(b); err != nil {
		t.Fatal(err)
	}
	for range 16 {
		h := make([]byte, nbdRepHdrSize)
		if _, err := io.ReadFull(c.r, h); err != nil {
			t.Fatalf("GO reply: %v", err)
		}
		typ := binenc.BigEndian.Uint32(h[12:])
		if _, err := io.CopyN(io.Discard, c.r, int64(binenc.BigEndian.Uint32(h[16:]))); err != nil {
			t.Fatal(err)
		}
		if typ == nbdRepAck {
			return c
		}
		if typ&(1<<31) != 0 {
			t.Fatalf("GO refused: %#x", typ)
		}
	}
	t.Fatal("GO: no ACK among 16 replies")
	return nil
}

// refusedNBD reports whether a new connection is closed without a greeting.
func refusedNBD(t *testing.T, addr string) bool {
	t.Helper()
	nc := dialTCP(t, addr)
	defer nc.Close()
	nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err := nc.Read(make([]byte, 1))
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatal("the server neither greeted nor closed a connection")
	}
	return err != nil
}

func (c *rawNBD) request(t *testing.T, typ uint16, cookie, off uint64, length uint32) {
	t.Helper()
	b := binenc.BigEndian.AppendUint32(nil, nbdMagicReq)
	b = binenc.BigEndian.AppendUint16(b, 0)
	b = binenc.BigEndian.AppendUint16(b, typ)
	b = binenc.BigEndian.AppendUint64(b, cookie)
	b = binenc.BigEndian.AppendUint64(b, off)
	b = binenc.BigEndian.AppendUint32(b, length)
	if _, err := c.nc.Write(b); err != nil {
		t.Fatal(err)
	}
}

// disconnect sends NBD_CMD_DISC and waits for the server to close: its
// connection slot is free by then.
func (c *rawNBD) disconnect(t *testing.T) {
	t.Helper()
	c.request(t, nbdCmdDisc, 0, 0, 0)
	if _, err := io.Copy(io.Discard, c.r); err != nil {
		t.Fatalf("waiting for the server to close: %v", err)
	}
}

// stallReads sends n READs of size bytes and reads nothing but the first
// reply's header: by then the server holds that reply's buffer in a write
// that cannot finish.
func stallReads(t *testing.T, addr string, size uint32, n int) net.Conn {
	t.Helper()
	c := dialNBD(t, addr)
	for i := range n {
		c.request(t, nbdCmdRead, uint64(i), uint64(i)*uint64(size), size)
	}
	if _, err := io.ReadFull(c.r, make([]byte, 16)); err != nil {
		t.Fatalf("first reply header: %v", err)
	}
	return c.nc
}

// flood sends a READ of 8 MiB at off, whose reply the socket cannot hold,
// then n requests from next, and reads nothing: every later reply queues
// behind the READ's, so the connection keeps --max-inflight requests with
// their buffers and workers. The requests go out in the background (the
// server stops reading at the limit).
func flood(t *testing.T, addr string, off uint64, n int, next func(i int) (typ uint16, off uint64, length uint32)) net.Conn {
	t.Helper()
	c := dialNBD(t, addr)
	c.request(t, nbdCmdRead, 0, off, 8<<20)
	if _, err := io.ReadFull(c.r, make([]byte, 16)); err != nil {
		t.Fatalf("first reply header: %v", err)
	}
	go func() { // ends with an error when the server drops the connection
		for i := range n {
			typ, off, length := next(i)
			b := binenc.BigEndian.AppendUint32(nil, nbdMagicReq)
			b = binenc.BigEndian.AppendUint16(b, 0)
			b = binenc.BigEndian.AppendUint16(b, typ)
			b = binenc.BigEndian.AppendUint64(b, uint64(i+1))
			b = binenc.BigEndian.AppendUint64(b, off)
			b = binenc.BigEndian.AppendUint32(b, length)
			if typ == nbdCmdWrite {
				b = append(b, make([]byte, length)...)
			}
			if _, err := c.nc.Write(b); err != nil {
				return
			}
		}
	}()
	return c.nc
}

// unalignedWrites writes n payloads of size bytes one after the other
// from off, which is not a multiple of 512, and reads the replies.
func unalignedWrites(t *testing.T, addr string, off uint64, size uint32, n int) {
	t.Helper()
	c := dialNBD(t, addr)
	payload := make([]byte, size)
	for i := range n {
		c.request(t, nbdCmdWrite, uint64(i), off+uint64(i)*uint64(size), size)
		if _, err := c.nc.Write(payload); err != nil {
			t.Fatal(err)
		}
		h := make([]byte, 16)
		if _, err := io.ReadFull(c.r, h); err != nil {
			t.Fatal(err)
		}
		if e := binenc.BigEndian.Uint32(h[4:]); e != 0 {
			t.Fatalf("unaligned write: error %d", e)
		}
	}
}

// stallWrite announces a WRITE of size bytes and sends half the payload,
// in the background: it blocks while the server waits for room to read
// it. The connection closes at the end of the test.
func stallWrite(t *testing.T, addr string, size uint32) net.Conn {
	t.Helper()
	c := dialNBD(t, addr)
	c.request(t, nbdCmdWrite, 1, 0, size)
	go c.nc.Write(make([]byte, size/2)) // ends with an error when the server drops it
	return c.nc
}

// waitDropped waits, for at most within, until the server has reset or
// closed nc, without reading from it (reading would let the server's
// blocked writes go on).
func waitDropped(t *testing.T, nc net.Conn, within time.Duration) {
	t.Helper()
	rc, err := nc.(*net.TCPConn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(within)
	var gone bool
	var perr error
	rc.Control(func(fd uintptr) {
		for !gone && perr == nil {
			ms := int(time.Until(deadline).Milliseconds())
			if ms <= 0 {
				return
			}
			fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLRDHUP}}
			n, err := unix.Poll(fds, ms)
			switch {
			case errors.Is(err, unix.EINTR):
			case err != nil:
				perr = err
			case n > 0:
				// POLLHUP and POLLERR (a reset) come unasked.
				gone = fds[0].Revents&(unix.POLLRDHUP|unix.POLLHUP|unix.POLLERR) != 0
			}
		}
	})
	if perr != nil {
		t.Fatal(perr)
	}
	if !gone {
		t.Fatalf("the server did not drop a stalled client within %v", within)
	}
}
