#!/bin/sh
# Runs every Fuzz target in the module for FUZZTIME each (default 10s).
# The checked-in corpus under each package's testdata/fuzz runs first.
set -eu
cd "$(dirname "$0")/.."
t="${FUZZTIME:-10s}"
for pkg in $(go list ./...); do
	dir=$(go list -f '{{.Dir}}' "$pkg")
	for f in $(grep -ho '^func Fuzz[A-Za-z0-9_]*' "$dir"/*_test.go 2>/dev/null | sed 's/^func //' | sort -u); do
		echo "fuzz $pkg $f ($t)"
		go test "$pkg" -run '^$' -fuzz "^$f\$" -fuzztime "$t"
	done
done
