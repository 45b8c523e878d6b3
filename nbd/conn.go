package nbd

// conn.go: conn, one client connection in transmission: reading requests,
// running them and writing replies.

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sync/semaphore"
	"golang.org/x/sys/unix"

	"github.com/nbdcache/nbdcache/storage"
)

// conn is one client connection.
//
// One goroutine (serve) reads requests and validates them; each valid
// request runs in a goroutine of its own, so replies leave in completion
// order. Those goroutines are workers that outlive their request: one
// idle waits on jobs for the next, and a new one starts only when none
// is idle. A fresh goroutine per request would grow its stack from 2 KiB
// on every request down the cache's write path (a tenth of the server's
// CPU in runtime.newstack, measured with fio randwrite through the
// cache). Replies are written under wmu into a buffered writer, which is
// flushed by whichever handler finishes last (inflight drops to zero), or
// else by the flusher goroutine, so that a burst of replies costs one
// write() and no reply waits behind a slow request. The exception is what
// needs no wait: small WRITEs to a storage.BatchWriter and small READs a
// storage.NoWaitReader serves from memory run on the read loop itself, a
// socket read's worth at a time (readLoop).
//
// What a connection may hold, and for how long:
//   - at most Config.MaxInFlight requests between header and reply
//     (inflight, slotFree): at the limit the read loop stops reading;
//   - buffers from the server's arena, at most connShare bytes of them
//     (share), each for one request: a WRITE's payload from before it is
//     read until the device call returns, a READ's data from before the
//     device call until its reply is written;
//   - a reply write lasts at most Config.WriteTimeout, a WRITE payload
//     arrives within Config.ReadTimeout of its header; when either runs
//     out the connection is aborted: the socket is closed, ctx ends, and
//     every buffer comes back as its request unwinds.
type conn struct {
	s       *Server
	nc      net.Conn      // the socket: deadlines, close; never replaced
	rw      io.ReadWriter // the data stream: nc, or tc once TLS is up
	tc      *tls.Conn     // nil until NBD_OPT_STARTTLS succeeded
	trusted bool          // handed over with ServeNegotiated (the kernel): no deadlines, never refused, no TLS
	ss      *session
	dev     storage.Device
	ro      bool

	ctx      context.Context // ends when the connection is aborted
	cancel   context.CancelFunc
	slotFree chan struct{}       // signalled when inflight drops below MaxInFlight
	share    *semaphore.Weighted // this connection's part of the buffer budget
	lane     chan struct{}       // full while a request holds this connection's lane (getBuf)
	scratch  chan struct{}       // full while a request holds a scratch slot (scratchCalls)

	// payloadDeadline is the read deadline readPayload armed, or zero;
	// idleArmed says the read deadline is readHeader's idle one, armed
	// when reqs requests had been read (idleReqs). Only the read loop
	// touches them.
	payloadDeadline time.Time
	idleArmed       bool
	reqs, idleReqs  uint64
	idleOutq        int // the send queue's bytes when the idle deadline last ran out, or 0

	stopping atomic.Bool
	inflight atomic.Int64
	handlers sync.WaitGroup
	jobs     chan job // to an idle worker; closed when reading ends
	kick     chan struct{}

	// batcher is dev as a storage.BatchWriter, or nil; nowait as a
	// storage.NoWaitReader, nowaitFlush as a storage.NoWaitFlusher, or
	// nil. batch holds the valid WRITEs the read
	// loop has read but not run yet, bws their device calls (runBatch);
	// unflushed counts the replies the read loop wrote and has not
	// flushed yet (they still count in inflight). borrows: batched
	// payloads may stay in the read buffer (borrow), unless the device
	// wants buffers aligned in memory (O_DIRECT), which the read buffer's
	// never are (a 28-byte header before each). Only the read loop
	// touches them.
	batcher     storage.BatchWriter
	borrows     bool
	nowait      storage.NoWaitReader
	nowaitFlush storage.NoWaitFlusher
	batch       []job
	bws         []storage.BatchWrite
	unflushed   int

	wmu           sync.Mutex
	w             *bufio.Writer
	writeDeadline time.Time // the write deadline deadlineWriter set
	werr          error     // sticky: the first write error, after which replies are dropped
	hdr           []byte
}

// Errors that end a connection whose client stalls.
var (
	errWriteTimeout = errors.New("nbd: the client read no replies within the write timeout")
	errReadTimeout  = errors.New("nbd: the client's payload did not arrive within the read timeout")
)

func newConn(s *Server, nc net.Conn, ss *session) *conn {
	c := &conn{s: s, nc: nc, rw: nc, ss: ss, trusted: ss != nil}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	return c
}

// stopReading makes serve stop after the request it is reading, if any.
func (c *conn) stopReading() {
	c.stopping.Store(true)
	c.nc.SetReadDeadline(time.Now())
}

// abort tears the connection down at once: the socket is closed, so that
// reads and writes fail, and ctx ends, so that requests waiting for
// buffers give up. Requests in flight still finish their device calls.
func (c *conn) abort() {
	c.cancel()
	c.nc.Close()
}

// drop aborts a connection whose client stalled. The close resets the
// TCP connection rather than leaving the kernel to deliver the replies
// still queued to a client that reads nothing (an orphaned socket would
// hold them for minutes).
func (c *conn) drop() {
	if tc, ok := c.nc.(*net.TCPConn); ok {
		tc.SetLinger(0)
	}
	c.abort()
}

