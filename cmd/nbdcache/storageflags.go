package main

// storageflags.go: the flags that choose the storage behind an export, and
// opening (or formatting) it.

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
	"github.com/nbdcache/nbdcache/faults"
	"github.com/nbdcache/nbdcache/nbd"
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
	quietCommit  time.Duration
	readOnly     bool
	direct       bool
	syncMode     string // --sync: normal or always (faults.go)
	faults       bool   // serve --faults (faults.go)
	backingTLS   string // --backing-tls-certificates: for an nbds:// backing
	backingConns int
	backingWait  time.Duration
}

func (f *storageFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.backing, "backing", "", "backing file, block device or NBD URI (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH, nbds://...) `PATH` (none at all: a demo in a temporary folder)")
	fs.StringVar(&f.backingTLS, "backing-tls-certificates", "", "for an nbds:// backing: `DIR` with ca-cert.pem, and client-cert.pem and client-key.pem to present one (libnbd's layout)")
	fs.IntVar(&f.backingConns, "backing-connections", 4, "`N` connections to an NBD backing that allows multi-conn")
	fs.DurationVar(&f.backingWait, "backing-timeout", 10*time.Second, "how long a request to an NBD backing that went away waits for it to come back before failing with EIO (`DURATION`)")
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
	fs.DurationVar(&f.quietCommit, "quiet-commit", 10*time.Millisecond, "once no write has been acknowledged for this long, make durable what a FLUSH would (at most every 100 ms): a power cut then loses nothing acknowledged before the quiet spell, and the FLUSH after it has nothing to do (`DURATION`, at least 1ms; 0: only on FLUSH and FUA)")
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
	rig   *faults.Rig  // --faults: power cuts, errors, delays
	// remote is the backing when it is an NBD export (--backing nbd://).
	remote *nbd.Remote
	close  []func() error
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
		o.rig = faults.New(log)
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
	if f.ramCache > 0 {
		if limit, total := ramCacheLimit(); f.ramCache > limit {
			return nil, fmt.Errorf("%w: --ram-cache %s is more than half of this machine's memory (%s); at most %s",
				errUsage, humanSize(f.ramCache), humanSize(total), humanSize(limit))
		}
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
	remote := nbd.IsURI(backing)
	if cachePath != "" && !remote {
		if err := refuseOverlap(cachePath, backing); err != nil {
			return nil, err
		}
	}

	// Both devices are claimed for as long as they are open; a read-only
	// export of a backing alone shares it with other read-only ones.
	var bdev storage.Device
	if remote {
		r, err := f.dialBacking(backing, log)
		if err != nil {
			return nil, err
		}
		bdev, o.remote = r, r
	} else {
		bopts := storage.FileOptions{Direct: f.direct, Claim: storage.ClaimExclusive}
		if f.readOnly && cachePath == "" {
			bopts.ReadOnly, bopts.Claim = true, storage.ClaimShared
		}
		file, err := openDevice("backing", backing, bopts, inUseHint)
		if err != nil {
			return nil, err
		}
		bdev = file
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
		back = o.rig.WrapBacking(bdev, remote, slow)
	}
	o.dev = back
	if cachePath == "" {
		o.finishExport(f)
		return o, nil
	}

	cdev, err := openDevice("cache", cachePath, storage.FileOptions{Direct: f.direct, Claim: storage.ClaimExclusive}, inUseHint)
	if err != nil {
		return nil, err
	}
	o.close = append(o.close, cdev.Close)
	var cd storage.Device = cdev
	if o.rig != nil {
		cd = o.rig.WrapCache(cdev)
	}
	opts := cache.Options{
		Mode: mode, BackingPath: absPath(backing), RAMCache: f.ramCache, WritebackPercent: f.wbPercent,
		SequentialCutoff: f.seqCutoff, CheckpointInterval: f.ckptInterval, QuietCommit: quietCommitOption(f.quietCommit), Logger: log, Writeback: writeback.Config{HighWatermark: f.wbHigh},
	}
	if f.seqCutoff == 0 {
		opts.SequentialCutoff = -1
	}
	if o.rig != nil {
		opts.Logger = o.rig.CacheLogger() // muted when a power cut abandons the cache
	}
	ident, err := cache.Identify(cd)
	switch {
	case errors.Is(err, cache.ErrNotFormatted) && !format:
		return nil, fmt.Errorf("%s: %w; format it with `nbdcache format --cache %s --backing %s`, or pass --format", cachePath, err, cachePath, backing)
	case errors.Is(err, cache.ErrNotFormatted):
		if opts.BackingID, err = f.formatCache(w, cachePath, cdev, cd, backing, back, log); err != nil {
			return nil, err
		}
	case err != nil:
		return nil, fmt.Errorf("opening the cache %s: %w", cachePath, err)
	default:
		if err := checkBacking(cachePath, ident, backing, back.Size()); err != nil {
			return nil, err
		}
		if err := reserveCache(cachePath, cdev, false, 0, 0, log); err != nil {
			return nil, err
		}
		opts.BackingID = ident.BackingID
	}
	c, err := cache.Open(cd, back, opts)
	if err != nil {
		return nil, fmt.Errorf("opening the cache %s: %w", cachePath, err)
	}
	if o.rig != nil {
		o.rig.SetCache(c, opts)
		o.close = append(o.close, o.rig.CloseCache)
	} else {
		o.close = append(o.close, c.Close)
	}
	o.cache, o.dev = c, c
	o.finishExport(f)
	return o, nil
}

