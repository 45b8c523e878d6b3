// Package test holds the cross-package suites: the real nbdcache binary
// driven by the clients people use (nbdinfo, nbdsh, qemu-img, qemu-io,
// nbdcopy, fio), crash tests of the real process, and the kernel tests
// that run in the VM harness.
//
// Every test asserts on the bytes that landed. A missing tool skips the
// test with its name; with NBDCACHE_REQUIRE_TOOLS=1 (set by `make test`
// and so by CI) a missing tool fails instead, so that nothing is skipped
// silently.
package test
