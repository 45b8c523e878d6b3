package main

// report.go: the table and the score.

import (
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
)

// Score sums up results over seeds.
type Score struct {
	Valid, Killed, SeedDependent, Survived, Invalid int
	PerSeed                                         []int // kills at each seed, of Valid
	Seeds                                           []uint64
}

// Scored counts the results; control mutants (harmless on purpose) do
// not count.
func Scored(rs []*Result, seeds []uint64) Score {
	s := Score{PerSeed: make([]int, len(seeds)), Seeds: seeds}
	for _, r := range rs {
		if r.M.Kind == "control" {
			continue
		}
		switch r.Verdict {
		case Invalid:
			s.Invalid++
			continue
		case Killed:
			s.Killed++
		case SeedDependent:
			s.SeedDependent++
		case Survived:
			s.Survived++
		}
		s.Valid++
		for i, run := range r.Runs {
			if run.Killed {
				s.PerSeed[i]++
			}
		}
	}
	return s
}

// Percent is the share of valid mutants killed at every seed.
func (s Score) Percent() float64 {
	if s.Valid == 0 {
		return 0
	}
	return 100 * float64(s.Killed) / float64(s.Valid)
}

// String is the score line.
func (s Score) String() string {
	return fmt.Sprintf("score %d/%d = %.1f%% (all seeds); %d seed-dependent, %d survived, %d invalid",
		s.Killed, s.Valid, s.Percent(), s.SeedDependent, s.Survived, s.Invalid)
}

func runCell(run SeedRun) string {
	switch {
	case run.Timeout:
		return "timeout"
	case run.Killed:
		return "killed"
	}
	return "-"
}

// header is a table's header: first, a column per seed, then the verdict
// columns.
func header(seeds []uint64, first ...string) []string {
	hdr := first
	for _, s := range seeds {
		hdr = append(hdr, fmt.Sprintf("seed %d", s))
	}
	return append(hdr, "verdict", "time", "killed by / why")
}

// seedCells appends r's outcome at each seed to row.
func (r *Result) seedCells(row []string, seeds []uint64) []string {
	for i := range seeds {
		cell := ""
		if i < len(r.Runs) {
			cell = runCell(r.Runs[i])
		}
		row = append(row, cell)
	}
	return row
}

// note is what the last column says: the test that killed r, or why it
// is invalid.
func (r *Result) note() string {
	if r.Verdict == Invalid {
		return r.Why
	}
	return r.KilledBy()
}

// WriteTable writes the results as an aligned text table, then the score
// per seed and the score line.
func WriteTable(w io.Writer, rs []*Result, seeds []uint64) {
	tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
	fmt.Fprintln(tw, strings.Join(header(seeds, "id", "kind"), "\t"))
	for _, r := range rs {
		row := r.seedCells([]string{r.M.ID, r.M.Kind}, seeds)
		row = append(row, r.Verdict.String(), fmt.Sprintf("%.1fs", r.Elapsed.Seconds()), r.note())
		fmt.Fprintln(tw, strings.Join(row, "\t"))
	}
	tw.Flush()
	writeScore(w, Scored(rs, seeds))
}

func writeScore(w io.Writer, s Score) {
	fmt.Fprintln(w)
	for i, seed := range s.Seeds {
		fmt.Fprintf(w, "seed %d: %d/%d killed\n", seed, s.PerSeed[i], s.Valid)
	}
	fmt.Fprintln(w, s)
}

// WriteMarkdown writes the results as a Markdown table, for REPORT.md.
func WriteMarkdown(w io.Writer, rs []*Result, seeds []uint64) {
	hdr := header(seeds, "id", "kind", "file")
	fmt.Fprintf(w, "| %s |\n", strings.Join(hdr, " | "))
	fmt.Fprintf(w, "|%s\n", strings.Repeat(" --- |", len(hdr)))
	for _, r := range rs {
		row := r.seedCells([]string{"`" + r.M.ID + "`", r.M.Kind, r.M.File}, seeds)
		note := r.note()
		if note != "" {
			note = "`" + strings.ReplaceAll(note, "|", `\|`) + "`"
		}
		verdict := r.Verdict.String()
		if r.Verdict != Killed {
			verdict = "**" + verdict + "**"
		}
		row = append(row, verdict, fmt.Sprintf("%.0fs", r.Elapsed.Seconds()), note)
		fmt.Fprintf(w, "| %s |\n", strings.Join(row, " | "))
	}
	s := Scored(rs, seeds)
	fmt.Fprintln(w)
	for i, seed := range s.Seeds {
		fmt.Fprintf(w, "- seed %d: %d/%d killed\n", seed, s.PerSeed[i], s.Valid)
	}
	fmt.Fprintf(w, "- %s\n", s)
}

// WriteList writes the mutants, one a line, for -list.
func WriteList(w io.Writer, ms []*Mutant) {
	tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "id\tkind\tfile\tpkgs\trun\tdescription")
	for _, m := range ms {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", m.ID, m.Kind, m.File, strings.Join(m.Pkgs, " "), m.Run, m.Desc)
	}
	tw.Flush()
}
