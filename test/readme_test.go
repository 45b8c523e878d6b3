package test

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// TestREADMECommandsParse: every nbdcache command in the README's sh
// blocks, as printed, is one the binary accepts: its command, flag names
// and flag values parse. Each runs with -h appended, which the flag
// parser reaches only after it has set every flag before it (a bad
// value or an unknown flag fails), and which then stops the command
// before it does anything. Optional parts written [--like this] are
// dropped, comments are cut, continued lines joined.
func TestREADMECommandsParse(t *testing.T) {
	cmds := readmeCommands(t)
	for _, c := range cmds {
		out, err := exec.Command(binary, append(c.args, "-h")...).CombinedOutput()
		if err != nil {
			t.Errorf("README: %s\nfails to parse (%v):\n%s", c.line, err, out)
		}
	}
	t.Logf("%d README commands parse", len(cmds))
}

// TestREADMECommandsRun runs, as printed and in the README's order, every
// README command that names only files in the current folder and the
// fault-mode control socket: format, check and rebind on cache.img,
// disk.img and copy.img, then the fault-mode server and each ctl command
// against it. A serve runs in the background (with a private unix
// listener added, so that it never takes the shared TCP port) until the
// end. Each command must exit 0. Commands that name devices, /run or a
// remote host cannot run here; TestREADMECommandsParse covers them.
func TestREADMECommandsRun(t *testing.T) {
	dir := t.TempDir()
	for name, size := range map[string]int64{"disk.img": 64 << 20, "copy.img": 64 << 20, "cache.img": 32 << 20, "b.img": 64 << 20, "c.img": 32 << 20} {
		if err := os.WriteFile(filepath.Join(dir, name), nil, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(filepath.Join(dir, name), size); err != nil {
			t.Fatal(err)
		}
	}
	runnable := func(args []string) bool {
		for _, a := range args {
			for _, no := range []string{"/dev/", "/run/", "/etc/", "://", "0.0.0.0"} {
				if strings.Contains(a, no) {
					return false
				}
			}
		}
		return true
	}
	ran := 0
	for _, c := range readmeCommands(t) {
		if !runnable(c.args) {
			continue
		}
		ran++
		if c.args[0] == "serve" {
			startServeIn(t, binary, dir, c.args[1:]...)
			continue
		}
		cmd := exec.Command(binary, c.args...)
		cmd.Dir = dir
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("README: %s\nfailed (%v):\n%s", c.line, err, out)
		}
	}
	if ran < 9 {
		t.Errorf("ran %d README commands; the README's runnable examples (format, check, rebind, fault mode) are gone?", ran)
	}
	t.Logf("%d README commands ran", ran)
}

// readmeCommand is one nbdcache command of the README's sh blocks.
type readmeCommand struct {
	line string   // as printed
	args []string // its words after "nbdcache", without comments and [optional parts]
}

// readmeCommands extracts the nbdcache commands of the README's sh
// blocks. Optional parts written [--like this] are dropped, comments are
// cut, continued lines joined.
func readmeCommands(t *testing.T) []readmeCommand {
	t.Helper()
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	var lines []string
	inSh := false
	cont := ""
	for _, line := range strings.Split(string(readme), "\n") {
		switch {
		case strings.HasPrefix(line, "```sh"):
			inSh = true
			continue
		case strings.HasPrefix(line, "```"):
			inSh = false
			continue
		}
		if !inSh {
			continue
		}
		line = cont + line
		cont = ""
		if strings.HasSuffix(line, "\\") {
			cont = strings.TrimSuffix(line, "\\") + " "
			continue
		}
		line = strings.TrimPrefix(strings.TrimSpace(line), "sudo ")
		if strings.HasPrefix(line, "nbdcache ") {
			lines = append(lines, line)
		}
	}
	if len(lines) < 15 {
		t.Fatalf("found %d nbdcache commands in the README's sh blocks; the extraction is broken", len(lines))
	}
	comment := regexp.MustCompile(`\s+#.*$`)
	optional := regexp.MustCompile(`\s*\[[^\]]*\]`)
	var cmds []readmeCommand
	for _, c := range lines {
		line := optional.ReplaceAllString(comment.ReplaceAllString(c, ""), "")
		args, ok := shellWords(strings.TrimPrefix(line, "nbdcache "))
		if !ok {
			t.Errorf("cannot split %q", c)
			continue
		}
		cmds = append(cmds, readmeCommand{c, args})
	}
	return cmds
}

// shellWords splits s as sh would for the simple quoting the README uses:
// single and double quotes, no escapes or expansions.
func shellWords(s string) ([]string, bool) {
	var words []string
	var cur strings.Builder
	in, quote := false, rune(0)
	for _, r := range s {
		switch {
		case quote != 0:
			if r == quote {
				quote = 0
			} else {
				cur.WriteRune(r)
			}
		case r == '\'' || r == '"':
			quote, in = r, true
		case r == ' ' || r == '\t':
			if in {
				words, in = append(words, cur.String()), false
				cur.Reset()
			}
		default:
			cur.WriteRune(r)
			in = true
		}
	}
	if in {
		words = append(words, cur.String())
	}
	return words, quote == 0
}
