package main

// remotebacking.go: NBD backings (--backing nbd://...): their id and dialing
// them, and opening a backing for the offline commands.

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/nbdcache/nbdcache/nbd"
	"github.com/nbdcache/nbdcache/storage"
)

// A remote backing (--backing nbd://...) is an NBD export, reached with
// nbd.Remote. It has no extended attribute to carry an id, so a cache is
// bound to its canonical URI: the id is a hash of it. A different export
// served under the same URI is not told apart, but by its size (the
// superblock records it); the URI is what the user sees and checks, and
// `nbdcache rebind` moves a cache to a new URI.

// remoteBackingID is the id of the export at uri.
func remoteBackingID(uri string) ([16]byte, error) {
	u, err := nbd.ParseURI(uri)
	if err != nil {
		return [16]byte{}, fmt.Errorf("%w: --backing: %v", errUsage, err)
	}
	sum := sha256.Sum256([]byte("nbdcache remote backing\n" + u.String()))
	var id [16]byte
	copy(id[:], sum[:])
	return id, nil
}

// dialBacking connects to the remote backing.
func (f *storageFlags) dialBacking(uri string, log *slog.Logger) (*nbd.Remote, error) {
	u, err := nbd.ParseURI(uri)
	if err != nil {
		return nil, fmt.Errorf("%w: --backing: %v", errUsage, err)
	}
	cfg := nbd.RemoteConfig{Logger: log, Connections: f.backingConns, Timeout: f.backingWait}
	switch {
	case u.TLS && f.backingTLS == "":
		return nil, fmt.Errorf("%w: --backing %s is nbds: it needs --backing-tls-certificates DIR (ca-cert.pem)", errUsage, uri)
	case !u.TLS && f.backingTLS != "":
		return nil, fmt.Errorf("%w: --backing-tls-certificates needs an nbds:// or nbds+unix:// backing", errUsage)
	case u.TLS:
		if cfg.TLS, err = clientTLSDir(f.backingTLS); err != nil {
			return nil, err
		}
	}
	if f.readOnly {
		return nil, fmt.Errorf("%w: --read-only with an NBD backing: serve it read-only from its own server", errUsage)
	}
	r, err := nbd.DialRemote(context.Background(), uri, cfg)
	if err != nil {
		return nil, fmt.Errorf("backing: %w", err)
	}
	return r, nil
}

// clientTLSDir reads libnbd's client layout: ca-cert.pem (required), and
// client-cert.pem with client-key.pem when present.
func clientTLSDir(dir string) (*tls.Config, error) {
	caPEM, err := os.ReadFile(filepath.Join(dir, "ca-cert.pem"))
	if err != nil {
		return nil, fmt.Errorf("--backing-tls-certificates: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("--backing-tls-certificates: %s/ca-cert.pem holds no PEM certificate", dir)
	}
	cfg := &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, "client-cert.pem"), filepath.Join(dir, "client-key.pem"))
	switch {
	case err == nil:
		cfg.Certificates = []tls.Certificate{cert}
	case !os.IsNotExist(err):
		if _, serr := os.Stat(filepath.Join(dir, "client-cert.pem")); serr == nil {
			return nil, fmt.Errorf("--backing-tls-certificates: %w", err)
		}
	}
	return cfg, nil
}

// offlineBacking is the backing of an offline command (format, check,
// rebind): a file or block device, opened read-only and claimed (the
// commands only read it), or an NBD export, dialled with
// --backing-tls-certificates when it is an nbds:// one. Its role in
// messages is "backing".
type offlineBacking struct {
	tlsDir string
}

func (o *offlineBacking) register(fs *flag.FlagSet) {
	fs.StringVar(&o.tlsDir, "backing-tls-certificates", "", "for an nbds:// backing: `DIR` with ca-cert.pem (and client-cert.pem, client-key.pem), libnbd's layout")
}

// warnLogger logs warnings and errors to w: the offline commands' logger.
func warnLogger(w io.Writer) *slog.Logger {
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelWarn}))
}

func (o *offlineBacking) open(path string, claim storage.Claim, hint string, log *slog.Logger) (storage.Device, error) {
	if !nbd.IsURI(path) {
		return openDevice("backing", path, storage.FileOptions{ReadOnly: true, Claim: claim}, hint)
	}
	f := storageFlags{backingTLS: o.tlsDir, backingConns: 1, backingWait: 10 * time.Second}
	return f.dialBacking(path, log)
}

// openPair opens the devices of format and rebind, which write the cache:
// both must be named, must not overlap, and are claimed exclusively.
// close closes them.
func (o *offlineBacking) openPair(cachePath, backing string, log *slog.Logger) (bdev storage.Device, cdev *storage.File, close func(), err error) {
	if cachePath == "" || backing == "" {
		return nil, nil, nil, fmt.Errorf("%w: --cache and --backing are required", errUsage)
	}
	if err := refuseOverlap(cachePath, backing); err != nil {
		return nil, nil, nil, err
	}
	if bdev, err = o.open(backing, storage.ClaimExclusive, inUseHint, log); err != nil {
		return nil, nil, nil, err
	}
	if cdev, err = openDevice("cache", cachePath, storage.FileOptions{Claim: storage.ClaimExclusive}, inUseHint); err != nil {
		bdev.Close()
		return nil, nil, nil, err
	}
	return bdev, cdev, func() { cdev.Close(); bdev.Close() }, nil
}
