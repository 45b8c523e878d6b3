package test

import (
	"bufio"
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestDemoServe runs the README's first command as a new user would:
// `nbdcache serve` with no storage flags. It must set up its demo files,
// print the commands to connect, and those very commands (nbdinfo,
// qemu-io, fio; fio shortened) must work against it. SIGTERM must then
// stop it cleanly and delete the demo folder.
func TestDemoServe(t *testing.T) {
	for _, name := range []string{"nbdinfo", "qemu-io", "fio"} {
		tool(t, name)
	}
	sock := filepath.Join(t.TempDir(), "demo.sock")
	cmd := exec.Command(binary, "serve", "--listen", "unix:"+sock)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	watchdog := time.AfterFunc(2*time.Minute, func() { cmd.Process.Kill() })
	defer watchdog.Stop()
	defer cmd.Process.Kill()

	var printed []string
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		printed = append(printed, sc.Text())
		if strings.HasPrefix(sc.Text(), "Stop with Ctrl-C") {
			break
		}
	}
	all := strings.Join(printed, "\n")
	m := regexp.MustCompile(`write-back cache in (\S+) \(deleted on exit\)`).FindStringSubmatch(all)
	if m == nil {
		t.Fatalf("no demo folder announced:\n%s\n%s", all, stderr.String())
	}
	dir := m[1]
	if _, err := os.Stat(filepath.Join(dir)); err != nil {
		t.Fatalf("demo folder: %v", err)
	}
	cmds := map[string]string{}
	for _, l := range printed {
		l = strings.TrimSpace(l)
		for _, name := range []string{"nbdinfo ", "qemu-io ", "fio "} {
			if strings.HasPrefix(l, name) {
				cmds[strings.TrimSpace(name)] = l
			}
		}
	}
	if len(cmds) != 3 {
		t.Fatalf("want the nbdinfo, qemu-io and fio commands printed, got %q:\n%s", cmds, all)
	}
	fioOut := filepath.Join(t.TempDir(), "fio.txt")
	cmds["fio"] = strings.Replace(cmds["fio"], "--runtime=10", "--runtime=2", 1) + " --output=" + fioOut
	for _, name := range []string{"nbdinfo", "qemu-io", "fio"} {
		got := run(t, "sh", "-c", cmds[name])
		t.Logf("%s: %s", cmds[name], lastLine(got))
		if name == "nbdinfo" && !strings.Contains(got, "1073741824") {
			t.Errorf("nbdinfo does not show the 1 GiB demo export:\n%s", got)
		}
	}
	if b, err := os.ReadFile(fioOut); err != nil || !strings.Contains(string(b), "err= 0") {
		t.Errorf("fio on the demo (%v):\n%s", err, b)
	}

	rest := make(chan string, 1)
	go func() {
		var b strings.Builder
		for sc.Scan() {
			b.WriteString(sc.Text() + "\n")
		}
		rest <- b.String()
	}()
	cmd.Process.Signal(syscall.SIGTERM)
	tail := <-rest
	if err := cmd.Wait(); err != nil {
		t.Fatalf("the demo did not exit cleanly on SIGTERM: %v\n%s\n%s", err, tail, stderr.String())
	}
	if !strings.Contains(tail, "stopped cleanly") {
		t.Errorf("no clean stop reported:\n%s", tail)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("the demo folder %s is still there after exit (%v)", dir, err)
	}
}
