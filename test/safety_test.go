package test

// What nbdcache refuses to do (issue 15): each refused command is run as a
// user would, and must exit with its status, say what it found and how
// to override it, change no byte of either device (both files hashed
// before and after), and leave the first server's data readable.

import (
	"bufio"
	"crypto/sha256"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Exit statuses (cmd/nbdcache/main.go, README).
const (
	exitCorrupt      = 1
	exitUsage        = 2
	exitWrongBacking = 3
	exitInUse        = 4
	exitRefused      = 5
)

// hashes returns the SHA-256 of each file.
func hashes(t *testing.T, paths ...string) []string {
	t.Helper()
	var hs []string
	for _, p := range paths {
		f, err := os.Open(p)
		if err != nil {
			t.Fatal(err)
		}
		h := sha256.New()
		if _, err := io.Copy(h, f); err != nil {
			t.Fatal(err)
		}
		f.Close()
		hs = append(hs, fmt.Sprintf("%x", h.Sum(nil)))
	}
	return hs
}

// refused runs nbdcache with args and requires exit status code, every
// string of want in its output, and not one byte changed in the files
// guarded. It returns the output.
func refused(t *testing.T, guarded []string, code int, want []string, args ...string) string {
	t.Helper()
	before := hashes(t, guarded...)
	out, got := nbdcache(t, args...)
	if got != code {
		t.Errorf("nbdcache %s: exit %d, want %d:\n%s", strings.Join(args, " "), got, code, out)
	}
	for _, w := range want {
		if !strings.Contains(out, w) {
			t.Errorf("nbdcache %s: output lacks %q:\n%s", strings.Join(args, " "), w, out)
		}
	}
	for _, bad := range []string{"goroutine ", "panic:", "fatal error"} {
		if strings.Contains(out, bad) {
			t.Errorf("nbdcache %s: a crash, not a refusal:\n%s", strings.Join(args, " "), out)
		}
	}
	after := hashes(t, guarded...)
	for i := range guarded {
		if before[i] != after[i] {
			t.Errorf("nbdcache %s changed %s", strings.Join(args, " "), guarded[i])
		}
	}
	return out
}

// firstServer is the server whose data the refused commands must not
// touch: a write-back cache that holds 1 MiB of 0x5a at offset 0, all of
// it written back (flush --drain), so that the files stay still while it
// runs; checkpoints come only when the journal fills.
type firstServer struct {
	*server
	backing, cache, ctl string
}

func startFirst(t *testing.T) *firstServer {
	t.Helper()
	qemuIO := tool(t, "qemu-io")
	f := &firstServer{ctl: "unix:" + filepath.Join(t.TempDir(), "ctl.sock")}
	f.backing, f.cache = cacheFiles(t, 32*mib, 16*mib)
	f.server = startServe(t, "--cache", f.cache, "--backing", f.backing, "--format", "--control", f.ctl, "--checkpoint-interval", "-1s")
	run(t, qemuIO, "-f", "raw", "-c", "write -P 0x5a 0 1M", "-c", "flush", f.uri)
	if out, code := nbdcache(t, "flush", "--drain", "--control", f.ctl); code != 0 {
		t.Fatalf("flush --drain (exit %d):\n%s", code, out)
	}
	return f
}

// readsBack requires the first server's data through a server at uri.
func readsBack(t *testing.T, uri string) {
	t.Helper()
	run(t, tool(t, "qemu-io"), "-f", "raw", "-c", "read -P 0x5a 0 1M", uri)
}

// restartReadsBack stops the first server, serves its files again and
// reads its data, then requires check to pass.
func (f *firstServer) restartReadsBack(t *testing.T) {
	t.Helper()
	f.stop()
	s := startServe(t, "--cache", f.cache, "--backing", f.backing)
	readsBack(t, s.uri)
	s.stop()
	mustCheck(t, f.cache, f.backing)
}

// TestTwoServersOneCache: a second server on the cache, on the backing,
// or on both is refused at once, naming the first one's pid, and so are
// check (without --live), rebind and attach; check --live says it read a
// snapshot of a device in use.
func TestTwoServersOneCache(t *testing.T) {
	f := startFirst(t)
	files := []string{f.cache, f.backing}
	holder := fmt.Sprintf("in use by process %d (", f.cmd.Process.Pid)
	sock := "unix:" + filepath.Join(t.TempDir(), "second.sock")
	refused(t, files, exitInUse, []string{holder, "stop the one that holds it first"},
		"serve", "--cache", f.cache, "--backing", f.backing, "--listen", sock)
	refused(t, files, exitInUse, []string{"the cache " + f.cache + " is " + holder},
		"serve", "--cache", f.cache, "--backing", sparseFile(t, "other.img", 32*mib), "--format", "--listen", sock)
	refused(t, files, exitInUse, []string{"the backing " + f.backing + " is " + holder},
		"serve", "--cache", sparseFile(t, "other-cache.img", 16*mib), "--backing", f.backing, "--format", "--listen", sock)
	refused(t, files, exitInUse, []string{"the backing " + f.backing + " is " + holder},
		"serve", "--backing", f.backing, "--read-only", "--listen", sock)
	// attach claims the devices before it asks the kernel for anything.
	refused(t, files, exitInUse, []string{holder}, "attach", "--cache", f.cache, "--backing", f.backing)
	refused(t, files, exitInUse, []string{holder, "--live"}, "check", "--cache", f.cache, "--backing", f.backing)
	refused(t, files, exitInUse, []string{holder}, "rebind", "--cache", f.cache, "--backing", f.backing)
	out := refused(t, files, 0, []string{"SNAPSHOT: the cache " + f.cache + " is " + holder, "ok (a snapshot of a cache in use)"},
		"check", "--live", "--cache", f.cache, "--backing", f.backing)
	t.Logf("check --live:\n%s", out)
	readsBack(t, f.uri)
	f.restartReadsBack(t)
}

// TestFormatWhileServing: format, even with --force, is refused while a
// server holds the cache.
func TestFormatWhileServing(t *testing.T) {
	f := startFirst(t)
	files := []string{f.cache, f.backing}
	holder := fmt.Sprintf("in use by process %d (", f.cmd.Process.Pid)
	out := refused(t, files, exitInUse, []string{holder}, "format", "--force", "--cache", f.cache, "--backing", f.backing)
	t.Logf("format --force while serving:\n%s", out)
	refused(t, files, exitInUse, []string{holder}, "format", "--force", "--cache", f.cache, "--backing", sparseFile(t, "other.img", 32*mib))
	readsBack(t, f.uri)
	f.restartReadsBack(t)
}

// TestFormatOverTheWrongFile: format and serve --format refuse a target
// that is the backing itself (the same path, a symlink, a hard link), the
// backing of another cache, a cache, a filesystem, or data; --force
// overrides all but the first.
func TestFormatOverTheWrongFile(t *testing.T) {
	f := startFirst(t)
	f.stop() // claims would refuse first: what is refused here is the target
	dir := t.TempDir()
	sym, hard := filepath.Join(dir, "sym.img"), filepath.Join(dir, "hard.img")
	if err := os.Symlink(f.backing, sym); err != nil {
		t.Fatal(err)
	}
	if err := os.Link(f.backing, hard); err != nil {
		t.Fatal(err)
	}
	other := sparseFile(t, "b2.img", 32*mib)
	files := []string{f.cache, f.backing, other}

	for _, target := range []string{f.backing, sym, hard} {
		out := refused(t, files, exitRefused, []string{"the cache and the backing are one device", "same file", "no flag overrides this"},
			"format", "--force", "--cache", target, "--backing", f.backing)
		t.Logf("format --cache %s --backing %s:\n%s", target, f.backing, out)
	}
	backingID := "it is the backing of a cache: it carries backing id "
	out := refused(t, files, exitRefused, []string{backingID, "Pass --force"},
		"format", "--cache", f.backing, "--backing", other)
	t.Logf("format over another cache's backing:\n%s", out)
	out = refused(t, files, exitRefused, []string{backingID, "are --cache and --backing swapped?", "nbdcache format --force --cache " + f.backing},
		"serve", "--format", "--cache", f.backing, "--backing", f.cache, "--listen", "unix:"+filepath.Join(dir, "s"))
	t.Logf("serve --format with the paths swapped:\n%s", out)
	out = refused(t, files, exitRefused, []string{"it holds an nbdcache cache", "for the backing " + f.backing + " (as last seen; id ", "Pass --force"},
		"format", "--cache", f.cache, "--backing", other)
	t.Logf("format over a cache:\n%s", out)

	// A filesystem (mkfs.ext4 where installed, else its magic alone), and
	// data that no signature names.
	fsImg := sparseFile(t, "fs.img", 32*mib)
	if mkfs, err := exec.LookPath("mkfs.ext4"); err == nil {
		run(t, mkfs, "-q", "-F", fsImg)
	} else if err := writeAt(fsImg, 0x438, []byte{0x53, 0xef}); err != nil {
		t.Fatal(err)
	}
	data := filepath.Join(dir, "data.img")
	b, err := os.ReadFile(f.backing) // a copy: no backing id, the first server's data
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(data, b, 0o644); err != nil {
		t.Fatal(err)
	}
	files = append(files, fsImg, data)
	out = refused(t, files, exitRefused, []string{"it holds a recognizable signature: ext2/3/4 filesystem (magic at offset 1080)", "Pass --force"},
		"format", "--cache", fsImg, "--backing", other)
	t.Logf("format over a filesystem:\n%s", out)
	out = refused(t, files, exitRefused, []string{"it holds data: the byte at offset 0 is not zero", "--format formats only a device that holds none"},
		"serve", "--format", "--cache", data, "--backing", other, "--listen", "unix:"+filepath.Join(dir, "s"))
	t.Logf("serve --format over data:\n%s", out)

	// --force destroys what it was told to, and says what.
	out, code := nbdcache(t, "format", "--force", "--cache", data, "--backing", other)
	if code != 0 || !strings.Contains(out, "--force: overwrote "+data+", where it holds data") {
		t.Errorf("format --force over data: exit %d:\n%s", code, out)
	}
	f.restartReadsBack(t)
}

// writeAt writes b at off into the file at path.
func writeAt(path string, off int64, b []byte) error {
	fh, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer fh.Close()
	_, err = fh.WriteAt(b, off)
	return err
}

// TestRebind: a copy of the backing (cp drops its id) is refused with a
// message naming the cache's backing and the fix; check exits 3 for it,
// not 1 as for corruption; rebind binds the cache to the copy, and the
// dirty data the cache held reads back through it.
func TestRebind(t *testing.T) {
	qemuIO := tool(t, "qemu-io")
	backing, cache := cacheFiles(t, 32*mib, 16*mib)
	s := startServe(t, "--cache", cache, "--backing", backing, "--format")
	run(t, qemuIO, "-f", "raw", "-c", "write -P 0x77 0 1M", "-c", "flush", s.uri)
	s.kill() // the data stays dirty in the cache, and nowhere else
	moved := filepath.Join(t.TempDir(), "moved.img")
	b, err := os.ReadFile(backing)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(moved, b, 0o644); err != nil { // cp: no xattr
		t.Fatal(err)
	}
	files := []string{cache, backing, moved}
	sock := "unix:" + filepath.Join(t.TempDir(), "s")
	idRE := regexp.MustCompile(`belongs to the backing ` + regexp.QuoteMeta(backing) + ` \(as last seen; id [0-9a-f]{32}\); the given backing ` + regexp.QuoteMeta(moved) + ` has no id`)
	for _, args := range [][]string{
		{"serve", "--cache", cache, "--backing", moved, "--listen", sock},
		{"check", "--cache", cache, "--backing", moved},
	} {
		out := refused(t, files, exitWrongBacking, []string{"nbdcache rebind --cache " + cache + " --backing " + moved}, args...)
		if !idRE.MatchString(out) {
			t.Errorf("%s: the message does not name the cache's backing, its id and the given one's:\n%s", args[0], out)
		}
		t.Logf("%s with a copy of the backing:\n%s", args[0], out)
	}
	small := sparseFile(t, "small.img", 16*mib)
	refused(t, append(files, small), exitWrongBacking, []string{"cannot be this cache's"}, "check", "--cache", cache, "--backing", small)
	refused(t, append(files, small), exitWrongBacking, []string{"so it is not that backing"}, "rebind", "--cache", cache, "--backing", small)

	out, code := nbdcache(t, "rebind", "--cache", cache, "--backing", moved)
	if code != 0 || !strings.Contains(out, "rebound the cache") || !strings.Contains(out, "it may hold dirty data") {
		t.Fatalf("rebind: exit %d:\n%s", code, out)
	}
	t.Logf("rebind:\n%s", out)
	// The old backing now carries another id than the cache's: refused,
	// and rebinding back to it takes --force.
	refused(t, files, exitWrongBacking, []string{"nbdcache rebind --force --cache " + cache + " --backing " + backing},
		"serve", "--cache", cache, "--backing", backing, "--listen", sock)
	refused(t, files, exitRefused, []string{"Pass --force"}, "rebind", "--cache", cache, "--backing", backing)

	s = startServe(t, "--cache", cache, "--backing", moved)
	run(t, qemuIO, "-f", "raw", "-c", "read -P 0x77 0 1M", s.uri)
	s.stop()
	mustCheck(t, cache, moved)

	// Corruption is another exit status than a wrong backing.
	for _, off := range []int64{100, 4096 + 100} {
		if err := writeAt(cache, off, []byte{0xff, 0xff}); err != nil {
			t.Fatal(err)
		}
	}
	if out, code := nbdcache(t, "check", "--cache", cache, "--backing", moved); code != exitCorrupt {
		t.Errorf("check of a cache with both superblock copies damaged: exit %d, want %d:\n%s", code, exitCorrupt, out)
	}
}

// racer is one of two commands started at once.
type racer struct {
	cmd     *exec.Cmd
	out     strings.Builder
	serving chan bool // true once it serves; false if it exited first
	exited  chan error
}

func startRacer(t *testing.T, args ...string) *racer {
	t.Helper()
	r := &racer{cmd: exec.Command(binary, args...), serving: make(chan bool, 1), exited: make(chan error, 1)}
	stdout, err := r.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	r.cmd.Stderr = r.cmd.Stdout
	if err := r.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(stdout)
		told := false
		for sc.Scan() {
			r.out.WriteString(sc.Text() + "\n")
			if !told && strings.Contains(sc.Text(), "serving export") {
				r.serving <- true
				told = true
			}
		}
		if !told {
			r.serving <- false
		}
		r.exited <- r.cmd.Wait()
	}()
	return r
}

