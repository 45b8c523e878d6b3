package cache

// format.go: the superblock, its I/O and the layout of the cache device
// (Format); encoding.go has the journal's and the checkpoints' encodings.

import (
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"log/slog"
	"sync"

	"github.com/nbdcache/nbdcache/storage"
)

// On-disk constants. doc.go draws the layout.
const (
	sectorSize   = 512
	metaBlock    = 4096 // superblock copy, journal block and checkpoint alignment
	sbMagic      = "NBDCACHE"
	ckptMagic    = "NBDCCKPT"
	jMagic       = "NBDJ"
	formatVer    = 2   // 2: journal blocks say how far the journal was durable
	sbUsed       = 152 // bytes of a superblock copy covered by its checksum (+4)
	ckptHdrSize  = 64
	ckptExtSize  = 32
	jHdrSize     = 24
	jRecSize     = 40
	jRecsPerBlk  = (metaBlock - jHdrSize - 4) / jRecSize
	jCkptOff     = jHdrSize + jRecsPerBlk*jRecSize // 4064: the ckpt field, after the last record
	minBuckets   = 4
	defaultBlock = 4096
	defaultBkt   = 1 << 20
)

// castagnoli is the CRC32C table, made on first use: making it computes
// the SSE4.2 code's combining tables, which takes 23 ms of a start under
// TCG (QEMU emulates the crc32 instruction bit by bit), and a command
// such as `nbdcache stats` never checksums anything.
var castagnoli = sync.OnceValue(func() *crc32.Table { return crc32.MakeTable(crc32.Castagnoli) })

func crc(p []byte) uint32 { return crc32.Checksum(p, castagnoli()) }

// State word of the superblock.
const (
	stateClean uint32 = 0 // no dirty data: the backing alone is the whole disk
	stateDirty uint32 = 1 // the cache may hold dirty data (in use, or closed dirty)
)

// superblock is the decoded form of one superblock copy.
type superblock struct {
	CacheID     [16]byte
	BackingID   [16]byte
	BackingSize int64
	CacheSize   int64
	BlockSize   int64
	BucketSize  int64
	CkptOff     int64 // slot 0; slot 1 follows at CkptOff+CkptSize
	CkptSize    int64
	JournalOff  int64
	JournalSize int64
	DataOff     int64
	NBuckets    int64
	State       uint32
	Seq         uint64
	// BackingPath is where the backing was when the cache was last
	// formatted, served or rebound: a hint for messages, kept outside the
	// checksummed header (see encodePathHint), never used to find it.
	BackingPath string
}

// The backing path hint: bytes [pathHintOff, pathHintEnd) of a
// superblock copy hold a length (u16), the path, zeroes, and a crc32c of
// the area in its last 4 bytes. Older images have zeroes there, which
// read as no path. A hint that fails its crc reads as no path too: it is
// only ever shown to a user, so it is not worth refusing a cache over.
const (
	pathHintOff = 512
	pathHintEnd = 2048
	maxPathHint = pathHintEnd - pathHintOff - 2 - 4
)

// salt seeds the checksums of journal blocks and checkpoints with the cache
// UUID, so that metadata left by an earlier format never validates.
func (sb *superblock) salt() uint32 { return crc(sb.CacheID[:]) }

func (sb *superblock) maxExtents() int64 {
	return (sb.CkptSize - ckptHdrSize - align8(sb.NBuckets)) / ckptExtSize
}

func (sb *superblock) journalSlots() int64 { return sb.JournalSize / metaBlock }

func (sb *superblock) bucketOf(loc int64) int64 { return (loc - sb.DataOff) / sb.BucketSize }

func (sb *superblock) bucketStart(b int64) int64 { return sb.DataOff + b*sb.BucketSize }

func align8(n int64) int64 { return (n + 7) &^ 7 }

func alignUp(n, a int64) int64 { return (n + a - 1) / a * a }

// encode writes sb into a metaBlock-sized buffer.
func (sb *superblock) encode() []byte {
	b := make([]byte, metaBlock)
	copy(b[0:8], sbMagic)
	le := binary.LittleEndian
	le.PutUint32(b[8:], formatVer)
	le.PutUint32(b[12:], sbUsed)
	copy(b[16:32], sb.CacheID[:])
	copy(b[32:48], sb.BackingID[:])
	for i, v := range []int64{sb.BackingSize, sb.CacheSize, sb.BlockSize, sb.BucketSize, sb.CkptOff,
		sb.CkptSize, sb.JournalOff, sb.JournalSize, sb.DataOff, sb.NBuckets} {
		le.PutUint64(b[48+8*i:], uint64(v))
	}
	le.PutUint32(b[128:], sb.State)
	le.PutUint64(b[136:], sb.Seq)
	le.PutUint32(b[sbUsed:], crc(b[:sbUsed]))
	encodePathHint(b[pathHintOff:pathHintEnd], sb.BackingPath)
	return b
}

