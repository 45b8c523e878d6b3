// Command nbdcache serves a block device over NBD, optionally through a
// write-back SSD cache. Run `nbdcache help` for the subcommands.
package main

// main.go: the table of subcommands, main, and `nbdcache version`.

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

func commands() []command {
	return []command{
		{name: "serve", summary: "serve a device over NBD (with no storage flags: a demo in a temporary folder)", define: runServe,
			short: map[string]string{"backing": "b", "cache": "c", "listen": "l", "export": "e", "read-only": "r", "pid-file": "P", "config": "f"}},
		{name: "format", summary: "write a cache superblock binding a cache device to its backing", define: runFormat,
			short: map[string]string{"backing": "b", "cache": "c"}},
		{name: "check", summary: "verify a cache offline; exits 1 on any corruption, 3 if it belongs to another backing", define: runCheck,
			short: map[string]string{"backing": "b", "cache": "c"}},
		{name: "rebind", summary: "bind a cache to a backing you vouch for (a copy that lost its id, a disk renamed)", define: runRebind,
			short: map[string]string{"backing": "b", "cache": "c"}},
		{name: "stats", summary: "show a running server's counters (--control)", define: runStats,
			short: map[string]string{"control": "C", "json": "j", "watch": "w"}},
		{name: "flush", summary: "flush --drain: write back every dirty byte of a running server and sync the backing", define: runFlush,
			short: map[string]string{"control": "C", "drain": "d"}},
		{name: "mode", args: "MODE", summary: "switch a running server's cache mode (writeback, writethrough, writearound or none)", define: runMode,
			short: map[string]string{"control": "C"}},
		{name: "ctl", summary: "drive a `serve --faults` server: power-cut, error, delay, status", long: ctlLong, sub: ctlCommands(),
			shared: func(fs *flag.FlagSet) { controlFlag(fs) }, short: map[string]string{"control": "C"}},
		{name: "attach", summary: "attach the storage as /dev/nbdN through the kernel's nbd driver (root)", define: runAttach,
			short: map[string]string{"backing": "b", "cache": "c", "read-only": "r", "pid-file": "P", "config": "f"}},
		{name: "detach", args: "/dev/nbdN", summary: "disconnect /dev/nbdN; its attach process flushes and exits", define: runDetach},
		{name: "version", summary: "print the version", define: runVersion},
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

// run runs the command line args and returns the exit status.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	root := newRoot(ctx, stdout, stderr)
	args = normalize(root, args)
	cmd, err := groupCheck(root, args)
	if err == nil {
		root.SetArgs(args)
		cmd, err = root.ExecuteC()
	}
	code := exitStatus(err)
	if code != exitOK {
		fmt.Fprintf(stderr, "%s: %v\n", cmd.CommandPath(), err)
	}
	return code
}

// version, if set at build time with -ldflags "-X main.version=...",
// overrides the module version from the build information.
var version = ""

func runVersion(fs *flag.FlagSet) runner {
	return func(ctx context.Context, args []string, stdout, stderr io.Writer) error {
		fmt.Fprintln(stdout, versionString(debug.ReadBuildInfo()))
		return nil
	}
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