// serve runs the connection to its end; the caller closes it (abort).
func (c *conn) serve() {
	var r *bufio.Reader
	if c.ss == nil {
		r = bufio.NewReaderSize(c.nc, negotiateBufSize)
		c.w = bufio.NewWriterSize(c.nc, negotiateBufSize)
		c.nc.SetDeadline(time.Now().Add(c.s.handshakeTimeout))
		ss, nr, err := c.negotiate(r)
		if err != nil {
			if !errors.Is(err, io.EOF) && !errors.Is(err, errAbort) {
				c.s.log.Info("negotiation failed", "remote", remote(c.nc), "err", err)
			}
			return
		}
		c.nc.SetDeadline(time.Time{})
		c.ss = ss
		c.s.log.Info("connection opened", "remote", remote(c.nc), "export", ss.export.Name,
			"tls", c.tc != nil, "structured_replies", ss.structured, "block_status", ss.meta)
		// Requests the client sent right behind NBD_OPT_GO may sit in
		// the small buffer: the transmission reader starts with them.
		in := io.Reader(c.rw)
		if n := nr.Buffered(); n > 0 {
			early, _ := nr.Peek(n)
			in = io.MultiReader(bytes.NewReader(bytes.Clone(early)), c.rw)
		}
		r = bufio.NewReaderSize(in, ioBufSize)
	} else {
		r = bufio.NewReaderSize(c.nc, ioBufSize)
	}
	if c.stopping.Load() {
		c.s.log.Info("connection closed", "remote", remote(c.nc)) // every "opened" gets its "closed"
		return
	}
	c.w = bufio.NewWriterSize(deadlineWriter{c}, ioBufSize)
	c.slotFree = make(chan struct{}, 1)
	c.share = semaphore.NewWeighted(c.s.connShare)
	c.lane = make(chan struct{}, 1)
	c.scratch = make(chan struct{}, 1)
	c.dev, c.ro = c.ss.export.Device, c.ss.export.ReadOnly
	if c.trusted || c.s.writeTimeout > 0 {
		// The read loop writes replies only where a reply write is
		// bounded in time (the kernel always reads them): otherwise a
		// client that reads none would stop it for good, idle check
		// and all (TestIdleDropsStuckReaderWithoutWriteTimeout).
		c.batcher, _ = c.dev.(storage.BatchWriter)
		c.borrows = c.batcher != nil && !storage.WantsAligned(c.dev)
		c.nowait, _ = c.dev.(storage.NoWaitReader)
		c.nowaitFlush, _ = c.dev.(storage.NoWaitFlusher)
	}
	c.kick = make(chan struct{}, 1)
	flusherDone := make(chan struct{})
	go c.flusher(flusherDone)

	c.jobs = make(chan job)
	err := c.readLoop(r)
	switch {
	case errors.Is(err, errReadTimeout):
		c.s.stats.timedOut.Add(1)
		c.s.log.Warn("connection dropped: a WRITE payload stalled", "remote", remote(c.nc), "timeout", c.s.readTimeout)
		c.drop()
	case errors.Is(err, errIdle):
		c.s.stats.idle.Add(1)
		c.s.log.Warn("connection closed: idle", "remote", remote(c.nc), "timeout", c.s.idleTimeout)
		if c.inflight.Load() > 0 {
			c.drop() // replies it does not read: a Flush may be blocked on them
		}
	}
	c.handlers.Wait()
	close(c.jobs)
	close(c.kick)
	<-flusherDone
	c.wmu.Lock()
	if c.werr == nil {
		c.setWerr(c.w.Flush())
	}
	if c.werr == nil && err == nil && c.tc != nil {
		// NBD_CMD_DISC: end the TLS session properly (close_notify).
		c.tc.CloseWrite()
	}
	c.wmu.Unlock()
	switch {
	case err != nil && !errors.Is(err, io.EOF) && !errors.Is(err, errReadTimeout) && !errors.Is(err, errIdle) && !c.stopping.Load() && c.ctx.Err() == nil:
		c.s.log.Info("connection closed", "remote", remote(c.nc), "err", err)
	case !errors.Is(err, errReadTimeout) && !errors.Is(err, errIdle):
		c.s.log.Info("connection closed", "remote", remote(c.nc))
	}
}

// deadlineWriter is where replies go: every write must finish within the
// write timeout. As with payloads (readPayload), the deadline is moved
// only when less than 7/8 of the timeout is left, so a write has between
// 7/8 of the timeout and all of it, and a burst of writes costs one timer
// update, not one each. Writes happen under wmu, which guards
// writeDeadline.
type deadlineWriter struct{ c *conn }

func (d deadlineWriter) Write(p []byte) (int, error) {
	c := d.c
	if c.trusted || c.s.writeTimeout < 0 {
		return c.rw.Write(p)
	}
	if now := time.Now(); c.writeDeadline.Before(now.Add(c.s.writeTimeout - c.s.writeTimeout/8)) {
		c.writeDeadline = now.Add(c.s.writeTimeout)
		c.nc.SetWriteDeadline(c.writeDeadline)
	}
	n, err := c.rw.Write(p)
	if errors.Is(err, os.ErrDeadlineExceeded) {
		err = fmt.Errorf("%w (%v)", errWriteTimeout, c.s.writeTimeout)
	}
	return n, err
}

func remote(nc net.Conn) string {
	if a := nc.RemoteAddr(); a != nil {
		return a.String()
	}
	return ""
}

