package test

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestServiceReadiness: serve as a systemd Type=notify service would run
// it. With a fake NOTIFY_SOCKET (bound as systemd binds it) and
// --pid-file: READY=1 arrives once the export listens, the pid file then
// names the server, a second instance given the same pid file is refused
// (exit 2), the server's URI is printed, and on SIGTERM STOPPING=1
// arrives and the pid file is gone.
func TestServiceReadiness(t *testing.T) {
	dir := t.TempDir()
	notify, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: filepath.Join(dir, "notify"), Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer notify.Close()
	t.Setenv("NOTIFY_SOCKET", filepath.Join(dir, "notify"))
	recv := func(want string) {
		t.Helper()
		buf := make([]byte, 512)
		notify.SetReadDeadline(time.Now().Add(30 * time.Second))
		n, err := notify.Read(buf)
		if err != nil || string(buf[:n]) != want {
			t.Fatalf("systemd got %q (%v), want %q", buf[:n], err, want)
		}
	}
	pidFile := filepath.Join(dir, "nbdcache.pid")
	s := startServe(t, "--backing", sparseFile(t, "backing.img", 16<<20), "--pid-file", pidFile)
	recv("READY=1")
	if b, err := os.ReadFile(pidFile); err != nil || string(b) != strconv.Itoa(s.cmd.Process.Pid)+"\n" {
		t.Fatalf("pid file holds %q (%v), want the server's pid %d", b, err, s.cmd.Process.Pid)
	}
	out, code := nbdcache(t, "serve", "--backing", sparseFile(t, "other.img", 16<<20), "--pid-file", pidFile,
		"--listen", "unix:"+filepath.Join(dir, "other.sock"))
	if code != 2 || !strings.Contains(out, "is running") {
		t.Fatalf("a second instance with the same pid file: exit %d:\n%s", code, out)
	}
	s.stop()
	recv("STOPPING=1")
	if _, err := os.Stat(pidFile); !os.IsNotExist(err) {
		t.Fatalf("pid file left after a clean stop (%v)", err)
	}
	if !strings.Contains(s.stdout.String(), "nbdcache: uri "+s.uri+"\n") {
		t.Fatalf("serve did not print its URI %s:\n%s", s.uri, s.stdout)
	}
}