// TestClaimRace: two servers started at once on the same fresh files,
// both with --format: exactly one formats and serves, the other is
// refused naming its pid. Then two formats at once: exactly one formats.
func TestClaimRace(t *testing.T) {
	for round := range 3 {
		backing, cache := cacheFiles(t, 32*mib, 16*mib)
		var rs [2]*racer
		for i := range rs {
			rs[i] = startRacer(t, "serve", "--cache", cache, "--backing", backing, "--format",
				"--listen", "unix:"+filepath.Join(t.TempDir(), "s"))
		}
		var won []int
		for i, r := range rs {
			select {
			case ok := <-r.serving:
				if ok {
					won = append(won, i)
				}
			case <-time.After(60 * time.Second):
				t.Fatalf("round %d: server %d neither served nor exited:\n%s", round, i, &r.out)
			}
		}
		if len(won) != 1 {
			for _, r := range rs {
				r.cmd.Process.Kill()
			}
			t.Fatalf("round %d: %d servers won the claim, want exactly 1:\n%s\n%s", round, len(won), &rs[0].out, &rs[1].out)
		}
		winner, loser := rs[won[0]], rs[1-won[0]]
		err := <-loser.exited
		ee, _ := err.(*exec.ExitError)
		if ee == nil || ee.ExitCode() != exitInUse || !strings.Contains(loser.out.String(), fmt.Sprintf("in use by process %d (", winner.cmd.Process.Pid)) {
			t.Errorf("round %d: the loser exited with %v, want %d naming the winner's pid %d:\n%s", round, err, exitInUse, winner.cmd.Process.Pid, &loser.out)
		}
		winner.cmd.Process.Signal(syscall.SIGTERM)
		if err := <-winner.exited; err != nil {
			t.Errorf("round %d: the winner exited with %v:\n%s", round, err, &winner.out)
		}
		mustCheck(t, cache, backing)

		// Two formats at once on fresh files: one formats; the other is
		// refused, for the claim (4) or, if it came second, for the cache
		// it finds (5).
		backing, cache = cacheFiles(t, 32*mib, 16*mib)
		var fs [2]*exec.Cmd
		var outs [2]strings.Builder
		for i := range fs {
			fs[i] = exec.Command(binary, "format", "--cache", cache, "--backing", backing)
			fs[i].Stdout, fs[i].Stderr = &outs[i], &outs[i]
			if err := fs[i].Start(); err != nil {
				t.Fatal(err)
			}
		}
		codes := make(map[int]int)
		for i, c := range fs {
			c.Wait()
			codes[c.ProcessState.ExitCode()]++
			if code := c.ProcessState.ExitCode(); code != 0 && code != exitInUse && code != exitRefused {
				t.Errorf("round %d: format %d: exit %d:\n%s", round, i, code, &outs[i])
			}
		}
		if codes[0] != 1 {
			t.Errorf("round %d: %d formats succeeded, want exactly 1:\n%s\n%s", round, codes[0], &outs[0], &outs[1])
		}
		mustCheck(t, cache, backing)
	}
}

