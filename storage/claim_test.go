package storage

import (
	"bufio"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
)

// claimFile makes a 1 MiB file for claim tests.
func claimFile(t *testing.T) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "dev.img")
	if err := os.WriteFile(p, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func openClaim(t *testing.T, path string, c Claim, readOnly bool) (*File, error) {
	t.Helper()
	f, err := OpenFile(path, FileOptions{Claim: c, ReadOnly: readOnly})
	if err == nil {
		t.Cleanup(func() { f.Close() })
	}
	return f, err
}

// TestClaimSameProcess: claims conflict between two opens of one process
// (flock is per open file description), shared claims coexist, ClaimNone
// ignores them, and Close releases the claim.
func TestClaimSameProcess(t *testing.T) {
	p := claimFile(t)
	first, err := openClaim(t, p, ClaimExclusive, false)
	if err != nil {
		t.Fatal(err)
	}
	_, err = openClaim(t, p, ClaimExclusive, false)
	var iu *InUseError
	if !errors.Is(err, ErrInUse) || !errors.As(err, &iu) {
		t.Fatalf("second exclusive open: %v, want ErrInUse", err)
	}
	if !slices.Equal(iu.PIDs(), []int{os.Getpid()}) {
		t.Errorf("holders %v, want this process %d", iu.Holders, os.Getpid())
	}
	if !strings.Contains(err.Error(), p) || !strings.Contains(err.Error(), "process") {
		t.Errorf("error %q names neither the path nor the process", err)
	}
	if _, err := openClaim(t, p, ClaimShared, true); !errors.Is(err, ErrInUse) {
		t.Errorf("shared open beside an exclusive claim: %v, want ErrInUse", err)
	}
	if _, err := openClaim(t, p, ClaimNone, true); err != nil {
		t.Errorf("open without a claim: %v", err)
	}
	first.Close()
	second, err := openClaim(t, p, ClaimExclusive, false)
	if err != nil {
		t.Fatalf("exclusive open after Close of the holder: %v", err)
	}
	second.Close()

	a, err := openClaim(t, p, ClaimShared, true)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := openClaim(t, p, ClaimShared, true); err != nil {
		t.Errorf("second shared claim: %v", err)
	}
	if _, err := openClaim(t, p, ClaimExclusive, false); !errors.Is(err, ErrInUse) {
		t.Errorf("exclusive open beside shared claims: %v, want ErrInUse", err)
	}
	a.Close()
}

// TestClaimThroughOtherPaths: a hard link and a symlink name the same
// inode, and so the same claim.
func TestClaimThroughOtherPaths(t *testing.T) {
	p := claimFile(t)
	dir := t.TempDir()
	hard, sym := filepath.Join(dir, "hard"), filepath.Join(dir, "sym")
	if err := os.Link(p, hard); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(p, sym); err != nil {
		t.Fatal(err)
	}
	if _, err := openClaim(t, p, ClaimExclusive, false); err != nil {
		t.Fatal(err)
	}
	for _, q := range []string{hard, sym} {
		if _, err := openClaim(t, q, ClaimExclusive, false); !errors.Is(err, ErrInUse) {
			t.Errorf("open through %s: %v, want ErrInUse", q, err)
		}
	}
}

// TestClaimRace: of many opens racing for one file, exactly one wins.
func TestClaimRace(t *testing.T) {
	p := claimFile(t)
	for round := range 20 {
		var wg sync.WaitGroup
		files := make([]*File, 8)
		errs := make([]error, 8)
		for i := range files {
			wg.Go(func() { files[i], errs[i] = OpenFile(p, FileOptions{Claim: ClaimExclusive}) })
		}
		wg.Wait()
		won := 0
		for i, err := range errs {
			switch {
			case err == nil:
				won++
				files[i].Close()
			case !errors.Is(err, ErrInUse):
				t.Fatalf("round %d: %v", round, err)
			}
		}
		if won != 1 {
			t.Fatalf("round %d: %d opens won the claim, want exactly 1", round, won)
		}
	}
}

// TestClaimHelper is the other process of TestClaimOtherProcess: it holds
// a claim on $NBDCACHE_CLAIM_HELPER until its stdin closes.
func TestClaimHelper(t *testing.T) {
	p := os.Getenv("NBDCACHE_CLAIM_HELPER")
	if p == "" {
		t.Skip("helper process only")
	}
	f, err := OpenFile(p, FileOptions{Claim: ClaimExclusive})
	if err != nil {
		t.Fatal(err)
	}
	os.Stdout.WriteString("held\n")
	bufio.NewReader(os.Stdin).ReadString('\n')
	f.Close()
}

// TestClaimOtherProcess: a claim held by another process refuses this
// one, and the error names that process by pid, as lsof would; once it
// exits, the claim is free.
func TestClaimOtherProcess(t *testing.T) {
	p := claimFile(t)
	cmd := exec.Command(os.Args[0], "-test.run=^TestClaimHelper$")
	cmd.Env = append(os.Environ(), "NBDCACHE_CLAIM_HELPER="+p)
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || line != "held\n" {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("helper: %q, %v", line, err)
	}
	_, err = openClaim(t, p, ClaimExclusive, false)
	var iu *InUseError
	if !errors.As(err, &iu) || !slices.Equal(iu.PIDs(), []int{cmd.Process.Pid}) {
		t.Errorf("open beside the helper (pid %d): %v", cmd.Process.Pid, err)
	} else if !strings.Contains(err.Error(), filepath.Base(os.Args[0])) {
		t.Errorf("error %q does not show the holder's command line", err)
	}
	stdin.Close()
	if err := cmd.Wait(); err != nil {
		t.Fatalf("helper: %v", err)
	}
	if _, err := openClaim(t, p, ClaimExclusive, false); err != nil {
		t.Errorf("open after the helper exited: %v", err)
	}
}

// TestClaimBlockDevice: on a block device (a loop device; root only) an
// exclusive claim is the kernel's O_EXCL too, so a partition of a claimed
// disk is refused, and the refusal names the process that has it.
func TestClaimBlockDevice(t *testing.T) {
	loop := loopDevice(t, 8<<20, true)
	f, err := openClaim(t, loop, ClaimExclusive, false)
	if err != nil {
		t.Fatal(err)
	}
	_, err = openClaim(t, loop, ClaimExclusive, true)
	var iu *InUseError
	if !errors.As(err, &iu) || !slices.Contains(iu.PIDs(), os.Getpid()) {
		t.Errorf("second exclusive open of %s: %v, want ErrInUse naming this process", loop, err)
	}
	if _, err := openClaim(t, loop, ClaimNone, true); err != nil {
		t.Errorf("open without a claim: %v", err)
	}
	if _, err := os.Stat(loop + "p1"); err == nil {
		_, err := openClaim(t, loop+"p1", ClaimExclusive, true)
		if !errors.As(err, &iu) || !slices.Contains(iu.PIDs(), os.Getpid()) {
			t.Errorf("exclusive open of the partition %sp1 of a claimed disk: %v, want ErrInUse naming this process", loop, err)
		}
	} else {
		t.Logf("no %sp1: the partition case is not covered", loop)
	}
	f.Close()
	g, err := openClaim(t, loop, ClaimExclusive, false)
	if err != nil {
		t.Fatalf("exclusive open after Close: %v", err)
	}
	g.Close()
}

// loopDevice attaches a fresh image of size bytes as a loop device,
// skipping the test where that is not possible (not root, no loop
// support). With partition, the image has a DOS partition table with one
// partition from 1 MiB to the end, and the device is scanned for it.
func loopDevice(t *testing.T, size int64, partition bool) string {
	t.Helper()
	losetup, err := exec.LookPath("losetup")
	if err != nil || os.Geteuid() != 0 {
		t.Skip("needs root and losetup")
	}
	img := filepath.Join(t.TempDir(), "loop.img")
	b := make([]byte, 512)
	if partition {
		// One primary partition of type 0x83 at LBA 2048 to the end.
		e := b[446:462]
		e[4] = 0x83
		putLE32(e[8:], 2048)
		putLE32(e[12:], uint32(size/512-2048))
		b[510], b[511] = 0x55, 0xaa
	}
	if err := os.WriteFile(img, b, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, size); err != nil {
		t.Fatal(err)
	}
	args := []string{"--find", "--show"}
	if partition {
		args = append(args, "--partscan")
	}
	out, err := exec.Command(losetup, append(args, img)...).CombinedOutput()
	if err != nil {
		t.Skipf("losetup: %v: %s", err, out)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() { exec.Command(losetup, "--detach", dev).Run() })
	return dev
}

func putLE32(b []byte, v uint32) {
	b[0], b[1], b[2], b[3] = byte(v), byte(v>>8), byte(v>>16), byte(v>>24)
}
