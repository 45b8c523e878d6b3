package main

// guard.go: what nbdcache refuses to do, and the messages that say why.
//
// The rule: no command destroys data it was not explicitly told to
// destroy. Every command that opens a cache or a backing claims both
// exclusively (storage.ClaimExclusive), so a second server, a format or a
// check beside a running server is refused at once, naming the holder's
// pid. format and serve --format refuse a target that holds anything
// (formatRefusals) unless format is given --force, and nothing overrides
// a cache that is its own backing.

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/nbdcache/nbdcache/cache"
	"github.com/nbdcache/nbdcache/nbd"
	"github.com/nbdcache/nbdcache/probe"
	"github.com/nbdcache/nbdcache/storage"
)

// errRefused marks a command refused because it would destroy data it
// was not told to destroy (exit status 5).
var errRefused = errors.New("refused")

// explained is an error whose message is written for the user in full,
// wrapping the sentinel that decides the exit status.
type explained struct {
	msg string
	err error
}

func (e *explained) Error() string { return e.msg }
func (e *explained) Unwrap() error { return e.err }

func explain(err error, format string, args ...any) error {
	return &explained{msg: fmt.Sprintf(format, args...), err: err}
}

// inUseHint is what to do about a device held by another process.
const inUseHint = "A cache and its backing belong to one process at a time; stop the one that holds it first"

// openDevice opens the cache or the backing ("cache", "backing") of a
// command, claimed as opts say, and explains the two failures a user
// meets: a path that does not exist, and a device held by another
// process (then hint says what to do).
func openDevice(role, path string, opts storage.FileOptions, hint string) (*storage.File, error) {
	f, err := storage.OpenFile(path, opts)
	switch {
	case err == nil:
		return f, nil
	case errors.Is(err, storage.ErrInUse):
		return nil, explain(err, "the %s %s is in use by %s.\n%s", role, path, holders(err), hint)
	case errors.Is(err, fs.ErrNotExist) && role == "cache":
		return nil, explain(err, "the cache %s does not exist. Give a block device (a partition of a fast disk), or create a file for it, e.g. `fallocate -l 10G %s` (at least %s with the default geometry)",
			path, path, humanSize(cache.MinCacheSize(0, 0)))
	case errors.Is(err, fs.ErrNotExist):
		return nil, explain(err, "the backing %s does not exist. Give a block device or a disk image; `truncate -s 100G %s` makes an empty one", path, path)
	}
	return nil, err
}

// reserveCache gives a cache file the blocks of all its size
// (storage.File.Reserve): a sparse cache file on a file system that fills
// up fails its writes, and the cache then refuses every write until it is
// restarted. strict: the cache holds nothing yet (it is being formatted
// with blockSize and bucketSize), and a file system without room for it
// refuses the format; a file too small for a cache (or a geometry that
// fits none) is left to the format to refuse. Otherwise the cache may hold
// dirty data, which the export must go on serving: any failure is a
// warning. A file system that cannot allocate ahead is a warning either
// way.
func reserveCache(path string, f *storage.File, strict bool, blockSize, bucketSize int64, log *slog.Logger) error {
	var least int64
	if strict {
		least = cache.MinCacheSize(int(blockSize), bucketSize) // 0: no device fits the geometry
		if least == 0 || f.Size() < least {
			return nil
		}
	}
	missing, err := f.Reserve()
	if err == nil {
		return nil
	}
	room := "has no room for it"
	if errors.Is(err, unix.EDQUOT) {
		room = "has no room for it within the quota"
	}
	if strict && errors.Is(err, storage.ErrNoSpace) {
		return explain(err, "the file system of the cache %s %s: %s of the file has no blocks yet (%v), and every write into a cache must find space. Free that much there, or make the file smaller (at least %s for this geometry)",
			path, room, humanSize(missing), err, humanSize(least))
	}
	log.Warn("the cache file's blocks could not be reserved: once its file system is full, the cache refuses writes until restarted",
		"cache", path, "unreserved_bytes", missing, "err", err)
	return nil
}

// holders names who holds a device, from the *storage.InUseError in err.
func holders(err error) string {
	var iu *storage.InUseError
	if !errors.As(err, &iu) || len(iu.Holders) == 0 {
		return "another process that could not be named"
	}
	names := make([]string, len(iu.Holders))
	for i, h := range iu.Holders {
		names[i] = h.String()
	}
	return strings.Join(names, "; ")
}

// refuseOverlap refuses a cache and a backing that share sectors: a
// device cannot be its own cache, and no flag overrides that.
func refuseOverlap(cachePath, backingPath string) error {
	why, err := probe.Overlap(cachePath, backingPath)
	if err != nil || why == "" {
		return nil // a missing path is openDevice's to explain
	}
	return explain(errRefused, "refusing: the cache and the backing are one device: %s.\nThe cache would overwrite the data it serves; no flag overrides this. Give the cache its own device", why)
}

