package main

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// smokeKilled are fast mutants of the list that the tests kill: the smoke
// test requires the runner to report them killed.
var smokeKilled = []string{"btree-cas-ignores-version", "btree-lookup-clip-loc", "plan-merges-nonadjacent"}

// TestMutationSmoke runs the runner on a few fast mutants that the tests
// kill and on a harmless one (testdata/control.txt) that must survive:
// the runner can report both verdicts, and the list entries still apply
// and still get killed. About half a minute; not with -short.
func TestMutationSmoke(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs mutants (about 30 s): not with -short")
	}
	goCmd, err := exec.LookPath("go")
	if err != nil {
		t.Fatal(err)
	}
	root, err := moduleRoot(goCmd)
	if err != nil {
		t.Fatal(err)
	}
	all, err := LoadList("mutants.txt")
	if err != nil {
		t.Fatal(err)
	}
	killed, err := Select(all, smokeKilled)
	if err != nil {
		t.Fatal(err)
	}
	control, err := LoadList(filepath.Join("testdata", "control.txt"))
	if err != nil {
		t.Fatal(err)
	}
	ms := append(slices.Clone(killed), control...)
	r := &Runner{Root: root, Work: t.TempDir(), Go: goCmd, Seeds: []uint64{1}, Timeout: 2 * time.Minute, Log: logWriter{t}}
	noTests, err := r.Baseline(t.Context(), ms)
	if err != nil {
		t.Fatal(err)
	}
	for m, why := range noTests {
		t.Errorf("%s: %s", m.ID, why)
	}
	var results []*Result
	for _, m := range ms {
		res, err := r.RunMutant(t.Context(), m)
		if err != nil {
			t.Fatal(err)
		}
		results = append(results, res)
		want := Killed
		if m.Kind == "control" {
			want = Survived
		}
		if res.Verdict != want {
			t.Errorf("%s: %s (%s), want %s", m.ID, res.Verdict, noteOf(res), want)
		}
	}
	var b strings.Builder
	WriteTable(&b, results, r.Seeds)
	t.Logf("\n%s", b.String())
	if s := Scored(results, r.Seeds); s.Valid != len(killed) || s.Killed != len(killed) {
		t.Errorf("score %v, want %d/%d (the control does not count)", s, len(killed), len(killed))
	}
}

type logWriter struct{ t *testing.T }

func (w logWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// TestListApplies: every mutant of the list still applies to the tree
// (its snippet occurs exactly once), so that code changes that move a
// mutant's target fail here, in every test run, not in the next full
// mutation run.
func TestListApplies(t *testing.T) {
	ms, err := LoadList("mutants.txt")
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) < 45 {
		t.Errorf("%d mutants, want at least 45", len(ms))
	}
	root := filepath.Join("..", "..")
	if err := CheckAll(root, ms); err != nil {
		t.Fatal(err)
	}
	for _, m := range ms {
		if m.Kind == "control" {
			t.Errorf("%s: control mutants belong in testdata/control.txt, not in the list that is scored", m.ID)
		}
	}
}

func TestParseList(t *testing.T) {
	const good = `# a comment
id: one
file: a/b.go
kind: sync
desc: something
run: ^TestX$
pkgs: ./a ./c
args: -short -cuts 3
timeout: 90s
orig: x := 1
repl: x := 2

id: two
file: a/b.go
kind: order
desc: two lines
run: ^TestY$
pkgs: ./a
orig:
|	if a {
|		b()
repl:
`
	ms, err := ParseList(strings.NewReader(good), "good")
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) != 2 {
		t.Fatalf("%d mutants, want 2", len(ms))
	}
	one, two := ms[0], ms[1]
	if one.Orig != "x := 1" || one.Repl != "x := 2" || !slices.Equal(one.Pkgs, []string{"./a", "./c"}) ||
		!slices.Equal(one.Args, []string{"-short", "-cuts", "3"}) || one.Timeout != 90*time.Second {
		t.Errorf("one: %+v", one)
	}
	if two.Orig != "\tif a {\n\t\tb()" || two.Repl != "" || two.Line != 13 {
		t.Errorf("two: orig %q repl %q line %d", two.Orig, two.Repl, two.Line)
	}

	for _, tc := range []struct{ name, list, want string }{
		{"missing field", "id: a\nfile: x.go\nkind: sync\ndesc: d\npkgs: ./x\norig: a\nrepl: b\n", "run: missing"},
		{"no repl", "id: a\nfile: x.go\nkind: sync\ndesc: d\nrun: X\npkgs: ./x\norig: a\n", "repl: missing"},
		{"same", "id: a\nfile: x.go\nkind: sync\ndesc: d\nrun: X\npkgs: ./x\norig: a\nrepl: a\n", "the same as orig"},
		{"bad kind", "id: a\nfile: x.go\nkind: typo\ndesc: d\nrun: X\npkgs: ./x\norig: a\nrepl: b\n", "kind \"typo\""},
		{"bad regexp", "id: a\nfile: x.go\nkind: sync\ndesc: d\nrun: (\npkgs: ./x\norig: a\nrepl: b\n", "run:"},
		{"pattern", "id: a\nfile: x.go\nkind: sync\ndesc: d\nrun: X\npkgs: ./...\norig: a\nrepl: b\n", "want one package"},
		{"duplicate id", "id: a\nfile: x.go\nkind: sync\ndesc: d\nrun: X\npkgs: ./x\norig: a\nrepl: b\nid: a\nfile: x.go\nkind: sync\ndesc: d\nrun: X\npkgs: ./x\norig: a\nrepl: b\n", "already used"},
		{"field twice", "id: a\nfile: x.go\nfile: y.go\n", "given twice"},
		{"stray snippet", "id: a\nfile: x.go\n|x\n", "| line outside"},
		{"unknown field", "id: a\nfoo: x\n", "unknown field"},
		{"before id", "file: x.go\n", "before the first id"},
	} {
		_, err := ParseList(strings.NewReader(tc.list), tc.name)
		if !errors.Is(err, ErrList) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want ErrList saying %q", tc.name, err, tc.want)
		}
	}
}

