package main

// service.go: running as a service: the pid file and systemd's readiness
// protocol (Type=notify; contrib/systemd/nbdcache@.service).

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"syscall"

	"github.com/nbdcache/nbdcache/internal/sdnotify"
)

type serviceFlags struct {
	pidFile string
}

func (f *serviceFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.pidFile, "pid-file", "", "write the process id to `FILE` once ready; removed on exit")
}

// check refuses, before anything starts, a pid file that names another
// live process (another instance may be running) or that cannot be
// written where it is.
func (f *serviceFlags) check() error {
	if f.pidFile == "" {
		return nil
	}
	if b, err := os.ReadFile(f.pidFile); err == nil {
		if pid, err := strconv.Atoi(string(bytes.TrimSpace(b))); err == nil && pid > 0 && pid != os.Getpid() && processAlive(pid) && sameProgram(pid) {
			return fmt.Errorf("%w: --pid-file %s names process %d, which is running (another instance?)", errUsage, f.pidFile, pid)
		}
	} else if !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("--pid-file: %w", err)
	}
	if st, err := os.Stat(filepath.Dir(f.pidFile)); err != nil || !st.IsDir() {
		return fmt.Errorf("%w: --pid-file %s: its folder does not exist", errUsage, f.pidFile)
	}
	return nil
}

// ready is called once the service does its job (the export listens, the
// device is attached): it writes the pid file and tells systemd. A
// failure is logged, not returned: the service runs. The returned
// function is called when shutdown begins: STOPPING=1, and the pid file
// removed if it still names this process.
func (f *serviceFlags) ready(log *slog.Logger) (stopping func()) {
	if f.pidFile != "" {
		if err := writePIDFile(f.pidFile); err != nil {
			log.Error("pid file not written", "err", err)
		}
	}
	if _, err := sdnotify.Notify(sdnotify.Ready); err != nil {
		log.Warn("readiness notification to systemd failed", "err", err)
	}
	return func() {
		sdnotify.Notify(sdnotify.Stopping)
		if f.pidFile == "" {
			return
		}
		if b, err := os.ReadFile(f.pidFile); err == nil && string(b) == pidLine() {
			os.Remove(f.pidFile)
		}
	}
}

func pidLine() string { return strconv.Itoa(os.Getpid()) + "\n" }

// writePIDFile writes this process's id to path, whole or not at all (a
// temporary file renamed over it).
func writePIDFile(path string) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), ".pid-*")
	if err != nil {
		return fmt.Errorf("--pid-file: %w", err)
	}
	_, err = tmp.WriteString(pidLine())
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Chmod(tmp.Name(), 0o644)
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		os.Remove(tmp.Name())
		return fmt.Errorf("--pid-file: %w", err)
	}
	return nil
}

// processAlive reports whether a process with this id exists (signal 0;
// EPERM: it exists, owned by another user).
func processAlive(pid int) bool {
	p, err := os.FindProcess(pid)
	if err != nil {
		return false
	}
	err = p.Signal(syscall.Signal(0))
	return err == nil || errors.Is(err, os.ErrPermission)
}

// sameProgram reports whether process pid runs this program (by its
// command name in /proc): a pid file left by a crash may name a pid the
// system has since given to something else, which must not keep a
// service from starting again.
func sameProgram(pid int) bool {
	self, err := os.ReadFile("/proc/self/comm")
	if err != nil {
		return true // cannot tell: assume it is
	}
	other, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/comm")
	return err != nil || string(other) == string(self)
}
