package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"runtime/debug"
	"strings"
	"testing"
)

// TestLogFlags: --log-format json writes one JSON object a line,
// --log-level filters, -v means at least info, and bad values are usage
// errors.
func TestLogFlags(t *testing.T) {
	var buf bytes.Buffer
	log, err := (&logFlags{level: "info", format: "json"}).logger(&buf)
	if err != nil {
		t.Fatal(err)
	}
	log.Debug("hidden")
	log.Info("connection opened", "remote", "127.0.0.1:1")
	var rec map[string]any
	if err := json.Unmarshal(buf.Bytes(), &rec); err != nil || rec["msg"] != "connection opened" || rec["remote"] != "127.0.0.1:1" {
		t.Fatalf("json log line %q: %v", buf.String(), err)
	}

	buf.Reset()
	log, _ = (&logFlags{level: "error", format: "text", verbose: true}).logger(&buf)
	log.Info("shown with -v")
	if !strings.Contains(buf.String(), "shown with -v") {
		t.Errorf("-v did not lower the level to info: %q", buf.String())
	}
	buf.Reset()
	log, _ = (&logFlags{level: "error", format: "text"}).logger(&buf)
	log.Warn("a warning")
	if buf.Len() != 0 {
		t.Errorf("--log-level error let a warning through: %q", buf.String())
	}

	for _, f := range []logFlags{{level: "loud", format: "text"}, {level: "info", format: "xml"}} {
		if _, err := f.logger(&buf); !errors.Is(err, errUsage) {
			t.Errorf("%+v: %v, want a usage error", f, err)
		}
	}
}

// TestVersionString: the module version and the stamped revision, cut to
// 12 digits, with "modified" for a dirty tree; -ldflags overrides the
// version.
func TestVersionString(t *testing.T) {
	bi := &debug.BuildInfo{GoVersion: "go1.26", Main: debug.Module{Version: "v1.2.3"},
		Settings: []debug.BuildSetting{{Key: "vcs.revision", Value: "0123456789abcdef0123"}, {Key: "vcs.modified", Value: "true"}}}
	if got, want := versionString(bi, true), "nbdcache v1.2.3 (0123456789ab, modified, go1.26)"; got != want {
		t.Errorf("got %q, want %q", got, want)
	}
	version = "v9"
	defer func() { version = "" }()
	if got := versionString(nil, false); got != "nbdcache v9" {
		t.Errorf("with -X main.version and no build info: %q", got)
	}
	var out bytes.Buffer
	if code := run(context.Background(), []string{"--version"}, &out, &out); code != 0 || !strings.HasPrefix(out.String(), "nbdcache v9") {
		t.Errorf("--version: exit %d, %q", code, out.String())
	}
}
