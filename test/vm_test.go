package test

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// The kernel tests: `nbdcache attach` against the real nbd driver in a
// QEMU VM (test/vm: a Debian kernel and a busybox initramfs). They are
// skipped when qemu-system-x86_64 is missing, and fail instead with
// NBDCACHE_REQUIRE_TOOLS=1.
//
// Environment:
//
//	NBDCACHE_VM_STORAGE  storage flags of attach in the guest
//	                     (default vmCacheStorage; /dev/vda is a
//	                     64 MiB disk for a cache, e.g.
//	                     "--cache /dev/vda --backing /dev/vdb --format")
//	NBDCACHE_VM_CUTS=N   real power cuts of the VM (default 5)
//	NBDCACHE_VM_BENCH=1  the full speed ratio against nbd-server (3
//	                     rounds of 5 s jobs; by default 1 round of 2 s)
//	NBDCACHE_VM_KEEP=DIR keep console logs in DIR
//	NBDCACHE_SEED        fio's random seed in the guest (default: time)
//	NBDVM_CACHE          where the kernel package is kept (test/vm/common.sh)

// guestScenarios are the guest scripts in test/vm/guest, each run as
// /scenarios/<name>.sh by /test.sh.
var guestScenarios = []string{"attach", "powercut", "upgrade", "faultcut", "cut1", "cut2", "bench"}

// vmTools are the host programs the VM tests need.
var vmTools = []string{"qemu-system-x86_64", "busybox", "gzip", "mkfs.ext4", "e2fsck", "mkfs.xfs", "xfs_repair", "fio", "nbd-server", "nbd-client"}

// buildVMImage builds a static nbdcache and, in dir, the initramfs with
// every tool the scenarios use.
func buildVMImage(t *testing.T, dir string) string {
	t.Helper()
	for _, name := range vmTools {
		tool(t, name)
	}
	bin := filepath.Join(dir, "nbdcache")
	build := exec.Command("go", "build", "-trimpath", "-o", bin, "../cmd/nbdcache")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("static build: %v\n%s", err, out)
	}
	testSh := filepath.Join(dir, "test.sh")
	script := "# run the scenario named on the kernel command line\nexec sh /scenarios/${SCENARIO:?no SCENARIO}.sh\n"
	if err := os.WriteFile(testSh, []byte(script), 0o644); err != nil {
		t.Fatal(err)
	}
	initrd := filepath.Join(dir, "initrd.gz")
	args := []string{"-o", initrd, "-s", testSh, "-f", "vm/guest/lib.sh:/lib.sh", "-b", bin, "-m", "xfs"}
	for _, s := range guestScenarios {
		args = append(args, "-f", "vm/guest/"+s+".sh:/scenarios/"+s+".sh")
	}
	for _, b := range vmTools[3:] {
		args = append(args, "-b", b)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	start := time.Now()
	if out, err := exec.CommandContext(ctx, "./vm/build-initramfs.sh", args...).CombinedOutput(); err != nil {
		t.Fatalf("build-initramfs.sh: %v\n%s", err, out)
	}
	t.Logf("initramfs built in %v", time.Since(start).Round(time.Second))
	trackInputs(t)
	return initrd
}

