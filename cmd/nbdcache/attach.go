package main

// attach.go: `nbdcache attach` and `nbdcache detach`: the storage as
// /dev/nbdN through the kernel's nbd driver.

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/nbdcache/nbdcache/nbd"
	"github.com/nbdcache/nbdcache/nbd/kernel"
)

type attachFlags struct {
	storage         storageFlags
	device          string
	connections     int
	timeout         time.Duration
	deadConnTimeout time.Duration
	reconnect       bool
	kernelBlockSize int
	maxRequest      int64
	queueDepth      int
	scheduler       string
	backendID       string
	ioctl           bool
	log             logFlags
	control         controlFlags
	noDrain         bool
	service         serviceFlags
	cpuProf         string
}

func (f *attachFlags) register(fs *flag.FlagSet) {
	f.storage.register(fs)
	f.control.register(fs, "stats, flush --drain, mode, ctl")
	fs.BoolVar(&f.storage.faults, "faults", false, "fault mode: power cuts, injected errors and latency through 'nbdcache ctl' (needs --control)")
	fs.BoolVar(&f.noDrain, "no-drain", false, "on detach, leave dirty data in the cache instead of writing it back first")
	fs.StringVar(&f.device, "device", "", "attach to `/dev/nbdN` (default: a free one, picked by the kernel)")
	fs.IntVar(&f.connections, "connections", 2, "`N` socket connections to the kernel (multi-conn)")
	fs.DurationVar(&f.timeout, "timeout", 0, "request `TIMEOUT` after which the kernel resends a request on another connection (0: the kernel's 30 s; whole seconds)")
	fs.DurationVar(&f.deadConnTimeout, "dead-conn-timeout", 60*time.Second, "how long requests wait for a restarted server (attach --reconnect) once this one died, before they fail, `DURATION`")
	fs.BoolVar(&f.reconnect, "reconnect", false, "with --device: hand fresh sockets to a device whose server died (restart or upgrade under a mounted filesystem)")
	fs.IntVar(&f.kernelBlockSize, "kernel-block-size", 0, "logical block `SIZE` of /dev/nbdN: 512 to 4096 (default: the device's block size)")
	f.maxRequest = 1 << 20
	fs.Var(sizeFlag{&f.maxRequest}, "max-request", "largest request the kernel sends, `SIZE` (max_sectors_kb)")
	fs.IntVar(&f.queueDepth, "queue-depth", 0, "requests the block layer queues, `N` (nr_requests; 0: the kernel's)")
	fs.StringVar(&f.scheduler, "scheduler", "", "I/O `SCHEDULER` of /dev/nbdN (none, mq-deadline; default: the kernel's)")
	fs.StringVar(&f.backendID, "backend-id", "", "backend identifier shown in /sys/block/nbdN/backend; a --reconnect must give the same (default: derived from --backing)")
	fs.BoolVar(&f.ioctl, "ioctl", false, "use the legacy ioctl interface even when netlink is there (no --reconnect)")
	fs.StringVar(&f.cpuProf, "cpuprofile", "", "write a Go CPU profile of the whole run to `FILE`")
	f.log.register(fs)
	f.service.register(fs)
	configFlag(fs)
}