// TestApplyRefusesMissingOrAmbiguous: a snippet that is not in the file,
// or is there twice, is refused with ErrSnippet, before anything runs.
func TestApplyRefusesMissingOrAmbiguous(t *testing.T) {
	root := t.TempDir()
	if err := os.MkdirAll(filepath.Join(root, "p"), 0o755); err != nil {
		t.Fatal(err)
	}
	src := "package p\n\nfunc f() int { return 1 }\n\nfunc g() int { return 1 }\n\nfunc h() int { return 2 }\n"
	if err := os.WriteFile(filepath.Join(root, "p", "p.go"), []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	m := func(orig string) *Mutant { return &Mutant{ID: "m", File: "p/p.go", Orig: orig, Repl: "return 3"} }
	got, err := m("return 2").Apply(root)
	if err != nil || !strings.Contains(string(got), "func h() int { return 3 }") {
		t.Errorf("unique snippet: %v\n%s", err, got)
	}
	for _, orig := range []string{"return 4", "return 1"} {
		_, err := m(orig).Apply(root)
		if !errors.Is(err, ErrSnippet) {
			t.Errorf("orig %q: %v, want ErrSnippet", orig, err)
		}
	}
	if err := CheckAll(root, []*Mutant{m("return 2"), m("return 1")}); !errors.Is(err, ErrSnippet) {
		t.Errorf("CheckAll: %v, want ErrSnippet", err)
	}
}

func TestSplitRegexp(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want []string
	}{
		{"^TestA$", []string{"^TestA$"}},
		{"TestA/sub", []string{"TestA", "sub"}},
		{"^Test(A|B/c)$", []string{"^Test(A|B/c)$"}},
		{"Test[/]x/y", []string{"Test[/]x", "y"}},
		{`Test\/x`, []string{`Test\/x`}},
	} {
		if got := splitRegexp(tc.in); !slices.Equal(got, tc.want) {
			t.Errorf("splitRegexp(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

func TestBinaryArgs(t *testing.T) {
	got := binaryArgs([]string{"-short", "-cuts", "300", "--v", "-timeout=3m", "-seed=4"})
	want := []string{"-test.short", "-cuts", "300", "-test.v", "-test.timeout=3m", "-seed=4"}
	if !slices.Equal(got, want) {
		t.Errorf("binaryArgs = %q, want %q", got, want)
	}
}

func TestScore(t *testing.T) {
	seeds := []uint64{1, 2}
	mk := func(kind string, v Verdict, kills ...bool) *Result {
		r := &Result{M: &Mutant{ID: kind, Kind: kind}, Verdict: v}
		for i, k := range kills {
			r.Runs = append(r.Runs, SeedRun{Seed: seeds[i], Killed: k})
		}
		return r
	}
	rs := []*Result{
		mk("sync", Killed, true, true),
		mk("sync", SeedDependent, true, false),
		mk("sync", Survived, false, false),
		mk("sync", Invalid),
		mk("control", Survived, false, false),
	}
	s := Scored(rs, seeds)
	if s.Valid != 3 || s.Killed != 1 || s.SeedDependent != 1 || s.Survived != 1 || s.Invalid != 1 || !slices.Equal(s.PerSeed, []int{2, 1}) {
		t.Errorf("%+v", s)
	}
	if got, want := s.String(), "score 1/3 = 33.3% (all seeds); 1 seed-dependent, 1 survived, 1 invalid"; got != want {
		t.Errorf("%q, want %q", got, want)
	}
}
