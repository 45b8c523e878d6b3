package cache

// encoding.go: the journal's records and blocks, and checkpoints, as they
// lie on the cache device (format.go has the superblock and the layout).

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
)

// Journal record types.
const (
	recInsert  uint8 = 1 // Off, Len, Loc, Gen, Ver, Dirty, data CRC
	recDelete  uint8 = 2 // Off, Len
	recClean   uint8 = 3 // Off, Len, Ver (writeback's CAS)
	recReplace uint8 = 4 // Off, Len, Ver, Loc, Gen, data CRC (GC's CAS move)
)

// record is one index update in the journal.
type record struct {
	Type  uint8
	Gen   uint8
	Dirty bool
	Off   int64
	Len   int64
	Loc   int64
	Ver   uint64
	CRC   uint32 // crc32c of the data at Loc (insert, replace)
}

func (r *record) encode(b []byte) {
	le := binary.LittleEndian
	b[0] = r.Type
	b[1] = r.Gen
	b[2] = 0
	if r.Dirty {
		b[2] = 1
	}
	b[3] = 0
	le.PutUint32(b[4:], uint32(r.Len/sectorSize))
	le.PutUint64(b[8:], uint64(r.Off))
	le.PutUint64(b[16:], uint64(r.Loc))
	le.PutUint64(b[24:], r.Ver)
	le.PutUint32(b[32:], r.CRC)
	le.PutUint32(b[36:], 0)
}

func decodeRecord(b []byte) (record, error) {
	le := binary.LittleEndian
	r := record{Type: b[0], Gen: b[1], Dirty: b[2] == 1}
	r.Len = int64(le.Uint32(b[4:])) * sectorSize
	r.Off = int64(le.Uint64(b[8:]))
	r.Loc = int64(le.Uint64(b[16:]))
	r.Ver = le.Uint64(b[24:])
	r.CRC = le.Uint32(b[32:])
	switch {
	case r.Type < recInsert || r.Type > recReplace:
		return r, fmt.Errorf("%w: journal record type %d", ErrCorrupt, r.Type)
	case b[2] > 1 || b[3] != 0 || le.Uint32(b[36:]) != 0:
		return r, fmt.Errorf("%w: journal record flags", ErrCorrupt)
	case r.Len <= 0 || r.Off < 0 || r.Off%sectorSize != 0 || r.Loc < 0 || r.Loc%sectorSize != 0 || r.Off > 1<<62 || r.Loc > 1<<62:
		return r, fmt.Errorf("%w: journal record range [%d+%d)@%d", ErrCorrupt, r.Off, r.Len, r.Loc)
	}
	return r, nil
}

// jblock is a decoded journal block.
type jblock struct {
	Seq  uint64
	Prev uint32 // chain: the CRC of the block before, or the checkpoint's seed
	Recs []record
	CRC  uint32 // this block's own checksum (the next block's Prev)
	// Durable: when the block was written, every block with a lower
	// sequence was durable (0: not known, as in format version 1).
	Durable uint64
	// Ckpt: when the block was written, checkpoint Ckpt was durable (0:
	// not known, as in blocks written before the field existed). A valid
	// block whose Ckpt is above the loaded checkpoint's sequence proves
	// that a newer checkpoint than the loaded one was durable.
	Ckpt uint64
}

// finishJBlock writes the header and checksum of a journal block whose n
// records are already encoded in b, and returns the checksum. durable and
// ckpt are what the writer knew: every block with a sequence below durable
// (at most seq) was durable, and so was checkpoint ckpt.
func finishJBlock(b []byte, salt uint32, seq uint64, prev uint32, n int, durable, ckpt uint64) uint32 {
	le := binary.LittleEndian
	copy(b[0:4], jMagic)
	le.PutUint32(b[4:], uint32(n))
	le.PutUint64(b[8:], seq)
	le.PutUint32(b[16:], prev)
	le.PutUint32(b[20:], durableField(seq, durable))
	le.PutUint64(b[jCkptOff:], ckpt)
	c := crc32.Update(salt, castagnoli(), b[:metaBlock-4])
	le.PutUint32(b[metaBlock-4:], c)
	return c
}

