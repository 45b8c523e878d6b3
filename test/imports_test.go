package test

import (
	"go/build"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// allowedImports pins the project's import graph: for each package (its
// path in the module), the project packages its non-test files may import.
// Imports point downward; an edge that is not here fails
// TestForbiddenImports. Add one only after asking whether the code
// belongs where it is (pebble's TestForbiddenImports is the model).
var allowedImports = map[string][]string{
	"btreeidx":            {},
	"storage":             {},
	"unixsock":            {},
	"internal/testbytes":  {},
	"internal/testcert":   {},
	"internal/ratelog":    {},
	"internal/sdnotify":   {},
	"test/testseed":       {},
	"test/mutate":         {},
	"bench/plot":          {},
	"writeback":           {"btreeidx", "storage"},
	"cache":               {"btreeidx", "storage", "writeback"},
	"nbd":                 {"storage"},
	"nbd/kernel":          {},
	"probe":               {"storage"},
	"control":             {"cache", "nbd", "unixsock", "writeback"},
	"storage/storagetest": {"internal/testbytes", "storage", "test/testseed"},
	"cmd/nbdcache":        {"cache", "control", "faults", "internal/ratelog", "internal/sdnotify", "metrics", "nbd", "nbd/kernel", "probe", "storage", "unixsock", "writeback"},
	"faults":              {"cache", "control", "nbd", "storage"},
	"metrics":             {"cache", "nbd", "writeback"},
	"test":                {},
	"test/vm":             {},
	"test/vm/fsynctime":   {},
	"test/vm/drainfloor":  {"storage"},
}

const module = "github.com/nbdcache/nbdcache"

// TestForbiddenImports walks the module's packages and checks each one's
// project imports against allowedImports; a package missing from the map
// fails too, so that a new one gets its place in the graph.
func TestForbiddenImports(t *testing.T) {
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	err = filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() {
			return nil
		}
		if name := d.Name(); path != root && (strings.HasPrefix(name, ".") || name == "testdata" || name == "vendor") {
			return filepath.SkipDir
		}
		pkg, err := build.ImportDir(path, 0)
		if err != nil {
			if _, ok := err.(*build.NoGoError); ok {
				return nil
			}
			t.Errorf("%s: %v", path, err)
			return nil
		}
		rel, _ := filepath.Rel(root, path)
		rel = filepath.ToSlash(rel)
		seen[rel] = true
		allowed, ok := allowedImports[rel]
		if !ok {
			t.Errorf("package %s is not in allowedImports: give it its place in the graph", rel)
			return nil
		}
		for _, imp := range pkg.Imports {
			dep, ours := strings.CutPrefix(imp, module+"/")
			if ours && !slices.Contains(allowed, dep) {
				t.Errorf("%s imports %s: not an allowed edge (allowedImports)", rel, dep)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for p := range allowedImports {
		if !seen[p] {
			if _, err := os.Stat(filepath.Join(root, p)); err != nil {
				t.Errorf("allowedImports names %s, which is gone", p)
			}
		}
	}
}