// readLoop reads and dispatches requests until DISC, EOF or an error
// that desynchronises the stream.
//
// Requests that need not wait run to completion on this goroutine, with
// no handoff, a socket read's worth at a time:
//   - on a device that takes writes in batches (storage.BatchWriter),
//     valid WRITEs of at most maxInline bytes gather in c.batch while the
//     next request is already whole in the read buffer, then run in one
//     device call (runBatch);
//   - a READ of at most maxInline bytes that the device can serve from
//     memory (storage.NoWaitReader) is answered at once (readInline).
//
// Their replies go out together in one write (settle) before this loop
// would wait for anything (a read from the socket, a buffer, a free slot),
// and a batch runs before any other request is dispatched, so a FLUSH
// read after the writes covers them, and nothing the batch holds is what
// the loop waits for.
//
// A batched WRITE whose payload is whole in r's buffer is not copied out
// of it (borrow): the batch runs before r reads from the socket again,
// which is the only time bufio moves or overwrites what it buffered. The
// loop reads on without running the batch only while the next request is
// whole in the buffer (nextBuffered), and runs it before any request that
// is not batched.
func (c *conn) readLoop(r *bufio.Reader) error {
	defer c.settle()
	var hb [requestHeaderSize]byte
	for {
		if c.pending() && !nextBuffered(r) {
			c.settle()
		}
		if err := c.readHeader(r, hb[:]); err != nil {
			return err
		}
		req, err := parseRequest(hb[:])
		if err != nil {
			return err
		}
		c.s.stats.requests.Add(1)
		batchable := c.batcher != nil && req.typ == cmdWrite && req.length > 0 && req.length <= maxInline
		if !batchable {
			c.runBatch()
		}
		if req.typ == cmdDisc {
			return nil
		}
		// At the limit, stop reading until a reply has gone out. Only
		// this loop raises inflight, so the limit holds once it is
		// below it; a stale signal costs one more look.
		for c.inflight.Load() >= int64(c.s.maxInFlight) {
			if c.pending() {
				c.settle()
				continue
			}
			select {
			case <-c.slotFree:
			case <-c.ctx.Done():
				return c.ctx.Err()
			}
		}
		errno, msg := c.validate(req)
		var payload buffer
		if batchable && c.borrows && errno == 0 && r.Buffered() >= int(req.length) {
			payload = borrow(r, int(req.length))
		} else if req.typ == cmdWrite && req.length > 0 {
			if errno == 0 {
				ok := false
				if c.pending() {
					// The batch's buffers must not be what getBuf
					// waits for, nor the replies already written
					// wait for it.
					if payload, ok = c.tryGetBuf(int(req.length)); !ok {
						c.settle()
					}
				}
				if !ok {
					if payload, err = c.getBuf(int(req.length)); err != nil {
						return err
					}
				}
			}
			// A refused write's payload is read and dropped, to keep
			// the stream in step.
			if err := c.readPayload(r, int64(req.length), payload.data); err != nil {
				c.putBuf(payload)
				return err
			}
		}
		c.inflight.Add(1)
		if errno != 0 {
			c.s.stats.errors.Add(1)
			c.replyError(req, errno, msg)
			if obs := c.s.observer; obs != nil {
				obs.Request(cmdName(req.typ), 0, errnoName(errno))
			}
			continue
		}
		if batchable {
			c.batch = append(c.batch, job{req, payload})
			if len(c.batch)+c.unflushed >= maxBatch {
				c.settle()
			}
			continue
		}
		if (req.typ == cmdRead && req.length > 0 && req.length <= maxInline && c.nowait != nil && c.readInline(req)) ||
			(req.typ == cmdFlush && c.nowaitFlush != nil && c.flushInline(req)) {
			if c.unflushed >= maxBatch {
				c.settle()
			}
			continue
		}
		c.handlers.Add(1)
		j := job{req, payload}
		select {
		case c.jobs <- j:
		default:
			go c.worker(j)
		}
	}
}

// maxBatch bounds the requests the read loop runs before it sends their
// replies (readLoop).
const maxBatch = 64

// maxReplyOverhead bounds a READ reply's bytes besides its data: the
// chunk headers of a structured reply with maxHoleChunks holes.
const maxReplyOverhead = (2*maxHoleChunks + 1) * 32

// maxInline is the longest READ or WRITE the read loop runs itself. A
// longer one costs mostly its copies, which workers spread over the CPUs
// and next to which a handoff is small (1 MiB writes at QD8 through the
// cache ran at about 0.8x when the read loop ran them one by one).
const maxInline = 128 << 10

// nextBuffered reports whether the next request, with its payload if it is
// a WRITE, is whole in r's buffer, so that reading it does not wait.
func nextBuffered(r *bufio.Reader) bool {
	n := r.Buffered()
	if n < requestHeaderSize {
		return false
	}
	hb, _ := r.Peek(requestHeaderSize)
	req, err := parseRequest(hb)
	if err != nil || req.typ != cmdWrite {
		return true // reading it does not wait (a bad magic ends the connection)
	}
	return int64(n-requestHeaderSize) >= int64(req.length)
}

// borrow takes the next n bytes of r, all of them buffered, as a payload
// that stays in r's buffer: valid until r next reads from its source.
// putBuf ignores it.
func borrow(r *bufio.Reader, n int) buffer {
	p, _ := r.Peek(n)
	r.Discard(n)
	return buffer{data: p, borrowed: true}
}

