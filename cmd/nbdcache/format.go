package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"

	"github.com/nbdcache/nbdcache/cache"
	"github.com/nbdcache/nbdcache/storage"
)

func runFormat(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("format", stderr)
	cachePath := fs.String("cache", "", "cache file or block device `PATH` to format (required)")
	backing := fs.String("backing", "", "backing file or block device `PATH` the cache belongs to (required)")
	blockSize := int64(4096)
	fs.Var(sizeFlag{&blockSize}, "block-size", "cache block `SIZE`")
	bucketSize := int64(1 << 20)
	fs.Var(sizeFlag{&bucketSize}, "bucket-size", "cache bucket `SIZE`")
	force := fs.Bool("force", false, "format even over a cache that still holds dirty data (that data is lost)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *cachePath == "" || *backing == "" {
		return fmt.Errorf("%w: --cache and --backing are required", errUsage)
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	bdev, err := storage.OpenFile(*backing, storage.FileOptions{ReadOnly: true})
	if err != nil {
		return err
	}
	defer bdev.Close()
	cdev, err := storage.OpenFile(*cachePath, storage.FileOptions{})
	if err != nil {
		return err
	}
	defer cdev.Close()
	id, err := backingID(*backing, true)
	if err != nil {
		return err
	}
	err = cache.Format(cdev, bdev, cache.FormatOptions{BlockSize: int(blockSize), BucketSize: bucketSize, BackingID: id, Force: *force, Logger: log})
	if errors.Is(err, cache.ErrDirty) {
		return fmt.Errorf("%w\nThe dirty data exists nowhere else. Serve the cache and run `nbdcache flush --drain` first, or pass --force to discard it", err)
	}
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "nbdcache: formatted %s (%d MiB) as a cache for %s (%d MiB), block %d, bucket %d\n",
		*cachePath, cdev.Size()>>20, *backing, bdev.Size()>>20, blockSize, bucketSize)
	return nil
}

// errCheckFailed makes check exit 1 after printing its report.
var errCheckFailed = errors.New("the cache is corrupt")

func runCheck(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("check", stderr)
	cachePath := fs.String("cache", "", "cache file or block device `PATH` (required)")
	backing := fs.String("backing", "", "backing file or block device `PATH` (required)")
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if *cachePath == "" || *backing == "" {
		return fmt.Errorf("%w: --cache and --backing are required", errUsage)
	}
	bdev, err := storage.OpenFile(*backing, storage.FileOptions{ReadOnly: true})
	if err != nil {
		return err
	}
	defer bdev.Close()
	cdev, err := storage.OpenFile(*cachePath, storage.FileOptions{ReadOnly: true})
	if err != nil {
		return err
	}
	defer cdev.Close()
	rep, cerr := cache.Check(cdev, bdev)
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
	if cerr == nil {
		// serve refuses a backing it cannot identify, and so does check.
		switch id, err := backingID(*backing, false); {
		case err != nil:
			rep.Problems = append(rep.Problems, fmt.Sprintf("cannot tell whether %s is this cache's backing (%x): %v", *backing, rep.BackingID, err))
		case id != rep.BackingID:
			rep.Problems = append(rep.Problems, fmt.Sprintf("the cache belongs to backing %x, but %s is %x", rep.BackingID, *backing, id))
		}
	}
	for _, w := range rep.Warnings {
		fmt.Fprintf(stdout, "  warning: %s\n", w)
	}
	for _, p := range rep.Problems {
		fmt.Fprintf(stdout, "  PROBLEM: %s\n", p)
	}
	if cerr != nil {
		return fmt.Errorf("%w: %v", errCheckFailed, cerr)
	}
	if len(rep.Problems) > 0 {
		return fmt.Errorf("%w: %d problems", errCheckFailed, len(rep.Problems))
	}
	fmt.Fprintln(stdout, "ok")
	return nil
}
