package kernel

// module.go: finding and loading the nbd module.

import (
	"bytes"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/pmorjan/kmod"
	"golang.org/x/sys/unix"
)

// ModuleConfig says where to find the nbd module and how to load it.
type ModuleConfig struct {
	// Params are the module parameters on first load (default
	// "nbds_max=16 max_part=0": partitions are not scanned; netlink
	// creates more devices on demand).
	Params string
	// ModulesDir is the modules root (default /lib/modules).
	ModulesDir string
	// SysDir is the sysfs root (default /sys), DevDir the device root
	// (default /dev); tests point them elsewhere.
	SysDir, DevDir string
	// Release is the kernel release (default: uname -r).
	Release string
	// Init loads a module image; the default is finit_module(2) with
	// fallbacks for compressed modules. Tests replace it.
	Init func(path, params string) error
}

func (m *ModuleConfig) defaults() error {
	if m.Params == "" {
		m.Params = "nbds_max=16 max_part=0"
	}
	if m.ModulesDir == "" {
		m.ModulesDir = "/lib/modules"
	}
	if m.SysDir == "" {
		m.SysDir = "/sys"
	}
	if m.DevDir == "" {
		m.DevDir = "/dev"
	}
	if m.Release == "" {
		var u unix.Utsname
		if err := unix.Uname(&u); err != nil {
			return err
		}
		m.Release = unix.ByteSliceToString(u.Release[:])
	}
	if m.Init == nil {
		m.Init = initModule
	}
	return nil
}

// Loaded reports whether the nbd driver is present: loaded as a module,
// built in, or at least showing /dev/nbd0.
func (m ModuleConfig) Loaded() bool {
	if m.SysDir == "" {
		m.SysDir = "/sys"
	}
	if m.DevDir == "" {
		m.DevDir = "/dev"
	}
	for _, p := range []string{filepath.Join(m.SysDir, "module/nbd"), filepath.Join(m.DevDir, "nbd0")} {
		if _, err := os.Stat(p); err == nil {
			return true
		}
	}
	return false
}

// LoadModule makes sure the nbd driver is there. It does nothing when nbd
// is loaded or built in. Otherwise it loads it with kmod, from
// <ModulesDir>/<release>/modules.dep; when that file is missing (minimal
// images, containers) it finds nbd.ko itself and gives kmod a temporary
// root holding a one-line modules.dep. Compressed modules (.ko.xz,
// .ko.zst, .ko.gz) are handed to the kernel to decompress where it can
// (Linux 6.2+), else decompressed here (gzip) or with the xz or zstd
// program. When none of this works the error wraps ErrNoDriver (or
// ErrPermission) and says what to do.
func LoadModule(cfg ModuleConfig) error {
	if err := cfg.defaults(); err != nil {
		return err
	}
	if cfg.Loaded() {
		return nil
	}
	modDir := filepath.Join(cfg.ModulesDir, cfg.Release)
	init := func(path, params string, _ int) error { return cfg.Init(path, params) }
	opts := []kmod.Option{kmod.SetInitFunc(init), kmod.SetConfigFile("")}
	root := cfg.ModulesDir
	if !exists(filepath.Join(modDir, "modules.dep")) {
		ko, err := findModule(modDir, "nbd")
		if err != nil {
			return noDriver(cfg, err)
		}
		tmp, err := oneModuleRoot(cfg.Release, ko)
		if err != nil {
			return err
		}
		defer os.RemoveAll(tmp)
		root = tmp
		opts = append(opts, kmod.SetIgnoreAlias(), kmod.SetIgnoreBuiltin())
	} else {
		if !exists(filepath.Join(modDir, "modules.alias")) {
			opts = append(opts, kmod.SetIgnoreAlias())
		}
		if !exists(filepath.Join(modDir, "modules.builtin")) {
			opts = append(opts, kmod.SetIgnoreBuiltin())
		}
	}
	if !exists("/proc/modules") {
		opts = append(opts, kmod.SetIgnoreStatus())
	}
	opts = append(opts, kmod.SetRootDir(root))
	// kmod.New finds <root>/<uname -r>: Release must be the running
	// kernel's for a real load.
	k, err := kmod.New(opts...)
	if err != nil {
		return noDriver(cfg, err)
	}
	if err := k.Load("nbd", cfg.Params, 0); err != nil {
		return noDriver(cfg, err)
	}
	if !cfg.Loaded() {
		// Built in according to modules.builtin, yet absent: the list
		// belongs to another kernel.
		return noDriver(cfg, errors.New("modules.builtin lists nbd but the kernel has no nbd driver"))
	}
	return nil
}

