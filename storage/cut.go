package storage

// cut.go: the one decision of what a power cut keeps. Crash replays the
// kept part of its redo log onto the durable image; Volatile undoes the
// rest of its undo log. Both ask planCut.

import "math/rand/v2"

// LossModel chooses what a power cut (Crash.PowerCut, CutVolatile) keeps
// of the unsynced operations. Durable data (flushed, or written with FUA)
// always survives, except for the one garbage sector LoseTorn may produce;
// see LoseTorn. Both devices decide with the same function, planCut.
type LossModel uint8

const (
	// LoseUnsynced drops every unsynced operation: the new device holds
	// exactly the durable image. (A FUA op makes whole sectors durable:
	// the bytes an older op put beside it in a sector it touches survive
	// with it; see planCut.)
	LoseUnsynced LossModel = iota
	// LoseRandom keeps each 512-byte sector of each unsynced operation
	// independently with probability 1/2, and applies the survivors on
	// top of the durable image in the order the operations were made. A
	// sector so holds its content after the newest operation that kept
	// it (with the older ones' bytes beside it), or its durable content.
	LoseRandom
	// LoseTorn is LoseRandom plus a torn last write and, sometimes, one
	// garbage sector:
	//
	//   - W is the last unsynced write (WriteAt without FUA; never a Trim
	//     or Zero) of which LoseRandom kept at least one sector that no
	//     newer operation keeps too (a free sector). W covers n device
	//     sectors, numbered 0..n-1 (a partial first or last sector counts
	//     as one).
	//   - A tear point t is drawn uniformly from 1..n. The free sectors
	//     t..n-1 of W are dropped, i.e. they keep whatever the sectors
	//     held before W (t = n: W is not torn).
	//   - With probability 1/2, one whole 512-byte device sector becomes
	//     random bytes: sector t of W if t < n and it is free (the sector
	//     being written when the power failed), else, for t = n, a free
	//     sector of W that was kept. A sector a newer operation keeps
	//     never turns to garbage.
	//
	// So garbage appears only in a sector that an unsynced write touched,
	// but that sector may have held durable data before, FUA data
	// included: a device that overwrites durable data in place can lose
	// it. Layouts that never
	// overwrite live data (append-only buckets, two superblock copies)
	// are the defence.
	LoseTorn
	// KeepUnsynced keeps every operation, like a process kill with the
	// operating system surviving.
	KeepUnsynced
)

// String names the model.
func (m LossModel) String() string {
	switch m {
	case LoseUnsynced:
		return "lose-unsynced"
	case LoseRandom:
		return "lose-random"
	case LoseTorn:
		return "lose-torn"
	case KeepUnsynced:
		return "keep-unsynced"
	}
	return "unknown"
}

// Tear says what LoseTorn did beyond LoseRandom.
type Tear struct {
	// Torn reports that the tear dropped at least one sector that
	// LoseRandom had kept; TornOff is the first byte of the torn write
	// that the tear dropped.
	Torn    bool  `json:"torn"`
	TornOff int64 `json:"torn_off"`
	// Garbage reports that the 512-byte sector at GarbageOff was filled
	// with random bytes, at the torn write's place in the order.
	Garbage    bool  `json:"garbage"`
	GarbageOff int64 `json:"garbage_off"`
}

// cutOp is one unsynced operation, in the order the device saw them.
type cutOp struct {
	kind   OpKind // OpWrite, OpTrim or OpZero
	off, n int64
	forced bool // written with FUA: kept whole by every model
}

// cutPlan is what a cut keeps of a log of cutOps.
type cutPlan struct {
	// keep holds, per op, one bit per device sector the op touches
	// (sectorsOf), set if the sector is kept; nil for a forced op.
	keep [][]uint64
	// torn is the index of LoseTorn's write W (-1: none).
	torn int
	Tear
	// junk is the garbage sector's new content (SectorSize bytes).
	junk []byte
}