// TestSystemdUnit: contrib/systemd/nbdcache@.service, with ExecStart
// pointing at the binary under test, passes `systemd-analyze verify`
// without a word (it warns about bad settings but exits 0, so any output
// fails the test).
func TestSystemdUnit(t *testing.T) {
	analyze := tool(t, "systemd-analyze")
	unit, err := os.ReadFile(filepath.Join("..", "contrib", "systemd", "nbdcache@.service"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(unit), "ExecStart=/usr/local/bin/nbdcache ") {
		t.Fatal("the unit's ExecStart no longer runs /usr/local/bin/nbdcache: update this test")
	}
	path := filepath.Join(t.TempDir(), "nbdcache@vm1.service")
	unit = []byte(strings.Replace(string(unit), "/usr/local/bin/nbdcache", binary, 1))
	if err := os.WriteFile(path, unit, 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(analyze, "verify", path).CombinedOutput()
	if err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
}

// TestStatsWatchJSONLines: `stats --json --watch` prints one JSON object a
// line (JSON Lines), each a whole snapshot, until it is stopped.
func TestStatsWatchJSONLines(t *testing.T) {
	ctl := "unix:" + filepath.Join(t.TempDir(), "ctl.sock")
	s := startServe(t, "--backing", sparseFile(t, "backing.img", 16<<20), "--control", ctl)
	defer s.stop()
	cmd := exec.Command(binary, "stats", "--json", "--watch", "50ms", "--control", ctl)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	sc := bufio.NewScanner(out)
	for i := range 3 {
		if !sc.Scan() {
			t.Fatalf("line %d: %v", i, sc.Err())
		}
		var st struct {
			Mode   *string  `json:"mode"`
			Uptime *float64 `json:"uptime_seconds"`
		}
		if err := json.Unmarshal(sc.Bytes(), &st); err != nil || st.Mode == nil || st.Uptime == nil {
			t.Fatalf("line %d is not a whole snapshot on one line (%v): %q", i, err, sc.Text())
		}
	}
}

// TestServeRun: nbdkit's --run convention. serve runs the command once
// it listens, with $uri set, stops cleanly when it exits, and exits with
// its status: nbdinfo and a qemu-io write go through $uri; a second serve
// over the same cache reads the pattern back in its command, which then
// exits 3, and so does serve.
func TestServeRun(t *testing.T) {
	tool(t, "qemu-io")
	tool(t, "nbdinfo")
	backing, cache := cacheFiles(t, 16<<20, 8<<20)
	sock := filepath.Join(t.TempDir(), "s.sock")
	out, err := serveCombined("serve", "--backing", backing, "--cache", cache, "--format", "--listen", "unix:"+sock,
		"--run", `nbdinfo --size "$uri" && qemu-io -f raw -c "write -P 0x5a 1M 64k" "$uri"`)
	if err != nil || !strings.Contains(string(out), "16777216\n") || !strings.Contains(string(out), "stopped cleanly") {
		t.Fatalf("serve --run: %v\n%s", err, out)
	}
	out, err = serveCombined("serve", "--backing", backing, "--cache", cache, "--listen", "unix:"+sock,
		"--run", `qemu-io -f raw -c "read -P 0x5a 1M 64k" "$uri" | grep -q "read 65536/65536" && exit 3`)
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 3 {
		t.Fatalf("serve --run 'read the pattern && exit 3': want exit status 3 (the pattern read back, the command's status passed on), got %v\n%s", err, out)
	}
}

// TestServeConfigFile: serve takes its flags from a TOML file (keys are
// flag names), run here through --run so that the whole service is one
// command line: the export name, backing and listener come from the
// file.
func TestServeConfigFile(t *testing.T) {
	tool(t, "nbdinfo")
	dir := t.TempDir()
	config := filepath.Join(dir, "vm1.toml")
	body := fmt.Sprintf("backing = %q\nexport = \"vm1\"\nlisten = [\"unix:%s\"]\n", sparseFile(t, "backing.img", 8<<20), filepath.Join(dir, "s.sock"))
	if err := os.WriteFile(config, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := serveCombined("serve", "--config", config, "--run", `test "$exportname" = vm1 && nbdinfo --size "$uri"`)
	if err != nil || !strings.Contains(string(out), "8388608\n") {
		t.Fatalf("serve --config: %v\n%s", err, out)
	}
}

// TestServeListenURI: --listen takes the URI a client is given; its
// export name becomes the export's.
func TestServeListenURI(t *testing.T) {
	tool(t, "nbdinfo")
	sock := filepath.Join(t.TempDir(), "s.sock")
	out, err := serveCombined("serve", "--backing", sparseFile(t, "backing.img", 4<<20),
		"--listen", "nbd+unix:///vm2?socket="+sock, "--run", `test "$exportname" = vm2 && nbdinfo --size "$uri"`)
	if err != nil || !strings.Contains(string(out), "4194304\n") ||
		!strings.Contains(string(out), "nbdcache: uri nbd+unix:///vm2?socket="+sock+"\n") {
		t.Fatalf("serve --listen nbd+unix:///vm2?socket=...: %v\n%s", err, out)
	}
}

// serveCombined runs nbdcache with args to its end, with /usr/bin first on
// PATH (for the tools a --run command calls), and returns its output.
func serveCombined(args ...string) ([]byte, error) {
	cmd := exec.Command(binary, args...)
	cmd.Env = append(os.Environ(), "PATH=/usr/bin:/bin:"+os.Getenv("PATH"))
	return cmd.CombinedOutput()
}

// TestBashCompletion: the checked-in bash completion, sourced by bash with
// Debian's bash-completion as a login shell has it, completes commands,
// subcommands and flags by asking the binary.
func TestBashCompletion(t *testing.T) {
	bash := tool(t, "bash")
	const lib = "/usr/share/bash-completion/bash_completion"
	if _, err := os.Stat(lib); err != nil {
		if os.Getenv("NBDCACHE_REQUIRE_TOOLS") != "" {
			t.Fatalf("%s is required (install bash-completion)", lib)
		}
		t.Skip("bash-completion not installed")
	}
	complete := func(line string) []string {
		script := `source ` + lib + `; source ../contrib/completion/nbdcache.bash
read -ra COMP_WORDS <<<"$LINE"; [[ $LINE == *" " ]] && COMP_WORDS+=("")
COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); COMP_LINE=$LINE; COMP_POINT=${#LINE}
__start_nbdcache; printf '%s\n' "${COMPREPLY[@]}"`
		cmd := exec.Command(bash, "-c", script)
		cmd.Env = append(os.Environ(), "LINE="+line, "PATH="+filepath.Dir(binary)+":"+os.Getenv("PATH"))
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%q: %v\n%s", line, err, out)
		}
		return strings.Fields(string(out))
	}
	for line, want := range map[string]string{
		"nbdcache se":               "serve",
		"nbdcache ctl power-":       "power-on",
		"nbdcache serve --backing-": "--backing-timeout",
		"nbdcache stats --w":        "--watch",
	} {
		if got := complete(line); !slices.Contains(got, want) {
			t.Errorf("%q completes to %q, want %q among them", line, got, want)
		}
	}
}
