package storage

import (
	"fmt"
	"testing"
)

// benchRandom4K runs 4 KiB requests at pseudo-random aligned offsets over
// the first 64 MiB of d (or all of it), in parallel (GOMAXPROCS
// goroutines; -cpu=1 for one at a time).
func benchRandom4K(b *testing.B, d Device, write bool, flags Flags) {
	const span = 64 << 20
	n := min(d.Size(), span) / 4096
	b.SetBytes(4096)
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		p := AlignedBuf(4096)
		x := uint64(len(p)) * 0x9e3779b97f4a7c15
		for pb.Next() {
			x ^= x << 13
			x ^= x >> 7
			x ^= x << 17
			off := int64(x%uint64(n)) * 4096
			var err error
			if write {
				err = d.WriteAt(p, off, flags)
			} else {
				err = d.ReadAt(p, off)
			}
			if err != nil {
				b.Error(err)
				return
			}
		}
	})
}

// prefill writes the first 64 MiB so that reads hit data.
func prefill(b *testing.B, d Device) {
	p := fill(1<<20, 1)
	for off := int64(0); off < min(d.Size(), 64<<20); off += int64(len(p)) {
		if err := d.WriteAt(p, off, 0); err != nil {
			b.Fatal(err)
		}
	}
	if err := d.Flush(); err != nil {
		b.Fatal(err)
	}
}

func BenchmarkMem4K(b *testing.B) {
	m := NewMem(64 << 20)
	prefill(b, m)
	b.Run("ReadAt", func(b *testing.B) { benchRandom4K(b, m, false, 0) })
	b.Run("WriteAt", func(b *testing.B) { benchRandom4K(b, m, true, 0) })
}

func BenchmarkCrash4K(b *testing.B) {
	c := NewCrash(64 << 20)
	prefill(b, c)
	b.Run("ReadAt", func(b *testing.B) { benchRandom4K(b, c, false, 0) })
	b.Run("WriteAt+Flush/64", func(b *testing.B) {
		// A Flush every 64 writes keeps the log (a copy of every
		// unsynced write) small, as a real user would.
		p := AlignedBuf(4096)
		b.SetBytes(4096)
		b.ReportAllocs()
		for i := 0; b.Loop(); i++ {
			if err := c.WriteAt(p, int64(i*7919%16384)*4096, 0); err != nil {
				b.Fatal(err)
			}
			if i%64 == 63 {
				if err := c.Flush(); err != nil {
					b.Fatal(err)
				}
			}
		}
	})
}

func BenchmarkFile4K(b *testing.B) {
	for _, direct := range []bool{false, true} {
		f := openTemp(b, 64<<20, direct)
		prefill(b, f)
		name := fmt.Sprintf("direct=%v", direct)
		b.Run(name+"/ReadAt", func(b *testing.B) { benchRandom4K(b, f, false, 0) })
		b.Run(name+"/WriteAt", func(b *testing.B) { benchRandom4K(b, f, true, 0) })
	}
}

// BenchmarkFileFUA compares the two ways File makes a write durable:
// pwritev2(RWF_DSYNC) and pwrite + fdatasync.
func BenchmarkFileFUA(b *testing.B) {
	for _, direct := range []bool{false, true} {
		for _, fallback := range []bool{false, true} {
			f := openTemp(b, 64<<20, direct)
			prefill(b, f)
			f.noDSync.Store(fallback)
			how := "pwritev2-dsync"
			if fallback {
				how = "pwrite+fdatasync"
			}
			b.Run(fmt.Sprintf("direct=%v/%s", direct, how), func(b *testing.B) { benchRandom4K(b, f, true, FUA) })
		}
	}
}

// BenchmarkFileFUAMixed measures a FUA write that follows 16 plain writes:
// fdatasync must also write those back, RWF_DSYNC only its own range.
func BenchmarkFileFUAMixed(b *testing.B) {
	for _, direct := range []bool{false, true} {
		for _, fallback := range []bool{false, true} {
			f := openTemp(b, 64<<20, direct)
			prefill(b, f)
			f.noDSync.Store(fallback)
			how := "pwritev2-dsync"
			if fallback {
				how = "pwrite+fdatasync"
			}
			b.Run(fmt.Sprintf("direct=%v/%s", direct, how), func(b *testing.B) {
				p := AlignedBuf(4096)
				b.SetBytes(17 * 4096)
				b.ReportAllocs()
				for i := 0; b.Loop(); i++ {
					for j := range 16 {
						if err := f.WriteAt(p, int64((i*16+j)*7919%16384)*4096, 0); err != nil {
							b.Fatal(err)
						}
					}
					if err := f.WriteAt(p, int64(i%16384)*4096, FUA); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
	}
}
