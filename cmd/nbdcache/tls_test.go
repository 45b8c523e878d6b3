package main

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nbdcache/nbdcache/internal/testcert"
	"github.com/nbdcache/nbdcache/nbd"
)

// TestTLSVerifyPeerNeedsRequire: with --tls on a client that skips
// STARTTLS is served in plaintext, so client certificates would keep
// nobody out: the combination is refused.
func TestTLSVerifyPeerNeedsRequire(t *testing.T) {
	certs := testcert.New(t)
	f := tlsFlags{mode: "on", dir: certs.ServerDir(t), verifyPeer: true}
	var cfg nbd.Config
	if err := f.apply(&cfg); !errors.Is(err, errUsage) || !strings.Contains(err.Error(), "--tls require") {
		t.Fatalf("--tls on --tls-verify-peer: %v", err)
	}
	f.mode = "require"
	if err := f.apply(&cfg); err != nil || !cfg.TLSRequired || cfg.TLS.ClientAuth != tls.RequireAndVerifyClientCert {
		t.Fatalf("--tls require --tls-verify-peer: %v", err)
	}
}

// TestCRL: a certificate is revoked only by its own issuer's CRL entry,
// and a CRL past its next update is refused at start.
func TestCRL(t *testing.T) {
	certs := testcert.New(t)
	dir := certs.ServerDir(t)
	crlPath := filepath.Join(dir, "ca-crl.pem")
	leaf := func(p testcert.Pair) *x509.Certificate {
		blk, _ := pem.Decode(p.Cert)
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	if err := os.WriteFile(crlPath, certs.CRL(t, certs.Client), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg, err := loadTLSDir(dir, true)
	if err != nil {
		t.Fatal(err)
	}
	ca := leaf(testcert.Pair{Cert: certs.CA})
	verify := func(c, issuer *x509.Certificate) error { // as after the chain [c, issuer] was verified
		return cfg.VerifyConnection(tls.ConnectionState{PeerCertificates: []*x509.Certificate{c},
			VerifiedChains: [][]*x509.Certificate{{c, issuer}}})
	}
	if err := verify(leaf(certs.Client), ca); !errors.Is(err, errRevoked) {
		t.Errorf("revoked client certificate: %v", err)
	}
	if err := verify(leaf(certs.Server), ca); err != nil {
		t.Errorf("a certificate the CRL does not list: %v", err)
	}
	// The same serial number from another issuer is another certificate.
	other := leaf(certs.Rogue)
	other.SerialNumber = leaf(certs.Client).SerialNumber
	if err := verify(other, &x509.Certificate{RawSubject: other.RawIssuer}); err != nil {
		t.Errorf("another issuer's certificate with a revoked serial number: %v", err)
	}

	if err := os.WriteFile(crlPath, certs.CRLUntil(t, time.Now().Add(-time.Minute)), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := loadTLSDir(dir, true); err == nil || !strings.Contains(err.Error(), "out of date") {
		t.Errorf("a CRL past its next update: %v", err)
	}
}
