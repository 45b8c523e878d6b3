package storage

import (
	"bytes"
	"testing"

	"github.com/nbdcache/nbdcache/test/testseed"
)

// TestCutAgreement: Crash replays what planCut keeps and Volatile undoes
// what it drops. Given the same requests and the same seed, the two must
// leave the same bytes and report the same tear, under every model.
func TestCutAgreement(t *testing.T) {
	rounds := 200
	if *longFlag {
		rounds = 3000
	}
	for _, model := range []LossModel{LoseUnsynced, LoseRandom, LoseTorn, KeepUnsynced} {
		t.Run(model.String(), func(t *testing.T) {
			seed := testseed.Get(t)
			rng := newRand(seed)
			const size = 96 * SectorSize
			tears := 0
			for round := range rounds {
				img := fill(size, rng.Uint64())
				c := NewCrash(size)
				mem := NewMem(size)
				for _, d := range []Device{c, mem} {
					if err := d.WriteAt(img, 0, FUA); err != nil {
						t.Fatal(err)
					}
				}
				v := NewVolatile(mem, VolatileOptions{})
				for range 1 + rng.IntN(40) {
					off := rng.Int64N(size)
					n := 1 + rng.Int64N(min(size-off, 4000))
					var fl Flags
					if rng.IntN(6) == 0 {
						fl = FUA
					}
					k, p := rng.IntN(10), fill(int(n), rng.Uint64())
					for _, d := range []Device{c, v} {
						var err error
						switch {
						case k < 7:
							err = d.WriteAt(p, off, fl)
						case k < 8:
							err = d.Zero(off, n, fl)
						case k < 9:
							err = d.Trim(off, n, fl)
						default:
							err = d.Flush()
						}
						if err != nil {
							t.Fatalf("round %d: %v", round, err)
						}
					}
				}
				cs := rng.Uint64()
				nc, crep := c.PowerCut(model, newRand(cs))
				vrep, err := v.Cut(model, newRand(cs))
				if err != nil {
					t.Fatal(err)
				}
				if crep.Tear != vrep.Tear {
					t.Fatalf("round %d: Crash tore %+v, Volatile %+v", round, crep.Tear, vrep.Tear)
				}
				if got, want := readAll(t, mem), readAll(t, nc); !bytes.Equal(got, want) {
					t.Fatalf("round %d: Volatile and Crash differ: %s", round, firstDiff(got, want))
				}
				if crep.Torn || crep.Garbage {
					tears++
				}
			}
			if model == LoseTorn && tears == 0 {
				t.Errorf("LoseTorn never tore: the agreement was not put to the test")
			}
		})
	}
}
