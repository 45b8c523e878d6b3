package main

// rebind.go: `nbdcache rebind`: binding a cache to another backing.

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"

	"github.com/nbdcache/nbdcache/cache"
	"github.com/nbdcache/nbdcache/nbd"
)

// runRebind binds a cache to a backing the user vouches for: a copy of
// the backing that lost its id (cp drops extended attributes), or the
// same disk seen under a new identity. Only the superblock's backing id
// and path change; dirty data stays in the cache and is written back to
// the new backing once served.
func runRebind(fs *flag.FlagSet) runner {
	cachePath := fs.String("cache", "", "cache file or block device `PATH` (required)")
	backing := fs.String("backing", "", "the backing file, block device or NBD URI `PATH` to bind it to (required)")
	var ob offlineBacking
	ob.register(fs)
	force := fs.Bool("force", false, "rebind even a backing file that carries the id of another cache, which then refuses it")
	return func(ctx context.Context, args []string, stdout, stderr io.Writer) error {
		bdev, cdev, closeAll, err := ob.openPair(*cachePath, *backing, warnLogger(stderr))
		if err != nil {
			return err
		}
		defer closeAll()
		ident, err := cache.Identify(cdev)
		if errors.Is(err, cache.ErrNotFormatted) {
			msg := fmt.Sprintf("%s holds no cache to rebind", *cachePath)
			if _, err := cache.Identify(bdev); err == nil {
				msg += fmt.Sprintf(" (%s does: are --cache and --backing swapped?)", *backing)
			}
			return explain(err, "%s", msg)
		}
		if err != nil {
			return fmt.Errorf("reading the cache %s: %w", *cachePath, err)
		}
		if bdev.Size() != ident.BackingSize {
			return explain(cache.ErrWrongBacking, "refusing: the cache %s belongs to a backing of %d bytes (%s); %s has %d bytes, so it is not that backing",
				*cachePath, ident.BackingSize, backingName(ident), *backing, bdev.Size())
		}
		old, oldErr := backingID(*backing)
		switch {
		case oldErr == nil && old == ident.BackingID:
			if err := cache.Rebind(cdev, bdev, ident.BackingID, absPath(*backing)); err != nil {
				return err
			}
			fmt.Fprintf(stdout, "nbdcache: the cache %s already belongs to %s (id %x); recorded its path\n", *cachePath, *backing, old)
			return nil
		case oldErr == nil && !isBlockDevice(*backing) && !nbd.IsURI(*backing) && !*force: // a URI's id is its own: nothing records another
			return explain(errRefused, "refusing: %s carries backing id %x, not this cache's (%x): it is, or was, the backing of another cache (or of this one, before a rebind).\n"+
				"Rebinding gives it a new id, and any cache bound to the old one then refuses it (its dirty data, if any, stays in it). Pass --force to do so",
				*backing, old, ident.BackingID)
		case oldErr != nil && !errors.Is(oldErr, errNoBackingID):
			return oldErr
		}
		id, commit, err := newBackingID(*backing)
		if err != nil {
			return err
		}
		if err := cache.Rebind(cdev, bdev, id, absPath(*backing)); err != nil {
			return err
		}
		if err := commit(); err != nil {
			return fmt.Errorf("the cache is rebound, but the backing's id could not be recorded: %w", err)
		}
		state := "it was closed clean"
		if !ident.Clean {
			state = "it may hold dirty data, which is written back to " + *backing + " once served"
		}
		fmt.Fprintf(stdout, "nbdcache: rebound the cache %s from the backing %s to %s (id %x); %s\n", *cachePath, backingName(ident), *backing, id, state)
		return nil
	}
}

// isBlockDevice reports whether path is a block device.
func isBlockDevice(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.Mode()&os.ModeDevice != 0 && fi.Mode()&os.ModeCharDevice == 0
}