// encodePathHint writes the path hint into its area h. A path too long
// for it keeps its end, after "...".
func encodePathHint(h []byte, path string) {
	if path == "" {
		return
	}
	if len(path) > maxPathHint {
		path = "..." + path[len(path)-(maxPathHint-3):]
	}
	le := binary.LittleEndian
	le.PutUint16(h, uint16(len(path)))
	copy(h[2:], path)
	le.PutUint32(h[len(h)-4:], crc(h[:len(h)-4]))
}

// decodePathHint reads the path hint from its area h; "" for none.
func decodePathHint(h []byte) string {
	le := binary.LittleEndian
	n := int(le.Uint16(h))
	if n == 0 || n > maxPathHint || crc(h[:len(h)-4]) != le.Uint32(h[len(h)-4:]) {
		return ""
	}
	return string(h[2 : 2+n])
}

// decodeSuperblock validates magic, then version, then checksum, then the
// geometry against the device size, and decodes one copy.
func decodeSuperblock(b []byte, devSize int64) (*superblock, error) {
	if len(b) < sbUsed+4 {
		return nil, fmt.Errorf("%w: short superblock", ErrCorrupt)
	}
	if string(b[0:8]) != sbMagic {
		return nil, ErrNotFormatted
	}
	le := binary.LittleEndian
	if v := le.Uint32(b[8:]); v != 1 && v != formatVer {
		// Version 1 images open; they become version 2 when the
		// superblock is next written.
		return nil, fmt.Errorf("%w: version %d, want 1 or %d", ErrVersion, v, formatVer)
	}
	if le.Uint32(b[12:]) != sbUsed {
		return nil, fmt.Errorf("%w: superblock header length %d", ErrCorrupt, le.Uint32(b[12:]))
	}
	if got, want := crc(b[:sbUsed]), le.Uint32(b[sbUsed:]); got != want {
		return nil, fmt.Errorf("%w: superblock checksum %08x, stored %08x", ErrCorrupt, got, want)
	}
	sb := &superblock{}
	copy(sb.CacheID[:], b[16:32])
	copy(sb.BackingID[:], b[32:48])
	v := make([]int64, 10)
	for i := range v {
		v[i] = int64(le.Uint64(b[48+8*i:]))
	}
	sb.BackingSize, sb.CacheSize, sb.BlockSize, sb.BucketSize, sb.CkptOff = v[0], v[1], v[2], v[3], v[4]
	sb.CkptSize, sb.JournalOff, sb.JournalSize, sb.DataOff, sb.NBuckets = v[5], v[6], v[7], v[8], v[9]
	sb.State = le.Uint32(b[128:])
	sb.Seq = le.Uint64(b[136:])
	if len(b) >= pathHintEnd {
		sb.BackingPath = decodePathHint(b[pathHintOff:pathHintEnd])
	}
	if err := sb.validate(devSize); err != nil {
		return nil, err
	}
	return sb, nil
}

