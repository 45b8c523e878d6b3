package test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nbdcache/nbdcache/storage"
)

const mib = 1 << 20

func TestNbdinfo(t *testing.T) {
	nbdinfo := tool(t, "nbdinfo")
	backing := sparseFile(t, "backing.img", 64*mib)
	s := startServe(t, "--backing", backing, "--export", "disk")
	out := run(t, nbdinfo, "--json", "nbd+unix:///disk?socket="+s.sock)
	var info struct {
		Protocol   string `json:"protocol"`
		Structured bool   `json:"structured"`
		Exports    []map[string]any
	}
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("nbdinfo --json: %v\n%s", err, out)
	}
	if info.Protocol != "newstyle-fixed" || !info.Structured || len(info.Exports) != 1 {
		t.Fatalf("nbdinfo: %s", out)
	}
	ex := info.Exports[0]
	want := map[string]any{
		"export-name": "disk", "export-size": float64(64 * mib),
		"is_read_only": false, "is_rotational": rotational(t, backing),
		"can_flush": true, "can_fua": true, "can_trim": true, "can_zero": true,
		"can_fast_zero": true, "can_multi_conn": true, "can_cache": true, "can_df": true,
		"block_size_minimum": float64(1), "block_size_preferred": float64(4096),
		"block_size_maximum": float64(32 * mib),
	}
	for k, v := range want {
		if ex[k] != v {
			t.Errorf("%s = %v, want %v", k, ex[k], v)
		}
	}
	if ctx, _ := json.Marshal(ex["contexts"]); string(ctx) != `["base:allocation"]` {
		t.Errorf("contexts %s", ctx)
	}

	// A read-only export of its own file: a backing another server
	// writes is claimed, and refused to every other server.
	ro := startServe(t, "--backing", sparseFile(t, "ro.img", 64*mib), "--read-only")
	out = run(t, nbdinfo, "--json", ro.uri)
	if !strings.Contains(out, `"is_read_only": true`) {
		t.Errorf("--read-only not advertised:\n%s", out)
	}
}

