package main

// tls.go: the TLS flags, and loading x509 certificate directories and CRLs.

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/nbdcache/nbdcache/nbd"
)

// tlsFlags configure NBD_OPT_STARTTLS with x509 certificates, in the
// directory layout of nbdkit's --tls-certificates and qemu's
// tls-creds-x509: ca-cert.pem, server-cert.pem, server-key.pem, and
// optionally ca-crl.pem.
type tlsFlags struct {
	mode       string
	dir        string
	verifyPeer bool
}

func (f *tlsFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&f.mode, "tls", "off", "`MODE` off, on (clients may upgrade with STARTTLS) or require (nothing but STARTTLS before TLS: no export name or size in plaintext)")
	fs.StringVar(&f.dir, "tls-certificates", "", "x509 files for --tls in `DIR`: server-cert.pem, server-key.pem, and ca-cert.pem (and ca-crl.pem) for --tls-verify-peer")
	fs.BoolVar(&f.verifyPeer, "tls-verify-peer", false, "require a client certificate signed by DIR/ca-cert.pem (and not revoked by DIR/ca-crl.pem, if present)")
}

// errNoCertificate is returned for a --tls-certificates folder that lacks
// the server's certificate or key.
var errNoCertificate = errors.New("no server certificate")

// apply checks the flags and sets cfg.TLS and cfg.TLSRequired.
func (f *tlsFlags) apply(cfg *nbd.Config) error {
	switch f.mode {
	case "off":
		if f.dir != "" || f.verifyPeer {
			return fmt.Errorf("%w: --tls-certificates and --tls-verify-peer need --tls on or require", errUsage)
		}
		return nil
	case "on":
		if f.verifyPeer {
			// A client that skips STARTTLS would be served in
			// plaintext, without a certificate: the check would
			// keep nobody out.
			return fmt.Errorf("%w: --tls-verify-peer needs --tls require (with --tls on a client that does not ask for TLS is served without a certificate)", errUsage)
		}
	case "require":
	default:
		return fmt.Errorf("%w: --tls %q: want off, on or require", errUsage, f.mode)
	}
	if f.dir == "" {
		return fmt.Errorf("%w: --tls %s needs --tls-certificates DIR", errUsage, f.mode)
	}
	c, err := loadTLSDir(f.dir, f.verifyPeer)
	if err != nil {
		return err
	}
	cfg.TLS, cfg.TLSRequired = c, f.mode == "require"
	return nil
}

// loadTLSDir reads the server's certificate and key from dir, and with
// verifyPeer the CA (and the CRL, if any) that client certificates are
// checked against.
func loadTLSDir(dir string, verifyPeer bool) (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, "server-cert.pem"), filepath.Join(dir, "server-key.pem"))
	if err != nil {
		return nil, fmt.Errorf("--tls-certificates %s: %w: %v", dir, errNoCertificate, err)
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	if !verifyPeer {
		return cfg, nil
	}
	caPEM, err := os.ReadFile(filepath.Join(dir, "ca-cert.pem"))
	if err != nil {
		return nil, fmt.Errorf("--tls-verify-peer: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(caPEM) {
		return nil, fmt.Errorf("--tls-verify-peer: %s/ca-cert.pem holds no PEM certificate", dir)
	}
	cfg.ClientAuth, cfg.ClientCAs = tls.RequireAndVerifyClientCert, pool
	crls, err := loadCRLs(filepath.Join(dir, "ca-crl.pem"), caPEM)
	if err != nil {
		return nil, err
	}
	if len(crls) > 0 {
		type key struct{ issuer, serial string }
		revoked := map[key]bool{}
		var nextUpdate time.Time // the earliest
		for _, crl := range crls {
			if !crl.NextUpdate.IsZero() {
				if time.Now().After(crl.NextUpdate) {
					return nil, fmt.Errorf("--tls-verify-peer: %s/ca-crl.pem holds a CRL out of date (next update was due %s): issue a new one",
						dir, crl.NextUpdate.UTC().Format(time.RFC3339))
				}
				if nextUpdate.IsZero() || crl.NextUpdate.Before(nextUpdate) {
					nextUpdate = crl.NextUpdate
				}
			}
			for _, e := range crl.RevokedCertificateEntries {
				revoked[key{string(crl.signer.RawSubject), e.SerialNumber.String()}] = true
			}
		}
		// Called after the chain was verified against ClientCAs. Every
		// certificate of the verified chain but its anchor (the client's,
		// and any intermediate it sent) is looked up by issuer and
		// serial: a serial number is unique per issuer. The issuer is
		// the certificate above it in the chain, named as the CRL's
		// signer is, by its subject's bytes: never by the name as the
		// CRL or the certificate encodes it, which may differ.
		cfg.VerifyConnection = func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return nil
			}
			if !nextUpdate.IsZero() && time.Now().After(nextUpdate) {
				return errCRLOutOfDate // as gnutls does: revocation data superseded
			}
			for _, chain := range cs.VerifiedChains {
				for i, c := range chain[:max(len(chain)-1, 1)] {
					issuer := chain[min(i+1, len(chain)-1)]
					if revoked[key{string(issuer.RawSubject), c.SerialNumber.String()}] {
						return errRevoked
					}
				}
			}
			return nil
		}
	}
	return cfg, nil
}

// errRevoked refuses a client whose certificate ca-crl.pem lists, and
// errCRLOutOfDate every client once ca-crl.pem is past its next update
// (the server must be restarted with a new one).
var (
	errRevoked      = errors.New("the client certificate is revoked (ca-crl.pem)")
	errCRLOutOfDate = errors.New("ca-crl.pem is past its next update: no client certificate can be checked")
)

// loadCRLs reads every CRL in the PEM file at path, if there is one (a
// DER file holds one), and checks that one of the CAs in caPEM signed each.
func loadCRLs(path string, caPEM []byte) ([]signedCRL, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var ders [][]byte
	for rest := b; ; {
		var der []byte
		if der, rest = pemDecode(rest, "X509 CRL"); der == nil {
			break
		}
		ders = append(ders, der)
	}
	if len(ders) == 0 {
		ders = [][]byte{b} // DER
	}
	var cas []*x509.Certificate
	for rest := caPEM; ; {
		var blk []byte
		if blk, rest = pemDecode(rest, "CERTIFICATE"); blk == nil {
			break
		}
		if ca, err := x509.ParseCertificate(blk); err == nil {
			cas = append(cas, ca)
		}
	}
	var crls []signedCRL
	for i, der := range ders {
		crl, err := x509.ParseRevocationList(der)
		if err != nil {
			return nil, fmt.Errorf("%s: CRL %d: %w", path, i+1, err)
		}
		var signer *x509.Certificate
		for _, ca := range cas {
			if crl.CheckSignatureFrom(ca) == nil {
				signer = ca
				break
			}
		}
		if signer == nil {
			return nil, fmt.Errorf("%s: CRL %d is not signed by a CA in ca-cert.pem", path, i+1)
		}
		crls = append(crls, signedCRL{crl, signer})
	}
	return crls, nil
}

// signedCRL is a CRL and the CA certificate whose signature it bears.
type signedCRL struct {
	*x509.RevocationList
	signer *x509.Certificate
}

// pemDecode returns the bytes of the first PEM block of type typ in b and
// what follows it; nil if there is none.
func pemDecode(b []byte, typ string) (der, rest []byte) {
	for {
		var blk *pem.Block
		blk, b = pem.Decode(b)
		if blk == nil {
			return nil, nil
		}
		if blk.Type == typ {
			return blk.Bytes, b
		}
	}
}