// runBatch runs the WRITEs gathered in c.batch in one device call on this
// goroutine, then writes their replies under one hold of wmu; settle
// flushes them.
func (c *conn) runBatch() {
	if len(c.batch) == 0 {
		return
	}
	c.bws = c.bws[:0]
	for _, j := range c.batch {
		var fl storage.Flags
		if j.req.flags&cflagFUA != 0 {
			fl |= storage.FUA
		}
		c.bws = append(c.bws, storage.BatchWrite{P: j.payload.data, Off: int64(j.req.offset), Flags: fl})
	}
	obs := c.s.observer
	var start time.Time
	if obs != nil {
		start = time.Now()
	}
	c.batcher.WriteBatch(c.bws)
	var took time.Duration
	if obs != nil {
		took = time.Since(start)
	}
	st := &c.s.stats
	for i, j := range c.batch {
		c.putBuf(j.payload)
		c.bws[i].P = nil
		st.writes.Add(1)
		errno := uint32(0)
		if err := c.bws[i].Err; err != nil {
			st.errors.Add(1)
			errno = errnoFor(err, true)
		} else {
			st.bytesWritten.Add(int64(j.req.length))
		}
		if obs != nil {
			obs.Request(cmdName(cmdWrite), took, errnoName(errno))
		}
	}
	c.wmu.Lock()
	for i, j := range c.batch {
		if err := c.bws[i].Err; err != nil {
			c.appendError(j.req, errnoFor(err, true), err.Error())
		} else {
			c.appendOK(j.req)
		}
	}
	c.wmu.Unlock()
	c.unflushed += len(c.batch)
	clear(c.batch)
	c.batch = c.batch[:0]
}

// pending reports whether the read loop holds a batch or replies it has
// not flushed: what settle sends on its way.
func (c *conn) pending() bool { return len(c.batch) > 0 || c.unflushed > 0 }

// settle runs the batch and flushes the replies the read loop wrote.
func (c *conn) settle() {
	c.runBatch()
	if c.unflushed > 0 {
		c.wmu.Lock()
		c.doneN(c.unflushed)
		c.unflushed = 0
	}
}

// readInline answers req, a valid READ, on the read loop if the device can
// serve it from memory, a buffer is free at once and the reply fits in
// what the reply buffer has free (so that writing it does not wait for
// the client: it waits in the buffer for settle); otherwise it reports
// false, having done nothing seen outside, and req goes to a worker. The
// holes are looked up only once the data is in hand: on a cache whose
// range is not all cached, that lookup may ask the backing.
func (c *conn) readInline(req request) bool {
	c.wmu.Lock()
	room := c.w.Available()
	c.wmu.Unlock()
	if int(req.length)+maxReplyOverhead > room {
		return false
	}
	buf, ok := c.tryGetBuf(int(req.length))
	if !ok {
		return false
	}
	obs := c.s.observer
	var start time.Time
	if obs != nil {
		start = time.Now()
	}
	if !c.nowait.ReadNoWait(buf.data, int64(req.offset)) {
		c.putBuf(buf)
		return false
	}
	holes := c.holes(req)
	c.s.stats.reads.Add(1)
	c.s.stats.bytesRead.Add(int64(req.length))
	c.wmu.Lock()
	c.appendRead(req, buf.data, holes)
	c.wmu.Unlock()
	c.putBuf(buf)
	c.unflushed++
	if obs != nil {
		obs.Request(cmdName(cmdRead), time.Since(start), "")
	}
	return true
}

// flushInline answers req, a valid FLUSH, on the read loop if the device
// has nothing to make durable (every write acknowledged before it is, the
// batch's included: it ran first) and the reply fits in what the reply
// buffer has free; otherwise it reports false, having done nothing, and
// req goes to a worker.
func (c *conn) flushInline(req request) bool {
	c.wmu.Lock()
	room := c.w.Available()
	c.wmu.Unlock()
	if room < simpleReplySize || !c.nowaitFlush.FlushNoWait() {
		return false
	}
	c.s.stats.flushes.Add(1)
	c.wmu.Lock()
	c.appendOK(req)
	c.wmu.Unlock()
	c.unflushed++
	if obs := c.s.observer; obs != nil {
		obs.Request(cmdName(cmdFlush), 0, "")
	}
	return true
}

// readPayload reads a WRITE's n-byte payload into dst (or drops it, if dst
// is nil), within the read timeout.
//
// The deadline is armed lazily: once armed it stays, and is moved only
// when less than 7/8 of the timeout is left, so that a stream of WRITEs
// costs one timer update per eighth of the timeout rather than two per
// WRITE. readHeader disarms it when it catches the read loop waiting for
// the next request. So a payload has between 7/8 of the timeout and all
// of it; a payload already in the buffer needs none.
func (c *conn) readPayload(r *bufio.Reader, n int64, dst []byte) error {
	timed := !c.trusted && c.s.readTimeout > 0 && int64(r.Buffered()) < n
	if timed {
		now := time.Now()
		if c.payloadDeadline.Before(now.Add(c.s.readTimeout - c.s.readTimeout/8)) {
			c.payloadDeadline = now.Add(c.s.readTimeout)
			c.idleArmed = false
			c.nc.SetReadDeadline(c.payloadDeadline)
			if c.stopping.Load() {
				c.nc.SetReadDeadline(now) // keep stopReading's word
			}
		}
	} else if c.idleArmed && int64(r.Buffered()) < n {
		// No payload deadline: the idle one must not run out inside a
		// payload that is arriving (the client is not idle).
		c.idleArmed = false
		c.nc.SetReadDeadline(time.Time{})
		if c.stopping.Load() {
			c.nc.SetReadDeadline(time.Now()) // keep stopReading's word
		}
	}
	var err error
	if dst != nil {
		_, err = io.ReadFull(r, dst)
	} else {
		_, err = io.CopyN(io.Discard, r, n)
	}
	if err != nil && timed && errors.Is(err, os.ErrDeadlineExceeded) && !c.stopping.Load() {
		return fmt.Errorf("%w (%d bytes in %v)", errReadTimeout, n, c.s.readTimeout)
	}
	return err
}