// TestReadOnlyShares: read-only exports of a backing share it; a writer
// is refused beside them.
func TestReadOnlyShares(t *testing.T) {
	backing := sparseFile(t, "backing.img", 32*mib)
	a := startServe(t, "--backing", backing, "--read-only")
	b := startServe(t, "--backing", backing, "--read-only")
	refused(t, []string{backing}, exitInUse, []string{fmt.Sprintf("process %d (", a.cmd.Process.Pid), fmt.Sprintf("process %d (", b.cmd.Process.Pid)},
		"serve", "--backing", backing, "--listen", "unix:"+filepath.Join(t.TempDir(), "s"))
}

// TestFootguns: an impossible --ram-cache is refused, not an out-of-memory
// crash; a cache too small (1 MiB, or empty) names the minimum, which then
// formats, and is not given blocks first (reserveCache); format
// on a missing file says how to make one.
func TestFootguns(t *testing.T) {
	backing, cache := cacheFiles(t, 32*mib, 16*mib)
	sock := "unix:" + filepath.Join(t.TempDir(), "s")
	files := []string{backing, cache}
	out := refused(t, files, exitUsage, []string{"--ram-cache 100.0 TiB is more than half of this machine's memory", "at most"},
		"serve", "--cache", cache, "--backing", backing, "--format", "--ram-cache", "100T", "--listen", sock)
	t.Logf("--ram-cache 100T:\n%s", out)

	tiny := sparseFile(t, "tiny.img", 1*mib)
	empty := sparseFile(t, "empty.img", 0)
	minRE := regexp.MustCompile(`needs at least [0-9.]+ MiB \(([0-9]+) bytes\)`)
	for _, args := range [][]string{
		{"format", "--cache", tiny, "--backing", backing},
		{"serve", "--format", "--cache", tiny, "--backing", backing, "--listen", sock},
		{"format", "--cache", empty, "--backing", backing},
		{"serve", "--format", "--cache", empty, "--backing", backing, "--listen", sock},
	} {
		out := refused(t, append(files, tiny, empty), exitCorrupt, []string{"too small"}, args...)
		m := minRE.FindStringSubmatch(out)
		if m == nil {
			t.Fatalf("%s on a cache too small does not name the minimum:\n%s", args[0], out)
		}
		t.Logf("%s on a cache too small:\n%s", args[0], out)
		n, _ := strconv.ParseInt(m[1], 10, 64)
		fits := sparseFile(t, "fits.img", n)
		if out, code := nbdcache(t, "format", "--cache", fits, "--backing", backing); code != 0 {
			t.Errorf("format on a cache of the minimum size (%d bytes): exit %d:\n%s", n, code, out)
		}
	}

	if n := allocated(t, tiny); n != 0 {
		t.Errorf("the refused 1 MiB cache was given %d bytes of blocks", n)
	}

	missing := filepath.Join(t.TempDir(), "missing.img")
	out = refused(t, files, exitCorrupt, []string{"does not exist", "fallocate -l"}, "format", "--cache", missing, "--backing", backing)
	t.Logf("format on a missing file:\n%s", out)
	if _, err := os.Stat(missing); err == nil {
		t.Error("format created the missing file")
	}
}

