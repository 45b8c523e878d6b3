package storage_test

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	. "github.com/nbdcache/nbdcache/storage"
	"github.com/nbdcache/nbdcache/storage/storagetest"
)

// Every Device here runs the contract (storagetest.Run).

func closing(t *testing.T, d Device) Device {
	t.Cleanup(func() { d.Close() })
	return d
}

func TestMemContract(t *testing.T) {
	storagetest.Run(t, func(t *testing.T, size int64) Device { return closing(t, NewMem(size)) })
}

func TestCrashContract(t *testing.T) {
	storagetest.Run(t, func(t *testing.T, size int64) Device { return closing(t, NewCrash(size)) })
}

func TestDelayContract(t *testing.T) {
	storagetest.Run(t, func(t *testing.T, size int64) Device { return closing(t, NewDelay(NewMem(size))) })
}

func TestFaultyContract(t *testing.T) {
	storagetest.Run(t, func(t *testing.T, size int64) Device { return closing(t, NewFaulty(NewMem(size), 1)) })
}

func TestSlowContract(t *testing.T) {
	storagetest.Run(t, func(t *testing.T, size int64) Device {
		return closing(t, NewSlow(NewMem(size), DiskModel{Name: "zero", TransferRate: 1 << 62}))
	})
}

func TestVolatileContract(t *testing.T) {
	storagetest.Run(t, func(t *testing.T, size int64) Device {
		return closing(t, NewVolatile(NewMem(size), VolatileOptions{}))
	})
}

func TestWrappersContract(t *testing.T) {
	t.Run("DurableAcks", func(t *testing.T) {
		storagetest.Run(t, func(t *testing.T, size int64) Device { return NewDurableAcks(NewMem(size)) })
	})
	// Closing a Gate's device or a Switch leaves the device below open (it
	// outlives them); here Close closes it, as its owner would.
	t.Run("Gate", func(t *testing.T) {
		storagetest.Run(t, func(t *testing.T, size int64) Device {
			m := NewMem(size)
			return closer{NewGate().Wrap(m), m}
		})
	})
	t.Run("Switch", func(t *testing.T) {
		storagetest.Run(t, func(t *testing.T, size int64) Device {
			m := NewMem(size)
			return closer{NewSwitch(m), m}
		})
	})
}

// closer is d whose Close closes below.
type closer struct {
	Device
	below Device
}

func (c closer) Close() error { return c.below.Close() }

func (c closer) Extents(off, length int64, fn func(Extent) bool) error {
	return c.Device.(Extenter).Extents(off, length, fn)
}

func TestFileContract(t *testing.T) {
	for _, direct := range []bool{false, true} {
		t.Run(fmt.Sprintf("direct=%v", direct), func(t *testing.T) {
			storagetest.Run(t, func(t *testing.T, size int64) Device {
				f, err := OpenFile(filepath.Join(t.TempDir(), "dev.img"), FileOptions{Size: size, Direct: direct})
				if err != nil {
					t.Fatal(err)
				}
				return closing(t, f)
			})
		})
	}
}

// TestFileBlockDevice runs the contract on a loop device, when the test
// can make one (root and losetup).
func TestFileBlockDevice(t *testing.T) {
	losetup, err := exec.LookPath("losetup")
	if err != nil || os.Geteuid() != 0 {
		t.Skip("block device test skipped: needs root and losetup to make a loop device")
	}
	mkLoop := func(t *testing.T, size int64) string {
		img := filepath.Join(t.TempDir(), "loop.img")
		if err := os.WriteFile(img, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(img, size); err != nil {
			t.Fatal(err)
		}
		out, err := exec.Command(losetup, "--find", "--show", img).CombinedOutput()
		if err != nil {
			t.Skipf("block device test skipped: losetup: %v: %s", err, out)
		}
		dev := strings.TrimSpace(string(out))
		t.Cleanup(func() { exec.Command(losetup, "--detach", dev).Run() })
		return dev
	}
	for _, direct := range []bool{false, true} {
		t.Run(fmt.Sprintf("direct=%v", direct), func(t *testing.T) {
			storagetest.Run(t, func(t *testing.T, size int64) Device {
				dev := mkLoop(t, size)
				f, err := OpenFile(dev, FileOptions{Direct: direct})
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { f.Close() })
				if !IsBlockDev(f) || f.Caps().BlockSize < 512 {
					t.Fatalf("%s: not seen as a block device: %+v", dev, f.Caps())
				}
				return f
			}, storagetest.Options{TrimKeeps: true})
		})
	}
	t.Run("caps", func(t *testing.T) {
		dev := mkLoop(t, 1<<20)
		if _, err := OpenFile(dev, FileOptions{Size: 2 << 20}); !errors.Is(err, ErrNoSpace) {
			t.Errorf("Size larger than the device: %v, want ErrNoSpace", err)
		}
		f, err := OpenFile(dev, FileOptions{})
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		t.Logf("%s: size %d, caps %+v", dev, f.Size(), f.Caps())
		if f.Size() != 1<<20 {
			t.Errorf("size %d", f.Size())
		}
	})
}
