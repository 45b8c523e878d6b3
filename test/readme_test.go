package test

import (
	"os"
	"os/exec"
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
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	var cmds []string
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
			cmds = append(cmds, line)
		}
	}
	if len(cmds) < 15 {
		t.Fatalf("found %d nbdcache commands in the README's sh blocks; the extraction is broken", len(cmds))
	}
	comment := regexp.MustCompile(`\s+#.*$`)
	optional := regexp.MustCompile(`\s*\[[^\]]*\]`)
	for _, c := range cmds {
		line := optional.ReplaceAllString(comment.ReplaceAllString(c, ""), "")
		args, ok := shellWords(strings.TrimPrefix(line, "nbdcache "))
		if !ok {
			t.Errorf("cannot split %q", c)
			continue
		}
		out, err := exec.Command(binary, append(args, "-h")...).CombinedOutput()
		if err != nil {
			t.Errorf("README: %s\nfails to parse (%v):\n%s", c, err, out)
		}
	}
	t.Logf("%d README commands parse", len(cmds))
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