// TestBlockDeviceClaims: a cache on a block device (a loop device; root
// only) is claimed by the kernel's O_EXCL too, so a second server
// reaching it through another device node is refused, naming the first
// one's pid; and a loop device over the backing file is the backing.
func TestBlockDeviceClaims(t *testing.T) {
	losetup, err := exec.LookPath("losetup")
	if err != nil || os.Geteuid() != 0 {
		t.Skip("needs root and losetup")
	}
	backing, img := cacheFiles(t, 32*mib, 16*mib)
	out, err := exec.Command(losetup, "--find", "--show", img).CombinedOutput()
	if err != nil {
		t.Skipf("losetup: %v: %s", err, out)
	}
	loop := strings.TrimSpace(string(out))
	t.Cleanup(func() { exec.Command(losetup, "--detach", loop).Run() })
	var st syscall.Stat_t
	if err := syscall.Stat(loop, &st); err != nil {
		t.Fatal(err)
	}
	alias := filepath.Join(t.TempDir(), "alias")
	if err := syscall.Mknod(alias, syscall.S_IFBLK|0o600, int(st.Rdev)); err != nil {
		t.Skipf("mknod: %v", err)
	}
	other := sparseFile(t, "other.img", 32*mib)
	files := []string{img, backing, other}
	refused(t, files, exitRefused, []string{loop + " is a loop device over " + img, "no flag overrides this"},
		"format", "--force", "--cache", loop, "--backing", img)

	s := startServe(t, "--cache", loop, "--backing", backing, "--format")
	holder := fmt.Sprintf("in use by process %d (", s.cmd.Process.Pid)
	refused(t, files, exitInUse, []string{"the cache " + alias + " is " + holder},
		"serve", "--cache", alias, "--backing", other, "--format", "--listen", "unix:"+filepath.Join(t.TempDir(), "s"))
	refused(t, files, exitInUse, []string{"the cache " + alias + " is " + holder},
		"format", "--force", "--cache", alias, "--backing", other)
	s.stop()
	mustCheck(t, alias, backing)
}
