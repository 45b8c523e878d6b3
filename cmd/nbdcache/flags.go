package main

// flags.go: the command line, on cobra and pflag. Each command registers
// its flags on a standard flag.FlagSet (define) and gets back the function
// that runs it; cobra parses them, GNU-style: flags before and after
// positional arguments, --name and --name=value, one-letter options where
// a command names them, "--" to end the flags. Before cobra, normalize
// turns -name into --name (as the standard flag package read it), and
// groupCheck reports a command line that names no command of a group. A
// mistyped flag or command gets one short error with the nearest name,
// not a page of usage.
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
	args    string // its positional arguments, for the usage line ("": none taken)
	summary string
	long    string
	// short gives flags a one-letter option as well.
	short map[string]string
	// define registers the command's flags and returns its runner; nil
	// for a group of commands (sub).
	define func(fs *flag.FlagSet) runner
	sub    []command
	// shared, for a group: flags every command of it defines itself,
	// also shown on the group so that they may come before a command's
	// name (and complete there).
	shared func(fs *flag.FlagSet)
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
	// What Execute would add, added now so that groupCheck knows them.
	root.InitDefaultHelpCmd()
	root.InitDefaultCompletionCmd()
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
		if c.shared != nil {
			fs := flag.NewFlagSet(c.name, flag.ContinueOnError)
			c.shared(fs)
			addFlags(cc.PersistentFlags(), fs, c.short)
		}
		for _, s := range c.sub {
			cc.AddCommand(s.cobra(ctx, stdout, stderr))
		}
		return cc
	}
	fs := flag.NewFlagSet("nbdcache "+c.name, flag.ContinueOnError)
	run := c.define(fs)
	addFlags(cc.Flags(), fs, c.short)
	cc.RunE = func(cmd *cobra.Command, args []string) error {
		if c.args == "" {
			if err := noArgs(args); err != nil {
				return err
			}
		}
		if cfg := fs.Lookup("config"); cfg != nil && cfg.Value.String() != "" {
			if err := applyConfig(fs, cfg.Value.String(), cmd.Flags().Changed); err != nil {
				return err
			}
		}
		return run(ctx, args, stdout, stderr)
	}
	return cc
}

// addFlags adds the flags of fs to pfs, with the one-letter options
// short names.
func addFlags(pfs *pflag.FlagSet, fs *flag.FlagSet, short map[string]string) {
	fs.VisitAll(func(f *flag.Flag) {
		pf := pflag.PFlagFromGoFlag(f)
		if s := short[f.Name]; s != "" {
			pf.Shorthand = s
		}
		if pf.DefValue == "0s" {
			pf.DefValue = "0" // so that help, as for other zeroes, shows no default
		}
		pfs.AddFlag(pf)
	})
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

// normalize prepares args for cobra, for the command they name:
//
//   - -name and -name=value become --name and --name=value, as the
//     standard flag package took both: scripts written for it keep
//     working, and a mistyped -nmae gets "unknown flag --nmae; did you
//     mean --name?" rather than being read as one-letter options
//     (nbdcache has no bundled ones: -rb is no -r -b);
//   - -V becomes --version;
//   - a flag's value is never touched, however it looks: the walk knows
//     which flags take one.
func normalize(root *cobra.Command, args []string) []string {
	out := slices.Clone(args)
	if len(out) > 0 && out[0] == "-V" {
		out[0] = "--version"
	}
	cmd, _, err := root.Find(out)
	if err != nil || cmd == nil {
		cmd = root
	}
	cmd.InitDefaultHelpFlag()
	root.InitDefaultVersionFlag()
	takesValue := func(name string) bool { f := flagOf(cmd, name); return f != nil && f.NoOptDefVal == "" }
	for i := 0; i < len(out); i++ {
		a := out[i]
		switch {
		case a == "--":
			return out
		case strings.HasPrefix(a, "--"):
			if name, _, hasValue := strings.Cut(a[2:], "="); !hasValue && takesValue(name) {
				i++
			}
		case len(a) > 2 && a[0] == '-' && a[2] != '=' && isLetter(a[1]):
			out[i] = "-" + a
			if name, _, hasValue := strings.Cut(a[1:], "="); !hasValue && takesValue(name) {
				i++
			}
		case len(a) == 2 && a[0] == '-' && isLetter(a[1]):
			if takesValue(a[1:]) {
				i++
			}
		}
	}
	return out
}

// flagOf looks name up, long or one-letter, among the flags cmd takes: its
// own, those it inherits, and those it shares with its commands.
func flagOf(cmd *cobra.Command, name string) *pflag.Flag {
	for _, fs := range []*pflag.FlagSet{cmd.Flags(), cmd.InheritedFlags(), cmd.PersistentFlags()} {
		if f := fs.Lookup(name); f != nil {
			return f
		}
		if len(name) == 1 {
			if f := fs.ShorthandLookup(name); f != nil {
				return f
			}
		}
	}
	return nil
}

func isLetter(b byte) bool { return 'a' <= b && b <= 'z' || 'A' <= b && b <= 'Z' }

// groupCheck finds, before cobra runs, a command line that names a group
// (the root, ctl) but none of its commands: a mistyped command, perhaps
// with flags after it, or ctl with flags alone. cobra would parse those
// flags against the group and report them instead.
func groupCheck(root *cobra.Command, args []string) (*cobra.Command, error) {
	if len(args) > 0 && (args[0] == cobra.ShellCompRequestCmd || args[0] == cobra.ShellCompNoDescRequestCmd) {
		return root, nil // completion asks about partial command lines
	}
	cmd, rest, err := root.Find(args)
	if err != nil || cmd == nil || !cmd.HasSubCommands() {
		return root, nil
	}
	help := false
	for i := 0; i < len(rest); i++ {
		a := rest[i]
		switch {
		case a == "--":
			return cmd, fmt.Errorf("%w: %q ends the flags; the command comes before it (%s -h lists them)", errUsage, a, cmd.CommandPath())
		case a == "-h" || a == "--help" || a == "--version" || a == "-v":
			help = true
		case strings.HasPrefix(a, "-") && !strings.Contains(a, "="):
			// A flag: a known one takes its value, if it has one; an
			// unknown one is taken to have one, as cobra does.
			if f := flagOf(cmd, strings.TrimLeft(a, "-")); f == nil || f.NoOptDefVal == "" {
				i++
			}
		default:
			return cmd, groupRunE(cmd, rest[i:])
		}
	}
	if help || cmd == root && len(rest) == 0 {
		return cmd, nil // cobra: help, the version, or the root's usage error
	}
	return cmd, groupRunE(cmd, nil)
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