// durableField encodes durable (1 to seq) as seq-durable+1; 0 (what
// version 1 wrote) means nothing is known, as for a durable of 0 or a
// distance beyond 32 bits.
func durableField(seq, durable uint64) uint32 {
	if durable == 0 || durable > seq || seq-durable >= 1<<32-1 {
		return 0
	}
	return uint32(seq - durable + 1)
}

// The two ways a block that was never written whole fails to decode: a
// slot never written (or overwritten by something else) has no magic; a
// torn write, damage, or a block of an earlier format (another salt)
// fails the checksum.
var (
	errJBlockMagic    = fmt.Errorf("%w: journal block magic", ErrCorrupt)
	errJBlockChecksum = fmt.Errorf("%w: journal block checksum", ErrCorrupt)
)

// decodeJBlock checks magic, checksum and record count, and decodes.
// Sequence and chain are the caller's business.
func decodeJBlock(salt uint32, b []byte) (*jblock, error) {
	if len(b) != metaBlock {
		return nil, fmt.Errorf("%w: journal block of %d bytes", ErrCorrupt, len(b))
	}
	le := binary.LittleEndian
	if string(b[0:4]) != jMagic {
		return nil, errJBlockMagic
	}
	c := crc32.Update(salt, castagnoli(), b[:metaBlock-4])
	if c != le.Uint32(b[metaBlock-4:]) {
		return nil, errJBlockChecksum
	}
	n := le.Uint32(b[4:])
	if n > jRecsPerBlk {
		return nil, fmt.Errorf("%w: journal block with %d records", ErrCorrupt, n)
	}
	jb := &jblock{Seq: le.Uint64(b[8:]), Prev: le.Uint32(b[16:]), CRC: c, Recs: make([]record, n), Ckpt: le.Uint64(b[jCkptOff:])}
	if d := uint64(le.Uint32(b[20:])); d > 0 {
		if d-1 >= jb.Seq {
			return nil, fmt.Errorf("%w: journal block %d says block %d was durable", ErrCorrupt, jb.Seq, int64(jb.Seq)-int64(d-1))
		}
		jb.Durable = jb.Seq - (d - 1)
	}
	for i := range jb.Recs {
		r, err := decodeRecord(b[jHdrSize+int(i)*jRecSize:])
		if err != nil {
			return nil, fmt.Errorf("record %d: %w", i, err)
		}
		jb.Recs[i] = r
	}
	return jb, nil
}

// ckptHeader is the decoded header of a checkpoint slot.
type ckptHeader struct {
	Seq      uint64 // checkpoint number, increasing
	JSeq     uint64 // sequence of the first journal block to replay
	JPos     int64  // its slot in the journal ring
	Seed     uint32 // the Prev that block must carry
	NBuckets uint32
	NextVer  uint64
	NExt     uint64
	BodyCRC  uint32
}

func (h *ckptHeader) bodyLen() int64 { return align8(int64(h.NBuckets)) + int64(h.NExt)*ckptExtSize }

// checkpoint is a decoded checkpoint: the index and bucket generations as of
// journal block JSeq-1.
type checkpoint struct {
	ckptHeader
	Gens []uint8
	Ext  []ckptExtent
}

type ckptExtent struct {
	Off, Len, Loc int64
	Ver           uint64
	Gen           uint8
	Dirty         bool
}

func encodeCkptHeader(salt uint32, h *ckptHeader) []byte {
	b := make([]byte, ckptHdrSize)
	le := binary.LittleEndian
	copy(b[0:8], ckptMagic)
	le.PutUint64(b[8:], h.Seq)
	le.PutUint64(b[16:], h.JSeq)
	le.PutUint64(b[24:], uint64(h.JPos))
	le.PutUint32(b[32:], h.Seed)
	le.PutUint32(b[36:], h.NBuckets)
	le.PutUint64(b[40:], h.NextVer)
	le.PutUint64(b[48:], h.NExt)
	le.PutUint32(b[56:], h.BodyCRC)
	le.PutUint32(b[60:], crc32.Update(salt, castagnoli(), b[:60]))
	return b
}