// validate checks the geometry: every region inside the device, in order,
// aligned, not overlapping.
func (sb *superblock) validate(devSize int64) error {
	bad := func(what string, args ...any) error {
		return fmt.Errorf("%w: superblock: %s", ErrCorrupt, fmt.Sprintf(what, args...))
	}
	pow2 := func(x int64) bool { return x > 0 && x&(x-1) == 0 }
	switch {
	case sb.BackingSize <= 0 || sb.BackingSize%sectorSize != 0:
		return bad("backing size %d", sb.BackingSize)
	case devSize >= 0 && sb.CacheSize != devSize:
		return bad("cache size %d, device has %d", sb.CacheSize, devSize)
	case !pow2(sb.BlockSize) || sb.BlockSize < sectorSize || sb.BlockSize > 1<<20:
		return bad("block size %d", sb.BlockSize)
	case sb.BucketSize < sb.BlockSize || sb.BucketSize%sb.BlockSize != 0 || sb.BucketSize > 1<<30:
		return bad("bucket size %d", sb.BucketSize)
	case sb.CkptOff != 2*metaBlock:
		return bad("checkpoint offset %d", sb.CkptOff)
	case sb.CkptSize < ckptHdrSize || sb.CkptSize%metaBlock != 0 || sb.CkptSize > 1<<40:
		return bad("checkpoint size %d", sb.CkptSize)
	case sb.JournalOff != sb.CkptOff+2*sb.CkptSize:
		return bad("journal offset %d", sb.JournalOff)
	case sb.JournalSize < 4*metaBlock || sb.JournalSize%metaBlock != 0 || sb.JournalSize > 1<<40:
		return bad("journal size %d", sb.JournalSize)
	case sb.DataOff < sb.JournalOff+sb.JournalSize || sb.DataOff%metaBlock != 0:
		return bad("data offset %d", sb.DataOff)
	case sb.NBuckets < minBuckets || sb.NBuckets > (sb.CacheSize-sb.DataOff)/sb.BucketSize:
		return bad("%d buckets of %d bytes from %d in %d bytes", sb.NBuckets, sb.BucketSize, sb.DataOff, sb.CacheSize)
	case sb.maxExtents() < 1:
		return bad("checkpoint slot of %d bytes holds no extent", sb.CkptSize)
	case sb.State > stateDirty:
		return bad("state %d", sb.State)
	}
	return nil
}

// layout computes a fresh superblock for a cache device of cacheSize bytes.
func layout(cacheSize, backingSize int64, blockSize int, bucketSize, journalSize int64) (*superblock, error) {
	sb := &superblock{BackingSize: backingSize, CacheSize: cacheSize, BlockSize: int64(blockSize), BucketSize: bucketSize}
	if blockSize == 0 {
		sb.BlockSize = defaultBlock
	}
	if bucketSize == 0 {
		sb.BucketSize = defaultBkt
	}
	sb.CkptOff = 2 * metaBlock
	// First guess of the buckets, ignoring metadata, then shrink until
	// everything fits.
	n := cacheSize / sb.BucketSize
	for ; n >= minBuckets; n-- {
		data := n * sb.BucketSize
		maxExt := 2*data/sb.BlockSize + 64
		sb.CkptSize = alignUp(ckptHdrSize+align8(n)+maxExt*ckptExtSize, metaBlock)
		sb.JournalOff = sb.CkptOff + 2*sb.CkptSize
		js := journalSize
		if js == 0 {
			js = min(max(data/32, 4<<20), 256<<20, alignUp(cacheSize/4, metaBlock))
		}
		sb.JournalSize = alignUp(max(js, 4*metaBlock), metaBlock)
		sb.DataOff = sb.JournalOff + sb.JournalSize
		if sb.DataOff+data <= cacheSize {
			break
		}
	}
	sb.NBuckets = n
	if err := sb.validate(cacheSize); err != nil {
		return nil, fmt.Errorf("%w: %d-byte cache device too small for %d-byte buckets: %w", ErrTooSmall, cacheSize, sb.BucketSize, err)
	}
	return sb, nil
}

// readSuper loads the newest valid superblock copy.
func readSuper(dev storage.Device) (*superblock, error) {
	var best *superblock
	var firstErr error
	for _, off := range []int64{0, metaBlock} {
		b := make([]byte, metaBlock)
		if dev.Size() < 2*metaBlock {
			return nil, ErrNotFormatted
		}
		if err := dev.ReadAt(b, off); err != nil {
			return nil, fmt.Errorf("cache: read superblock at %d: %w", off, err)
		}
		sb, err := decodeSuperblock(b, dev.Size())
		if err != nil {
			if firstErr == nil || (firstErr == ErrNotFormatted && err != ErrNotFormatted) {
				firstErr = fmt.Errorf("superblock copy at %d: %w", off, err)
			}
			continue
		}
		if best == nil || sb.Seq > best.Seq {
			best = sb
		}
	}
	if best == nil {
		return nil, firstErr
	}
	return best, nil
}

// writeSuper writes both copies, syncing after each, so that one valid copy
// exists at every moment.
func writeSuper(dev storage.Device, sb *superblock) error {
	b := sb.encode()
	for _, off := range []int64{0, metaBlock} {
		if err := dev.WriteAt(b, off, 0); err != nil {
			return fmt.Errorf("cache: write superblock at %d: %w", off, err)
		}
		if err := dev.Flush(); err != nil {
			return fmt.Errorf("cache: sync superblock: %w", err)
		}
	}
	return nil
}