// readHeader reads a request header into hb. Waiting for a request has no
// time limit but the idle timeout: a payload deadline still armed
// (readPayload) that runs out here is disarmed, and the read goes on
// where it stopped.
//
// With Config.IdleTimeout, a read that must wait arms the idle deadline,
// unless it is armed already: a stream of requests costs one timer update
// per timeout, not one per request. When it runs out, the connection is
// idle if no request was read since it was armed, none is in flight (a
// reply being written counts until it is flushed: done) and the socket's
// send queue is empty or made no progress since the last time; otherwise
// it is armed again. So an idle client is dropped after between one and
// two idle timeouts, once it has its replies.
func (c *conn) readHeader(r *bufio.Reader, hb []byte) error {
	idle := c.s.idleTimeout
	if c.trusted {
		idle = 0
	}
	got := 0
	for {
		if idle > 0 && !c.idleArmed && r.Buffered() < len(hb)-got {
			c.armIdle(idle)
		}
		n, err := io.ReadFull(r, hb[got:])
		got += n
		if err == nil || !errors.Is(err, os.ErrDeadlineExceeded) || c.stopping.Load() {
			if err == nil {
				c.reqs++
			}
			return err
		}
		if c.idleArmed && c.reqs == c.idleReqs {
			// Replies may still be on their way: a slow reader
			// drains the socket's send queue. Idle once nothing is in
			// flight and the queue is empty, or once the queue is
			// stuck for a whole timeout (the client reads nothing,
			// in flight or not: serve then drops it).
			q := unsentBytes(c.nc)
			if (q <= 0 && c.inflight.Load() == 0) || (q > 0 && q == c.idleOutq) {
				return errIdle
			}
			c.idleOutq = max(q, 0)
		} else {
			c.idleOutq = 0
		}
		c.idleArmed = false
		c.payloadDeadline = time.Time{}
		if idle > 0 {
			c.armIdle(idle)
			continue
		}
		c.nc.SetReadDeadline(time.Time{})
		if c.stopping.Load() {
			c.nc.SetReadDeadline(time.Now()) // stopReading's may just have been cleared
		}
	}
}

// armIdle sets the read deadline to the idle timeout from now.
func (c *conn) armIdle(idle time.Duration) {
	now := time.Now()
	c.idleArmed, c.idleReqs, c.payloadDeadline = true, c.reqs, time.Time{}
	c.nc.SetReadDeadline(now.Add(idle))
	if c.stopping.Load() {
		c.nc.SetReadDeadline(now) // keep stopReading's word
	}
}

// errIdle ends a connection that sent nothing for the idle timeout.
var errIdle = errors.New("nbd: connection idle")

// getBuf takes a buffer of n > 0 bytes from the server's budget, within
// this connection's share, waiting in line for both. It fails only when
// the connection is aborted.
//
// A request of at most laneSize bytes that cannot be served at once
// takes this connection's lane instead: one block of the lane arena,
// which has a block for every allowed connection, so it is there
// whenever this connection's previous lane request is done. Without it a
// small request would queue behind every request ahead in the arena: K
// connections that each pipeline a maximum-size READ and never read the
// replies hold the budget for a write timeout each, a few at a time, and
// a 4 KiB READ behind them would wait about K/4 write timeouts
// (TestLaneBeatsStalledReaders).
func (c *conn) getBuf(n int) (buffer, error) {
	cost := int64(blockSize(n))
	if n <= c.s.laneSize {
		if b, ok := c.tryGetBuf(n); ok {
			return b, nil
		}
		select {
		case c.lane <- struct{}{}:
		case <-c.ctx.Done():
			return buffer{}, c.ctx.Err()
		}
		if b, ok := c.s.lanes.tryGet(n); ok {
			b.lane = true
			return b, nil
		}
		// More connections than lanes (the kernel's are never
		// refused): wait in line like any request.
		<-c.lane
	}
	if err := c.share.Acquire(c.ctx, cost); err != nil {
		return buffer{}, err
	}
	b, err := c.s.bufs.get(c.ctx, n)
	if err != nil {
		c.share.Release(cost)
		return buffer{}, err
	}
	return b, nil
}

// tryGetBuf is getBuf that does not wait: within the share, from the
// shared arena, never a lane.
func (c *conn) tryGetBuf(n int) (buffer, bool) {
	cost := int64(blockSize(n))
	if !c.share.TryAcquire(cost) {
		return buffer{}, false
	}
	b, ok := c.s.bufs.tryGet(n)
	if !ok {
		c.share.Release(cost)
	}
	return b, ok
}

// putBuf gives back a buffer from getBuf (a zero buffer is ignored).
func (c *conn) putBuf(b buffer) {
	if b.data == nil || b.borrowed {
		return
	}
	if b.lane {
		c.s.lanes.put(b)
		<-c.lane
		return
	}
	c.s.bufs.put(b)
	c.share.Release(int64(pageSize) << b.order)
}

// job is one valid request for a worker.
type job struct {
	req     request
	payload buffer
}

// worker handles j, then every job it receives until jobs is closed.
func (c *conn) worker(j job) {
	for ok := true; ok; j, ok = <-c.jobs {
		if obs := c.s.observer; obs != nil {
			start := time.Now()
			errno := c.handle(j.req, j.payload)
			obs.Request(cmdName(j.req.typ), time.Since(start), errnoName(errno))
			continue
		}
		c.handle(j.req, j.payload)
	}
}

