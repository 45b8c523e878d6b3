package main

// serve.go: `nbdcache serve`, its --run command, and the shutdown that
// flushes.

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"runtime/pprof"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/nbdcache/nbdcache/nbd"
	"github.com/nbdcache/nbdcache/storage"
)

const defaultListen = "127.0.0.1:10809"

type serveFlags struct {
	storage storageFlags
	limits  limitFlags
	listens []listenAddr
	export  string
	log     logFlags
	cpuProf string
	control controlFlags
	sockets socketFlags
	tls     tlsFlags
	metrics string
	service serviceFlags
	run     string
}

func runServe(fs *flag.FlagSet) runner {
	var f serveFlags
	f.storage.register(fs)
	f.limits.register(fs)
	fs.Func("listen", "listen on `ADDR`: unix:PATH or HOST:PORT; repeatable (default "+defaultListen+")", func(s string) error {
		a, err := parseListen(s)
		if err != nil {
			return err
		}
		f.listens = append(f.listens, a)
		return nil
	})
	fs.StringVar(&f.export, "export", "", "export `NAME` (the empty name always reaches it too)")
	f.log.register(fs)
	f.control.register(fs, "stats, flush --drain, mode")
	f.sockets.register(fs)
	f.tls.register(fs)
	fs.StringVar(&f.metrics, "metrics", "", "serve Prometheus metrics at /metrics on `ADDR`: HOST:PORT or unix:PATH (the control socket serves them too)")
	fs.StringVar(&f.cpuProf, "cpuprofile", "", "write a Go CPU profile of the whole run to `FILE`")
	fs.BoolVar(&f.storage.faults, "faults", false, "fault mode: power cuts, injected errors and latency through 'nbdcache ctl' (needs --control)")
	f.service.register(fs)
	configFlag(fs)
	fs.StringVar(&f.run, "run", "", "run `CMD` with sh once serving, with $uri, $unixsocket or $port, and $exportname set; stop when it exits, with its exit status (nbdkit's --run)")
	return func(ctx context.Context, args []string, stdout, stderr io.Writer) error {
		if err := f.service.check(); err != nil {
			return err
		}
		log, err := f.log.logger(stderr)
		if err != nil {
			return err
		}
		var cfg nbd.Config
		if err := f.limits.apply(&cfg); err != nil {
			return err
		}
		if err := f.tls.apply(&cfg); err != nil {
			return err
		}
		if _, err := f.control.access(); err != nil {
			return err
		}
		perm, err := f.sockets.perm()
		if err != nil {
			return err
		}
		if f.storage.faults && f.control.addr == "" {
			return fmt.Errorf("%w: --faults needs --control unix:PATH, through which `nbdcache ctl` drives it", errUsage)
		}
		if len(f.listens) == 0 {
			a, _ := parseListen(defaultListen)
			f.listens = []listenAddr{a}
		}
		for _, a := range f.listens {
			if a.export != "" && a.export != f.export {
				if f.export != "" || a.export != f.listens[0].export {
					return fmt.Errorf("%w: --listen names export %q, but the export is %q (one export per server)", errUsage, a.export, f.export)
				}
				f.export = a.export
			}
			if a.tls && cfg.TLS == nil {
				return fmt.Errorf("%w: --listen %s is a TLS URI: give --tls on or --tls require (and --tls-certificates)", errUsage, a)
			}
		}
		if f.cpuProf != "" {
			stopProf, err := startCPUProfile(f.cpuProf)
			if err != nil {
				return err
			}
			defer stopProf()
		}

		st, err := f.storage.open(stdout, log)
		if err != nil {
			return err
		}
		defer st.Close()
		dev := st.dev

		cfg.Exports = []nbd.Export{{Name: f.export, Device: dev, ReadOnly: f.storage.readOnly}}
		cfg.Logger = log
		var srvRef atomic.Pointer[nbd.Server]
		m := serverMetrics(st, &srvRef)
		cfg.Observer = m.Observer()
		srv, err := nbd.NewServer(cfg)
		if err != nil {
			return err
		}
		srvRef.Store(srv)
		if f.metrics != "" {
			bound, stop, err := serveMetrics(f.metrics, m, perm, log)
			if err != nil {
				return err
			}
			defer stop()
			fmt.Fprintf(stdout, "nbdcache: metrics on http://%s/metrics\n", bound)
		}
		if st.rig != nil {
			st.rig.SetServer(srv) // power cuts drop the connections
		}
		stopControl := func() error { return nil }
		if f.control.addr != "" {
			stop, err := startControl(f.control, &daemon{srv: srv, st: st, started: time.Now(), metrics: m})
			if err != nil {
				return err
			}
			stopControl = stop
			defer func() { stopControl() }()
		}
		var ls []net.Listener
		for _, a := range f.listens {
			l, err := listen(a, perm)
			if err != nil {
				for _, l := range ls {
					l.Close()
				}
				return err
			}
			if a.network == "unix" {
				defer os.Remove(a.addr)
			}
			ls = append(ls, l)
		}
		serveErr := make(chan error, len(ls))
		for _, l := range ls {
			go func() { serveErr <- srv.Serve(l) }()
		}
		for i, l := range ls {
			fmt.Fprintf(stdout, "nbdcache: serving export %q (%d bytes) on %s\n", f.export, dev.Size(), listenString(f.listens[i], l))
		}
		for i, l := range ls {
			fmt.Fprintf(stdout, "nbdcache: uri %s\n", nbdURI(f.listens[i], l, f.export, cfg.TLS != nil))
		}
		if st.rig != nil {
			fmt.Fprintf(stdout, "nbdcache: fault mode: `nbdcache ctl --control %s power-cut|error|delay|status`\n", f.control.addr)
		}
		if st.demo {
			printConnectHelp(stdout, f.listens[0], ls[0], f.export, cfg.TLS != nil)
		}

		stopping := f.service.ready(log)
		var child *exec.Cmd
		var childDone chan error
		if f.run != "" {
			child = exec.Command("/bin/sh", "-c", f.run)
			child.Env = append(os.Environ(), runEnv(f.listens[0], ls[0], f.export, cfg.TLS != nil)...)
			child.Stdin, child.Stdout, child.Stderr = os.Stdin, stdout, stderr
			// Its own process group, so that stopping it stops what it
			// started too; and it dies with serve.
			child.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
			if err = child.Start(); err != nil {
				err = fmt.Errorf("--run: %w", err)
			} else {
				childDone = make(chan error, 1)
				go func() { childDone <- child.Wait() }()
			}
		}
		if err == nil {
			select {
			case <-ctx.Done():
			case err = <-serveErr:
				log.Error("listener failed", "err", err)
			case cerr := <-childDone:
				childDone, err = nil, runExitError(cerr)
			}
		}
		if child != nil && child.Process != nil {
			stopGroup(child.Process.Pid, childDone, log)
		}
		stopping()
		stopControl()
		stopControl = func() error { return nil }
		if err := shutdownAndFlush(srv, dev, log); err != nil {
			return err
		}
		if cerr := st.Close(); cerr != nil {
			return fmt.Errorf("closing: %w", cerr)
		}
		if err != nil && !errors.Is(err, nbd.ErrServerClosed) {
			return err
		}
		fmt.Fprintln(stdout, "nbdcache: stopped cleanly")
		return nil
	}
}

