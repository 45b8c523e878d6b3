package cache

import (
	"bytes"
	"encoding/binary"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/nbdcache/nbdcache/storage"
)

var flagUpdateCorpus = flag.Bool("update-corpus", false, "rewrite the seed corpora under testdata/fuzz")

const fuzzSalt = 0x12345678

func sampleSuper() *superblock {
	sb, err := layout(4<<20, 8<<20, 4096, 64<<10, 64<<10)
	if err != nil {
		panic(err)
	}
	sb.CacheID = [16]byte{9, 9, 9}
	sb.BackingID = testBackingID
	sb.Seq = 7
	return sb
}

func sampleJBlock() []byte {
	b, _ := encodeJBlock(fuzzSalt, 5, 0xabcdef01, []record{
		{Type: recInsert, Gen: 1, Dirty: true, Off: 4096, Len: 8192, Loc: 1 << 20, Ver: 3, CRC: 77},
		{Type: recDelete, Off: 0, Len: 512},
		{Type: recClean, Off: 4096, Len: 4096, Ver: 3},
		{Type: recReplace, Gen: 2, Off: 4096, Len: 4096, Loc: 2 << 20, Ver: 3, CRC: 78},
	}, 4, 2)
	return b
}

func sampleCkpt() []byte {
	gens := []uint8{1, 2, 3, 4, 5}
	ext := []ckptExtent{{Off: 0, Len: 4096, Loc: 1 << 20, Ver: 1, Gen: 1, Dirty: true}, {Off: 8192, Len: 512, Loc: 2 << 20, Ver: 2, Gen: 2}}
	body := encodeCkptBody(gens, ext)
	h := &ckptHeader{Seq: 3, JSeq: 10, JPos: 2, Seed: 42, NBuckets: uint32(len(gens)), NextVer: 3, NExt: uint64(len(ext)),
		BodyCRC: crcSalted(fuzzSalt, body)}
	return append(encodeCkptHeader(fuzzSalt, h), body...)
}

// FuzzSuperblock: any bytes decode to an error or to a superblock that
// re-encodes to the same bytes.
func FuzzSuperblock(f *testing.F) {
	f.Add(sampleSuper().encode())
	withPath := sampleSuper()
	withPath.BackingPath = "/srv/disks/backing.img"
	f.Add(withPath.encode())
	f.Fuzz(func(t *testing.T, b []byte) {
		sb, err := decodeSuperblock(b, -1)
		if err != nil {
			return
		}
		// A version 1 superblock re-encodes as the current version.
		want := append([]byte(nil), b[:sbUsed+4]...)
		if binary.LittleEndian.Uint32(want[8:]) != formatVer {
			binary.LittleEndian.PutUint32(want[8:], formatVer)
			binary.LittleEndian.PutUint32(want[sbUsed:], crc(want[:sbUsed]))
		}
		if got := sb.encode(); !bytes.Equal(got[:sbUsed+4], want) {
			t.Fatalf("round trip differs")
		} else if p := decodePathHint(got[pathHintOff:pathHintEnd]); p != sb.BackingPath {
			t.Fatalf("backing path hint %q re-reads as %q", sb.BackingPath, p)
		}
	})
}

// FuzzJournalBlock: any bytes decode to an error or to valid records that
// re-encode to the same block.
func FuzzJournalBlock(f *testing.F) {
	f.Add(sampleJBlock())
	f.Fuzz(func(t *testing.T, b []byte) {
		jb, err := decodeJBlock(fuzzSalt, b)
		if err != nil {
			return
		}
		for _, r := range jb.Recs {
			if r.Len <= 0 || r.Off < 0 || r.Loc < 0 || r.Off%sectorSize != 0 || r.Loc%sectorSize != 0 {
				t.Fatalf("invalid record accepted: %+v", r)
			}
		}
		got, sum := encodeJBlock(fuzzSalt, jb.Seq, jb.Prev, jb.Recs, jb.Durable, jb.Ckpt)
		if sum != jb.CRC || !bytes.Equal(got, b) {
			t.Fatalf("round trip differs")
		}
	})
}

// FuzzCheckpoint: header and body decode to an error or to sorted,
// non-overlapping, aligned extents.
func FuzzCheckpoint(f *testing.F) {
	f.Add(sampleCkpt())
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := decodeCkptHeader(fuzzSalt, b)
		if err != nil {
			return
		}
		if h.bodyLen() > 1<<20 || int64(len(b)) < ckptHdrSize {
			return
		}
		body := b[ckptHdrSize:]
		if int64(len(body)) > h.bodyLen() {
			body = body[:h.bodyLen()]
		}
		ck, err := decodeCkptBody(fuzzSalt, h, body)
		if err != nil {
			return
		}
		var end int64
		for _, e := range ck.Ext {
			if e.Off < end || e.Len <= 0 || e.Off%sectorSize != 0 || e.Loc%sectorSize != 0 {
				t.Fatalf("bad extent accepted: %+v", e)
			}
			end = e.Off + e.Len
		}
	})
}

