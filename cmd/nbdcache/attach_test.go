package main

import (
	"bytes"
	"errors"
	"strings"
	"testing"
)

// TestAttachUsage: flag mistakes are usage errors, found before any
// storage is opened or the kernel is touched.
func TestAttachUsage(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--reconnect"}, "--reconnect needs --device"},
		{[]string{"--device", "/dev/nbd0", "--reconnect", "--ioctl"}, "drop --ioctl"},
		{[]string{"--device", "/dev/sda"}, "not an nbd device"},
		{[]string{"--device", "/dev/nbd0", "--connections", "0"}, "--connections 0"},
		{[]string{"stray"}, "unexpected argument"},
	} {
		code, out, errs := runArgs(t, append([]string{"attach"}, tc.args...)...)
		if code != exitUsage || !strings.Contains(errs, tc.want) {
			t.Errorf("attach %q: exit %d, %q; want a usage error with %q", tc.args, code, errs, tc.want)
		}
		if out != "" {
			t.Errorf("attach %q printed %q", tc.args, out)
		}
	}
}

func TestDetachUsage(t *testing.T) {
	for _, args := range [][]string{nil, {"/dev/nbd0", "/dev/nbd1"}, {"/dev/sdb"}} {
		if code, _, errs := runArgs(t, append([]string{"detach"}, args...)...); code != exitUsage {
			t.Errorf("detach %q: exit %d, %q; want a usage error", args, code, errs)
		}
	}
}

func TestBackendIdentifier(t *testing.T) {
	f := storageFlags{backing: "/dev/vdb"}
	if got := backendIdentifier(&f); got != "nbdcache:/dev/vdb" {
		t.Errorf("got %q", got)
	}
	f.cachePath = "/dev/vda"
	if got := backendIdentifier(&f); got != "nbdcache:/dev/vdb+cache:/dev/vda" {
		t.Errorf("got %q", got)
	}
	rel := storageFlags{backing: "disk.img"}
	if got := backendIdentifier(&rel); !strings.HasPrefix(got, "nbdcache:/") || !strings.HasSuffix(got, "/disk.img") {
		t.Errorf("relative path not made absolute: %q", got)
	}
}

// TestWritebackFlagsUsage: out-of-range writeback percentages are usage
// errors, found before any storage is opened; the default high watermark
// follows a higher --writeback-percent.
func TestWritebackFlagsUsage(t *testing.T) {
	for _, tc := range []struct {
		pct, high int
		want      string
	}{
		{0, 70, "--writeback-percent 0"},
		{101, 70, "--writeback-percent 101"},
		{20, 10, "--writeback-high 10"},
		{10, 101, "--writeback-high 101"},
		{80, 0, "/nonexistent/b"}, // 80% with the default watermark is fine: the file is what fails
	} {
		f := storageFlags{backing: "/nonexistent/b", cachePath: "/nonexistent/c", mode: "writeback", syncMode: "normal", wbPercent: tc.pct, wbHigh: tc.high}
		var out bytes.Buffer
		o, err := f.open(&out, nil)
		if err == nil {
			o.Close()
		}
		if err == nil || !strings.Contains(err.Error(), tc.want) || errors.Is(err, errUsage) != strings.HasPrefix(tc.want, "--") {
			t.Errorf("percent %d high %d: %v, want an error with %q", tc.pct, tc.high, err, tc.want)
		}
	}
}