// listenString shows where a listener really is (port 0 resolved).
func listenString(a listenAddr, l net.Listener) string {
	if a.network == "unix" {
		return a.String()
	}
	return l.Addr().String()
}

// nbdURI is the NBD URI (as understood by libnbd and qemu) for a
// listener; with TLS, libnbd's nbds:// form, which needs the client's
// certificate folder added (&tls-certificates=DIR).
func nbdURI(a listenAddr, l net.Listener, export string, tls bool) string {
	s := ""
	if tls {
		s = "s"
	}
	if a.network == "unix" {
		return fmt.Sprintf("nbd%s+unix:///%s?socket=%s", s, export, a.addr)
	}
	return fmt.Sprintf("nbd%s://%s/%s", s, l.Addr().String(), export)
}

func printConnectHelp(w io.Writer, a listenAddr, l net.Listener, export string, tls bool) {
	uri := nbdURI(a, l, export, tls)
	fmt.Fprintf(w, `
Connect with:
  nbdinfo '%[1]s'
  qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' '%[1]s'
  fio --name=demo --ioengine=nbd --uri='%[1]s' --rw=randrw --bs=4k --iodepth=32 --size=256M --runtime=10 --time_based
Stop with Ctrl-C: requests in flight finish and the device is flushed.
`, uri)
}

// startCPUProfile profiles the process until the returned func is called.
func startCPUProfile(path string) (func(), error) {
	fh, err := os.Create(path)
	if err != nil {
		return nil, err
	}
	if err := pprof.StartCPUProfile(fh); err != nil {
		fh.Close()
		return nil, err
	}
	return func() {
		pprof.StopCPUProfile()
		fh.Close()
	}, nil
}

// runEnv is what --run's command finds in its environment, as nbdkit
// sets it: the URI of the first listener and its parts.
func runEnv(a listenAddr, l net.Listener, export string, tls bool) []string {
	env := []string{"uri=" + nbdURI(a, l, export, tls), "exportname=" + export}
	if a.network == "unix" {
		return append(env, "unixsocket="+a.addr)
	}
	if _, port, err := net.SplitHostPort(l.Addr().String()); err == nil {
		env = append(env, "port="+port)
	}
	return env
}

// errRunExit: --run's command failed; serve exits with its status.
type errRunExit struct{ code int }

func (e *errRunExit) Error() string {
	return fmt.Sprintf("the --run command exited with status %d", e.code)
}

// runExitError turns the command's end into serve's result: nil when it
// succeeded, else its exit status (1 if a signal ended it).
func runExitError(err error) error {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return &errRunExit{max(ee.ExitCode(), 1)}
	}
	if err != nil {
		return fmt.Errorf("--run: %w", err)
	}
	return nil
}

// stopGroup ends what is left of --run's process group: SIGTERM, and
// SIGKILL after runGrace. done, if not nil, reports the command's own end
// (serve was stopped while it ran); processes it left behind in its group
// are stopped too.
func stopGroup(pgid int, done <-chan error, log *slog.Logger) {
	syscall.Kill(-pgid, syscall.SIGTERM)
	if done == nil {
		return
	}
	t := time.NewTimer(runGrace)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
		log.Warn("the --run command did not stop on SIGTERM; killing it", "grace", runGrace)
		syscall.Kill(-pgid, syscall.SIGKILL)
		<-done
	}
}

// runGrace is how long --run's command has to stop after SIGTERM.
const runGrace = 10 * time.Second

// shutdownAndFlush ends serving, as serve and attach do at the end: the
// requests in flight are answered (for up to 30 s; then the connections
// are closed), and the device is flushed.
func shutdownAndFlush(srv *nbd.Server, dev storage.Device, log *slog.Logger) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := srv.Shutdown(ctx); err != nil {
		log.Warn("shutdown did not finish in time; connections were closed", "err", err)
	}
	if err := dev.Flush(); err != nil {
		return fmt.Errorf("final flush: %w", err)
	}
	return nil
}