// validate checks a request against the export and the negotiated state.
// It is the one place where requests are judged; handlers trust it.
func (c *conn) validate(req request) (errno uint32, msg string) {
	allowed := uint16(cflagFUA)
	switch req.typ {
	case cmdRead:
		if c.ss.structured {
			allowed |= cflagDF
		}
	case cmdWrite, cmdTrim, cmdFlush, cmdCache:
	case cmdWriteZeroes:
		allowed |= cflagNoHole | cflagFastZero
	case cmdBlockStatus:
		if !c.ss.meta {
			return errInval, "BLOCK_STATUS without a negotiated meta context"
		}
		allowed |= cflagReqOne
	default:
		return errInval, fmt.Sprintf("unknown command %d", req.typ)
	}
	if req.flags&^allowed != 0 {
		return errInval, fmt.Sprintf("%s: invalid flags %#x", cmdName(req.typ), req.flags)
	}
	if (req.typ == cmdRead || req.typ == cmdWrite) && req.length > c.s.maxPayload {
		if req.flags&cflagDF != 0 {
			return errOverflow, "read too large to send unfragmented"
		}
		return errInval, fmt.Sprintf("%s of %d bytes exceeds the maximum payload %d", cmdName(req.typ), req.length, c.s.maxPayload)
	}
	write := req.typ == cmdWrite || req.typ == cmdTrim || req.typ == cmdWriteZeroes
	if write && c.ro {
		return errPerm, "the export is read-only"
	}
	if req.typ == cmdFlush {
		if req.offset != 0 || req.length != 0 {
			return errInval, "FLUSH with a nonzero offset or length"
		}
		return 0, ""
	}
	if req.typ == cmdTrim && !c.dev.Caps().Trim {
		return errNotSup, "TRIM was not offered"
	}
	size := uint64(c.dev.Size())
	if req.offset > size || uint64(req.length) > size-req.offset {
		if req.typ == cmdWrite || req.typ == cmdWriteZeroes {
			return errNoSpc, fmt.Sprintf("%s beyond the end of the export (%d)", cmdName(req.typ), size)
		}
		return errInval, fmt.Sprintf("%s beyond the end of the export (%d)", cmdName(req.typ), size)
	}
	if req.typ == cmdBlockStatus && req.length == 0 {
		return errInval, "BLOCK_STATUS of length 0"
	}
	return 0, ""
}

// handle runs one validated request and sends its reply.
// handle runs one request and sends its reply; it returns the reply's
// errno (0 for success).
func (c *conn) handle(req request, payload buffer) uint32 {
	defer c.handlers.Done()
	st := &c.s.stats
	off, n := int64(req.offset), int64(req.length)
	var fl storage.Flags
	if req.flags&cflagFUA != 0 {
		fl |= storage.FUA
	}
	var err error
	switch req.typ {
	case cmdRead:
		st.reads.Add(1)
		if n == 0 {
			c.replyRead(req, nil, nil)
			return 0
		}
		holes := c.holes(req)
		var buf buffer
		if buf, err = c.getBuf(int(n)); err != nil {
			break
		}
		if err = c.dev.ReadAt(buf.data, off); err == nil {
			st.bytesRead.Add(n)
			c.replyRead(req, buf.data, holes)
			c.putBuf(buf)
			return 0
		}
		c.putBuf(buf)
	case cmdWrite:
		st.writes.Add(1)
		if n > 0 {
			err = c.dev.WriteAt(payload.data, off, fl)
		}
		c.putBuf(payload)
		if err == nil {
			st.bytesWritten.Add(n)
		}
	case cmdFlush:
		st.flushes.Add(1)
		err = c.dev.Flush()
	case cmdTrim:
		st.trims.Add(1)
		if n > 0 {
			err = c.dev.Trim(off, n, fl)
		}
	case cmdWriteZeroes:
		st.zeroes.Add(1)
		if req.flags&cflagNoHole != 0 {
			fl |= storage.NoHole
		}
		if req.flags&cflagFastZero != 0 {
			fl |= storage.FastZero
		}
		err = c.scratchCalls(off, n, func(off, n int64) error { return c.zero(off, n, fl) })
	case cmdCache:
		if p, ok := c.dev.(storage.Prefetcher); ok {
			err = c.scratchCalls(off, n, p.Prefetch)
		}
	case cmdBlockStatus:
		st.blockStatuses.Add(1)
		var buf buffer
		if buf, err = c.getBuf(maxBlockStatusReply); err != nil {
			break
		}
		var desc []byte
		desc, err = c.blockStatus(req, buf.data[:0])
		if err == nil {
			c.replyBlockStatus(req, desc)
		}
		c.putBuf(buf)
		if err == nil {
			return 0
		}
	}
	if err != nil {
		st.errors.Add(1)
		errno := errnoFor(err, req.typ == cmdWrite || req.typ == cmdWriteZeroes)
		c.replyError(req, errno, err.Error())
		return errno
	}
	c.replyOK(req)
	return 0
}

// scratchCalls runs call over [off, off+n) in pieces of at most
// scratchChunk bytes, each in one of the server's scratch slots. The slots
// bound the device calls that may allocate working memory of their own,
// which the buffer budget cannot see: CACHE (the cache reads each bucket
// it warms into a fresh buffer) and WRITE_ZEROES (zeroes written a bucket
// at a time where a device cannot zero natively). A connection holds at
// most one slot at a time (c.scratch), and gives it up between pieces to
// whoever waits (a channel serves its waiters in order): so a connection
// that pipelines CACHE requests over the whole disk delays another's
// 4 KiB WRITE_ZEROES by about one piece per connection ahead of it, not
// by all its requests (TestScratchIsShared). It fails when the
// connection is aborted.
func (c *conn) scratchCalls(off, n int64, call func(off, n int64) error) error {
	for n > 0 {
		k := min(n, scratchChunk)
		select {
		case c.scratch <- struct{}{}:
		case <-c.ctx.Done():
			return c.ctx.Err()
		}
		var err error
		select {
		case c.s.scratch <- struct{}{}:
			err = call(off, k)
			<-c.s.scratch
		case <-c.ctx.Done():
			err = c.ctx.Err()
		}
		<-c.scratch
		if err != nil {
			return err
		}
		off, n = off+k, n-k
	}
	return nil
}

