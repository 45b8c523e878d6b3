package main

// format.go: `nbdcache format` and `nbdcache check`.

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"

	"github.com/nbdcache/nbdcache/cache"
	"github.com/nbdcache/nbdcache/nbd"
	"github.com/nbdcache/nbdcache/storage"
)

func runFormat(fs *flag.FlagSet) runner {
	cachePath := fs.String("cache", "", "cache file or block device `PATH` to format (required)")
	backing := fs.String("backing", "", "backing file, block device or NBD URI `PATH` the cache belongs to (required)")
	var ob offlineBacking
	ob.register(fs)
	blockSize := int64(4096)
	fs.Var(sizeFlag{&blockSize}, "block-size", "cache block `SIZE`")
	bucketSize := int64(1 << 20)
	fs.Var(sizeFlag{&bucketSize}, "bucket-size", "cache bucket `SIZE`")
	force := fs.Bool("force", false, "format even over what the cache device holds: a cache (its dirty data too), a backing, a filesystem, any data; all of it is lost")
	return func(ctx context.Context, args []string, stdout, stderr io.Writer) error {
		log := warnLogger(stderr)
		bdev, cdev, closeAll, err := ob.openPair(*cachePath, *backing, log)
		if err != nil {
			return err
		}
		defer closeAll()
		why, err := formatRefusals(*cachePath, cdev)
		if err != nil {
			return err
		}
		if len(why) > 0 && !*force {
			return refuseFormat(*cachePath, why, bdev, "Pass --force to format it anyway; what it holds is lost.")
		}
		if err := reserveCache(*cachePath, cdev, true, blockSize, bucketSize, log); err != nil {
			return err
		}
		id, commit, err := newBackingID(*backing)
		if err != nil {
			return err
		}
		err = cache.Format(cdev, bdev, cache.FormatOptions{BlockSize: int(blockSize), BucketSize: bucketSize, BackingID: id,
			BackingPath: absPath(*backing), Force: *force, Logger: log})
		switch {
		case errors.Is(err, cache.ErrDirty):
			return fmt.Errorf("%w\nThe dirty data exists nowhere else. Serve the cache and run `nbdcache flush --drain` first, or pass --force to discard it", err)
		case errors.Is(err, cache.ErrTooSmall):
			return tooSmall(err, *cachePath, cdev.Size(), int(blockSize), bucketSize)
		case err != nil:
			return err
		}
		if err := commit(); err != nil {
			return fmt.Errorf("%s is formatted, but the backing's id could not be recorded: %w; once that is fixed, `nbdcache rebind --cache %s --backing %s` binds them", *cachePath, err, *cachePath, *backing)
		}
		for _, w := range why {
			fmt.Fprintf(stderr, "nbdcache format: --force: overwrote %s, where %s\n", *cachePath, w)
		}
		if fi, err := os.Stat(*cachePath); err == nil && fi.Mode().IsRegular() {
			if err := dropBackingID(*cachePath); err != nil { // a cache now, no backing
				return err
			}
		}
		fmt.Fprintf(stdout, "nbdcache: formatted %s (%d MiB) as a cache for %s (%d MiB), block %d, bucket %d\n",
			*cachePath, cdev.Size()>>20, *backing, bdev.Size()>>20, blockSize, bucketSize)
		return nil
	}
}

// errCheckFailed makes check exit 1 after printing its report: the cache
// is corrupt (or could not be read).
var errCheckFailed = errors.New("the cache is corrupt")

// checkHint is what check says about a device held by a server.
const checkHint = "check reads a cache at rest: stop that process first, or pass --live to check a snapshot of the device in use (a write in flight may then show as a problem)"

