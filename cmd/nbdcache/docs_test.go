package main

import (
	"bytes"
	"flag"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/spf13/cobra/doc"
)

var updateDocs = flag.Bool("update", false, "rewrite docs/man and contrib/completion from the command tree")

// manDate is the date the man pages carry: a fixed one, so that the
// generated pages depend on the command tree alone.
var manDate = time.Date(2026, 12, 6, 0, 0, 0, 0, time.UTC)

// generatedDocs renders the man pages and the completion scripts, by
// path relative to the repository root.
func generatedDocs(t *testing.T) map[string][]byte {
	t.Helper()
	root := newRoot(t.Context(), io.Discard, io.Discard)
	root.DisableAutoGenTag = true
	dir := t.TempDir()
	hdr := &doc.GenManHeader{Title: "NBDCACHE", Section: "1", Source: "nbdcache", Manual: "nbdcache manual", Date: &manDate}
	if err := doc.GenManTree(root, hdr, dir); err != nil {
		t.Fatal(err)
	}
	out := map[string][]byte{}
	pages, _ := filepath.Glob(filepath.Join(dir, "*.1"))
	for _, p := range pages {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		out[filepath.Join("docs/man", filepath.Base(p))] = b
	}
	for name, gen := range map[string]func(io.Writer) error{
		"nbdcache.bash": func(w io.Writer) error { return root.GenBashCompletionV2(w, true) },
		"_nbdcache":     root.GenZshCompletion,
		"nbdcache.fish": func(w io.Writer) error { return root.GenFishCompletion(w, true) },
	} {
		var b bytes.Buffer
		if err := gen(&b); err != nil {
			t.Fatal(err)
		}
		out[filepath.Join("contrib/completion", name)] = b.Bytes()
	}
	return out
}

// TestGeneratedDocs: the man pages (docs/man) and the completion scripts
// (contrib/completion) checked in are the ones the command tree makes.
// `make docs` (go test ./cmd/nbdcache -run TestGeneratedDocs -update)
// rewrites them.
func TestGeneratedDocs(t *testing.T) {
	want := generatedDocs(t)
	if len(want) < 15 {
		t.Fatalf("only %d files generated", len(want))
	}
	if *updateDocs {
		for _, d := range []string{"../../docs/man", "../../contrib/completion"} {
			old, _ := filepath.Glob(filepath.Join(d, "*"))
			for _, p := range old {
				os.Remove(p)
			}
			if err := os.MkdirAll(d, 0o755); err != nil {
				t.Fatal(err)
			}
		}
	}
	for rel, b := range want {
		path := filepath.Join("../..", rel)
		if *updateDocs {
			if err := os.WriteFile(path, b, 0o644); err != nil {
				t.Fatal(err)
			}
			continue
		}
		got, err := os.ReadFile(path)
		if err != nil || !bytes.Equal(got, b) {
			t.Errorf("%s is stale or missing (%v): run make docs", rel, err)
		}
	}
	if *updateDocs {
		return
	}
	for _, d := range []string{"../../docs/man", "../../contrib/completion"} {
		have, _ := filepath.Glob(filepath.Join(d, "*"))
		for _, p := range have {
			rel, _ := filepath.Rel("../..", p)
			if _, ok := want[rel]; !ok {
				t.Errorf("%s is no longer generated: run make docs", rel)
			}
		}
	}
}