// noDriver explains a failed load.
func noDriver(cfg ModuleConfig, err error) error {
	if errors.Is(err, unix.EPERM) || errors.Is(err, unix.EACCES) {
		return fmt.Errorf("%w: loading nbd needs CAP_SYS_MODULE: run as root, or run `modprobe nbd` first (%w)", ErrPermission, err)
	}
	hint := "install the modules of the running kernel (Debian: the linux-image package matching `uname -r`; Ubuntu: linux-modules-extra-$(uname -r)) and retry, or run `modprobe nbd`; in a container, load nbd on the host"
	return fmt.Errorf("%w for kernel %s: %w; %s", ErrNoDriver, cfg.Release, err, hint)
}

func exists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// moduleSuffixes are the file names a module may have, plain first.
var moduleSuffixes = []string{".ko", ".ko.zst", ".ko.xz", ".ko.gz"}

// findModule looks for <name>.ko* under modDir/kernel (the usual
// drivers/block/ first).
func findModule(modDir, name string) (string, error) {
	for _, sfx := range moduleSuffixes {
		p := filepath.Join(modDir, "kernel/drivers/block", name+sfx)
		if exists(p) {
			return p, nil
		}
	}
	var found string
	filepath.WalkDir(modDir, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return nil // unreadable: skip
		}
		if !d.IsDir() {
			for _, sfx := range moduleSuffixes {
				if d.Name() == name+sfx {
					found = p
					return filepath.SkipAll
				}
			}
		}
		return nil
	})
	if found == "" {
		return "", fmt.Errorf("no modules.dep and no %s.ko under %s", name, modDir)
	}
	return found, nil
}

// oneModuleRoot builds a modules root for kmod that knows one module: a
// temporary D/<release>/ with a symlink to ko and a one-line
// modules.dep. The caller removes D.
func oneModuleRoot(release, ko string) (string, error) {
	dir, err := os.MkdirTemp("", "nbdcache-kmod-")
	if err != nil {
		return "", err
	}
	rel := filepath.Join(dir, release)
	base := filepath.Base(ko)
	err = os.MkdirAll(rel, 0o755)
	if err == nil {
		err = os.Symlink(ko, filepath.Join(rel, base))
	}
	if err == nil {
		err = os.WriteFile(filepath.Join(rel, "modules.dep"), []byte(base+":\n"), 0o644)
	}
	if err != nil {
		os.RemoveAll(dir)
		return "", err
	}
	return dir, nil
}

// compression names the compression of a module file by its suffix.
func compression(path string) string {
	switch {
	case strings.HasSuffix(path, ".ko.xz"):
		return "xz"
	case strings.HasSuffix(path, ".ko.zst"):
		return "zstd"
	case strings.HasSuffix(path, ".ko.gz"):
		return "gzip"
	}
	return ""
}

// initModule loads one module file into the kernel.
func initModule(path, params string) error {
	params = strings.TrimSpace(params)
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	comp := compression(path)
	if comp == "" {
		err := unix.FinitModule(int(f.Fd()), params, 0)
		if errors.Is(err, unix.ENOSYS) {
			buf, rerr := io.ReadAll(f)
			if rerr != nil {
				return rerr
			}
			return unix.InitModule(buf, params)
		}
		return err
	}
	// Linux 6.2+ with CONFIG_MODULE_DECOMPRESS decompresses itself.
	err = unix.FinitModule(int(f.Fd()), params, unix.MODULE_INIT_COMPRESSED_FILE)
	if err == nil || errors.Is(err, unix.EEXIST) || errors.Is(err, unix.EPERM) {
		return err
	}
	img, derr := decompress(comp, f)
	if derr != nil {
		return fmt.Errorf("%s is %s-compressed, the kernel cannot decompress it (%v), and neither can we: %w; decompress it by hand (e.g. `%s -d`) or run `modprobe nbd`", path, comp, err, derr, comp)
	}
	return unix.InitModule(img, params)
}

// decompress reads a whole compressed module: gzip in process, xz and
// zstd through their programs (no decompressor dependency for a
// fallback that modern kernels do not need).
func decompress(comp string, f *os.File) ([]byte, error) {
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return nil, err
	}
	if comp == "gzip" {
		zr, err := gzip.NewReader(f)
		if err != nil {
			return nil, err
		}
		return io.ReadAll(zr)
	}
	prog, err := exec.LookPath(comp)
	if err != nil {
		return nil, fmt.Errorf("no %s program: %w", comp, err)
	}
	var out, stderr bytes.Buffer
	cmd := exec.Command(prog, "-dc")
	cmd.Stdin, cmd.Stdout, cmd.Stderr = f, &out, &stderr
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("%s -dc: %w: %s", comp, err, strings.TrimSpace(stderr.String()))
	}
	return out.Bytes(), nil
}
