package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/nbdcache/nbdcache/cache"
	"github.com/nbdcache/nbdcache/storage"
	"github.com/nbdcache/nbdcache/writeback"
)

// storageFlags are the flags that choose the storage behind an export.
// serve and attach share them.
type storageFlags struct {
	backing      string
	cachePath    string
	mode         string
	format       bool
	blockSize    int64
	bucketSize   int64
	ramCache     int64
	seqCutoff    int64
	wbPercent    int
	wbHigh       int
	backingModel string
	ckptInterval time.Duration
	readOnly     bool
	direct       bool
	syncMode     string // --sync: normal or always (faults.go)
	faults       bool   // serve --faults (faults.go)
}

func (f *storageFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.backing, "backing", "", "backing file or block device `PATH` (none at all: a demo in a temporary folder)")
	fs.StringVar(&f.cachePath, "cache", "", "cache file or block device `PATH` (none: serve the backing directly)")
	fs.StringVar(&f.mode, "mode", "writeback", "cache `MODE`: writeback, writethrough, writearound or none")
	fs.BoolVar(&f.format, "format", false, "format the cache device if it holds no cache yet")
	f.blockSize = 4096
	fs.Var(sizeFlag{&f.blockSize}, "block-size", "cache block `SIZE` (with --format)")
	f.bucketSize = 1 << 20
	fs.Var(sizeFlag{&f.bucketSize}, "bucket-size", "cache bucket `SIZE` (with --format)")
	fs.Var(sizeFlag{&f.ramCache}, "ram-cache", "`SIZE` of the RAM tier for hot clean data (0: off)")
	f.seqCutoff = 4 << 20
	fs.Var(sizeFlag{&f.seqCutoff}, "sequential-cutoff", "sequential streams longer than `SIZE` bypass the cache (0: never)")
	fs.IntVar(&f.wbPercent, "writeback-percent", 10, "dirty share of the cache that background writeback aims at, in `PERCENT`")
	fs.IntVar(&f.wbHigh, "writeback-high", 0, "dirty share of the cache at or above which writeback runs at full speed, in `PERCENT` (0: 70, or --writeback-percent if higher)")
	fs.DurationVar(&f.ckptInterval, "checkpoint-interval", time.Minute, "checkpoint the index at least this often while writes trickle in, so start-up replays a short journal (`DURATION`; negative: only when the journal is half full)")
	fs.StringVar(&f.backingModel, "backing-model", "", "give the backing a slow disk's latency: `MODEL` hdd (see docs)")
	fs.BoolVar(&f.readOnly, "read-only", false, "refuse writes, trims and zeroes with EPERM")
	fs.BoolVar(&f.direct, "direct", false, "open the devices with O_DIRECT")
	fs.StringVar(&f.syncMode, "sync", "normal", "`MODE` always: acknowledge a write only once it is durable (FUA on every write); normal: as the client asks")
}

// openedStorage is the device to export and what to do when done with it.
type openedStorage struct {
	dev   storage.Device
	cache *cache.Cache // nil without --cache
	demo  bool         // the embedded default: files in a temporary folder
	rig   *faultRig    // --faults: power cuts, errors, delays (faults.go)
	close []func() error
}

// Close closes everything open, the cache first; it returns the first
// error.
func (o *openedStorage) Close() error {
	var first error
	for i := len(o.close) - 1; i >= 0; i-- {
		if err := o.close[i](); err != nil && first == nil {
			first = err
		}
	}
	o.close = nil
	return first
}

// Demo sizes: the embedded default's backing and cache files.
const (
	demoBackingSize = 1 << 30
	demoCacheSize   = 256 << 20
)

