// Package storage defines Device, the one contract between the NBD server,
// the cache and every piece of storage, and holds its implementations: File
// (regular files and block devices, on golang.org/x/sys), Mem, and the test
// and experiment wrappers (Crash, which drops unsynced writes on demand).
//
// Invariants:
//   - A Device has a fixed size; every call is range-checked against it and
//     fails with ErrOutOfRange, touching nothing, when it does not fit.
//   - A write acknowledged without FUA is durable once a later Flush returns
//     nil; with FUA, when it returns.
//   - A wrapper that intercepts calls implements every method itself and
//     holds the wrapped device in a named field, never embedded, so that a
//     method added to Device cannot pass through a wrapper unnoticed.
//
// Storage sits at the bottom: it imports nothing of this module.
package storage