// trackInputs opens what the VM run is made of. go test caches a result
// by the files the test process itself opened (inside the module); the
// guest scripts and the Go sources of the binary reach the VM through
// subprocesses, so they are opened here, and a change to any of them
// invalidates a cached result.
func trackInputs(t *testing.T) {
	t.Helper()
	err := filepath.WalkDir("..", func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			if n := d.Name(); p != ".." && (strings.HasPrefix(n, ".") || n == "testdata") {
				return filepath.SkipDir
			}
			return nil
		}
		if n := d.Name(); strings.HasSuffix(n, ".go") || strings.HasSuffix(n, ".sh") || n == "go.mod" || n == "go.sum" {
			_, err := os.ReadFile(p)
			return err
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// vmResult is what a guest run left.
type vmResult struct {
	status  int
	console string
}

// vmRun describes one boot.
type vmRun struct {
	scenario string
	limit    time.Duration
	env      []string // KEY=VALUE for the guest
	disks    []string // raw images: /dev/vda, /dev/vdb, ... (default: fresh 64 MiB and 512 MiB)
	kill     string   // SIGKILL qemu 1 s after a console line with this marker
	storage  string   // attach's storage flags (default vmCacheStorage)
}

// vmCacheStorage is what the scenarios attach by default: the product, a
// write-back cache on /dev/vda in front of /dev/vdb.
const vmCacheStorage = "--cache /dev/vda --backing /dev/vdb --format"

// newDisks makes the default disks: a 64 MiB /dev/vda (for a cache) and
// a 512 MiB /dev/vdb, sparse.
func newDisks(t *testing.T) []string {
	t.Helper()
	dir := t.TempDir()
	var disks []string
	for _, d := range []struct {
		name string
		size int64
	}{{"ssd.img", 64 << 20}, {"hdd.img", 512 << 20}} {
		p := filepath.Join(dir, d.name)
		f, err := os.Create(p)
		if err != nil {
			t.Fatal(err)
		}
		if err := f.Truncate(d.size); err != nil {
			t.Fatal(err)
		}
		f.Close()
		disks = append(disks, p)
	}
	return disks
}

// runVM boots the image and runs one scenario.
func runVM(t *testing.T, initrd string, r vmRun) vmResult {
	t.Helper()
	if r.disks == nil {
		r.disks = newDisks(t)
	}
	seed := os.Getenv("NBDCACHE_SEED")
	if seed == "" {
		seed = strconv.FormatInt(time.Now().UnixNano()%1_000_000_007, 10)
	}
	t.Logf("%s: guest seed %s (replay with NBDCACHE_SEED=%s)", r.scenario, seed, seed)
	kargs := []string{"SCENARIO=" + r.scenario, "SEED=" + seed}
	storage := r.storage
	if storage == "" {
		storage = vmCacheStorage
	}
	if s := os.Getenv("NBDCACHE_VM_STORAGE"); s != "" {
		storage = s
	}
	if s := storage; s != "" {
		// Kernel command line words cannot hold spaces: commas stand in.
		kargs = append(kargs, "NBDCACHE_STORAGE="+strings.ReplaceAll(s, " ", ","))
	}
	kargs = append(kargs, r.env...)
	logPath := filepath.Join(t.TempDir(), "console.log")
	args := []string{"-q", "-m", "2048", "-t", strconv.Itoa(int(r.limit.Seconds())), "-i", initrd, "-l", logPath, "-A", strings.Join(kargs, " ")}
	for _, d := range r.disks {
		args = append(args, "-d", d)
	}
	if r.kill != "" {
		args = append(args, "-K", r.kill, "-D", "1")
	}
	start := time.Now()
	out, status := bootVM(t, r.limit, args)
	if status == vmBootHung {
		// The kernel never reached /init, so nothing ran and the disks are as
		// they were: a hang of the emulated boot (seen once in CI, the console
		// silent after SeaBIOS), not a result. Boot once more; a second hang
		// fails.
		t.Logf("%s: the boot hung before /init (%s); booting again", r.scenario, strings.TrimSpace(lastLine(string(out))))
		out, status = bootVM(t, r.limit, args)
	}
	console, _ := os.ReadFile(logPath)
	if keep := os.Getenv("NBDCACHE_VM_KEEP"); keep != "" {
		os.MkdirAll(keep, 0o755)
		os.WriteFile(filepath.Join(keep, r.scenario+".log"), console, 0o644)
	}
	t.Logf("%s: guest exit status %d after %v; %s", r.scenario, status, time.Since(start).Round(time.Second), strings.TrimSpace(lastLine(string(out))))
	for _, l := range strings.Split(string(console), "\n") {
		if strings.HasPrefix(l, "STEP ") {
			t.Log(l)
		}
	}
	return vmResult{status: status, console: string(console)}
}

// vmBootHung is run-vm.sh's exit status when the guest's /init never started.
const vmBootHung = 123

// bootVM runs run-vm.sh once and returns its output and exit status.
func bootVM(t *testing.T, limit time.Duration, args []string) ([]byte, int) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), limit+time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, "./vm/run-vm.sh", args...).CombinedOutput()
	if err != nil {
		ee, ok := err.(*exec.ExitError)
		if !ok {
			t.Fatalf("run-vm.sh: %v\n%s", err, out)
		}
		return out, ee.ExitCode()
	}
	return out, 0
}