// formatRefusals lists what formatting cachePath as a cache would
// destroy: a cache, the id of some cache's backing, a filesystem, RAID,
// LVM or partition table signature, or any data in its first or last
// MiB. Empty when it holds nothing nbdcache can see.
func formatRefusals(cachePath string, cdev storage.Device) ([]string, error) {
	var why []string
	id, err := cache.Identify(cdev)
	switch {
	case err == nil:
		state := "clean"
		if !id.Clean {
			state = "maybe dirty: it was not closed clean, and its dirty data exists nowhere else (serve it and run `nbdcache flush --drain` to write it back first)"
		}
		why = append(why, fmt.Sprintf("it holds an nbdcache cache (%x) for the backing %s, %s", id.CacheID, backingName(id), state))
	case errors.Is(err, cache.ErrNotFormatted):
	default:
		why = append(why, fmt.Sprintf("it holds an nbdcache superblock that does not validate (%v)", err))
	}
	if fi, err := os.Stat(cachePath); err == nil && fi.Mode().IsRegular() {
		bid, found, err := fileBackingID(cachePath)
		if err == nil && found {
			why = append(why, fmt.Sprintf("it is the backing of a cache: it carries backing id %x in its %s attribute", bid, backingIDXattr))
		}
	}
	sigs, err := probe.Signatures(deviceReader{cdev}, cdev.Size())
	if err != nil {
		return nil, err
	}
	for _, s := range sigs {
		why = append(why, "it holds a recognizable signature: "+s.String())
	}
	if len(why) == 0 {
		off, found, err := probe.NonZero(deviceReader{cdev}, cdev.Size())
		if err != nil {
			return nil, err
		}
		if found {
			why = append(why, fmt.Sprintf("it holds data: the byte at offset %d is not zero (a device becomes a cache only if its first and last MiB are zeroes)", off))
		}
	}
	return why, nil
}

// refuseFormat is the error of a format refused for the reasons why; fix
// says how to override. It adds a hint when the backing given (bdev)
// holds a cache: the paths may be swapped.
func refuseFormat(cachePath string, why []string, bdev storage.Device, fix string) error {
	var b strings.Builder
	fmt.Fprintf(&b, "refusing to format %s as a cache; that would destroy what it holds:", cachePath)
	for _, w := range why {
		fmt.Fprintf(&b, "\n  - %s", w)
	}
	if _, err := cache.Identify(bdev); err == nil {
		b.WriteString("\n  (the backing given holds an nbdcache cache: are --cache and --backing swapped?)")
	}
	b.WriteString("\n" + fix)
	return explain(errRefused, "%s", b.String())
}

// backingName describes the backing a cache belongs to: its path as last
// seen, if recorded, and its id.
func backingName(id cache.Identity) string {
	if id.BackingPath == "" {
		return fmt.Sprintf("with id %x (its path was not recorded)", id.BackingID)
	}
	return fmt.Sprintf("%s (as last seen; id %x)", id.BackingPath, id.BackingID)
}

// checkBacking compares the backing given with the one the cache belongs
// to. It returns nil when they match, else an error wrapping
// cache.ErrWrongBacking that says what each is and how to bind the cache
// to the given backing if the user vouches for it.
func checkBacking(cachePath string, id cache.Identity, backingPath string, backingSize int64) error {
	bid, err := backingID(backingPath)
	var given string
	switch {
	case errors.Is(err, errNoBackingID):
		given = "has no id (it was never bound to a cache, or it is a copy that lost its extended attributes: cp and most tools drop them)"
	case err != nil:
		return err
	case bid != id.BackingID:
		given = fmt.Sprintf("has id %x", bid)
	case backingSize != id.BackingSize:
		given = "has that id"
	default:
		return nil
	}
	msg := fmt.Sprintf("wrong backing: the cache %s belongs to the backing %s; the given backing %s %s", cachePath, backingName(id), backingPath, given)
	if backingSize != id.BackingSize {
		msg += fmt.Sprintf(", and %d bytes where the cache's backing had %d. A backing of another size cannot be this cache's", backingSize, id.BackingSize)
	} else {
		force := ""
		if err == nil && !isBlockDevice(backingPath) {
			force = " --force" // it carries an id of its own: see runRebind
		}
		msg += fmt.Sprintf(".\nIf %s is that backing (a copy of it, or the same disk under a new name), bind the cache to it with\n  nbdcache rebind%s --cache %s --backing %s", backingPath, force, cachePath, backingPath)
	}
	return explain(cache.ErrWrongBacking, "%s", msg)
}

// tooSmall explains cache.ErrTooSmall with the minimum size.
func tooSmall(err error, cachePath string, size int64, blockSize int, bucketSize int64) error {
	m := cache.MinCacheSize(blockSize, bucketSize)
	return explain(err, "the cache %s (%s) is too small for %s buckets of %s blocks: it needs at least %s (%d bytes); a smaller --bucket-size needs less",
		cachePath, humanSize(size), humanSize(bucketSize), humanSize(int64(blockSize)), humanSize(m), m)
}

// ramCacheLimit is the largest --ram-cache accepted: half the memory of
// the machine, or of the cgroup the process runs in if that is smaller.
func ramCacheLimit() (limit, total int64) {
	var si unix.Sysinfo_t
	if unix.Sysinfo(&si) != nil {
		return 1 << 62, 0
	}
	total = int64(si.Totalram) * int64(si.Unit)
	if b, err := os.ReadFile("/sys/fs/cgroup/memory.max"); err == nil {
		var n int64
		if _, err := fmt.Sscan(strings.TrimSpace(string(b)), &n); err == nil && n > 0 && n < total {
			total = n
		}
	}
	return total / 2, total
}

// deviceReader reads a storage.Device as an io.ReaderAt, for probe.
type deviceReader struct{ d storage.Device }

func (r deviceReader) ReadAt(p []byte, off int64) (int, error) {
	if err := r.d.ReadAt(p, off); err != nil {
		return 0, err
	}
	return len(p), nil
}

// humanSize prints a byte count in binary units.
func humanSize(n int64) string {
	switch {
	case n >= 1<<40:
		return fmt.Sprintf("%.1f TiB", float64(n)/(1<<40))
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d bytes", n)
}

// absPath is path made absolute, for the backing path hint.
func absPath(path string) string {
	if nbd.IsURI(path) {
		return path
	}
	if a, err := filepath.Abs(path); err == nil {
		return a
	}
	return path
}