// planCut decides, for model, which sectors of ops survive. Draws come
// from rng in a fixed order, so one seed gives one plan.
//
// A sector's content after a cut is its content after one of the ops that
// touched it, or its durable content: never bytes of an older op beside
// bytes its newer ones lost. So once the draws are made, every op older
// than the newest op kept in a sector is kept there too (covered); a
// forced op is always kept, which makes the whole sectors it touches
// durable, as a disk's read-modify-write of a sector would.
func planCut(ops []cutOp, model LossModel, rng *rand.Rand) cutPlan {
	p := cutPlan{keep: make([][]uint64, len(ops)), torn: -1, Tear: Tear{TornOff: -1, GarbageOff: -1}}
	for i, op := range ops {
		if op.forced {
			continue
		}
		n := sectorsOf(op.off, op.n)
		bits := make([]uint64, (n+63)/64)
		switch model {
		case KeepUnsynced:
			fillBits(bits, n)
		case LoseRandom, LoseTorn:
			for w := range bits {
				bits[w] = rng.Uint64()
			}
			trimBits(bits, n)
		}
		p.keep[i] = bits
	}
	if model == LoseTorn {
		p.tear(ops, p.covered(ops), rng)
	}
	// Covered again after a tear: the sectors W lost no longer cover
	// older ops.
	for i, c := range p.covered(ops) {
		for w := range c {
			p.keep[i][w] |= c[w]
		}
	}
	return p
}

// covered returns, per op, the bits of its sectors that a newer op keeps
// (nil: none).
func (p *cutPlan) covered(ops []cutOp) [][]uint64 {
	out := make([][]uint64, len(ops))
	kept := make(map[int64]bool)
	for i := len(ops) - 1; i >= 0; i-- {
		first, n := ops[i].off/SectorSize, sectorsOf(ops[i].off, ops[i].n)
		for s := range n {
			switch {
			case kept[first+int64(s)]:
				if p.keep[i] != nil {
					if out[i] == nil {
						out[i] = make([]uint64, (n+63)/64)
					}
					setBit(out[i], s, true)
				}
			case p.kept(i, s):
				kept[first+int64(s)] = true
			}
		}
	}
	return out
}

// tear implements LoseTorn's tear and garbage on the drawn bits. It
// touches only sectors that no newer op keeps (cov is p.covered).
func (p *cutPlan) tear(ops []cutOp, cov [][]uint64, rng *rand.Rand) {
	free := func(i, s int) bool { return cov[i] == nil || !getBit(cov[i], s) }
	w := -1
	for i := len(ops) - 1; i >= 0 && w < 0; i-- {
		if ops[i].kind != OpWrite || ops[i].forced {
			continue
		}
		for s := range sectorsOf(ops[i].off, ops[i].n) {
			if getBit(p.keep[i], s) && free(i, s) {
				w = i
				break
			}
		}
	}
	if w < 0 {
		return
	}
	p.torn = w
	op, bits := ops[w], p.keep[w]
	n := sectorsOf(op.off, op.n)
	first := op.off / SectorSize
	t := 1 + rng.IntN(n)
	for s := t; s < n; s++ {
		if getBit(bits, s) && free(w, s) {
			if !p.Torn {
				p.Torn = true
				p.TornOff = max(op.off, (first+int64(s))*SectorSize)
			}
			setBit(bits, s, false)
		}
	}
	if rng.IntN(2) == 0 {
		return
	}
	s := t
	if t == n {
		// Some free sector of W was kept: that is how W was chosen.
		var kept []int
		for j := range n {
			if getBit(bits, j) && free(w, j) {
				kept = append(kept, j)
			}
		}
		s = kept[rng.IntN(len(kept))]
	} else if !free(w, s) {
		return
	}
	p.Garbage, p.GarbageOff = true, (first+int64(s))*SectorSize
	p.junk = make([]byte, SectorSize)
	for j := range p.junk {
		p.junk[j] = byte(rng.Uint32())
	}
}

// kept reports whether the plan keeps sector s (op-relative) of op i.
func (p *cutPlan) kept(i, s int) bool { return p.keep[i] == nil || getBit(p.keep[i], s) }

// sectorsOf is the number of device sectors [off, off+n) touches.
func sectorsOf(off, n int64) int {
	return int((off+n-1)/SectorSize - off/SectorSize + 1)
}

func getBit(bits []uint64, i int) bool { return bits[i/64]&(1<<(i%64)) != 0 }

func setBit(bits []uint64, i int, v bool) {
	if v {
		bits[i/64] |= 1 << (i % 64)
	} else {
		bits[i/64] &^= 1 << (i % 64)
	}
}

func anyBit(bits []uint64) bool {
	for _, w := range bits {
		if w != 0 {
			return true
		}
	}
	return false
}

// fillBits sets bits 0..n-1.
func fillBits(bits []uint64, n int) {
	for i := range bits {
		bits[i] = ^uint64(0)
	}
	trimBits(bits, n)
}

// trimBits clears the bits at n and above.
func trimBits(bits []uint64, n int) {
	if n%64 != 0 {
		bits[len(bits)-1] &= 1<<(n%64) - 1
	}
}
