// Package storage defines Device, the one contract between the NBD server,
// the cache and every piece of storage, and holds its implementations:
//
//   - File: regular files and block devices, on golang.org/x/sys/unix;
//   - Mem: a sparse in-memory device (64 KiB chunks, one lock each);
//   - Crash: an in-memory device with a volatile cache that loses power on
//     demand (PowerCut), for crash tests;
//   - Faulty: a wrapper that injects errors;
//   - Slow: a wrapper that gives a device the latency of a hard disk;
//   - Delay: a wrapper that adds a fixed latency per kind of request;
//   - Volatile: a wrapper over a real device that keeps an undo log of
//     unsynced writes, so that a power cut can be played on it;
//   - DurableAcks: every write, trim and zero durable before it returns;
//   - Gate, Switch and NewDead: a power-on generation that can be shut
//     for good, a device that can be replaced while requests wait, and a
//     device on which everything fails (fault mode's plumbing).
//
// Invariants:
//   - A Device has a fixed size; every call is range-checked against it and
//     fails with ErrOutOfRange, touching nothing, when it does not fit.
//   - A write acknowledged without FUA is durable once a later Flush returns
//     nil; with FUA, when it returns.
//   - A wrapper that intercepts calls implements every method itself and
//     holds the wrapped device in a named field, never embedded, so that a
//     method added to Device cannot pass through a wrapper unnoticed.
//   - Errors are this package's sentinels, or syscall errnos wrapped with %w
//     so that errors.Is(err, unix.EIO) works; callers never match strings.
//
// # Crash
//
// A Crash device keeps a durable image, a visible image and the log of
// unsynced operations since the last Flush:
//
//	            WriteAt/Trim/Zero                Flush
//	caller ──────────────┬──────────▶ visible    (replays the log onto
//	                     └──append──▶ log ──────▶ durable, empties it)
//	                                  │
//	                      PowerCut    ▼
//	durable + (the log's ops the LossModel keeps, in log order) ─▶ new Crash
//
// A FUA operation is applied to the durable image at once if the log is
// empty, else logged as "forced" and replayed by every cut. The models work
// at 512-byte sector granularity (SectorSize): LoseUnsynced keeps nothing of
// the log, LoseRandom keeps each sector of each operation with probability
// 1/2, LoseTorn adds a torn last write and, sometimes, one garbage sector
// (see LoseTorn for the exact rule), KeepUnsynced keeps everything.
//
// PowerCutAll cuts several devices (a cache and its backing) at one
// instant: it takes every device's lock before it cuts any of them.
//
// Ordering: writes, trims, zeroes, flushes and PowerCut are serialized by one
// lock per device, so the log order is the order the visible image saw. An operation
// racing with PowerCut is either wholly in the log the cut replays or fails
// with ErrPoweredOff. The hook (SetHook) runs before an operation takes the
// lock, so it may call PowerCut.
//
// # File
//
// File issues pread/pwrite in loops (short transfers, EINTR) on a raw file
// descriptor that only Close closes, after the requests in flight have
// drained, so a descriptor is never closed or reused under a request. With
// O_DIRECT, a request whose buffer, offset or length is not aligned goes
// through an aligned bounce buffer (read-modify-write for partial blocks,
// serialized per block). FUA uses pwritev2(RWF_DSYNC) where the kernel takes
// it, else pwrite + fdatasync.
//
// A File can claim its device (FileOptions.Claim, claim.go): a flock on
// its open file description, and O_EXCL on a block device, taken before
// anything is read or written and held until Close. A refused claim
// fails with *InUseError, which names the holders as lsof would.
//
// Storage sits at the bottom: it imports nothing of this module.
package storage