func lastLine(s string) string {
	s = strings.TrimSpace(s)
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		return s[i+1:]
	}
	return s
}

// requireOK fails the test unless the guest exited 0 and printed marker.
func (r vmResult) requireOK(t *testing.T, marker string) {
	t.Helper()
	if r.status != 0 || !strings.Contains(r.console, marker) {
		t.Fatalf("guest exit status %d (want 0 and %q); console tail:\n%s", r.status, marker, tail(r.console, 80))
	}
}

func tail(s string, n int) string {
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// TestVM boots the VM once per scenario, all from one initramfs.
//
//   - boot-watchdog: a boot that has not reached /init in time is
//     killed and reported as hung (runVM then boots once more).
//   - attach: attach with 2 connections; fio verify=crc32c on /dev/nbd0;
//     ext4 and xfs: mount, write and fsync files, umount, clean fsck,
//     detach, re-attach, every file intact; SIGTERM exits cleanly; the
//     ioctl path; the queue's shape; with the cache, a detach and a
//     SIGTERM under O_DIRECT writes leave every acknowledged block on
//     the backing disk.
//   - powercut: kill -9 the server while fio (fsync=1, verify) and an
//     fsync-heavy writer run; restart with --reconnect; no I/O error,
//     clean fsck, every fsync'd file intact.
//   - upgrade: the server is replaced (SIGUSR2 hand-over, then a new
//     binary with --reconnect) under a mounted xfs with an fsync-heavy
//     writer: no I/O error, no lost data.
//   - faultcut: attach --faults under a mounted ext4 with an
//     fsync-heavy writer; ctl power-cut --off under each loss model,
//     umount, power-on: clean fsck, every fsync'd file intact.
//   - bench: throughput on /dev/nbd0 as a ratio to nbd-server with
//     nbd-client on the same disk (a short pass; NBDCACHE_VM_BENCH=1 for
//     the full one).
func TestVM(t *testing.T) {
	if testing.Short() {
		t.Skip("VM tests are not short")
	}
	initrd := buildVMImage(t, t.TempDir())
	t.Run("boot-watchdog", func(t *testing.T) {
		// No kernel reaches /init in a second under TCG: the watchdog must
		// call that a hung boot, which runVM boots again.
		out, status := bootVM(t, time.Minute, []string{"-q", "-B", "1", "-t", "60", "-i", initrd})
		if status != vmBootHung {
			t.Fatalf("run-vm.sh -B 1: exit status %d, want %d\n%s", status, vmBootHung, out)
		}
	})
	t.Run("attach", func(t *testing.T) {
		runVM(t, initrd, vmRun{scenario: "attach", limit: 4 * time.Minute}).requireOK(t, "ATTACH-SCENARIO-OK")
	})
	t.Run("attach-nocache", func(t *testing.T) {
		runVM(t, initrd, vmRun{scenario: "attach", limit: 4 * time.Minute, storage: "--backing /dev/vdb"}).requireOK(t, "ATTACH-SCENARIO-OK")
	})
	t.Run("powercut", func(t *testing.T) {
		runVM(t, initrd, vmRun{scenario: "powercut", limit: 4 * time.Minute}).requireOK(t, "POWERCUT-SCENARIO-OK")
	})
	t.Run("upgrade", func(t *testing.T) {
		runVM(t, initrd, vmRun{scenario: "upgrade", limit: 4 * time.Minute}).requireOK(t, "UPGRADE-SCENARIO-OK")
	})
	t.Run("faultcut", func(t *testing.T) {
		runVM(t, initrd, vmRun{scenario: "faultcut", limit: 5 * time.Minute}).requireOK(t, "FAULTCUT-SCENARIO-OK")
	})
	t.Run("faultcut-negative-control", func(t *testing.T) {
		// ext4 mounted nobarrier sends no FLUSH: its fsyncs promise
		// nothing, and the same scenario must catch the loss. Without
		// quiet commits, which would make most of it durable in the
		// writer's pauses (a process start under TCG outlasts 10 ms).
		r := runVM(t, initrd, vmRun{scenario: "faultcut", limit: 5 * time.Minute, env: []string{"FAULTCUT_MOUNT=nobarrier", "ATTACH_FLAGS=--quiet-commit=0"}})
		caught := regexp.MustCompile(`FAIL: (files differ|e2fsck found problems|mount after power-on)`).FindString(r.console)
		if r.status == 0 || caught == "" {
			t.Fatalf("with ext4 mounted nobarrier the scenario did not catch a loss (guest exit status %d); console tail:\n%s", r.status, tail(r.console, 60))
		}
		t.Logf("negative control caught it: %s", caught)
	})
	// Real power cuts of the VM under an fsync-heavy ext4 writer, with
	// the cache (issue 4 asks for 5 a run; NBDCACHE_VM_CUTS changes it).
	cuts := 5
	if n, err := strconv.Atoi(os.Getenv("NBDCACHE_VM_CUTS")); err == nil && n > 0 {
		cuts = n
	}
	for i := range cuts {
		t.Run(fmt.Sprintf("vmcut-%d", i+1), func(t *testing.T) { vmPowerCut(t, initrd) })
	}
	t.Run("bench", func(t *testing.T) {
		// A short pass by default (one round of 2 s jobs); the full
		// measurement behind the flag.
		env := []string{"BENCH_ROUNDS=1", "BENCH_RUNTIME=2"}
		if os.Getenv("NBDCACHE_VM_BENCH") != "" {
			env = nil
		}
		vmBench(t, runVM(t, initrd, vmRun{scenario: "bench", limit: 12 * time.Minute, env: env}))
	})
}

// vmPowerCut cuts the VM's power (SIGKILL of qemu: the guest's page
// cache is lost, what qemu wrote to the disk images stays) under an
// fsync-heavy writer, then boots again on the same disks: fsck must be
// clean and every file whose fsync returned before the cut intact.
func vmPowerCut(t *testing.T, initrd string) {
	disks := newDisks(t)
	r := runVM(t, initrd, vmRun{scenario: "cut1", limit: 4 * time.Minute, disks: disks, kill: "CUT-NOW"})
	if r.status != 137 {
		t.Fatalf("part 1: guest exit status %d, want 137 (killed at CUT-NOW); console tail:\n%s", r.status, tail(r.console, 60))
	}
	var synced []string
	for _, l := range strings.Split(r.console, "\n") {
		if strings.HasPrefix(l, "SYNCED ") && len(strings.Fields(l)) == 3 {
			synced = append(synced, l)
		}
	}
	if len(synced) < 20 {
		t.Fatalf("part 1: only %d files fsync'd before the cut", len(synced))
	}
	t.Logf("power cut after %d fsync'd files", len(synced))
	list := filepath.Join(t.TempDir(), "synced.img")
	data := []byte(strings.Join(synced, "\n") + "\n")
	data = append(data, make([]byte, 4096-len(data)%4096)...)
	if err := os.WriteFile(list, data, 0o644); err != nil {
		t.Fatal(err)
	}
	runVM(t, initrd, vmRun{scenario: "cut2", limit: 4 * time.Minute, disks: append(disks, list)}).requireOK(t, "CUT-SCENARIO-OK")
}

// vmBench prints the ratios of the bench scenario.
func vmBench(t *testing.T, r vmResult) {
	r.requireOK(t, "BENCH-SCENARIO-OK")
	sc := bufio.NewScanner(strings.NewReader(r.console))
	n := 0
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) != 4 || f[0] != "BENCH" {
			continue
		}
		a, err1 := strconv.ParseFloat(strings.TrimPrefix(f[2], "nbdcache="), 64)
		b, err2 := strconv.ParseFloat(strings.TrimPrefix(f[3], "peer="), 64)
		if err1 != nil || err2 != nil || a == 0 || b == 0 {
			t.Errorf("bad bench line %q", sc.Text())
			continue
		}
		n++
		fmt.Printf("vm bench %-14s nbdcache/nbd-server = %.2f  (%.0f vs %.0f KiB/s, TCG)\n", f[1], a/b, a, b)
	}
	if n != 4 {
		t.Fatalf("%d bench results, want 4", n)
	}
}
