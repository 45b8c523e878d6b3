package main

// flags.go: the command line, on cobra and pflag. Each command registers
// its flags on a standard flag.FlagSet (define) and gets back the function
// that runs it; cobra parses them, GNU-style: flags before and after
// positional arguments, --name and --name=value, one-letter options where
// a command names them, "--" to end the flags. A mistyped flag or command
// gets one short error with the nearest name, not a page of usage.
//
// cobra rather than kong: its completion scripts (bash, zsh, fish) and man
// pages come with it (docs/man, contrib/completion), and the flag package
// values the commands already had (sizes, repeatable --listen) plug into
// pflag as they are.

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"runtime/debug"
	"slices"
	"strings"

	"github.com/BurntSushi/toml"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

// runner runs a command once its flags are parsed; args are its
// positional arguments.
type runner func(ctx context.Context, args []string, stdout, stderr io.Writer) error

// command is one subcommand.
type command struct {
	name    string
	args    string // its positional arguments, for the usage line
	summary string
	long    string
	// short gives flags a one-letter option as well.
	short map[string]string
	// define registers the command's flags and returns its runner; nil
	// for a group of commands (sub).
	define func(fs *flag.FlagSet) runner
	sub    []command
}

// noArgs is the check of a command that takes no positional argument.
func noArgs(args []string) error {
	if len(args) > 0 {
		return fmt.Errorf("%w: unexpected argument %q", errUsage, args[0])
	}
	return nil
}

// newRoot builds the command tree; the commands write to stdout and
// stderr and run under ctx.
func newRoot(ctx context.Context, stdout, stderr io.Writer) *cobra.Command {
	root := &cobra.Command{
		Use:           "nbdcache",
		Short:         "a write-back block cache served over NBD",
		Long:          "nbdcache serves a block device over NBD, optionally through a write-back cache on a fast device.\nWith no storage flags, `nbdcache serve` runs a demo in a temporary folder.",
		Version:       versionString(debug.ReadBuildInfo()),
		SilenceErrors: true,
		SilenceUsage:  true,
		Args:          cobra.ArbitraryArgs,
		RunE:          groupRunE,
	}
	root.SetVersionTemplate("{{.Version}}\n")
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.SetFlagErrorFunc(flagError)
	for _, c := range commands() {
		root.AddCommand(c.cobra(ctx, stdout, stderr))
	}
	return root
}

// cobra makes c a cobra command.
func (c command) cobra(ctx context.Context, stdout, stderr io.Writer) *cobra.Command {
	use := c.name
	if c.args != "" {
		use += " " + c.args
	}
	cc := &cobra.Command{Use: use, Short: c.summary, Long: c.long, SilenceErrors: true, SilenceUsage: true}
	if c.define == nil {
		cc.Args, cc.RunE = cobra.ArbitraryArgs, groupRunE
		for _, s := range c.sub {
			cc.AddCommand(s.cobra(ctx, stdout, stderr))
		}
		return cc
	}
	fs := flag.NewFlagSet("nbdcache "+c.name, flag.ContinueOnError)
	run := c.define(fs)
	fs.VisitAll(func(f *flag.Flag) {
		pf := pflag.PFlagFromGoFlag(f)
		if s := c.short[f.Name]; s != "" {
			pf.Shorthand = s
		}
		cc.Flags().AddFlag(pf)
	})
	cc.RunE = func(cmd *cobra.Command, args []string) error {
		if cfg := fs.Lookup("config"); cfg != nil && cfg.Value.String() != "" {
			if err := applyConfig(fs, cfg.Value.String(), cmd.Flags().Changed); err != nil {
				return err
			}
		}
		return run(ctx, args, stdout, stderr)
	}
	return cc
}

// groupRunE runs a group (the root, ctl) named without a known command.
func groupRunE(cmd *cobra.Command, args []string) error {
	if len(args) == 0 {
		return fmt.Errorf("%w: want a command (%s -h lists them)", errUsage, cmd.CommandPath())
	}
	var names []string
	for _, c := range cmd.Commands() {
		if c.IsAvailableCommand() {
			names = append(names, c.Name())
		}
	}
	return fmt.Errorf("%w: unknown command %q%s (%s -h lists them)", errUsage, args[0],
		didYouMean(args[0], names, func(s string) string { return s }), cmd.CommandPath())
}

// flagError makes a parse error a usage error, and names the nearest flag
// for an unknown one.
func flagError(cmd *cobra.Command, err error) error {
	hint := ""
	if ne := (*pflag.NotExistError)(nil); errors.As(err, &ne) && ne.GetSpecifiedName() != "" {
		var names []string
		cmd.Flags().VisitAll(func(f *pflag.Flag) { names = append(names, f.Name) })
		hint = didYouMean(ne.GetSpecifiedName(), names, dashes)
	}
	return fmt.Errorf("%w: %v%s (%s -h lists the flags)", errUsage, err, hint, cmd.CommandPath())
}

// longFlags rewrites -name to --name for every long flag of the commands,
// as the standard flag package took both: scripts written for earlier
// versions keep working. One-letter options are left alone.
func longFlags(root *cobra.Command, args []string) []string {
	long := map[string]bool{}
	var walk func(c *cobra.Command)
	walk = func(c *cobra.Command) {
		c.Flags().VisitAll(func(f *pflag.Flag) { long[f.Name] = len(f.Name) > 1 })
		for _, s := range c.Commands() {
			walk(s)
		}
	}
	walk(root)
	out := slices.Clone(args)
	for i, a := range out {
		if a == "--" {
			break
		}
		if name, _, _ := strings.Cut(strings.TrimPrefix(a, "-"), "="); len(a) > 2 && a[0] == '-' && a[1] != '-' && long[name] {
			out[i] = "-" + a
		}
	}
	return out
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

// configFlag registers --config on fs (serve and attach, the commands a
// service runs).
func configFlag(fs *flag.FlagSet) {
	fs.String("config", "", "read flags from the TOML `FILE`: keys are flag names (backing = \"disk.img\"), arrays repeat a flag; the command line wins")
}

// applyConfig sets, from the TOML file at path, every flag of fs that the
// command line did not set (onCommandLine). Keys are flag names without dashes; a value is
// a string, number or boolean, or an array of them for a repeatable flag
// (listen = ["unix:/run/a.sock", "127.0.0.1:10809"]). A key that names no
// flag is an error, with the nearest flag name.
func applyConfig(fs *flag.FlagSet, path string, onCommandLine func(name string) bool) error {
	var m map[string]any
	if _, err := toml.DecodeFile(path, &m); err != nil {
		return fmt.Errorf("%w: --config: %v", errUsage, err)
	}
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
		if onCommandLine(k) {
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
