package main

import (
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"

	"github.com/nbdcache/nbdcache/storage"
)

// storageFlags are the flags that choose the storage behind an export.
// serve and attach share them.
type storageFlags struct {
	backing  string
	readOnly bool
	direct   bool
}

func (f *storageFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.backing, "backing", "", "backing file or block device `PATH` (none: a demo file in a temporary folder)")
	fs.BoolVar(&f.readOnly, "read-only", false, "refuse writes, trims and zeroes with EPERM")
	fs.BoolVar(&f.direct, "direct", false, "open the devices with O_DIRECT")
}

// openedStorage is the device to export and what to do when done with it.
type openedStorage struct {
	dev   storage.Device
	demo  bool     // the embedded default: files in a temporary folder
	close []func() // run in reverse order by Close
}

func (o *openedStorage) Close() {
	for i := len(o.close) - 1; i >= 0; i-- {
		o.close[i]()
	}
}

// demoBackingSize is the size of the embedded default's backing file.
const demoBackingSize = 1 << 30

// open opens the storage the flags describe. With no storage flags it
// creates the embedded default in a temporary folder and says so on w.
func (f *storageFlags) open(w io.Writer) (*openedStorage, error) {
	o := &openedStorage{}
	backing := f.backing
	if backing == "" {
		dir, err := os.MkdirTemp("", "nbdcache-demo-")
		if err != nil {
			return nil, err
		}
		o.close = append(o.close, func() { os.RemoveAll(dir) })
		backing = filepath.Join(dir, "backing.img")
		if err := createSparse(backing, demoBackingSize); err != nil {
			o.Close()
			return nil, err
		}
		o.demo = true
		fmt.Fprintf(w, "nbdcache: demo mode: no --backing given, serving a %d MiB sparse file in %s (deleted on exit)\n", demoBackingSize>>20, dir)
	}
	dev, err := storage.OpenFile(backing, storage.FileOptions{ReadOnly: f.readOnly, Direct: f.direct})
	if err != nil {
		o.Close()
		return nil, err
	}
	o.close = append(o.close, func() { dev.Close() })
	o.dev = dev
	return o, nil
}

// createSparse creates a sparse file of the given size, refusing to
// touch an existing one.
func createSparse(path string, size int64) error {
	fh, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	if err := fh.Truncate(size); err != nil {
		fh.Close()
		return err
	}
	return fh.Close()
}
