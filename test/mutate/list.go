package main

// list.go: the mutant list, parsed and checked against the tree.

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"time"
)

// Sentinel errors.
var (
	// ErrList is wrapped by every error about the list's syntax and
	// fields.
	ErrList = errors.New("mutate: bad mutant list")
	// ErrSnippet is wrapped when a mutant's orig snippet is missing from
	// its file, or occurs more than once there.
	ErrSnippet = errors.New("mutate: snippet not found exactly once")
)

// Mutant is one planted bug.
type Mutant struct {
	ID      string
	File    string // relative to the module root, slash-separated
	Kind    string
	Desc    string
	Run     string   // -test.run of every package
	Pkgs    []string // package patterns, relative to the module root ("./cache")
	Args    []string // extra test flags, as for go test
	Timeout time.Duration
	Orig    string
	Repl    string

	Line    int  // where its block starts in the list (for messages)
	hasRepl bool // repl: was given (an empty one deletes orig)
}

// kinds are the kinds of bug a mutant may be, as the report groups them.
var kinds = []string{
	"sync",        // a sync or flush skipped or made conditional
	"order",       // two durability steps swapped, or one not awaited
	"generation",  // bucket generation not bumped or not checked
	"epoch",       // bucket epoch not bumped or not rechecked
	"boundary",    // an off-by-one at an extent, bucket or ring boundary
	"frontier",    // the durable frontier overstated, or torn tail vs corruption
	"chain",       // the journal chain or sequence check weakened
	"checkpoint",  // checkpoint choice, slot or pending-bucket errors
	"fua",         // a FUA dropped
	"errno",       // an error mapped to the wrong NBD errno
	"concurrency", // promotion guard, direct-write registration, cleanGone settling
	"writeback",   // writeback planning, ordering and clean marking
	"btree",       // the extent index's boundaries and compare-and-swap
	"space",       // allocation, GC and eviction
	"fault",       // the handling of a failed device call
	"control",     // harmless on purpose: must survive
}

var idRE = regexp.MustCompile(`^[a-z0-9][a-z0-9-]*$`)

