// Package testcert makes throwaway x509 certificates for TLS tests, in the
// directory layout nbdkit, qemu and libnbd use: ca-cert.pem with
// server-cert.pem and server-key.pem for a server, client-cert.pem and
// client-key.pem for a client. No openssl or certtool needed.
package testcert

// testcert.go: Set, a throwaway CA with its server and client certificates,
// as directories, tls.Configs and CRLs.

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// Pair is a certificate and its key, PEM-encoded.
type Pair struct {
	Cert, Key []byte
}

// Set is a CA with a server and a client certificate it signed, and a
// client certificate signed by another CA (Rogue), for refusals.
type Set struct {
	CA     []byte // the CA certificate, PEM
	Server Pair   // for localhost, 127.0.0.1 and ::1
	Client Pair
	Rogue  Pair // signed by a CA the server does not trust

	ca issuer
}

type issuer struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

// New makes a Set, failing t on any error.
func New(t testing.TB) *Set {
	t.Helper()
	ca := newCA(t, "nbdcache test CA")
	other := newCA(t, "some other CA")
	s := &Set{CA: pemCert(ca.cert.Raw), ca: ca}
	s.Server = leaf(t, ca, "localhost", x509.ExtKeyUsageServerAuth, true)
	s.Client = leaf(t, ca, "test client", x509.ExtKeyUsageClientAuth, false)
	s.Rogue = leaf(t, other, "rogue client", x509.ExtKeyUsageClientAuth, false)
	return s
}

func newKey(t testing.TB) *ecdsa.PrivateKey {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func template(t testing.TB, cn string) *x509.Certificate {
	sn, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	if err != nil {
		t.Fatal(err)
	}
	return &x509.Certificate{
		SerialNumber: sn,
		Subject:      pkix.Name{CommonName: cn, Organization: []string{"nbdcache tests"}},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
	}
}

func newCA(t testing.TB, cn string) issuer {
	key := newKey(t)
	tpl := template(t, cn)
	tpl.IsCA, tpl.BasicConstraintsValid = true, true
	tpl.KeyUsage = x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature
	der, err := x509.CreateCertificate(rand.Reader, tpl, tpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return issuer{cert, key}
}

func leaf(t testing.TB, ca issuer, cn string, usage x509.ExtKeyUsage, server bool) Pair {
	key := newKey(t)
	tpl := template(t, cn)
	tpl.BasicConstraintsValid = true
	tpl.KeyUsage = x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment
	tpl.ExtKeyUsage = []x509.ExtKeyUsage{usage}
	if server {
		tpl.DNSNames = []string{"localhost"}
		tpl.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1), net.IPv6loopback}
	}
	der, err := x509.CreateCertificate(rand.Reader, tpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return Pair{Cert: pemCert(der), Key: pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: kder})}
}

func pemCert(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

// ServerDir writes ca-cert.pem, server-cert.pem and server-key.pem into a
// new folder and returns it.
func (s *Set) ServerDir(t testing.TB) string {
	t.Helper()
	dir := t.TempDir()
	write(t, dir, "ca-cert.pem", s.CA)
	write(t, dir, "server-cert.pem", s.Server.Cert)
	write(t, dir, "server-key.pem", s.Server.Key)
	return dir
}

// ClientDir writes ca-cert.pem and, if p is not nil, client-cert.pem and
// client-key.pem into a new folder and returns it.
func (s *Set) ClientDir(t testing.TB, p *Pair) string {
	t.Helper()
	dir := t.TempDir()
	write(t, dir, "ca-cert.pem", s.CA)
	if p != nil {
		write(t, dir, "client-cert.pem", p.Cert)
		write(t, dir, "client-key.pem", p.Key)
	}
	return dir
}

func write(t testing.TB, dir, name string, b []byte) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// ServerConfig is a server's configuration; with verifyPeer it requires a
// client certificate signed by the CA.
func (s *Set) ServerConfig(t testing.TB, verifyPeer bool) *tls.Config {
	t.Helper()
	cert, err := tls.X509KeyPair(s.Server.Cert, s.Server.Key)
	if err != nil {
		t.Fatal(err)
	}
	cfg := &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}
	if verifyPeer {
		cfg.ClientAuth = tls.RequireAndVerifyClientCert
		cfg.ClientCAs = s.pool(t)
	}
	return cfg
}

// ClientConfig is a client's configuration for "localhost", presenting p
// if not nil.
func (s *Set) ClientConfig(t testing.TB, p *Pair) *tls.Config {
	t.Helper()
	cfg := &tls.Config{RootCAs: s.pool(t), ServerName: "localhost", MinVersion: tls.VersionTLS12}
	if p != nil {
		cert, err := tls.X509KeyPair(p.Cert, p.Key)
		if err != nil {
			t.Fatal(err)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	return cfg
}

func (s *Set) pool(t testing.TB) *x509.CertPool {
	p := x509.NewCertPool()
	if !p.AppendCertsFromPEM(s.CA) {
		t.Fatal("bad CA PEM")
	}
	return p
}

// CRL returns a PEM certificate revocation list, signed by the CA, that
// revokes the given certificates (ca-crl.pem).
func (s *Set) CRL(t testing.TB, revoked ...Pair) []byte {
	t.Helper()
	return s.CRLUntil(t, time.Now().Add(24*time.Hour), revoked...)
}

// CRLUntil is CRL with its next update due at next.
func (s *Set) CRLUntil(t testing.TB, next time.Time, revoked ...Pair) []byte {
	t.Helper()
	tpl := &x509.RevocationList{Number: big.NewInt(1), ThisUpdate: next.Add(-25 * time.Hour), NextUpdate: next}
	for _, p := range revoked {
		blk, _ := pem.Decode(p.Cert)
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		tpl.RevokedCertificateEntries = append(tpl.RevokedCertificateEntries, x509.RevocationListEntry{SerialNumber: c.SerialNumber, RevocationTime: time.Now()})
	}
	der, err := x509.CreateRevocationList(rand.Reader, tpl, s.ca.cert, s.ca.key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "X509 CRL", Bytes: der})
}