// open opens the storage the flags describe. With no storage flags it
// creates the embedded default in a temporary folder and says so on w.
func (f *storageFlags) open(w io.Writer, log *slog.Logger) (_ *openedStorage, err error) {
	o := &openedStorage{}
	defer func() {
		if err != nil {
			o.Close()
		}
	}()
	if err := parseSyncMode(f.syncMode); err != nil {
		return nil, err
	}
	if f.faults {
		o.rig = newFaultRig(log)
	}
	mode, err := cache.ParseMode(f.mode)
	if err != nil {
		return nil, fmt.Errorf("%w: --mode: %v", errUsage, err)
	}
	if f.wbPercent < 1 || f.wbPercent > 100 {
		return nil, fmt.Errorf("%w: --writeback-percent %d: want 1 to 100", errUsage, f.wbPercent)
	}
	if f.wbHigh != 0 && (f.wbHigh < f.wbPercent || f.wbHigh > 100) {
		return nil, fmt.Errorf("%w: --writeback-high %d: want --writeback-percent (%d) to 100", errUsage, f.wbHigh, f.wbPercent)
	}
	var model *storage.DiskModel
	if f.backingModel != "" {
		m, err := storage.ParseDiskModel(f.backingModel)
		if err != nil {
			return nil, fmt.Errorf("%w: --backing-model: %v", errUsage, err)
		}
		model = &m
	}
	backing, cachePath, format := f.backing, f.cachePath, f.format
	if backing == "" && cachePath == "" {
		dir, err := os.MkdirTemp("", "nbdcache-demo-")
		if err != nil {
			return nil, err
		}
		o.close = append(o.close, func() error { return os.RemoveAll(dir) })
		backing, cachePath, format = filepath.Join(dir, "backing.img"), filepath.Join(dir, "cache.img"), true
		if err := createSparse(backing, demoBackingSize); err != nil {
			return nil, err
		}
		if err := createSparse(cachePath, demoCacheSize); err != nil {
			return nil, err
		}
		o.demo = true
		fmt.Fprintf(w, "nbdcache: demo mode: no --backing or --cache given; a %d MiB backing file behind a %d MiB write-back cache in %s (deleted on exit)\n",
			demoBackingSize>>20, demoCacheSize>>20, dir)
	} else if backing == "" {
		return nil, fmt.Errorf("%w: --cache needs --backing", errUsage)
	}

	bdev, err := storage.OpenFile(backing, storage.FileOptions{ReadOnly: f.readOnly && cachePath == "", Direct: f.direct})
	if err != nil {
		return nil, err
	}
	o.close = append(o.close, bdev.Close)
	var back storage.Device = bdev
	if model != nil && o.rig == nil {
		back = storage.NewSlow(bdev, *model)
	}
	if o.rig != nil { // --faults: the disk model goes inside the fault wrappers
		var slow func(storage.Device) storage.Device
		if model != nil {
			slow = func(d storage.Device) storage.Device { return storage.NewSlow(d, *model) }
		}
		back = o.rig.wrapBacking(bdev, slow)
	}
	o.dev = back
	if cachePath == "" {
		o.finishExport(f)
		return o, nil
	}

	cdev, err := storage.OpenFile(cachePath, storage.FileOptions{Direct: f.direct})
	if err != nil {
		return nil, err
	}
	o.close = append(o.close, cdev.Close)
	var cd storage.Device = cdev
	if o.rig != nil {
		cd = o.rig.wrapCache(cdev)
	}
	id, err := backingID(backing, format)
	if err != nil {
		return nil, err
	}
	opts := cache.Options{
		Mode: mode, BackingID: id, RAMCache: f.ramCache, WritebackPercent: f.wbPercent,
		SequentialCutoff: f.seqCutoff, CheckpointInterval: f.ckptInterval, Logger: log, Writeback: writeback.Config{HighWatermark: f.wbHigh},
	}
	if f.seqCutoff == 0 {
		opts.SequentialCutoff = -1
	}
	if o.rig != nil {
		opts.Logger = o.rig.cacheLogger() // muted when a power cut abandons the cache
	}
	c, err := cache.Open(cd, back, opts)
	if errors.Is(err, cache.ErrNotFormatted) && format {
		fmt.Fprintf(w, "nbdcache: formatting %s as a cache for %s\n", cachePath, backing)
		if err := cache.Format(cd, back, cache.FormatOptions{BlockSize: int(f.blockSize), BucketSize: f.bucketSize, BackingID: id, Logger: log}); err != nil {
			return nil, err
		}
		c, err = cache.Open(cd, back, opts)
	}
	if errors.Is(err, cache.ErrNotFormatted) {
		return nil, fmt.Errorf("%s: %w; format it with `nbdcache format --cache %s --backing %s`, or pass --format", cachePath, err, cachePath, backing)
	}
	if err != nil {
		return nil, fmt.Errorf("opening the cache %s: %w", cachePath, err)
	}
	if o.rig != nil {
		o.rig.setCache(c, opts)
		o.close = append(o.close, o.rig.closeCache)
	} else {
		o.close = append(o.close, c.Close)
	}
	o.cache, o.dev = c, c
	o.finishExport(f)
	return o, nil
}

// createSparse creates a sparse file of the given size, refusing to
// touch an existing one.
func createSparse(path string, size int64) error {
	fh, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	if err := fh.Truncate(size); err != nil {
		fh.Close()
		return err
	}
	return fh.Close()
}