// formatCache is --format: it formats a cache device (file, as cd
// wraps it) that holds no cache, unless it holds anything else
// (formatRefusals), once its blocks are reserved (reserveCache), and
// returns the backing id the cache is bound to.
func (f *storageFlags) formatCache(w io.Writer, cachePath string, file *storage.File, cd storage.Device, backing string, back storage.Device, log *slog.Logger) ([16]byte, error) {
	why, err := formatRefusals(cachePath, cd)
	if err != nil {
		return [16]byte{}, err
	}
	if len(why) > 0 {
		return [16]byte{}, refuseFormat(cachePath, why, back, fmt.Sprintf(
			"--format formats only a device that holds none of these. To destroy what it holds, run `nbdcache format --force --cache %s --backing %s` first.", cachePath, backing))
	}
	if err := reserveCache(cachePath, file, true, f.blockSize, f.bucketSize, log); err != nil {
		return [16]byte{}, err
	}
	id, commit, err := newBackingID(backing)
	if err != nil {
		return id, err
	}
	fmt.Fprintf(w, "nbdcache: formatting %s as a cache for %s\n", cachePath, backing)
	err = cache.Format(cd, back, cache.FormatOptions{BlockSize: int(f.blockSize), BucketSize: f.bucketSize, BackingID: id, BackingPath: absPath(backing), Logger: log})
	if errors.Is(err, cache.ErrTooSmall) {
		return id, tooSmall(err, cachePath, cd.Size(), int(f.blockSize), f.bucketSize)
	}
	if err != nil {
		return id, err
	}
	if err := commit(); err != nil {
		return id, fmt.Errorf("%s is formatted, but the backing's id could not be recorded: %w; once that is fixed, `nbdcache rebind --cache %s --backing %s` binds them", cachePath, err, cachePath, backing)
	}
	return id, nil
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

// liveCache is the cache serving now: fault mode swaps it at every cut.
func (o *openedStorage) liveCache() *cache.Cache {
	if o.rig != nil {
		return o.rig.CurrentCache()
	}
	return o.cache
}

// finishExport wraps the device to serve as the flags ask: the fault
// mode's export layers, then durable acknowledgements.
func (o *openedStorage) finishExport(f *storageFlags) {
	if o.rig != nil {
		o.dev = o.rig.WrapExport(o.dev)
	}
	if f.syncMode == "always" {
		o.dev = storage.NewDurableAcks(o.dev)
	}
}

// parseSyncMode checks --sync.
func parseSyncMode(s string) error {
	switch s {
	case "normal", "always":
		return nil
	}
	return fmt.Errorf("%w: --sync %q: want normal or always", errUsage, s)
}

// quietCommitOption turns --quiet-commit into cache.Options.QuietCommit,
// where 0 is the default and negative is never.
func quietCommitOption(d time.Duration) time.Duration {
	if d <= 0 {
		return -1
	}
	return d
}
