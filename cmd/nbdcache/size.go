package main

// size.go: sizes with units: parsing, printing and the flag.

import (
	"fmt"
	"math/big"
	"strconv"
	"strings"
)

// parseSize reads a byte count: a number, maybe with a fraction, and an
// optional unit, with the meanings storage tools give them:
//   - K, M, G, T, P, E alone, or KiB, MiB, ... : binary, as in qemu-img
//     and nbdkit ("4M" and "4MiB" are 4 MiB);
//   - kB, MB, GB, TB, PB, EB: decimal (SI: "4kB" is 4000 bytes);
//   - B, or nothing: bytes.
//
// Case does not matter ("8mb" is 8 MB, decimal). A fraction must come to
// a whole number of bytes: "1.5G" is 1610612736, "1.3B" is refused.
func parseSize(s string) (int64, error) {
	bad := func(why string) (int64, error) {
		return 0, fmt.Errorf("bad size %q: %s (want a number with an optional unit: K, M, G, T or KiB, MiB, ... binary; kB, MB, GB, TB decimal)", s, why)
	}
	t := strings.TrimSpace(s)
	i := strings.IndexFunc(t, func(r rune) bool { return (r < '0' || r > '9') && r != '.' })
	if i < 0 {
		i = len(t)
	}
	num, unit := t[:i], strings.ToLower(strings.TrimSpace(t[i:]))
	if num == "" || strings.Count(num, ".") > 1 || num == "." {
		return bad("no number")
	}
	mult, ok := sizeUnits[unit]
	if !ok {
		return bad("unknown unit")
	}
	// num as the fraction whole/10^k, exactly.
	whole, frac, _ := strings.Cut(num, ".")
	digits, ok := new(big.Int).SetString(whole+frac+"0", 10) // "0": a trailing dot, or "1." parse
	if !ok {
		return bad("no number")
	}
	den := new(big.Int).Exp(big.NewInt(10), big.NewInt(int64(len(frac)+1)), nil)
	n := new(big.Int).Mul(digits, mult)
	if new(big.Int).Rem(n, den).Sign() != 0 {
		return bad("not a whole number of bytes")
	}
	n.Quo(n, den)
	if !n.IsInt64() || n.Int64() > 1<<62 {
		return bad("too large")
	}
	return n.Int64(), nil
}

// sizeUnits maps a unit, in lower case, to its multiplier.
var sizeUnits = func() map[string]*big.Int {
	m := map[string]*big.Int{"": big.NewInt(1), "b": big.NewInt(1)}
	for i, p := range "kmgtpe" {
		bin := new(big.Int).Lsh(big.NewInt(1), uint(10*(i+1)))
		dec := new(big.Int).Exp(big.NewInt(1000), big.NewInt(int64(i+1)), nil)
		m[string(p)], m[string(p)+"i"], m[string(p)+"ib"] = bin, bin, bin
		m[string(p)+"b"] = dec
	}
	return m
}()

// formatSize writes n in the largest binary unit that divides it ("4MiB"),
// or in bytes.
func formatSize(n int64) string {
	for i := 5; i >= 0; i-- {
		if u := int64(1) << (10 * (i + 1)); n != 0 && n%u == 0 {
			return strconv.FormatInt(n/u, 10) + string("KMGTPE"[i]) + "iB"
		}
	}
	return strconv.FormatInt(n, 10)
}

// sizeFlag is a flag.Value for sizes.
type sizeFlag struct{ v *int64 }

func (f sizeFlag) String() string {
	if f.v == nil {
		return "0"
	}
	return formatSize(*f.v)
}

func (f sizeFlag) Set(s string) error {
	n, err := parseSize(s)
	if err != nil {
		return err
	}
	*f.v = n
	return nil
}