// Format writes a fresh cache on cacheDev for backing. It refuses, with
// ErrDirty, to overwrite a valid cache that holds dirty data unless
// opts.Force; then it logs what is lost.
func Format(cacheDev, backing storage.Device, opts FormatOptions) error {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if backing.Size() <= 0 || backing.Size()%sectorSize != 0 {
		return fmt.Errorf("%w: backing size %d is not a positive multiple of %d", ErrBadOption, backing.Size(), sectorSize)
	}
	if bs := opts.BlockSize; bs != 0 && (bs < sectorSize || bs&(bs-1) != 0) {
		return fmt.Errorf("%w: block size %d", ErrBadOption, bs)
	}
	if old, err := readSuper(cacheDev); err == nil {
		st, rerr := loadState(cacheDev, old, breakNone, nil, false)
		switch {
		case rerr != nil && !opts.Force:
			return fmt.Errorf("%w: existing cache unreadable (%v); --force to overwrite", ErrDirty, rerr)
		case rerr != nil:
			log.Warn("cache: overwriting an unreadable cache; any dirty data in it is lost", "err", rerr)
		case st.idx.DirtyBytes() > 0 && !opts.Force:
			return fmt.Errorf("%w: %d dirty bytes in %d extents not yet written back; --force to discard them",
				ErrDirty, st.idx.DirtyBytes(), st.idx.DirtyLen())
		case st.idx.DirtyBytes() > 0:
			log.Warn("cache: formatting over dirty data; it is lost", "dirty_bytes", st.idx.DirtyBytes(), "dirty_extents", st.idx.DirtyLen())
		}
	}
	sb, err := layout(cacheDev.Size(), backing.Size(), opts.BlockSize, opts.BucketSize, opts.JournalSize)
	if err != nil {
		return err
	}
	sb.BackingID, sb.BackingPath = opts.BackingID, opts.BackingPath
	if _, err := rand.Read(sb.CacheID[:]); err != nil {
		return fmt.Errorf("cache: uuid: %w", err)
	}
	sb.CacheID[6] = sb.CacheID[6]&0x0f | 0x40
	sb.CacheID[8] = sb.CacheID[8]&0x3f | 0x80
	sb.State = stateClean
	sb.Seq = 1
	// Kill the old superblocks first, so a crash in the middle leaves no
	// valid cache pointing at a half-written layout.
	zero := make([]byte, 2*metaBlock)
	if err := cacheDev.WriteAt(zero, 0, 0); err != nil {
		return fmt.Errorf("cache: format: %w", err)
	}
	if err := cacheDev.Flush(); err != nil {
		return fmt.Errorf("cache: format: %w", err)
	}
	salt := sb.salt()
	ck := &ckptHeader{Seq: 1, JSeq: 1, JPos: 0, Seed: randSeed(), NBuckets: uint32(sb.NBuckets), NextVer: 1}
	body := encodeCkptBody(make([]uint8, sb.NBuckets), nil)
	ck.BodyCRC = crcSalted(salt, body)
	buf := append(encodeCkptHeader(salt, ck), body...)
	if err := cacheDev.WriteAt(buf, sb.CkptOff, 0); err != nil {
		return fmt.Errorf("cache: format: write checkpoint: %w", err)
	}
	if err := cacheDev.WriteAt(make([]byte, metaBlock), sb.CkptOff+sb.CkptSize, 0); err != nil {
		return fmt.Errorf("cache: format: clear checkpoint: %w", err)
	}
	if err := cacheDev.Flush(); err != nil {
		return fmt.Errorf("cache: format: %w", err)
	}
	return writeSuper(cacheDev, sb)
}

// inData reports whether [loc, loc+n) lies in the data area.
func (sb *superblock) inData(loc, n int64) bool {
	return loc >= sb.DataOff && n > 0 && loc+n <= sb.DataOff+sb.NBuckets*sb.BucketSize && loc+n > loc
}

// forBuckets calls fn for each piece of [loc, loc+n) within one bucket.
func (sb *superblock) forBuckets(loc, n int64, fn func(b, loc, n int64)) {
	for n > 0 {
		b := sb.bucketOf(loc)
		end := min(loc+n, sb.bucketStart(b+1))
		fn(b, loc, end-loc)
		n -= end - loc
		loc = end
	}
}
