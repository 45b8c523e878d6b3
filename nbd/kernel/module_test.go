package kernel

import (
	"bufio"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func release(t *testing.T) string {
	t.Helper()
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		t.Fatal(err)
	}
	return unix.ByteSliceToString(u.Release[:])
}

// nbdLoadedHere skips when the host has nbd loaded: kmod would then
// (rightly) not load it again, and these tests want to see the load.
func nbdLoadedHere(t *testing.T) {
	f, err := os.Open("/proc/modules")
	if err != nil {
		return
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if strings.HasPrefix(sc.Text(), "nbd ") {
			t.Skip("nbd is loaded on this host")
		}
	}
}

// fakeTree makes sys, dev and modules roots in a temp dir, with the nbd
// module file at kernel/drivers/block/<file>.
func fakeTree(t *testing.T, file string, withDep bool) (ModuleConfig, string) {
	t.Helper()
	dir := t.TempDir()
	rel := release(t)
	modDir := filepath.Join(dir, "modules", rel)
	ko := filepath.Join(modDir, "kernel/drivers/block", file)
	must(t, os.MkdirAll(filepath.Dir(ko), 0o755))
	must(t, os.WriteFile(ko, []byte("not really a module"), 0o644))
	if withDep {
		must(t, os.WriteFile(filepath.Join(modDir, "modules.dep"), []byte("kernel/drivers/block/"+file+":\nkernel/fs/other.ko:\n"), 0o644))
		must(t, os.WriteFile(filepath.Join(modDir, "modules.builtin"), []byte("kernel/fs/ext4/ext4.ko\n"), 0o644))
	}
	must(t, os.MkdirAll(filepath.Join(dir, "sys"), 0o755))
	must(t, os.MkdirAll(filepath.Join(dir, "dev"), 0o755))
	return ModuleConfig{ModulesDir: filepath.Join(dir, "modules"), SysDir: filepath.Join(dir, "sys"), DevDir: filepath.Join(dir, "dev"), Release: rel}, ko
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func TestLoadModule(t *testing.T) {
	nbdLoadedHere(t)
	for _, tc := range []struct {
		name    string
		file    string
		withDep bool
	}{
		{"modules.dep", "nbd.ko", true},
		{"no modules.dep", "nbd.ko", false},
		{"compressed, no modules.dep", "nbd.ko.zst", false},
		{"compressed", "nbd.ko.xz", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, ko := fakeTree(t, tc.file, tc.withDep)
			var loaded []string
			cfg.Init = func(path, params string) error {
				real, err := filepath.EvalSymlinks(path)
				if err != nil {
					return err
				}
				loaded = append(loaded, real+" "+strings.TrimSpace(params))
				return os.MkdirAll(filepath.Join(cfg.SysDir, "module/nbd"), 0o755)
			}
			cfg.Params = "nbds_max=4"
			if err := LoadModule(cfg); err != nil {
				t.Fatal(err)
			}
			wantKo, _ := filepath.EvalSymlinks(ko)
			if len(loaded) != 1 || loaded[0] != wantKo+" nbds_max=4" {
				t.Fatalf("loaded %q, want %q", loaded, wantKo+" nbds_max=4")
			}
			// Loaded now: a second call does nothing.
			loaded = nil
			if err := LoadModule(cfg); err != nil || loaded != nil {
				t.Fatalf("second load: %v, %q", err, loaded)
			}
		})
	}
}

func TestLoadModuleAlreadyThere(t *testing.T) {
	cfg, _ := fakeTree(t, "nbd.ko", true)
	must(t, os.WriteFile(filepath.Join(cfg.DevDir, "nbd0"), nil, 0o644))
	cfg.Init = func(string, string) error { t.Fatal("loaded although /dev/nbd0 exists"); return nil }
	if err := LoadModule(cfg); err != nil {
		t.Fatal(err)
	}
}

func TestLoadModuleBuiltin(t *testing.T) {
	nbdLoadedHere(t)
	cfg, _ := fakeTree(t, "nbd.ko", true)
	modDir := filepath.Join(cfg.ModulesDir, cfg.Release)
	must(t, os.WriteFile(filepath.Join(modDir, "modules.builtin"), []byte("kernel/drivers/block/nbd.ko\n"), 0o644))
	cfg.Init = func(string, string) error { t.Fatal("loaded a built-in module"); return nil }
	// modules.builtin says built in, but there is no driver: a clear error.
	err := LoadModule(cfg)
	if !errors.Is(err, ErrNoDriver) {
		t.Fatalf("got %v, want ErrNoDriver", err)
	}
}

func TestLoadModuleMissing(t *testing.T) {
	nbdLoadedHere(t)
	cfg, ko := fakeTree(t, "nbd.ko", false)
	must(t, os.Remove(ko))
	cfg.Init = func(string, string) error { t.Fatal("nothing to load"); return nil }
	err := LoadModule(cfg)
	if !errors.Is(err, ErrNoDriver) || !strings.Contains(err.Error(), "modprobe nbd") {
		t.Fatalf("got %v, want ErrNoDriver with a hint", err)
	}
}

func TestLoadModulePermission(t *testing.T) {
	nbdLoadedHere(t)
	cfg, _ := fakeTree(t, "nbd.ko", true)
	cfg.Init = func(string, string) error { return unix.EPERM }
	if err := LoadModule(cfg); !errors.Is(err, ErrPermission) {
		t.Fatalf("got %v, want ErrPermission", err)
	}
}

func TestCompression(t *testing.T) {
	for in, want := range map[string]string{"a/nbd.ko": "", "nbd.ko.xz": "xz", "nbd.ko.zst": "zstd", "nbd.ko.gz": "gzip"} {
		if got := compression(in); got != want {
			t.Errorf("compression(%q) = %q, want %q", in, got, want)
		}
	}
}
