// Package btreeidx is the cache's extent index: it maps ranges of the
// virtual device to the place on the cache device that holds their data.
//
// # Model
//
// An Extent says that [Off, Off+Len) of the virtual device lives at
// [Loc, Loc+Len) of the cache device, was written by the write with
// version Ver (unique and increasing: the compare-and-swap token) into a
// bucket of generation Gen, and is Dirty until writeback has made it
// durable on the backing device. Extents are kept in a B-tree
// (github.com/google/btree, BTreeG) keyed by their END offset, as bcache
// does: the extent holding offset x is the first one whose end > x.
//
// Offsets, lengths and locations are bytes, multiples of SectorSize (512);
// the mutating methods panic with ErrInvalid otherwise (callers validate at
// their edge with Extent.Validate and ValidRange). Lookup and the Ascend
// methods accept any byte offsets.
//
// # Invariants (Check verifies all of them)
//
//  1. Extents are ordered by end and do not overlap: each starts at or
//     after the end of the one before; the first starts at or after 0.
//  2. Every extent has Len > 0, Len <= MaxItemLen, End() <= MaxOffset and
//     Loc+Len <= MaxLoc.
//  3. Gaps are uncached ranges. Adjacent extents are never merged unless
//     nothing observable but Len() changes: same Ver, Gen and Dirty, and
//     contiguous Loc (pieces of one write, rejoined by MarkClean or
//     Replace). Insert never merges: every write has its own Ver.
//  4. The dirty set holds every region with dirty extents. The virtual
//     device is cut into regions of 2 MiB; an extent belongs to region r
//     when 2r MiB <= End() < 2(r+1) MiB (its key decides). The set is a
//     paged bitmap of region numbers (regions.go). A dirty insert adds its
//     region; a region leaves only when AscendDirty walks it whole and
//     finds no dirty extent, so the set may also hold regions that became
//     clean since the last walk, and never misses one. AscendDirty visits
//     only the regions of the set.
//  5. Len, Bytes, DirtyBytes and DirtyLen equal what a full walk counts.
//
// # Ordering rules
//
// The Index is not safe for concurrent use. The cache holds its own mutex
// across every call, callbacks included. Callbacks may read the Index but
// must not modify it. Insert and Delete call dropped after the index has
// been updated, in ascending order, once per displaced piece, so the
// caller can account the freed space of each bucket. MarkClean and Replace
// are compare-and-swaps on Ver: a part that another write has replaced in
// the meantime is left alone and counted, never an error. The order
// writeback must respect (backing write durable before MarkClean) and GC
// must respect (copy durable before Replace, old bucket reused only after
// Replace) belongs to those callers; the Index only makes each swap
// atomic under the caller's lock.
//
// # Memory
//
// Each extent is one 24-byte tree item. The end sector leads the first
// word, so comparing keys is one shift and one compare; the other fields
// are packed around it:
//
//	word  bits    field
//	----  ------  ------------------------------------------------
//	w0    63..21  end sector       (43 bits: virtual device < 4 PiB)
//	w0    20..13  generation       (8 bits)
//	w0    12      dirty
//	w0    11      spare, always 0
//	w0    10..0   location sector, high 11 bits
//	ver   63..0   version          (64 bits)
//	w2    63..32  location sector, low 32 bits (43 in all: cache < 4 PiB)
//	w2    31..0   length in sectors (32 bits: < 2 TiB per item)
//
// The dirty set costs one bit per region, in 1 KiB pages that each cover
// 16 GiB of the virtual device: at most 64 KiB per TiB that ever held
// dirty data, whatever the number of dirty extents, and keeping it is a
// lookup in a small map and one OR per dirty insert (the earlier exact
// per-region counts in a second B-tree cost two tree descents per insert,
// a third of the time of a dirty insert). The B-tree uses degree 64.
// Measured by BenchmarkMemory (1e6 extents of 4 KiB, heap bytes per
// extent) and TestMemory (2e5 sparse extents): random and never adjacent
// 35 clean or dirty; sequential 50 clean or dirty (B-tree nodes split in
// the middle, so appending in order leaves them half full). TestLong
// (1e7 random 4 KiB inserts over 1 TiB): 35.4 clean or dirty.
//
// Calls do not allocate in the steady state: results go to callbacks, and
// range operations reuse one scratch slice of at most 64 items (they work
// in batches of that size, so a huge Delete does not grow it).
package btreeidx
