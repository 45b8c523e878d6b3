package test

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nbdcache/nbdcache/internal/testcert"
)

// tcpAddr is the HOST:PORT of the server's first (TCP) listener.
func tcpAddr(s *server) string {
	return s.listening[0][strings.LastIndex(s.listening[0], " ")+1:]
}

// try runs a command and returns its output and whether it succeeded.
func try(name string, args ...string) (string, bool) {
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), "PATH=/usr/bin:/bin:"+os.Getenv("PATH"), "LIBNBD_DEBUG=0")
	out, err := cmd.CombinedOutput()
	return string(out), err == nil
}

// qemuTLS are the qemu-img/qemu-io arguments for the export at addr
// through TLS with the client certificates in dir.
func qemuTLS(addr, dir string) []string {
	host, port, _ := strings.Cut(addr, ":")
	return []string{"--object", "tls-creds-x509,id=tls0,endpoint=client,dir=" + dir,
		"--image-opts", fmt.Sprintf("driver=nbd,host=%s,port=%s,export=disk,tls-creds=tls0", host, port)}
}

// TestTLS serves with --tls require and certificates made by the test,
// and connects with nbdinfo, qemu-img and qemu-io over TCP and a unix
// socket. A plaintext client is refused without learning anything.
func TestTLS(t *testing.T) {
	nbdinfo, qemuImg, qemuIO := tool(t, "nbdinfo"), tool(t, "qemu-img"), tool(t, "qemu-io")
	certs := testcert.New(t)
	srvDir, cliDir := certs.ServerDir(t), certs.ClientDir(t, nil)
	const size = 24 * mib
	s := startServe(t, "--backing", sparseFile(t, "backing.img", size), "--export", "disk",
		"--listen", "127.0.0.1:0", "--tls", "require", "--tls-certificates", srvDir)
	addr := tcpAddr(s)

	// TLS over TCP: libnbd checks the certificate against 127.0.0.1.
	out := run(t, nbdinfo, "--json", fmt.Sprintf("nbds://%s/disk?tls-certificates=%s", addr, cliDir))
	if !strings.Contains(out, fmt.Sprintf(`"export-size": %d`, size)) {
		t.Errorf("nbdinfo over TLS:\n%s", out)
	}
	// And over the unix socket.
	run(t, nbdinfo, fmt.Sprintf("nbds+unix:///disk?socket=%s&tls-certificates=%s", s.sock, cliDir))
	// qemu checks the certificate against the host too.
	out = run(t, qemuImg, append([]string{"info"}, qemuTLS(addr, cliDir)...)...)
	if !strings.Contains(out, fmt.Sprintf("(%d bytes)", size)) {
		t.Errorf("qemu-img info over TLS:\n%s", out)
	}
	run(t, qemuIO, append([]string{"-c", "write -P 0x5c 1M 2M", "-c", "read -P 0x5c 1M 2M", "-c", "read -P 0 0 1M"}, qemuTLS(addr, cliDir)...)...)
	// qemu over the unix socket, which has no host name to check the
	// certificate against: it is given one.
	run(t, qemuIO, "-c", "read -P 0x5c 1M 2M", "--object", "tls-creds-x509,id=tls0,endpoint=client,dir="+cliDir,
		"--image-opts", "driver=nbd,server.type=unix,server.path="+s.sock+",export=disk,tls-creds=tls0,tls-hostname=localhost")

	// Plaintext clients are refused, and learn neither the export's
	// name nor its size.
	for _, args := range [][]string{
		{nbdinfo, "--json", "nbd://" + addr + "/disk"},
		{nbdinfo, "--list", "nbd://" + addr},
		{nbdinfo, "--json", "nbd+unix:///disk?socket=" + s.sock},
		{qemuImg, "info", "nbd://" + addr + "/disk"},
	} {
		out, ok := try(args[0], args[1:]...)
		if ok {
			t.Errorf("%s: a plaintext client was served:\n%s", strings.Join(args, " "), out)
		}
		for _, leak := range []string{"export-size", fmt.Sprint(size), "24 MiB", `"disk"`} {
			if strings.Contains(out, leak) {
				t.Errorf("%s: %q leaked:\n%s", strings.Join(args, " "), leak, out)
			}
		}
	}
	// A client that trusts another CA refuses the server.
	other := testcert.New(t)
	if out, ok := try(nbdinfo, fmt.Sprintf("nbds://%s/disk?tls-certificates=%s", addr, other.ClientDir(t, nil))); ok {
		t.Errorf("a client trusting another CA connected:\n%s", out)
	}
}

// TestTLSClientCertificates: with --tls-verify-peer the server requires a
// client certificate signed by its CA and not revoked by ca-crl.pem.
func TestTLSClientCertificates(t *testing.T) {
	nbdinfo, qemuImg := tool(t, "nbdinfo"), tool(t, "qemu-img")
	certs := testcert.New(t)
	srvDir := certs.ServerDir(t)
	backing := sparseFile(t, "backing.img", 16*mib)
	// --tls on would serve a client that skips STARTTLS without a
	// certificate: refused.
	if out, err := exec.Command(binary, "serve", "--backing", backing,
		"--tls", "on", "--tls-certificates", srvDir, "--tls-verify-peer").CombinedOutput(); err == nil ||
		!strings.Contains(string(out), "--tls-verify-peer needs --tls require") {
		t.Errorf("--tls on --tls-verify-peer: %v\n%s", err, out)
	}
	s := startServe(t, "--backing", backing, "--export", "disk", "--listen", "127.0.0.1:0",
		"--tls", "require", "--tls-certificates", srvDir, "--tls-verify-peer")
	addr := tcpAddr(s)
	uri := func(dir string) string { return fmt.Sprintf("nbds://%s/disk?tls-certificates=%s", addr, dir) }
	good := certs.ClientDir(t, &certs.Client)
	run(t, nbdinfo, uri(good))
	run(t, qemuImg, append([]string{"info"}, qemuTLS(addr, good)...)...)
	for name, dir := range map[string]string{
		"no certificate": certs.ClientDir(t, nil),
		"another CA's":   certs.ClientDir(t, &certs.Rogue),
		"the server's for a client": func() string {
			d := t.TempDir()
			os.WriteFile(filepath.Join(d, "ca-cert.pem"), certs.CA, 0o600)
			os.WriteFile(filepath.Join(d, "client-cert.pem"), certs.Server.Cert, 0o600)
			os.WriteFile(filepath.Join(d, "client-key.pem"), certs.Server.Key, 0o600)
			return d
		}(),
	} {
		if out, ok := try(nbdinfo, uri(dir)); ok {
			t.Errorf("client with %s certificate was served:\n%s", name, out)
		}
	}
	if out, ok := try(nbdinfo, "nbd://"+addr+"/disk"); ok {
		t.Errorf("a plaintext client was served under --tls require --tls-verify-peer:\n%s", out)
	}
	s.stop()

	// Revoked by ca-crl.pem.
	if err := os.WriteFile(filepath.Join(srvDir, "ca-crl.pem"), certs.CRL(t, certs.Client), 0o600); err != nil {
		t.Fatal(err)
	}
	s = startServe(t, "--backing", backing, "--export", "disk", "--listen", "127.0.0.1:0",
		"--tls", "require", "--tls-certificates", srvDir, "--tls-verify-peer")
	addr = tcpAddr(s)
	if out, ok := try(nbdinfo, uri(good)); ok {
		t.Errorf("a revoked client certificate was accepted:\n%s", out)
	}
}