// zero runs WRITE_ZEROES, writing zeroes when the device cannot zero
// natively (unless the client asked for a fast zero only).
func (c *conn) zero(off, n int64, fl storage.Flags) error {
	err := c.dev.Zero(off, n, fl)
	if !errors.Is(err, storage.ErrNotSupported) || fl&storage.FastZero != 0 {
		return err
	}
	z := c.s.zeroes() // shared and never written: WriteAt does not modify p
	for n > 0 {
		k := min(n, int64(len(z)))
		if err := c.dev.WriteAt(z[:k], off, fl&storage.FUA); err != nil {
			return err
		}
		off, n = off+k, n-k
	}
	return nil
}

// maxDescriptors bounds one BLOCK_STATUS reply, so that its payload
// (maxBlockStatusReply bytes at most) comes from the buffer budget in one
// 32 KiB block. A client that wants more asks again from where the reply
// ended, as the spec expects.
const (
	maxDescriptors      = (32<<10 - 4) / 8
	maxBlockStatusReply = 4 + 8*maxDescriptors
)

// blockStatus appends the base:allocation descriptors for req to desc,
// which has room for maxBlockStatusReply bytes.
func (c *conn) blockStatus(req request, desc []byte) ([]byte, error) {
	off, n := int64(req.offset), int64(req.length)
	one := req.flags&cflagReqOne != 0
	desc = binary.BigEndian.AppendUint32(desc, metaContextID)
	ex, ok := c.dev.(storage.Extenter)
	if !ok {
		desc = binary.BigEndian.AppendUint32(desc, uint32(n))
		return binary.BigEndian.AppendUint32(desc, 0), nil
	}
	count := 0
	var lastFlags uint32
	err := ex.Extents(off, n, func(e storage.Extent) bool {
		var f uint32
		if e.Hole {
			f |= stateHole
		}
		if e.Zero {
			f |= stateZero
		}
		l := min(e.Length, n)
		if count > 0 && f == lastFlags {
			// Merge with the previous descriptor when the status is
			// the same and the length still fits.
			i := len(desc) - 8
			if prev := int64(binary.BigEndian.Uint32(desc[i:])); prev+l <= 0xffffffff {
				binary.BigEndian.PutUint32(desc[i:], uint32(prev+l))
				n -= l
				return n > 0
			}
		}
		desc = binary.BigEndian.AppendUint32(desc, uint32(l))
		desc = binary.BigEndian.AppendUint32(desc, f)
		lastFlags = f
		count++
		n -= l
		return n > 0 && !one && count < maxDescriptors
	})
	if err != nil {
		return nil, err
	}
	if count == 0 {
		desc = binary.BigEndian.AppendUint32(desc, uint32(n))
		desc = binary.BigEndian.AppendUint32(desc, 0)
	}
	return desc, nil
}

// Replies. Each takes wmu, appends to the buffered writer and then calls
// done, which decides when the buffer reaches the socket.

func (c *conn) replyOK(req request) {
	c.wmu.Lock()
	c.appendOK(req)
	c.done()
}

// appendOK writes req's reply of success; wmu is held.
func (c *conn) appendOK(req request) {
	c.hdr = appendSimpleReply(c.hdr[:0], 0, req.cookie)
	c.write(c.hdr)
}

func (c *conn) replyRead(req request, data []byte, holes []span) {
	c.wmu.Lock()
	c.appendRead(req, data, holes)
	c.done()
}

// appendRead writes req's reply with its data; wmu is held.
func (c *conn) appendRead(req request, data []byte, holes []span) {
	switch {
	case !c.ss.structured:
		c.hdr = appendSimpleReply(c.hdr[:0], 0, req.cookie)
		c.write(c.hdr)
		c.write(data)
	case len(data) == 0:
		c.hdr = appendStructHeader(c.hdr[:0], replyFlagDone, replyTypeNone, req.cookie, 0)
		c.write(c.hdr)
	default:
		// Data chunks between the holes, hole chunks for the holes;
		// the last chunk carries DONE.
		pos := int64(0)
		chunk := func(end int64, last bool) {
			if end > pos {
				c.dataChunk(req, data, pos, end, last)
				pos = end
			}
		}
		for i, h := range holes {
			chunk(h.off, false)
			flags := uint16(0)
			if i == len(holes)-1 && h.off+h.len == int64(len(data)) {
				flags = replyFlagDone
			}
			c.hdr = appendStructHeader(c.hdr[:0], flags, replyTypeOffsetHole, req.cookie, 12)
			c.hdr = binary.BigEndian.AppendUint64(c.hdr, req.offset+uint64(h.off))
			c.hdr = binary.BigEndian.AppendUint32(c.hdr, uint32(h.len))
			c.write(c.hdr)
			pos = h.off + h.len
		}
		chunk(int64(len(data)), true)
	}
}

func (c *conn) dataChunk(req request, data []byte, from, to int64, last bool) {
	flags := uint16(0)
	if last {
		flags = replyFlagDone
	}
	c.hdr = appendStructHeader(c.hdr[:0], flags, replyTypeOffsetData, req.cookie, uint32(8+to-from))
	c.hdr = binary.BigEndian.AppendUint64(c.hdr, req.offset+uint64(from))
	c.write(c.hdr)
	c.write(data[from:to])
}

