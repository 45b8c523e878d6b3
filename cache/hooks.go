package cache

// hooks.go: the seams tests open the cache with (open; the tests' openHooked). Production
// code consults them where a test must break an ordering rule or watch an
// event; Open leaves them all zero, and nothing outside the package can
// set them.

// testHooks are a Cache's test seams.
type testHooks struct {
	// brk breaks one ordering rule on purpose (the harness self-tests).
	brk breakMode
	// maxExt, if > 0, caps the index below what a checkpoint slot holds
	// (tests reach the limit with few extents).
	maxExt int64
	// onDirectWait, if set, is called when a direct backing write finds
	// its range held and is about to wait (tests order races with it).
	onDirectWait func()
	// onMove, if set, is called with mu held just before GC moves
	// [off, off+n) to another bucket.
	onMove func(off, n int64)
	// trace, if set, is called with the index, journal and backing events
	// of the cache (see trace.go), under mu where they happen under it:
	// tests print the history of a sector that went wrong.
	trace func(off, n int64, msg string)
	// noBackground runs no goroutines: writeback, GC and checkpoints then
	// happen only when a caller needs them (space, journal room) or asks
	// (the tests' writebackStep, GCStep, Checkpoint, Drain).
	noBackground bool
	// twoSyncs: the alternative ordering, measured by BenchmarkFlush: sync
	// the data, then write the journal and sync again.
	twoSyncs bool
	// alwaysThrash: the cache thrashes whatever the detector says (the
	// power-cut test's thrashing variant runs the paths around it).
	alwaysThrash bool
	// neverSlower: the cache never counts as slower than its backing
	// (thrashDetector's cost rule off), for tests of GC and of the miss
	// rule on memory devices: there the cache's cost under a loaded
	// machine (CI runs packages side by side) comes and goes around the
	// backing's, and the cost rule has tests of its own.
	neverSlower bool
}

// breakMode selects an ordering bug for the harness self-test.
type breakMode int

const (
	breakNone       breakMode = iota
	breakNoSync               // commit writes the journal but never syncs the cache device
	breakNoDataCRC            // replay trusts records without checking their data
	breakSkipBFlush           // commit does not flush the backing before the journal
	// Concurrency bugs (issue 14), for the concurrent model test:
	breakNoPinRecheck // a direct backing write trusts the pin check made before it left mu
	breakNoPromoGuard // a promotion ignores backing writes that started after its read
	breakNoCleanGone  // a backing write does not wait for the removal of clean extents to be durable
	// a clean record of a writeback that collided does not count as
	// removing a clean extent (settleCleanGone ignores it)
	breakNoCollisionSettle
)
