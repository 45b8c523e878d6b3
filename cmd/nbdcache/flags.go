package main

// Command-line parsing on the standard flag package, with what users of
// GNU-style tools expect: flags before and after positional arguments,
// help that spells flags --name, a short error with a suggestion for a
// mistyped flag or command instead of a page of usage.

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"slices"
	"strings"

	"github.com/BurntSushi/toml"
)

// newFlagSet returns a flag set that reports errors instead of exiting.
// -h prints "usage: nbdcache NAME [flags]" and the flags.
func newFlagSet(name string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("nbdcache "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: nbdcache %s [flags]\n\nflags:\n", name)
		printFlags(stderr, fs)
	}
	return fs
}

// parseFlags parses args, flags anywhere among them, and rejects
// positional arguments.
func parseFlags(fs *flag.FlagSet, args []string) error {
	pos, err := parseArgs(fs, args, true)
	if err != nil {
		return err
	}
	if len(pos) > 0 {
		return fmt.Errorf("%w: unexpected argument %q", errUsage, pos[0])
	}
	return nil
}

// parseArgs parses the flags in args and returns the positional
// arguments. With interspersed, flags may follow positional arguments
// (`mode writethrough --control unix:PATH`); without, parsing stops at
// the first (a command's own subcommand follows). After "--" everything
// is positional. A flag that fs does not define is reported with the
// nearest one that it does; only -h prints the whole usage.
func parseArgs(fs *flag.FlagSet, args []string, interspersed bool) ([]string, error) {
	if err := checkFlagNames(fs, args, interspersed); err != nil {
		return nil, err
	}
	// The flag package prints a parse error, and the whole usage, itself:
	// silence it, and report the error once.
	usage, out := fs.Usage, fs.Output()
	fs.Usage = func() {}
	fs.SetOutput(io.Discard)
	defer func() { fs.Usage = usage; fs.SetOutput(out) }()
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				usage()
				return nil, err
			}
			return nil, fmt.Errorf("%w: %v (nbdcache %s -h lists the flags)", errUsage, err, strings.TrimPrefix(fs.Name(), "nbdcache "))
		}
		rest := fs.Args()
		if consumed := len(args) - len(rest); !interspersed || len(rest) == 0 || (consumed > 0 && args[consumed-1] == "--") {
			if c := fs.Lookup("config"); c != nil && c.Value.String() != "" {
				if err := applyConfig(fs, c.Value.String()); err != nil {
					return nil, err
				}
			}
			return append(pos, rest...), nil
		}
		pos, args = append(pos, rest[0]), rest[1:]
	}
}

// checkFlagNames finds the first flag in args that fs does not define.
func checkFlagNames(fs *flag.FlagSet, args []string, interspersed bool) error {
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			return nil
		}
		if len(a) < 2 || a[0] != '-' {
			if !interspersed {
				return nil
			}
			continue
		}
		name, _, hasValue := strings.Cut(strings.TrimLeft(a, "-"), "=")
		if name == "h" || name == "help" {
			continue
		}
		f := fs.Lookup(name)
		if f == nil {
			var names []string
			fs.VisitAll(func(f *flag.Flag) { names = append(names, f.Name) })
			return fmt.Errorf("%w: unknown flag %s%s (nbdcache %s -h lists the flags)", errUsage, dashes(name),
				didYouMean(name, names, dashes), strings.TrimPrefix(fs.Name(), "nbdcache "))
		}
		if b, ok := f.Value.(interface{ IsBoolFlag() bool }); !hasValue && !(ok && b.IsBoolFlag()) {
			i++ // the flag's value
		}
	}
	return nil
}

func dashes(name string) string {
	if len(name) == 1 {
		return "-" + name
	}
	return "--" + name
}

// didYouMean returns "; did you mean X?" for the candidate nearest to s,
// if it is near enough to be a typo, or "".
func didYouMean(s string, candidates []string, show func(string) string) string {
	best, bestD := "", len(s)/3+2
	for _, c := range candidates {
		if d := editDistance(s, c); d < bestD || (d == bestD && best == "" && strings.HasPrefix(c, s)) {
			best, bestD = c, d
		}
	}
	if best == "" {
		return ""
	}
	return "; did you mean " + show(best) + "?"
}

// editDistance is the Levenshtein distance between a and b.
func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur := make([]int, len(b)+1)
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev = cur
	}
	return prev[len(b)]
}

// printFlags is flag.PrintDefaults with the flags spelled as they are
// used: --name (-x for a one-letter flag).
func printFlags(w io.Writer, fs *flag.FlagSet) {
	fs.VisitAll(func(f *flag.Flag) {
		arg, usage := flag.UnquoteUsage(f)
		line := "  " + dashes(f.Name)
		if arg != "" {
			line += " " + arg
		}
		line += "\n    \t" + strings.ReplaceAll(usage, "\n", "\n    \t")
		switch f.DefValue {
		case "", "0", "false", "0s", "[]":
		default:
			line += " (default " + f.DefValue + ")"
		}
		fmt.Fprintln(w, line)
	})
}

// configFlag registers --config on fs (serve and attach, the commands a
// service runs).
func configFlag(fs *flag.FlagSet) {
	fs.String("config", "", "read flags from the TOML `FILE`: keys are flag names (backing = \"disk.img\"), arrays repeat a flag; the command line wins")
}

// applyConfig sets, from the TOML file at path, every flag of fs that the
// command line did not set. Keys are flag names without dashes; a value is
// a string, number or boolean, or an array of them for a repeatable flag
// (listen = ["unix:/run/a.sock", "127.0.0.1:10809"]). A key that names no
// flag is an error, with the nearest flag name.
func applyConfig(fs *flag.FlagSet, path string) error {
	var m map[string]any
	if _, err := toml.DecodeFile(path, &m); err != nil {
		return fmt.Errorf("%w: --config: %v", errUsage, err)
	}
	onCommandLine := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { onCommandLine[f.Name] = true })
	var names []string
	fs.VisitAll(func(f *flag.Flag) { names = append(names, f.Name) })
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		if k == "config" || fs.Lookup(k) == nil {
			return fmt.Errorf("%w: --config %s: %q is no flag of nbdcache %s%s", errUsage, path, k,
				strings.TrimPrefix(fs.Name(), "nbdcache "), didYouMean(k, names, func(s string) string { return s }))
		}
		if onCommandLine[k] {
			continue
		}
		vals, ok := m[k].([]any)
		if !ok {
			vals = []any{m[k]}
		}
		for _, v := range vals {
			switch v.(type) {
			case string, int64, bool:
			case float64:
				v = fmt.Sprint(v) // 1.5: as written for a number with a fraction
			default:
				return fmt.Errorf("%w: --config %s: %s: a %T is no flag value (a string, number or boolean)", errUsage, path, k, v)
			}
			if err := fs.Set(k, fmt.Sprint(v)); err != nil {
				return fmt.Errorf("%w: --config %s: %s: %v", errUsage, path, k, err)
			}
		}
	}
	return nil
}