// ParseList reads a mutant list (see doc.go). name is used in messages.
func ParseList(r io.Reader, name string) ([]*Mutant, error) {
	var (
		ms   []*Mutant
		cur  *Mutant
		seen = map[string]bool{} // fields of cur
		snip *string             // the snippet "|" lines append to
		errs []error
	)
	bad := func(line int, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%w: %s:%d: %s", ErrList, name, line, fmt.Sprintf(format, args...)))
	}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for n := 1; sc.Scan(); n++ {
		line := sc.Text()
		if rest, ok := strings.CutPrefix(line, "|"); ok {
			switch {
			case snip == nil:
				bad(n, "a | line outside an empty orig: or repl:")
			case *snip == "":
				*snip = rest
			default:
				*snip += "\n" + rest
			}
			continue
		}
		snip = nil
		if strings.TrimSpace(line) == "" || strings.HasPrefix(line, "#") {
			continue
		}
		key, val, ok := strings.Cut(line, ":")
		if !ok || strings.ContainsAny(key, " \t") {
			bad(n, "want key: value, got %q", line)
			continue
		}
		val = strings.TrimPrefix(val, " ")
		if key == "id" {
			cur = &Mutant{ID: strings.TrimSpace(val), Line: n}
			ms = append(ms, cur)
			clear(seen)
		} else if cur == nil {
			bad(n, "%s: before the first id:", key)
			continue
		}
		if seen[key] {
			bad(n, "mutant %s: %s: given twice", cur.ID, key)
			continue
		}
		seen[key] = true
		switch key {
		case "id":
		case "file":
			cur.File = strings.TrimSpace(val)
		case "kind":
			cur.Kind = strings.TrimSpace(val)
		case "desc":
			cur.Desc = strings.TrimSpace(val)
		case "run":
			cur.Run = strings.TrimSpace(val)
		case "pkgs":
			cur.Pkgs = strings.Fields(val)
		case "args":
			cur.Args = strings.Fields(val)
		case "timeout":
			d, err := time.ParseDuration(strings.TrimSpace(val))
			if err != nil || d <= 0 {
				bad(n, "mutant %s: timeout %q", cur.ID, val)
			}
			cur.Timeout = d
		case "orig", "repl":
			p := &cur.Orig
			if key == "repl" {
				p = &cur.Repl
			}
			*p = val
			cur.hasRepl = cur.hasRepl || key == "repl"
			if val == "" {
				snip = p
			}
		default:
			bad(n, "mutant %s: unknown field %q", cur.ID, key)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("mutate: read %s: %w", name, err)
	}
	ids := map[string]int{}
	for _, m := range ms {
		for _, e := range m.check() {
			bad(m.Line, "mutant %s: %s", m.ID, e)
		}
		if first, dup := ids[m.ID]; dup {
			bad(m.Line, "mutant %s: id already used at line %d", m.ID, first)
		}
		ids[m.ID] = m.Line
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return ms, nil
}

// check reports what is missing or malformed in m's fields.
func (m *Mutant) check() []string {
	var p []string
	if !idRE.MatchString(m.ID) {
		p = append(p, "id must match "+idRE.String())
	}
	for _, f := range []struct{ name, v string }{{"file", m.File}, {"kind", m.Kind}, {"desc", m.Desc}, {"run", m.Run}, {"orig", m.Orig}} {
		if f.v == "" {
			p = append(p, f.name+": missing")
		}
	}
	if m.Kind != "" && !slices.Contains(kinds, m.Kind) {
		p = append(p, fmt.Sprintf("kind %q: not one of %s", m.Kind, strings.Join(kinds, ", ")))
	}
	if !m.hasRepl {
		p = append(p, "repl: missing (an empty repl: deletes orig)")
	}
	if len(m.Pkgs) == 0 {
		p = append(p, "pkgs: missing")
	}
	for _, pk := range m.Pkgs {
		if !strings.HasPrefix(pk, "./") || strings.Contains(pk, "...") {
			p = append(p, fmt.Sprintf("pkgs: %q: want one package, as ./dir", pk))
		}
	}
	if m.Run != "" {
		if _, err := regexp.Compile(m.Run); err != nil {
			p = append(p, fmt.Sprintf("run: %v", err))
		}
	}
	if m.Orig != "" && m.Orig == m.Repl {
		p = append(p, "repl: the same as orig")
	}
	if filepath.IsAbs(m.File) || strings.Contains(m.File, "..") {
		p = append(p, fmt.Sprintf("file %q: want a path inside the module", m.File))
	}
	return p
}

// LoadList parses the list in the file at path.
func LoadList(path string) ([]*Mutant, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("mutate: %w", err)
	}
	defer f.Close()
	return ParseList(f, path)
}

// Select returns the mutants named in ids, in the order of the list, or
// all of them when ids is empty. An unknown id is an error.
func Select(ms []*Mutant, ids []string) ([]*Mutant, error) {
	if len(ids) == 0 {
		return ms, nil
	}
	want := map[string]bool{}
	for _, id := range ids {
		want[id] = true
	}
	var out []*Mutant
	for _, m := range ms {
		if want[m.ID] {
			out = append(out, m)
			delete(want, m.ID)
		}
	}
	if len(want) > 0 {
		var unknown []string
		for id := range want {
			unknown = append(unknown, id)
		}
		slices.Sort(unknown)
		return nil, fmt.Errorf("%w: unknown mutant ids: %s", ErrList, strings.Join(unknown, ", "))
	}
	return out, nil
}

// Apply returns the contents of m's file under root with the mutation
// made. It fails, wrapping ErrSnippet, unless orig occurs exactly once.
func (m *Mutant) Apply(root string) ([]byte, error) {
	src, err := os.ReadFile(filepath.Join(root, filepath.FromSlash(m.File)))
	if err != nil {
		return nil, fmt.Errorf("mutate: mutant %s: %w", m.ID, err)
	}
	switch n := strings.Count(string(src), m.Orig); n {
	case 1:
	case 0:
		return nil, fmt.Errorf("%w: mutant %s (line %d): orig is not in %s (the code changed: update the mutant)\n%s",
			ErrSnippet, m.ID, m.Line, m.File, indent(m.Orig))
	default:
		return nil, fmt.Errorf("%w: mutant %s (line %d): orig occurs %d times in %s (make it longer, so that it names one place)\n%s",
			ErrSnippet, m.ID, m.Line, n, m.File, indent(m.Orig))
	}
	return []byte(strings.Replace(string(src), m.Orig, m.Repl, 1)), nil
}

// CheckAll applies every mutant in ms and returns the errors of those that
// do not apply.
func CheckAll(root string, ms []*Mutant) error {
	var errs []error
	for _, m := range ms {
		if _, err := m.Apply(root); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func indent(s string) string {
	return "\t| " + strings.ReplaceAll(s, "\n", "\n\t| ")
}