// span is a range relative to a request's offset.
type span struct{ off, len int64 }

// minHoleRead is the smallest read for which holes are looked up: below
// it the lookup costs more than sending the zeroes.
const minHoleRead = 64 << 10

// maxHoleChunks bounds the chunks of one read reply.
const maxHoleChunks = 64

// holes lists the ranges of a structured read that read as zeroes, so that
// they go out as hole chunks (sparse copies with nbdcopy and qemu-img stay
// sparse and cheap). It is empty for small or DF reads and for devices
// that do not report extents.
func (c *conn) holes(req request) []span {
	ex, ok := c.dev.(storage.Extenter)
	if !ok || !c.ss.structured || req.flags&cflagDF != 0 || req.length < minHoleRead {
		return nil
	}
	var hs []span
	pos := int64(0)
	err := ex.Extents(int64(req.offset), int64(req.length), func(e storage.Extent) bool {
		l := min(e.Length, int64(req.length)-pos)
		if e.Zero && l >= 4096 {
			if n := len(hs); n > 0 && hs[n-1].off+hs[n-1].len == pos {
				hs[n-1].len += l
			} else {
				hs = append(hs, span{pos, l})
			}
		}
		pos += l
		return pos < int64(req.length) && len(hs) < maxHoleChunks
	})
	if err != nil {
		return nil
	}
	return hs
}

func (c *conn) replyBlockStatus(req request, desc []byte) {
	c.wmu.Lock()
	c.hdr = appendStructHeader(c.hdr[:0], replyFlagDone, replyTypeBlockStatus, req.cookie, uint32(len(desc)))
	c.write(c.hdr)
	c.write(desc)
	c.done()
}

func (c *conn) replyError(req request, errno uint32, msg string) {
	c.wmu.Lock()
	c.appendError(req, errno, msg)
	c.done()
}

// appendError writes req's error reply; wmu is held.
func (c *conn) appendError(req request, errno uint32, msg string) {
	if c.ss.structured {
		if len(msg) > maxStringLength {
			msg = msg[:maxStringLength]
		}
		c.hdr = appendStructHeader(c.hdr[:0], replyFlagDone, replyTypeError, req.cookie, uint32(6+len(msg)))
		c.hdr = binary.BigEndian.AppendUint32(c.hdr, errno)
		c.hdr = binary.BigEndian.AppendUint16(c.hdr, uint16(len(msg)))
		c.hdr = append(c.hdr, msg...)
	} else {
		c.hdr = appendSimpleReply(c.hdr[:0], errno, req.cookie)
	}
	c.write(c.hdr)
}

// write appends b to the reply stream; wmu is held.
func (c *conn) write(b []byte) {
	if c.werr == nil {
		_, err := c.w.Write(b)
		c.setWerr(err)
	}
}

// setWerr records the first write error; wmu is held. Once replies cannot
// be written the connection is aborted, so that it stops reading requests
// and gives its buffers back.
func (c *conn) setWerr(err error) {
	if err == nil || c.werr != nil {
		return
	}
	c.werr = err
	if errors.Is(err, errWriteTimeout) {
		c.s.stats.timedOut.Add(1)
		c.s.log.Warn("connection dropped: the client stopped reading replies", "remote", remote(c.nc), "timeout", c.s.writeTimeout)
		c.drop()
		return
	}
	c.abort()
}

// done finishes a reply: wmu is held on entry and released. The last
// request in flight flushes, before it stops counting (readHeader's idle
// check must not see a connection with no request in flight while a reply
// is still being written); otherwise the flusher is woken. Only the read
// loop raises inflight and only done, under wmu, lowers it, so a request
// that sees itself last is last or followed by a new one.
func (c *conn) done() {
	if c.inflight.Load() == 1 && c.werr == nil && c.w.Buffered() > 0 {
		c.setWerr(c.w.Flush())
	}
	n := c.inflight.Add(-1)
	if n == int64(c.s.maxInFlight)-1 {
		select { // wake the read loop if it waits at the limit
		case c.slotFree <- struct{}{}:
		default:
		}
	}
	c.wmu.Unlock()
	if n == 0 {
		return
	}
	select {
	case c.kick <- struct{}{}:
	default:
	}
}

// doneN finishes the k replies the read loop wrote (settle): wmu is held
// on entry and released. They go out now, in one write with whatever else
// is buffered, since the read loop is about to wait.
func (c *conn) doneN(k int) {
	if c.werr == nil && c.w.Buffered() > 0 {
		c.setWerr(c.w.Flush())
	}
	c.inflight.Add(-int64(k)) // the read loop, the only waiter on slotFree, is the caller
	c.wmu.Unlock()
}

// unsentBytes is the number of bytes in the socket's send queue (for TCP,
// sent but not acknowledged, or not sent yet; for a Unix socket, not yet
// read by the peer), or -1 if it cannot be known.
func unsentBytes(nc net.Conn) int {
	sc, ok := nc.(syscall.Conn)
	if !ok {
		return -1
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return -1
	}
	n := -1
	rc.Control(func(fd uintptr) {
		if q, err := unix.IoctlGetInt(int(fd), unix.SIOCOUTQ); err == nil {
			n = q
		}
	})
	return n
}

// flusher pushes buffered replies out while other requests are still in
// flight. It yields once before flushing so that replies completing at
// the same moment share the write.
func (c *conn) flusher(done chan<- struct{}) {
	defer close(done)
	for range c.kick {
		runtime.Gosched()
		c.wmu.Lock()
		if c.werr == nil && c.w.Buffered() > 0 {
			c.setWerr(c.w.Flush())
		}
		c.wmu.Unlock()
	}
}
