#!/bin/bash
# Runs every Fuzz target in the module for FUZZTIME each (default 10s).
# The checked-in corpus under each package's testdata/fuzz runs first.
#
# Go 1.26's fuzz coordinator can end a duration-bounded run with a bare
# "context deadline exceeded" when its deadline races a busy worker
# (go.dev/issue/75804, fixed in Go 1.27) — no input failed. Such a run,
# and only such a run (no "Failing input written"), is repeated once with
# an execution-count budget, which has no deadline to race.
#
# Minimizing a newly interesting input may take 60 s by default, and its
# executions are not counted: FuzzJournalBlock spent all but its first 3 s
# of a 10 s budget there (7k executions instead of 700k). 1 s is enough
# for the small inputs here.
set -uo pipefail
cd "$(dirname "$0")/.."
t="${FUZZTIME:-10s}"
min=(-fuzzminimizetime 1s)
status=0
for pkg in $(go list ./...); do
	dir=$(go list -f '{{.Dir}}' "$pkg")
	for f in $(grep -ho '^func Fuzz[A-Za-z0-9_]*' "$dir"/*_test.go 2>/dev/null | sed 's/^func //' | sort -u); do
		echo "fuzz $pkg $f ($t)"
		log=$(mktemp)
		if go test "$pkg" -run '^$' -fuzz "^$f\$" -fuzztime "$t" "${min[@]}" 2>&1 | tee "$log"; then
			rm -f "$log"
			continue
		fi
		if grep -q "context deadline exceeded" "$log" && ! grep -q "Failing input written" "$log"; then
			echo "fuzz $pkg $f: the Go 1.26 fuzztime deadline race, not a failing input; again with a count budget"
			go test "$pkg" -run '^$' -fuzz "^$f\$" -fuzztime 20000x "${min[@]}" || status=1
		else
			status=1
		fi
		rm -f "$log"
	done
done
exit $status
