package main

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/nbdcache/nbdcache/nbd"
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

// refuseRemoteOffline refuses an NBD URI backing in the offline commands
// (format, check, rebind), which open files: `serve --format` formats a
// cache for a remote backing, and binds it.
func refuseRemoteOffline(cmd, backing string) error {
	if nbd.IsURI(backing) {
		return fmt.Errorf("%w: %s does not take an NBD backing yet; `nbdcache serve --cache PATH --backing %s --format` formats a cache for it", errUsage, cmd, backing)
	}
	return nil
}
