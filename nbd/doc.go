// Package nbd is the NBD server: the fixed newstyle handshake
// (handshake.go), the transmission phase (conn.go) and the wire format
// (proto.go), serving storage.Device exports to any number of clients.
// Package kernel, below it, hands a served connection to the Linux nbd
// driver.
//
// # Invariants
//
//   - A garbled or stalled negotiation costs only its own connection: every
//     length a client sends is bounded before anything is allocated, and
//     the whole negotiation must finish within Config.HandshakeTimeout
//     (10 s by default, qemu's limit since CVE-2024-7409).
//   - Every request is judged in one place (conn.validate) before it
//     touches the device: a range outside the export, a bad flag, a write
//     to a read-only export or a payload over the maximum gets its errno,
//     leaves the device untouched, and the connection stays usable (a
//     refused write's payload is read and discarded, so the stream stays
//     in step). A stream that cannot be resynchronised (a bad magic) ends
//     the connection.
//   - Errors reach the wire through one mapping (errno.go) from the
//     storage sentinels and wrapped errnos; nothing matches error strings.
//   - Requests run concurrently, on workers that outlive one request (one
//     waits for the next job; a new one starts only when none is idle), and
//     replies leave in completion order, each whole under the reply lock.
//     Buffered replies reach the socket when the last request in flight
//     finishes, or from the flusher goroutine, which yields once first so
//     that replies completing together share one write.
//   - On a device that takes writes in batches (storage.BatchWriter), the
//     WRITEs of one socket read run to completion on the connection's
//     read loop instead: one device call for all of them, their replies
//     in one write (conn.runBatch). The batch runs before the loop waits
//     for anything (the socket, a buffer, a free slot) and before any
//     other request is dispatched, so a FLUSH read behind it covers it.
//     READs a storage.NoWaitReader serves from memory, whose replies fit
//     the reply buffer, are answered there too (conn.readInline). The
//     loop then writes replies itself (conn.settle), so a client that
//     does not read replies while it sends stalls its connection once
//     the socket buffers are full, where before it could send up to
//     MaxInFlight requests first; such a client is dropped at the write
//     timeout as before. Without a write timeout the loop writes no
//     reply of a request it ran (only error replies to invalid ones).
//   - A reply is written only after the device call returned, so a FLUSH
//     (a device Flush) covers every write acknowledged before it on any
//     connection to the same device: NBD_FLAG_CAN_MULTI_CONN is honest.
//   - Shutdown stops reading, lets every request in flight be answered,
//     then closes; flushing the devices is the owner's job. DropConnections
//     closes every connection at once without replies, as a power-cycled
//     disk would.
//
// # Resource limits
//
// What any mix of clients can make the server hold is bounded, each bound
// by one owner:
//
//   - Request buffers (READ data, WRITE payloads, BLOCK_STATUS replies)
//     come from the arena (arena.go): one anonymous mapping of
//     Config.BufferBudget bytes outside the Go heap, handed out by a buddy
//     allocator first come, first served. A connection holds at most a
//     quarter of it (conn.share, acquired before the arena), and the
//     advertised maximum block size fits that quarter, so every valid
//     request can get its buffer; a longer one is refused (EINVAL, or
//     EOVERFLOW with DF) before anything is allocated. A WRITE's buffer
//     is taken before its payload is read: a client that announces a
//     large WRITE and stalls holds it for at most Config.ReadTimeout.
//   - An eighth of the budget at most is cut into lanes: one block of up
//     to maxLane bytes for each allowed connection (conn.getBuf). A
//     request that fits a lane and cannot be served from the shared
//     arena at once takes its connection's lane instead of queueing, so
//     however many clients hold the shared budget, a connection's small
//     requests go on, one at a time.
//   - A connection has at most Config.MaxInFlight requests between header
//     and reply (conn.inflight); at the limit its read loop stops reading.
//   - A reply write that does not finish within Config.WriteTimeout
//     aborts the connection (a TCP reset): a client that stops reading
//     replies gets its buffers taken back in bounded time. Nothing else
//     waits on a client: an idle connection may wait for its next request
//     header forever, at the cost of its socket buffers.
//   - At most Config.MaxConnections connections are open, negotiating or
//     not; more are closed before the greeting, and a closing connection's
//     slot is free before its client sees the close. A negotiating
//     connection has 4 KiB socket buffers, a transmitting one 256 KiB.
//   - CACHE and WRITE_ZEROES device calls, which may allocate working
//     memory of their own, run at most maxScratchCalls at a time across
//     the server, in pieces of at most scratchChunk bytes, one piece at a
//     time per connection (conn.scratchCalls).
//   - Config.Allow is checked on accept, before the greeting.
//
// So the process's resident memory stays within its idle size, plus the
// budget, plus a per-connection constant (socket buffers, worker
// goroutines, the collector's slack): test/limits_test.go measures it on
// the built binary under hostile mixes and holds it to 2 MiB per allowed
// connection. Connections handed over with ServeNegotiated (the kernel)
// share the budget but have no deadlines and are never refused.
//
// # TLS
//
// With Config.TLS, NBD_OPT_STARTTLS upgrades the connection (handshake.go):
// the ACK, then the TLS handshake within the negotiation deadline, then a
// fresh reader and writer over TLS and a fresh session. Nothing read or
// negotiated in plaintext crosses over: buffered plaintext is dropped
// with the old reader, structured replies and meta contexts are
// forgotten. With Config.TLSRequired (FORCEDTLS) every option but
// STARTTLS and ABORT is refused with NBD_REP_ERR_TLS_REQD before TLS, and
// NBD_OPT_EXPORT_NAME ends the connection, so no export name, size or
// flag is sent in plaintext. A transmission ended by NBD_CMD_DISC ends
// its TLS session with close_notify.
package nbd