// runAttach serves the storage to the kernel's nbd driver as /dev/nbdN.
//
// It stops on SIGTERM or SIGINT (disconnect, finish the requests in
// flight, flush, exit 0), when the kernel disconnects (nbdcache detach),
// and on SIGUSR2, which hands the device over: it finishes and flushes
// like a stop but leaves the device attached, its requests waiting
// --dead-conn-timeout for `attach --reconnect`.
func runAttach(fs *flag.FlagSet) runner {
	var f attachFlags
	f.register(fs)
	return func(ctx context.Context, args []string, stdout, stderr io.Writer) error {
		if err := f.service.check(); err != nil {
			return err
		}
		log, err := f.log.logger(stderr)
		if err != nil {
			return err
		}
		if _, err := f.control.access(); err != nil {
			return err
		}
		if f.storage.faults && f.control.addr == "" {
			return fmt.Errorf("%w: --faults needs --control unix:PATH, through which `nbdcache ctl` drives it", errUsage)
		}
		index := kernel.AnyIndex
		if f.device != "" {
			n, err := kernel.ParseDevice(f.device)
			if err != nil {
				return fmt.Errorf("%w: --device: %v", errUsage, err)
			}
			index = n
		}
		if f.reconnect && index == kernel.AnyIndex {
			return fmt.Errorf("%w: --reconnect needs --device", errUsage)
		}
		if f.reconnect && f.ioctl {
			return fmt.Errorf("%w: --reconnect needs netlink; drop --ioctl", errUsage)
		}
		if f.connections < 1 || f.connections > 64 {
			return fmt.Errorf("%w: --connections %d: want 1 to 64", errUsage, f.connections)
		}

		if f.reconnect {
			if err := checkOldServerGone(index); err != nil {
				return err
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
		var srvRef atomic.Pointer[nbd.Server]
		m := serverMetrics(st, &srvRef)
		srv, err := nbd.NewServer(nbd.Config{
			Exports:  []nbd.Export{{Name: "", Device: dev, ReadOnly: f.storage.readOnly}},
			Logger:   log,
			Observer: m.Observer(),
		})
		if err != nil {
			return err
		}
		srvRef.Store(srv)
		if st.rig != nil {
			st.rig.SetServer(srv) // power cuts drop the connections
		}
		if f.control.addr != "" {
			stopControl, err := startControl(f.control, &daemon{srv: srv, st: st, started: time.Now(), metrics: m})
			if err != nil {
				return err
			}
			defer stopControl()
		}
		info, err := srv.Info("")
		if err != nil {
			return err
		}
		bs := f.kernelBlockSize
		if bs == 0 {
			bs = min(max(info.BlockSize, 512), os.Getpagesize())
		}
		size := info.Size - info.Size%int64(bs)
		if size != info.Size {
			log.Warn("device size is not a multiple of the block size; the last bytes are not exposed", "size", info.Size, "block_size", bs)
		}
		backend := f.backendID
		if backend == "" {
			backend = backendIdentifier(&f.storage)
		}

		handover := make(chan os.Signal, 1)
		signal.Notify(handover, syscall.SIGUSR2)
		defer signal.Stop(handover)

		a, err := kernel.Attach(ctx, kernel.AttachConfig{
			Config: kernel.Config{
				Index:           index,
				Size:            size,
				BlockSize:       bs,
				ServerFlags:     uint64(info.Flags),
				Timeout:         f.timeout,
				DeadConnTimeout: f.deadConnTimeout,
				Backend:         backend,
			},
			Connections: f.connections,
			Reconnect:   f.reconnect,
			ForceIoctl:  f.ioctl,
			Shape: kernel.Shape{
				Rotational:   dev.Caps().Rotational,
				MaxSectorsKB: int(f.maxRequest >> 10),
				NrRequests:   f.queueDepth,
				Scheduler:    f.scheduler,
			},
			Serve:  func(c net.Conn) error { return srv.ServeNegotiated(c, "") },
			Logger: log,
		})
		if err != nil {
			sctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			srv.Shutdown(sctx)
			if errors.Is(err, kernel.ErrBusy) && index != kernel.AnyIndex {
				return fmt.Errorf("%s is already connected (if its server died, use --reconnect): %w", f.device, err)
			}
			return err
		}
		defer a.Close()
		verb := "attached"
		if f.reconnect {
			verb = "reconnected"
		}
		fmt.Fprintf(stdout, "nbdcache: %s %s (%d bytes, %d connections, %s)\n", verb, a.Path(), size, f.connections, a.Mode())

		stopping := f.service.ready(log)
		defer stopping()
		released := false
		select {
		case <-ctx.Done():
			if err := a.Disconnect(); err != nil {
				log.Warn("disconnect failed", "device", a.Path(), "err", err)
			}
			t := time.NewTimer(30 * time.Second)
			select {
			case <-a.Done():
			case <-t.C:
				log.Warn("the kernel kept connections open after the disconnect; closing them", "device", a.Path())
			}
			t.Stop()
		case <-a.Done():
			if !a.DisconnectRequested() {
				if f.reconnect && srv.Stats().Requests == 0 {
					return fmt.Errorf("the kernel did not take the new sockets: is another server still attached to %s? (stop it with SIGUSR2 to hand over)", a.Path())
				}
				log.Error("every connection died without a disconnect; the device waits for `nbdcache attach --reconnect`", "device", a.Path(), "dead_conn_timeout", f.deadConnTimeout)
				released = true
			}
		case <-handover:
			a.Release()
			released = true
		}

		if err := shutdownAndFlush(srv, dev, log); err != nil {
			return err
		}
		if !released && !f.noDrain {
			// A second SIGINT or SIGTERM stops a long drain; what is left
			// stays dirty, and safe, in the cache.
			dctx, stopDrain := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
			defer stopDrain()
			if err := drainOnDetach(dctx, st, log); err != nil {
				return err
			}
		}
		if cerr := st.Close(); cerr != nil {
			return fmt.Errorf("closing: %w", cerr)
		}
		if released {
			fmt.Fprintf(stdout, "nbdcache: released %s; requests wait up to %v for `nbdcache attach --device %s --reconnect`\n", a.Path(), f.deadConnTimeout, a.Path())
			return nil
		}
		fmt.Fprintf(stdout, "nbdcache: detached %s\n", a.Path())
		return nil
	}
}

// backendIdentifier names what is served, so that a --reconnect with
// other storage is refused by the kernel.
func backendIdentifier(f *storageFlags) string {
	abs := func(p string) string {
		if p == "" {
			return ""
		}
		if a, err := filepath.Abs(p); err == nil {
			return a
		}
		return p
	}
	id := "nbdcache:" + abs(f.backing)
	if f.cachePath != "" {
		id += "+cache:" + abs(f.cachePath)
	}
	return id
}

// checkOldServerGone refuses a --reconnect while the process that
// connected the device still runs as nbdcache: the kernel would ignore
// the new sockets.
func checkOldServerGone(index int) error {
	pid := kernel.ServerPID("", index)
	if pid == 0 {
		return fmt.Errorf("/dev/nbd%d is not connected; attach it without --reconnect", index)
	}
	if pid == os.Getpid() {
		return nil
	}
	comm, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	if err != nil {
		return nil // gone
	}
	if strings.TrimSpace(string(comm)) == filepath.Base(os.Args[0]) {
		return fmt.Errorf("/dev/nbd%d is still served by process %d; stop it first (kill -USR2 %d hands it over cleanly)", index, pid, pid)
	}
	return nil
}

// runDetach disconnects /dev/nbdN; its attach process then exits.
func runDetach(fs *flag.FlagSet) runner {
	useIoctl := fs.Bool("ioctl", false, "disconnect with the NBD_DISCONNECT ioctl even when netlink is there")
	return func(ctx context.Context, args []string, stdout, stderr io.Writer) error {
		pos := args
		if len(pos) != 1 {
			return fmt.Errorf("%w: want one device, /dev/nbdN", errUsage)
		}
		path := pos[0]
		index, err := kernel.ParseDevice(path)
		if err != nil {
			return fmt.Errorf("%w: %v", errUsage, err)
		}
		var nl *kernel.Netlink
		if *useIoctl {
			err = kernel.ErrNoNetlink
		} else {
			nl, err = kernel.DialNetlink()
		}
		if errors.Is(err, kernel.ErrNoNetlink) {
			if _, serr := os.Stat(path); serr != nil {
				return fmt.Errorf("%s: %w (is nbd loaded?)", path, serr)
			}
			if err := kernel.DisconnectIoctl(path); err != nil {
				return err
			}
			fmt.Fprintf(stdout, "nbdcache: disconnected %s (ioctl)\n", path)
			return nil
		}
		if err != nil {
			return err
		}
		defer nl.Close()
		if err := nl.Disconnect(index); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "nbdcache: disconnected %s\n", path)
		return nil
	}
}
