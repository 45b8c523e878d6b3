package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

type crltCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
}

var crltSerial int64 = 1000

func crltCert(t *testing.T, cn string, parent *crltCA, isCA bool, usage x509.ExtKeyUsage) (*crltCA, tls.Certificate) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	crltSerial++
	tpl := &x509.Certificate{
		SerialNumber:          big.NewInt(crltSerial),
		Subject:               pkix.Name{CommonName: cn},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		BasicConstraintsValid: true,
	}
	if isCA {
		tpl.IsCA = true
		tpl.KeyUsage = x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature
	} else {
		tpl.KeyUsage = x509.KeyUsageDigitalSignature
		tpl.ExtKeyUsage = []x509.ExtKeyUsage{usage}
		if usage == x509.ExtKeyUsageServerAuth {
			tpl.DNSNames = []string{"localhost"}
		}
	}
	signer, signKey := tpl, key
	if parent != nil {
		signer, signKey = parent.cert, parent.key
	}
	der, err := x509.CreateCertificate(rand.Reader, tpl, signer, &key.PublicKey, signKey)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &crltCA{c, key}, tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: c}
}

func crltPEM(typ string, der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
}

func crltCRL(t *testing.T, ca *crltCA, revoked ...*x509.Certificate) []byte {
	t.Helper()
	tpl := &x509.RevocationList{Number: big.NewInt(1), ThisUpdate: time.Now().Add(-time.Hour), NextUpdate: time.Now().Add(24 * time.Hour)}
	for _, c := range revoked {
		tpl.RevokedCertificateEntries = append(tpl.RevokedCertificateEntries, x509.RevocationListEntry{SerialNumber: c.SerialNumber, RevocationTime: time.Now()})
	}
	der, err := x509.CreateRevocationList(rand.Reader, tpl, ca.cert, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	return crltPEM("X509 CRL", der)
}

func crltWrite(t *testing.T, dir, name string, parts ...[]byte) {
	t.Helper()
	var b []byte
	for _, p := range parts {
		b = append(b, p...)
	}
	if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// crltHandshake runs a TLS handshake between cfg (the server) and a
// client presenting cert; it returns the server's error.
func crltHandshake(t *testing.T, cfg *tls.Config, cert tls.Certificate) error {
	t.Helper()
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	a.SetDeadline(time.Now().Add(5 * time.Second))
	b.SetDeadline(time.Now().Add(5 * time.Second))
	go func() {
		tc := tls.Client(b, &tls.Config{InsecureSkipVerify: true, Certificates: []tls.Certificate{cert}})
		tc.Handshake()
		tc.Read(make([]byte, 1)) // TLS 1.3: learn of a refusal
	}()
	ts := tls.Server(a, cfg)
	return ts.Handshake()
}

// TestCRLEveryOneInTheFile: ca-crl.pem may hold the CRLs of several CAs
// (gnutls, hence nbdkit and qemu, read every CRL in the file); a client
// revoked by any of them is refused. (Review finding: only the first CRL
// was read.)
func TestCRLEveryOneInTheFile(t *testing.T) {
	ca1, _ := crltCert(t, "CA one", nil, true, 0)
	ca2, _ := crltCert(t, "CA two", nil, true, 0)
	_, server := crltCert(t, "localhost", ca1, false, x509.ExtKeyUsageServerAuth)
	_, client1 := crltCert(t, "client of CA one", ca1, false, x509.ExtKeyUsageClientAuth)
	_, client2 := crltCert(t, "client of CA two", ca2, false, x509.ExtKeyUsageClientAuth)
	dir := t.TempDir()
	crltWrite(t, dir, "ca-cert.pem", crltPEM("CERTIFICATE", ca1.cert.Raw), crltPEM("CERTIFICATE", ca2.cert.Raw))
	crltWrite(t, dir, "server-cert.pem", crltPEM("CERTIFICATE", server.Certificate[0]))
	kder, _ := x509.MarshalPKCS8PrivateKey(server.PrivateKey)
	crltWrite(t, dir, "server-key.pem", crltPEM("PRIVATE KEY", kder))
	crltWrite(t, dir, "ca-crl.pem", crltCRL(t, ca1, client1.Leaf), crltCRL(t, ca2, client2.Leaf))
	cfg, err := loadTLSDir(dir, true)
	if err != nil {
		t.Fatal(err)
	}
	if err := crltHandshake(t, cfg, client1); !errors.Is(err, errRevoked) {
		t.Fatalf("control: the first CRL's revoked client: %v", err)
	}
	if err := crltHandshake(t, cfg, client2); !errors.Is(err, errRevoked) {
		t.Fatalf("a client certificate revoked by the second CRL in ca-crl.pem: %v, want refused as revoked", err)
	}
}

// TestCRLRevokedIntermediate: the client presents its certificate
// and the intermediate CA that issued it; ca-cert.pem holds the root,
// whose CRL revokes the intermediate: the client is refused, as gnutls
// refuses it (every certificate of the chain is checked). (Review
// finding: only the leaf was checked.)
func TestCRLRevokedIntermediate(t *testing.T) {
	root, _ := crltCert(t, "root CA", nil, true, 0)
	inter, _ := crltCert(t, "intermediate CA", root, true, 0)
	_, server := crltCert(t, "localhost", root, false, x509.ExtKeyUsageServerAuth)
	_, client := crltCert(t, "client", inter, false, x509.ExtKeyUsageClientAuth)
	client.Certificate = append(client.Certificate, inter.cert.Raw)
	dir := t.TempDir()
	crltWrite(t, dir, "ca-cert.pem", crltPEM("CERTIFICATE", root.cert.Raw))
	crltWrite(t, dir, "server-cert.pem", crltPEM("CERTIFICATE", server.Certificate[0]))
	kder, _ := x509.MarshalPKCS8PrivateKey(server.PrivateKey)
	crltWrite(t, dir, "server-key.pem", crltPEM("PRIVATE KEY", kder))
	// First without a CRL: the chain is valid.
	cfg, err := loadTLSDir(dir, true)
	if err != nil {
		t.Fatal(err)
	}
	if err := crltHandshake(t, cfg, client); err != nil {
		t.Fatalf("valid chain refused: %v", err)
	}
	crltWrite(t, dir, "ca-crl.pem", crltCRL(t, root, inter.cert))
	if cfg, err = loadTLSDir(dir, true); err != nil {
		t.Fatal(err)
	}
	if err := crltHandshake(t, cfg, client); !errors.Is(err, errRevoked) {
		t.Fatalf("a client whose issuing intermediate CA the root's CRL revokes: %v, want refused as revoked", err)
	}
}
