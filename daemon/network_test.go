package daemon_test

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nbdmover/nbdmover/daemon"
	"github.com/nbdmover/nbdmover/internal/backuptest"
	"github.com/nbdmover/nbdmover/internal/qemutest"
	"github.com/nbdmover/nbdmover/mover"
	"github.com/nbdmover/nbdmover/mover/domain"
	"github.com/nbdmover/nbdmover/pipeline"
	"github.com/nbdmover/nbdmover/repo"
)

// serveTCP runs a daemon on 127.0.0.1 with o until the test ends and
// returns its address.
func serveTCP(t *testing.T, o daemon.ServeOptions) string {
	t.Helper()
	if o.Listen == "" {
		o.Listen = "127.0.0.1:0"
	}
	o.Runner.Backup.Repo = repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	o.Runner.Backup.RunDir = runDir
	o.Init = true
	ctx, cancel := context.WithCancel(t.Context())
	addr := make(chan string, 1)
	done := make(chan error, 1)
	o.Ready = func(a string) { addr <- a }
	go func() { done <- daemon.Serve(ctx, o) }()
	t.Cleanup(func() { cancel(); <-done })
	select {
	case a := <-addr:
		return a
	case err := <-done:
		t.Fatalf("serve: %v", err)
	}
	return ""
}

// An idle keep-alive connection is closed after IdleTimeout; a client that
// sends its headers too slowly (slow loris) is cut off after
// ReadHeaderTimeout; a body over 64 KiB gets 413 with a JSON error.
func TestDaemonTimeoutsAndLimits(t *testing.T) {
	addr := serveTCP(t, daemon.ServeOptions{Token: "tok", IdleTimeout: 300 * time.Millisecond,
		ReadHeaderTimeout: 300 * time.Millisecond})

	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer tok\r\n\r\n")
	r := bufio.NewReader(c)
	resp, err := http.ReadResponse(r, nil)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("health: %v %v", resp, err)
	}
	io.Copy(io.Discard, resp.Body)
	start := time.Now()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := r.ReadByte(); err != io.EOF || time.Since(start) > 5*time.Second {
		t.Fatalf("idle connection: read %v after %v, want EOF soon after 300ms", err, time.Since(start))
	}

	slow, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer slow.Close()
	start = time.Now()
	slow.Write([]byte("GET /healthz HTTP/1.1\r\nHost: x\r\n"))
	go func() { // trickle, never finishing the headers
		for range 50 {
			time.Sleep(100 * time.Millisecond)
			if _, err := slow.Write([]byte("X-A: b\r\n")); err != nil {
				return
			}
		}
	}()
	slow.SetReadDeadline(time.Now().Add(10 * time.Second))
	io.ReadAll(slow)
	if took := time.Since(start); took > 5*time.Second {
		t.Fatalf("a slow-loris client held its connection for %v", took)
	}

	req, _ := http.NewRequest("POST", "http://"+addr+"/v1/jobs", strings.NewReader(`{"domain": "`+strings.Repeat("x", 70<<10)+`"}`))
	req.Header.Set("Authorization", "Bearer tok")
	resp, err = http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 413 || !strings.Contains(string(body), `"error"`) {
		t.Fatalf("oversized body: %d %s", resp.StatusCode, body)
	}
}

// Clients without the token cannot hold the connection slots: with
// --max-connections 4, four idle connections and four that got 401 on a
// keep-alive request leave room for an authorised request at once; the
// 401 closes its connection.
func TestDaemonUnauthenticatedSlots(t *testing.T) {
	addr := serveTCP(t, daemon.ServeOptions{Token: "tok", MaxConnections: 4})
	tokenless := func() (*http.Response, *bufio.Reader, error) {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		fmt.Fprintf(c, "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
		r := bufio.NewReader(c)
		c.SetReadDeadline(time.Now().Add(2 * time.Second))
		resp, err := http.ReadResponse(r, nil)
		return resp, r, err
	}
	// A 401 closes its connection.
	resp, r, err := tokenless()
	if err != nil || resp.StatusCode != 401 || !resp.Close {
		t.Fatalf("tokenless request: %v %v", resp, err)
	}
	io.Copy(io.Discard, resp.Body)
	if _, err := r.ReadByte(); err != io.EOF {
		t.Fatalf("the connection of a 401 stays open: %v", err)
	}
	var idle []net.Conn
	for range 4 { // connected, never a byte sent
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		idle = append(idle, c)
	}
	time.Sleep(300 * time.Millisecond) // idle now, not new: closed first to make room
	for range 4 {                      // requests without the token: a 401, or closed to make room
		if resp, _, err := tokenless(); err == nil && resp.StatusCode != 401 {
			t.Fatalf("tokenless request: %d", resp.StatusCode)
		}
	}
	for range 3 {
		start := time.Now()
		ctx, cancel := context.WithTimeout(t.Context(), time.Second)
		req, _ := http.NewRequestWithContext(ctx, "GET", "http://"+addr+"/healthz", nil)
		req.Header.Set("Authorization", "Bearer tok")
		resp, err := (&http.Client{Transport: &http.Transport{}}).Do(req)
		cancel()
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("an authorised request beside tokenless connections: %v %v after %v", resp, err, time.Since(start))
		}
		resp.Body.Close()
	}
}

