// Command nbdcache serves a block device over NBD, optionally through a
// write-back SSD cache. Run `nbdcache help` for the subcommands.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime/debug"
	"syscall"

	"github.com/nbdcache/nbdcache/cache"
	"github.com/nbdcache/nbdcache/storage"
)

// command is one subcommand.
type command struct {
	name    string
	summary string
	run     func(ctx context.Context, args []string, stdout, stderr io.Writer) error
}

func commands() []command {
	return []command{
		{"serve", "serve a device over NBD (with no storage flags: a demo in a temporary folder)", runServe},
		{"format", "write a cache superblock binding a cache device to its backing", runFormat},
		{"check", "verify a cache offline; exits 1 on any corruption, 3 if it belongs to another backing", runCheck},
		{"rebind", "bind a cache to a backing you vouch for (a copy that lost its id, a disk renamed)", runRebind},
		{"stats", "show a running server's counters (--control)", runStats},
		{"flush", "flush --drain: write back every dirty byte of a running server and sync the backing", runFlush},
		{"mode", "switch a running server's cache mode", runMode},
		{"ctl", "drive a `serve --faults` server: power-cut, error, delay, status", runCtl},
		{"attach", "attach the storage as /dev/nbdN through the kernel's nbd driver (root)", runAttach},
		{"detach", "disconnect /dev/nbdN; its attach process flushes and exits", runDetach},
		{"version", "print the version", runVersion},
	}
}

// errUsage marks an error caused by bad command-line input (exit status 2).
var errUsage = errors.New("usage")

// Exit statuses, a stable interface (README).
const (
	exitOK           = 0
	exitError        = 1 // any other failure; check: the cache is corrupt
	exitUsage        = 2 // bad command-line input
	exitWrongBacking = 3 // the cache belongs to another backing
	exitInUse        = 4 // another process holds the cache or the backing
	exitRefused      = 5 // it would destroy data it was not told to destroy
)

// exitStatus maps a command's error to its exit status.
func exitStatus(err error) int {
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
		return exitOK
	case errors.Is(err, errUsage):
		return exitUsage
	case errors.Is(err, errCheckFailed):
		return exitError
	case errors.Is(err, cache.ErrWrongBacking):
		return exitWrongBacking
	case errors.Is(err, storage.ErrInUse):
		return exitInUse
	case errors.Is(err, errRefused):
		return exitRefused
	}
	if re := (*errRunExit)(nil); errors.As(err, &re) {
		return re.code // serve --run: the command's own status
	}
	return exitError
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	os.Exit(run(ctx, os.Args[1:], os.Stdout, os.Stderr))
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) > 0 && (args[0] == "--version" || args[0] == "-version" || args[0] == "-V") {
		args = []string{"version"}
	}
	if len(args) == 0 || args[0] == "help" || args[0] == "-h" || args[0] == "--help" {
		usage(stderr)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	for _, c := range commands() {
		if c.name == args[0] {
			err := c.run(ctx, args[1:], stdout, stderr)
			code := exitStatus(err)
			if code != exitOK {
				fmt.Fprintf(stderr, "nbdcache %s: %v\n", c.name, err)
			}
			return code
		}
	}
	var names []string
	for _, c := range commands() {
		names = append(names, c.name)
	}
	fmt.Fprintf(stderr, "nbdcache: unknown command %q%s (nbdcache help lists them)\n", args[0],
		didYouMean(args[0], names, func(s string) string { return s }))
	return 2
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "usage: nbdcache <command> [flags]\n\ncommands:")
	for _, c := range commands() {
		fmt.Fprintf(w, "  %-10s %s\n", c.name, c.summary)
	}
	fmt.Fprintln(w, "\nRun `nbdcache <command> -h` for a command's flags.")
}

// version, if set at build time with -ldflags "-X main.version=...",
// overrides the module version from the build information.
var version = ""

func runVersion(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fmt.Fprintln(stdout, versionString(debug.ReadBuildInfo()))
	return nil
}

// versionString is "nbdcache VERSION (REVISION[, modified], GO)": the
// module version (v1.2.3 when installed with go install ...@v1.2.3,
// "(devel)" in a checkout) and the VCS revision that `go build` stamps.
func versionString(bi *debug.BuildInfo, ok bool) string {
	v := version
	if !ok {
		if v == "" {
			v = "unknown"
		}
		return "nbdcache " + v
	}
	if v == "" {
		v = bi.Main.Version
	}
	var rev, modified string
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			rev = s.Value
		case "vcs.modified":
			if s.Value == "true" {
				modified = ", modified"
			}
		}
	}
	if rev == "" {
		rev = "no revision"
	} else if len(rev) > 12 {
		rev = rev[:12]
	}
	return fmt.Sprintf("nbdcache %s (%s%s, %s)", v, rev, modified, bi.GoVersion)
}