// rotational is what the backing's device says about itself, which the
// export passes on.
func rotational(t *testing.T, path string) bool {
	f, err := storage.OpenFile(path, storage.FileOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	return f.Caps().Rotational
}

// TestNbdsh runs every command and every error through libnbd's Python
// binding, and 64 requests in flight.
func TestNbdsh(t *testing.T) {
	py := python3(t)
	backing := sparseFile(t, "backing.img", 64*mib)
	s := startServe(t, "--backing", backing)
	ro := startServe(t, "--backing", sparseFile(t, "ro.img", 64*mib), "--read-only") // its own file: s claims backing
	script := filepath.Join("testdata", "nbdsh_commands.py")
	out := run(t, py, script, s.uri, ro.uri)
	t.Log(out)
	if !strings.Contains(out, "ALL OK") {
		t.Fatalf("nbdsh script did not finish:\n%s", out)
	}
	// The bytes that landed in the file, after a clean stop.
	s.stop()
	got, err := os.ReadFile(backing)
	if err != nil {
		t.Fatal(err)
	}
	want := bytes.Repeat([]byte{0x5a}, 4096)
	if !bytes.Equal(got[mib:mib+4096], want) {
		t.Errorf("the FUA write at 1 MiB did not land in the backing file")
	}
	if !bytes.Equal(got[2*mib:2*mib+65536], make([]byte, 65536)) {
		t.Errorf("the zeroed range at 2 MiB is not zero in the backing file")
	}
}

func TestQemuImgConvertCompare(t *testing.T) {
	qemuImg := tool(t, "qemu-img")
	backing := sparseFile(t, "backing.img", 32*mib)
	src, data := randomFile(t, "src.img", 32*mib, 1)
	s := startServe(t, "--backing", backing)
	run(t, qemuImg, "convert", "-n", "-f", "raw", "-O", "raw", src, s.uri)
	run(t, qemuImg, "compare", "-f", "raw", "-F", "raw", src, s.uri)
	s.stop()
	got, _ := os.ReadFile(backing)
	if !bytes.Equal(got, data) {
		t.Fatal("backing file differs from the converted image")
	}
}

func TestQemuIo(t *testing.T) {
	qemuIo := tool(t, "qemu-io")
	backing := sparseFile(t, "backing.img", 16*mib)
	s := startServe(t, "--backing", backing)
	args := []string{"-f", "raw"}
	for i, pat := range []int{0x11, 0x22, 0x33, 0x44} {
		off := i * 3 * mib / 2
		args = append(args, "-c", fmt.Sprintf("write -P %#x %d 1M", pat, off))
	}
	args = append(args, "-c", "write -z 6M 512k", "-c", "flush")
	for i, pat := range []int{0x11, 0x22, 0x33, 0x44} {
		off := i * 3 * mib / 2
		args = append(args, "-c", fmt.Sprintf("read -P %#x %d 1M", pat, off))
	}
	args = append(args, "-c", "read -P 0 6M 512k", "-c", "aio_write -P 0x77 8M 4k", "-c", "aio_flush", "-c", "read -P 0x77 8M 4k")
	out := run(t, qemuIo, append(args, s.uri)...)
	if strings.Contains(out, "Pattern verification failed") || strings.Contains(out, "failed") {
		t.Fatalf("qemu-io:\n%s", out)
	}
	s.stop()
	got, _ := os.ReadFile(backing)
	for i, pat := range []byte{0x11, 0x22, 0x33, 0x44} {
		off := i * 3 * mib / 2
		if !bytes.Equal(got[off:off+mib], bytes.Repeat([]byte{pat}, mib)) {
			t.Errorf("pattern %#x did not land at %d", pat, off)
		}
	}
}

func TestNbdcopyRoundTrip(t *testing.T) {
	nbdcopy := tool(t, "nbdcopy")
	backing := sparseFile(t, "backing.img", 48*mib)
	src, data := randomFile(t, "src.img", 48*mib, 2)
	// Leave holes in the source so that nbdcopy's sparse path runs too.
	copy(data[5*mib:9*mib], make([]byte, 4*mib))
	os.WriteFile(src, data, 0o644)
	s := startServe(t, "--backing", backing)
	run(t, nbdcopy, "--connections=4", "--requests=16", src, s.uri)
	dst := filepath.Join(t.TempDir(), "back.img")
	run(t, nbdcopy, s.uri, dst)
	got, _ := os.ReadFile(dst)
	if !bytes.Equal(got, data) {
		t.Fatal("nbdcopy round trip differs")
	}
}

func TestFioVerify(t *testing.T) {
	fio := tool(t, "fio")
	backing := sparseFile(t, "backing.img", 64*mib)
	s := startServe(t, "--backing", backing)
	out := filepath.Join(t.TempDir(), "fio.json")
	run(t, fio, "--name=verify", "--ioengine=nbd", "--uri="+s.uri,
		"--rw=randwrite", "--bs=4k", "--iodepth=16", "--numjobs=4",
		"--size=16M", "--offset_increment=16M", "--verify=crc32c", "--do_verify=1",
		"--verify_fatal=1", "--verify_state_save=0", "--output-format=json", "--output="+out)
	var res struct {
		Jobs []struct {
			Error int `json:"error"`
			Write struct {
				IOBytes int64 `json:"io_bytes"`
			} `json:"write"`
			Read struct {
				IOBytes int64 `json:"io_bytes"`
			} `json:"read"`
		} `json:"jobs"`
	}
	b, _ := os.ReadFile(out)
	if err := json.Unmarshal(b, &res); err != nil {
		t.Fatalf("fio output: %v\n%s", err, b)
	}
	if len(res.Jobs) != 4 {
		t.Fatalf("%d fio jobs", len(res.Jobs))
	}
	for i, j := range res.Jobs {
		if j.Error != 0 || j.Write.IOBytes != 16*mib || j.Read.IOBytes != 16*mib {
			t.Errorf("job %d: error %d, wrote %d, verified %d", i, j.Error, j.Write.IOBytes, j.Read.IOBytes)
		}
	}
}