// Plain TCP is refused off loopback, and TLS is not offered on a unix
// socket.
func TestDaemonListenRules(t *testing.T) {
	ro := daemon.RunnerOptions{Backup: mover.Options{Repo: repo.Options{Location: t.TempDir()}, RunDir: runDir}}
	notSocket := filepath.Join(t.TempDir(), "precious")
	os.WriteFile(notSocket, []byte("data"), 0o600)
	for _, tt := range []struct {
		o    daemon.ServeOptions
		says string
	}{
		{daemon.ServeOptions{Listen: "unix://" + notSocket, Runner: ro}, "not a socket"},
		{daemon.ServeOptions{Listen: "0.0.0.0:0", Token: "tok", Runner: ro}, "--tls-cert"},
		{daemon.ServeOptions{Listen: "[::]:0", Token: "tok", Runner: ro}, "loopback"},
		{daemon.ServeOptions{Listen: "127.0.0.1:0", Runner: ro}, "token"},
		{daemon.ServeOptions{Listen: "unix://" + filepath.Join(t.TempDir(), "s"), TLS: daemon.TLSOptions{Cert: "c", Key: "k"}, Runner: ro}, "unix socket"},
		{daemon.ServeOptions{Listen: "0.0.0.0:0", Token: "tok", TLS: daemon.TLSOptions{Cert: "/nonexistent.pem", Key: "/nonexistent.key"}, Runner: ro}, "nonexistent"},
	} {
		err := daemon.Serve(t.Context(), tt.o)
		if err == nil || !strings.Contains(err.Error(), tt.says) {
			t.Errorf("%s: %v, want an error saying %q", tt.o.Listen, err, tt.says)
		}
	}
	if b, err := os.ReadFile(notSocket); err != nil || string(b) != "data" {
		t.Fatalf("a file at the socket path was touched: %q %v", b, err)
	}
}

// TLS with a certificate made here; with a client CA, a client without a
// certificate is refused and one with a certificate signed by it gets in.
func TestDaemonTLS(t *testing.T) {
	dir := t.TempDir()
	ca, caKey := newCert(t, nil, nil, "test CA", true)
	srv, srvKey := newCert(t, ca, caKey, "127.0.0.1", false)
	cli, cliKey := newCert(t, ca, caKey, "client", false)
	write := func(name string, blocks ...*pem.Block) string {
		p := filepath.Join(dir, name)
		var b []byte
		for _, blk := range blocks {
			b = append(b, pem.EncodeToMemory(blk)...)
		}
		os.WriteFile(p, b, 0o600)
		return p
	}
	srvCert, srvKeyFile := write("srv.pem", certPEM(srv)), write("srv.key", keyPEM(t, srvKey))
	caFile := write("ca.pem", certPEM(ca))
	roots := x509.NewCertPool()
	roots.AddCert(ca)
	client := func(certs ...tls.Certificate) *http.Client {
		return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
			TLSClientConfig: &tls.Config{RootCAs: roots, Certificates: certs}}}
	}
	get := func(c *http.Client, url string) (int, error) {
		req, _ := http.NewRequest("GET", url, nil)
		req.Header.Set("Authorization", "Bearer tok")
		resp, err := c.Do(req)
		if err != nil {
			return 0, err
		}
		resp.Body.Close()
		return resp.StatusCode, nil
	}

	addr := serveTCP(t, daemon.ServeOptions{Listen: "127.0.0.1:0", Token: "tok", TLS: daemon.TLSOptions{Cert: srvCert, Key: srvKeyFile}})
	if code, err := get(client(), "https://"+addr+"/healthz"); err != nil || code != 200 {
		t.Fatalf("TLS: %d %v", code, err)
	}
	if _, err := get(&http.Client{Timeout: 5 * time.Second}, "http://"+addr+"/healthz"); err == nil {
		if code, _ := get(&http.Client{Timeout: 5 * time.Second}, "http://"+addr+"/healthz"); code == 200 {
			t.Fatal("plain HTTP accepted on the TLS port")
		}
	}

	mtls := serveTCP(t, daemon.ServeOptions{Listen: "127.0.0.1:0", Token: "tok",
		TLS: daemon.TLSOptions{Cert: srvCert, Key: srvKeyFile, ClientCA: caFile}})
	if _, err := get(client(), "https://"+mtls+"/healthz"); err == nil {
		t.Fatal("mutual TLS let a client without a certificate in")
	}
	pair := tls.Certificate{Certificate: [][]byte{cli.Raw}, PrivateKey: cliKey}
	if code, err := get(client(pair), "https://"+mtls+"/healthz"); err != nil || code != 200 {
		t.Fatalf("mutual TLS with a client certificate: %d %v", code, err)
	}
}