func decodeCkptHeader(salt uint32, b []byte) (*ckptHeader, error) {
	if len(b) < ckptHdrSize {
		return nil, fmt.Errorf("%w: short checkpoint header", ErrCorrupt)
	}
	if string(b[0:8]) != ckptMagic {
		return nil, fmt.Errorf("%w: checkpoint magic", ErrCorrupt)
	}
	le := binary.LittleEndian
	if crc32.Update(salt, castagnoli(), b[:60]) != le.Uint32(b[60:]) {
		return nil, fmt.Errorf("%w: checkpoint header checksum", ErrCorrupt)
	}
	h := &ckptHeader{
		Seq: le.Uint64(b[8:]), JSeq: le.Uint64(b[16:]), JPos: int64(le.Uint64(b[24:])), Seed: le.Uint32(b[32:]),
		NBuckets: le.Uint32(b[36:]), NextVer: le.Uint64(b[40:]), NExt: le.Uint64(b[48:]), BodyCRC: le.Uint32(b[56:]),
	}
	if h.NExt > 1<<40 || h.JPos < 0 {
		return nil, fmt.Errorf("%w: checkpoint header fields", ErrCorrupt)
	}
	return h, nil
}

func encodeCkptBody(gens []uint8, ext []ckptExtent) []byte {
	b := make([]byte, 0, align8(int64(len(gens)))+int64(len(ext))*ckptExtSize)
	b = appendCkptGens(b, len(gens), func(i int) uint8 { return gens[i] })
	for _, e := range ext {
		b = appendCkptExtent(b, e)
	}
	return b
}

// appendCkptGens appends the generation bytes of n buckets, padded to 8.
func appendCkptGens(b []byte, n int, gen func(int) uint8) []byte {
	for i := range n {
		b = append(b, gen(i))
	}
	for i := int64(n); i < align8(int64(n)); i++ {
		b = append(b, 0)
	}
	return b
}

// appendCkptExtent appends one 32-byte checkpoint extent.
func appendCkptExtent(b []byte, e ckptExtent) []byte {
	le := binary.LittleEndian
	var dirty uint8
	if e.Dirty {
		dirty = 1
	}
	b = le.AppendUint64(b, uint64(e.Off))
	b = le.AppendUint32(b, uint32(e.Len/sectorSize))
	b = append(b, e.Gen, dirty, 0, 0)
	b = le.AppendUint64(b, uint64(e.Loc))
	return le.AppendUint64(b, e.Ver)
}

// decodeCkptBody decodes the body described by h; extents must be valid,
// sorted and non-overlapping.
func decodeCkptBody(salt uint32, h *ckptHeader, b []byte) (*checkpoint, error) {
	if int64(len(b)) != h.bodyLen() {
		return nil, fmt.Errorf("%w: checkpoint body of %d bytes, want %d", ErrCorrupt, len(b), h.bodyLen())
	}
	if crc32.Update(salt, castagnoli(), b) != h.BodyCRC {
		return nil, fmt.Errorf("%w: checkpoint body checksum", ErrCorrupt)
	}
	ck := &checkpoint{ckptHeader: *h, Gens: append([]uint8(nil), b[:h.NBuckets]...)}
	n := align8(int64(h.NBuckets))
	le := binary.LittleEndian
	ck.Ext = make([]ckptExtent, h.NExt)
	var prevEnd int64
	for i := range ck.Ext {
		p := b[n+int64(i)*ckptExtSize:]
		e := ckptExtent{Off: int64(le.Uint64(p[0:])), Len: int64(le.Uint32(p[8:])) * sectorSize, Gen: p[12], Dirty: p[13] == 1,
			Loc: int64(le.Uint64(p[16:])), Ver: le.Uint64(p[24:])}
		if p[13] > 1 || p[14] != 0 || p[15] != 0 || e.Len <= 0 || e.Off < prevEnd || e.Off%sectorSize != 0 ||
			e.Loc < 0 || e.Loc%sectorSize != 0 || e.Off > 1<<62 || e.Loc > 1<<62 {
			return nil, fmt.Errorf("%w: checkpoint extent %d [%d+%d)@%d", ErrCorrupt, i, e.Off, e.Len, e.Loc)
		}
		prevEnd = e.Off + e.Len
		ck.Ext[i] = e
	}
	return ck, nil
}