// fuzzImage builds a small cache image with dirty and clean data, a
// checkpoint and a journal tail, and returns it with its backing and the
// metadata size (everything before the data area).
func fuzzImage(tb testing.TB) (cache, back []byte, meta int64) {
	d := formatMem(tb, 512<<10+128<<10, 256<<10, FormatOptions{BlockSize: 4096, BucketSize: 32 << 10, JournalSize: 16 * metaBlock})
	c := openStillT(tb, d, Options{PromoteAll: true})
	for i := int64(0); i < 24; i++ {
		off := (i * 7919 * sectorSize) % (256<<10 - 8192)
		if err := c.WriteAt(payload(off, 4096, uint64(i+1)), off, 0); err != nil {
			tb.Fatal(err)
		}
		if i == 12 {
			c.Checkpoint()
			writebackStep(c, 0, 16<<10)
		}
	}
	c.Flush()
	cache = make([]byte, d.cache.Size())
	back = make([]byte, d.back.Size())
	d.cache.ReadAt(cache, 0)
	d.back.ReadAt(back, 0)
	sb, _ := readSuper(d.cache)
	return cache, back, sb.DataOff
}

// FuzzImage: a cache image whose metadata is mutated is reported by Check
// or Open, or opens and serves only data some write really wrote (sector
// self-description), never panics.
func FuzzImage(f *testing.F) {
	img, back, meta := fuzzImage(f)
	f.Add(uint32(0), []byte{0xff})
	f.Add(uint32(2*metaBlock+70), []byte{1, 2, 3})
	f.Add(uint32(meta-1000), []byte{0})
	f.Fuzz(func(t *testing.T, at uint32, patch []byte) {
		m := append([]byte(nil), img...)
		off := int64(at) % meta
		copy(m[off:meta], patch)
		cdev, bdev := storage.NewMem(int64(len(m))), storage.NewMem(int64(len(back)))
		cdev.WriteAt(m, 0, 0)
		bdev.WriteAt(back, 0, 0)
		Check(cdev, bdev)
		c, err := openStill(cdev, bdev, Options{BackingID: testBackingID})
		if err != nil {
			return
		}
		defer c.Close()
		buf := make([]byte, len(back))
		if err := c.ReadAt(buf, 0); err != nil {
			return
		}
		for s := int64(0); s < int64(len(back))/sectorSize; s++ {
			if _, err := sectorID(buf[s*sectorSize:(s+1)*sectorSize], s); err != nil {
				t.Fatalf("served garbage after a metadata mutation at %d: %v", off, err)
			}
		}
	})
}

// TestWriteFuzzCorpus regenerates the checked-in seed corpora.
func TestWriteFuzzCorpus(t *testing.T) {
	if !*flagUpdateCorpus {
		t.Skip("-update-corpus not set")
	}
	write := func(name string, i int, args ...any) {
		dir := filepath.Join("testdata", "fuzz", name)
		os.MkdirAll(dir, 0o755)
		var buf bytes.Buffer
		buf.WriteString("go test fuzz v1\n")
		for _, a := range args {
			switch v := a.(type) {
			case []byte:
				fmt.Fprintf(&buf, "[]byte(%q)\n", v)
			case uint32:
				fmt.Fprintf(&buf, "uint32(%d)\n", v)
			}
		}
		if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("seed%d", i)), buf.Bytes(), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	sb := sampleSuper().encode()
	write("FuzzSuperblock", 0, sb[:sbUsed+4])
	bad := append([]byte(nil), sb[:sbUsed+4]...)
	binary.LittleEndian.PutUint32(bad[8:], formatVer+1)
	write("FuzzSuperblock", 1, bad)
	write("FuzzJournalBlock", 0, sampleJBlock())
	jb := sampleJBlock()
	jb[30] ^= 1
	write("FuzzJournalBlock", 1, jb)
	write("FuzzCheckpoint", 0, sampleCkpt())
	ck := sampleCkpt()
	write("FuzzCheckpoint", 1, ck[:ckptHdrSize])
	_, _, meta := fuzzImage(t)
	write("FuzzImage", 0, uint32(metaBlock+8), []byte{0})
	write("FuzzImage", 1, uint32(meta-metaBlock), []byte("NBDJ"))
}

// encodeJBlock encodes a whole journal block at once, as the fuzz targets
// need; the cache encodes records as they are appended (appendLocked) and
// finishes the block with finishJBlock.
func encodeJBlock(salt uint32, seq uint64, prev uint32, recs []record, durable, ckpt uint64) ([]byte, uint32) {
	b := make([]byte, metaBlock)
	for i := range recs {
		recs[i].encode(b[jHdrSize+i*jRecSize:])
	}
	return b, finishJBlock(b, salt, seq, prev, len(recs), durable, ckpt)
}