func runCheck(fs *flag.FlagSet) runner {
	cachePath := fs.String("cache", "", "cache file or block device `PATH` (required)")
	backing := fs.String("backing", "", "backing file, block device or NBD URI `PATH` (required)")
	var ob offlineBacking
	ob.register(fs)
	live := fs.Bool("live", false, "check even while a server holds the devices: a snapshot, which a write in flight can make look corrupt")
	deep := fs.Bool("deep", false, "also compare every clean extent with the backing (reads all cached data)")
	return func(ctx context.Context, args []string, stdout, stderr io.Writer) error {
		if *cachePath == "" || *backing == "" {
			return fmt.Errorf("%w: --cache and --backing are required", errUsage)
		}
		if err := refuseOverlap(*cachePath, *backing); err != nil {
			return err
		}
		var inUse []string // with --live: who holds the devices
		open := func(role, path string) (storage.Device, error) {
			if role == "backing" && nbd.IsURI(path) {
				return ob.open(path, storage.ClaimExclusive, checkHint, warnLogger(stderr))
			}
			f, err := openDevice(role, path, storage.FileOptions{ReadOnly: true, Claim: storage.ClaimExclusive}, checkHint)
			if errors.Is(err, storage.ErrInUse) && *live {
				inUse = append(inUse, fmt.Sprintf("the %s %s is in use by %s", role, path, holders(err)))
				return openDevice(role, path, storage.FileOptions{ReadOnly: true}, checkHint)
			}
			return f, err
		}
		bdev, err := open("backing", *backing)
		if err != nil {
			return err
		}
		defer bdev.Close()
		cdev, err := open("cache", *cachePath)
		if err != nil {
			return err
		}
		defer cdev.Close()
		for _, u := range inUse {
			fmt.Fprintf(stdout, "SNAPSHOT: %s; this is the cache as it was while being written, and a problem below may be a write in flight, not corruption\n", u)
		}
		check := cache.Check
		if *deep {
			check = cache.CheckDeep
		}
		rep, cerr := check(cdev, bdev)
		if errors.Is(cerr, cache.ErrNotFormatted) && rep.SuperblockCopies == 0 {
			return fmt.Errorf("%w: %s holds no cache superblock at all: %v", errCheckFailed, *cachePath, cerr)
		}
		fmt.Fprintf(stdout, "cache %x for backing %x: %s\n", rep.CacheID, rep.BackingID, rep.State)
		unused := ""
		if rep.CheckpointsUnused > 0 {
			unused = fmt.Sprintf(", %d unused", rep.CheckpointsUnused)
		}
		if rep.Checkpoint == 0 { // recovery failed before loading one: the problem says why
			fmt.Fprintf(stdout, "  superblock copies valid: %d of 2; %d of 2 checkpoint slots valid%s\n", rep.SuperblockCopies, rep.CheckpointsValid, unused)
		} else {
			fmt.Fprintf(stdout, "  superblock copies valid: %d of 2; checkpoint %d (%d of 2 slots valid%s)\n", rep.SuperblockCopies, rep.Checkpoint, rep.CheckpointsValid, unused)
			fmt.Fprintf(stdout, "  journal: %d blocks, %d records replayed, %d dropped (data never durable); ends at: %s\n", rep.JournalBlocks, rep.Replayed, rep.Dropped, rep.JournalStop)
			fmt.Fprintf(stdout, "  index: %d extents, %d bytes cached, %d dirty; %d of %d buckets used\n", rep.Extents, rep.CachedBytes, rep.DirtyBytes, rep.UsedBuckets, rep.Buckets)
		}
		// serve refuses a backing that is not the cache's, and so does check;
		// that is not corruption, and exits 3, not 1.
		var wrong error
		if id, err := cache.Identify(cdev); err == nil {
			wrong = checkBacking(*cachePath, id, *backing, bdev.Size())
			if wrong != nil && !errors.Is(wrong, cache.ErrWrongBacking) {
				rep.Problems = append(rep.Problems, fmt.Sprintf("cannot tell whether %s is this cache's backing (%x): %v", *backing, rep.BackingID, wrong))
				wrong = nil
			}
		}
		for _, w := range rep.Warnings {
			fmt.Fprintf(stdout, "  warning: %s\n", w)
		}
		for _, p := range rep.Problems {
			fmt.Fprintf(stdout, "  PROBLEM: %s\n", p)
		}
		switch {
		case len(rep.Problems) > 0:
			return fmt.Errorf("%w: %d problems", errCheckFailed, len(rep.Problems))
		case cerr != nil && !errors.Is(cerr, cache.ErrWrongBacking):
			return fmt.Errorf("%w: %v", errCheckFailed, cerr)
		case wrong != nil:
			fmt.Fprintln(stdout, "  the cache itself is sound; it belongs to another backing")
			return wrong
		case cerr != nil: // a wrong size that checkBacking did not see (no superblock to identify)
			return cerr
		}
		if len(inUse) > 0 {
			fmt.Fprintln(stdout, "ok (a snapshot of a cache in use)")
			return nil
		}
		fmt.Fprintln(stdout, "ok")
		return nil
	}
}
