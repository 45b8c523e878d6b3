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
//   - A reply is written only after the device call returned, so a FLUSH
//     (a device Flush) covers every write acknowledged before it on any
//     connection to the same device: NBD_FLAG_CAN_MULTI_CONN is honest.
//   - Shutdown stops reading, lets every request in flight be answered,
//     then closes; flushing the devices is the owner's job. DropConnections
//     closes every connection at once without replies, as a power-cycled
//     disk would.
package nbd
