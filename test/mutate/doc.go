// Command mutate is the mutation runner of the durable core (issue 23): it
// plants one bug at a time in the cache, writeback, btreeidx, storage and
// nbd packages and reports whether the tests notice.
//
//	go run ./test/mutate [-seeds 1,2,3] [-only id,id] [-list] [-check] [-min-score 90] [-md report.md]
//
// (make mutate runs it nice'd, with MUTATE_FLAGS.) -list prints the
// mutants, -check only checks that each applies, -md also writes the
// results as a Markdown table, -keep keeps the mutated files and the test
// logs.
//
// The mutants are data, in mutants.txt (see below). The tree is never
// modified: a mutant's file is written, mutated, to a work directory, and
// `go test -c -overlay overlay.json` builds the test binaries of the
// mutant's packages with it in place of the original. Each binary then
// runs, once per seed, with -test.run set to the mutant's test regexp and
// NBDCACHE_SEED set to the seed (test/testseed reads it in every package;
// the -seed flag is not passed, since packages that do not import testseed
// would refuse it). Building once per mutant and running the binary per
// seed is what `go test -overlay ... -count=1 -run RE PKGS` would do, less
// the relinking.
//
// # Verdicts
//
// A run is killed when a binary exits nonzero (a failed test, a panic, a
// test timeout: a hang is a bug the tests caught), and survived when every
// binary passes. A mutant is:
//
//   - killed: killed at every seed (only these count in the score);
//   - seed-dependent: killed at some seeds, not all;
//   - survived: killed at none;
//   - invalid: it does not build, or its test regexp matches no test of
//     its packages. An invalid mutant makes the run fail: the list has
//     rotted, or the mutant never tested anything.
//
// Before any mutant runs, a baseline runs the same tests on the tree as it
// is, at every seed: if they fail unmutated, every mutant would look
// killed, so the runner stops with the failing tests named.
//
// # The list
//
// mutants.txt is a sequence of blocks. A block starts with an "id:" line
// and holds "key: value" lines; lines starting with # are comments, blank
// lines are ignored:
//
//	id:      journal-commit-no-sync        unique: [a-z0-9-]+
//	file:    cache/journal.go              from the module root
//	kind:    sync                          one of the kinds in list.go
//	desc:    what the bug is, in words
//	run:     ^TestPowerCut$                -test.run of every package
//	pkgs:    ./cache                       space-separated
//	args:    -cuts 400                     optional extra test flags
//	timeout: 4m                            optional, per run (default -timeout)
//	orig:    if needSync && c.test.brk != breakNoSync {
//	repl:    if false && needSync && c.test.brk != breakNoSync {
//
// orig and repl are the exact text, as written after "orig: " (one
// space). A snippet of several lines, or one whose leading tabs matter, is
// written as lines that start with "|" after an empty "orig:" or "repl:";
// what follows the "|" is the line, verbatim:
//
//	orig:
//	|		c.mu.jstartSeq = h.JSeq
//	|		for _, b := range c.mu.pending[:npend] {
//
// orig must occur exactly once in the file: the runner refuses a mutant
// whose snippet is missing or ambiguous, before it runs anything, so the
// list cannot rot silently as the code changes. Arguments in args that
// go test knows (-short, -v, -timeout, ...) are passed to the binaries as
// -test.short and so on; others (-cuts) are the packages' own flags.
package main
