# nbdcache: `make test` installs what the tests need, then runs them all.
GO ?= go
FUZZTIME ?= 10s
export PATH := /usr/bin:/bin:/usr/sbin:/sbin:$(PATH)

.PHONY: all build deps test race unit integration fuzz bench vet mutate docs clean

all: build

build:
	$(GO) build -buildvcs=auto -o nbdcache ./cmd/nbdcache

# Installs the Debian packages the tests use, if any is missing.
deps:
	./test/install-deps.sh

vet:
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo "gofmt needed"; exit 1; }
	$(GO) vet ./...

# Everything CI runs. A missing tool fails the run instead of skipping.
test: deps vet race
	NBDCACHE_REQUIRE_TOOLS=1 $(GO) test -count=1 -timeout 25m ./...
	FUZZTIME=$(FUZZTIME) ./test/fuzz.sh

# The cache's concurrency tests under the race detector (-short: fewer
# cuts and operations than the plain run).
RACE_TESTS = TestConcurrentModel$$|TestPowerCutConcurrent$$|TestConcurrent$$|TestDirectWriteWaitsForGapFill|TestPromotionAfterWritebackIsDropped|TestWriteBatchConcurrent$$
race:
	$(GO) test -race -count=1 -short -timeout 10m -run '$(RACE_TESTS)' ./cache

unit:
	$(GO) test -short ./...

fuzz:
	FUZZTIME=$(FUZZTIME) ./test/fuzz.sh

# Mutation testing of the durable core (test/mutate, issue 23): every
# mutant of test/mutate/mutants.txt, once per seed; about two hours on two
# cores, so not part of `make test` (which runs TestMutationSmoke, a few
# mutants). MUTATE_FLAGS: e.g. -only id1,id2, -min-score 85, -md out.md.
MUTATE_SEEDS ?= 1,2,3
mutate:
	nice -n 10 $(GO) run ./test/mutate -seeds $(MUTATE_SEEDS) $(MUTATE_FLAGS)

# The man pages (docs/man) and shell completions (contrib/completion),
# generated from the command tree; TestGeneratedDocs fails when they are
# stale.
docs:
	$(GO) test -count=1 -run '^TestGeneratedDocs$$' ./cmd/nbdcache -update

bench: build
	./bench/fio-vs-peers.sh

clean:
	rm -f nbdcache