func newCert(t *testing.T, parent *x509.Certificate, parentKey *ecdsa.PrivateKey, name string, isCA bool) (*x509.Certificate, *ecdsa.PrivateKey) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{SerialNumber: serial, Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		IsCA:        isCA, BasicConstraintsValid: true}
	if ip := net.ParseIP(name); ip != nil {
		tmpl.IPAddresses = []net.IP{ip}
	}
	if parent == nil {
		parent, parentKey = tmpl, key
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, &key.PublicKey, parentKey)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return cert, key
}

func certPEM(c *x509.Certificate) *pem.Block { return &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw} }

func keyPEM(t *testing.T, k *ecdsa.PrivateKey) *pem.Block {
	der, err := x509.MarshalECPrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	return &pem.Block{Type: "EC PRIVATE KEY", Bytes: der}
}

// The memory budget: a job whose buffers alone exceed it is refused with
// 422; one that would push the running jobs over it waits in the queue
// even when --max-jobs would let it run.
func TestDaemonMemoryBudget(t *testing.T) {
	ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	one := mover.Options{Tuning: pipeline.Tuning{Readers: 1}}.Memory(1, 1<<20)
	slow := slowDomain(t)
	quick := qemutest.NewDomain(t, false, qemutest.DiskSpec{Dev: "vda", Format: "qcow2", Size: 16 * MiB})
	quick.Write("vda", "write -P 0x21 0 1M")
	sock := filepath.Join(t.TempDir(), "nbdmover.sock")
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	ready := make(chan struct{})
	go func() {
		done <- daemon.Serve(ctx, daemon.ServeOptions{Listen: "unix://" + sock, Log: backuptest.Log(t), Ready: func(string) { close(ready) }, Init: true,
			Runner: daemon.RunnerOptions{MaxJobs: 2, MaxMemory: one * 3 / 2,
				Backup: mover.Options{Repo: ro, RunDir: runDir},
				Domain: domain.Options{ScratchDir: filepath.Join(t.TempDir(), "scratch")}}})
	}()
	<-ready
	defer func() { cancel(); <-done }()
	d := &testDaemon{t: t, client: unixClient(sock), base: "http://nbdmover"}

	if _, code, msg := d.submit(fmt.Sprintf(`{"domain": %q, "readers": 64}`, quick.Name)); code != 422 || !strings.Contains(msg, "max-memory") {
		t.Fatalf("a job over the budget: %d %s", code, msg)
	}
	a, code, msg := d.submit(fmt.Sprintf(`{"domain": %q%s}`, slow.Name, slowJob))
	if code != 202 {
		t.Fatalf("submit: %d %s", code, msg)
	}
	d.wait(a, daemon.JobRunning)
	b, code, _ := d.submit(fmt.Sprintf(`{"domain": %q, "readers": 1}`, quick.Name))
	if code != 202 {
		t.Fatalf("second job: %d", code)
	}
	time.Sleep(500 * time.Millisecond)
	if v := d.wait(b, daemon.JobQueued, daemon.JobRunning, daemon.JobSucceeded); v.State != daemon.JobQueued || v.Memory != one {
		t.Fatalf("a job beyond the memory budget must queue: %+v", v)
	}
	d.do("DELETE", "/v1/jobs/"+a, "", nil)
	if v := d.wait(b, daemon.JobSucceeded, daemon.JobFailed); v.State != daemon.JobSucceeded {
		t.Fatalf("the queued job: %+v", v)
	}
}
