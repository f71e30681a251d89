package export_test

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	crand "crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nbdmover/nbdmover/export"
	"github.com/nbdmover/nbdmover/internal/backuptest"
	"github.com/nbdmover/nbdmover/internal/listen"
	"github.com/nbdmover/nbdmover/internal/qemutest"
	"github.com/nbdmover/nbdmover/mover"
	"github.com/nbdmover/nbdmover/mover/nbd"
	"github.com/nbdmover/nbdmover/nbdclient"
	"github.com/nbdmover/nbdmover/repo"
	"github.com/nbdmover/nbdmover/sink/sinktest"
)

const MiB = backuptest.MiB

// backup takes a full backup of a test image (holes, zero runs, data, a
// short last chunk) served by qemu-nbd, into 256 KiB chunks, and returns
// the backup's id and a raw copy of the image.
func backup(t *testing.T, ro repo.Options, size int64) (string, []byte) {
	t.Helper()
	qemutest.Need(t, "qemu-nbd", "qemu-img", "qemu-io")
	img := backuptest.Image(t, size)
	srv := qemutest.Serve(t, img, "-r")
	defer srv.Kill()
	res, err := mover.Backup(t.Context(), nbd.New(nbd.Options{URI: srv.URI, Name: "vm", Disk: "vda"}),
		mover.Options{Repo: ro, Init: true, Mode: "full", ChunkSize: 256 << 10, RunDir: t.TempDir(), Log: backuptest.Log(t)})
	if err != nil {
		t.Fatal(err)
	}
	raw, err := os.ReadFile(qemutest.RawCopy(t, img))
	if err != nil {
		t.Fatal(err)
	}
	return res.ID, raw
}

// start exports the backup on a socket in a new directory.
func start(t *testing.T, o export.Options) *export.Export {
	t.Helper()
	if o.Listen == "" {
		o.Listen = "unix://" + filepath.Join(t.TempDir(), "export.sock")
	}
	o.Log = backuptest.Log(t)
	e, err := export.Start(t.Context(), o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	return e
}

func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	qemutest.Need(t, name)
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// The export of a backup, from a local, an S3 and an encrypted repository,
// is the disk at the backup point to every client: nbdinfo (size, flags,
// meta context, map), nbdcopy (bit-exact), qemu-img (compare, map), libnbd
// reading at random offsets and lengths on several connections at once;
// zero chunks are holes; writes are refused.
func TestExportServesTheBackup(t *testing.T) {
	for _, where := range []string{"local", "s3", "encrypted"} {
		t.Run(where, func(t *testing.T) {
			ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
			switch where {
			case "s3":
				ro = repo.Options{Location: fmt.Sprintf("s3://export-%08x/r", rand.Uint32()), S3Endpoint: sinktest.S3Endpoint(t)}
			case "encrypted":
				repo.SetPasswordCost(repo.Cost{Time: 1, MemoryKiB: 8 << 10, Threads: 1})
				keys, err := repo.PasswordKeys([]byte("export test"))
				if err != nil {
					t.Fatal(err)
				}
				ro.Keys = keys
				if _, err := ro.Init(t.Context(), repo.InitOptions{}); err != nil {
					t.Fatal(err)
				}
			}
			id, raw := backup(t, ro, 25*MiB+3*512)
			e := start(t, export.Options{Repo: ro, Domain: "vm", Backup: "latest", CacheBytes: 16 << 20})
			if e.Backup != id || len(e.Disks) != 1 || e.Disks[0].Name != "vda" || e.Disks[0].Size != int64(len(raw)) {
				t.Fatalf("export %+v", e)
			}
			uri := e.Disks[0].URI
			if !strings.HasPrefix(uri, "nbd+unix:///vda?socket=/") {
				t.Fatalf("URI %s", uri)
			}

			var info []struct {
				Name         string   `json:"export-name"`
				Size         int64    `json:"export-size"`
				ReadOnly     bool     `json:"is_read_only"`
				CanMultiConn bool     `json:"can_multi_conn"`
				Contexts     []string `json:"contexts"`
			}
			var doc struct {
				Exports any `json:"exports"`
			}
			out := run(t, "nbdinfo", "--json", uri)
			if err := json.Unmarshal([]byte(out), &doc); err != nil {
				t.Fatal(err)
			}
			b, _ := json.Marshal(doc.Exports)
			json.Unmarshal(b, &info)
			if len(info) != 1 || info[0].Size != int64(len(raw)) || !info[0].ReadOnly || !info[0].CanMultiConn ||
				!strings.Contains(strings.Join(info[0].Contexts, " "), "base:allocation") {
				t.Fatalf("nbdinfo: %s", out)
			}

			// The map: holes exactly where the backup has zero chunks,
			// which read as zeroes.
			var extents []struct {
				Offset int64 `json:"offset"`
				Length int64 `json:"length"`
				Type   int   `json:"type"`
			}
			if err := json.Unmarshal([]byte(run(t, "nbdinfo", "--map", "--json", uri)), &extents); err != nil {
				t.Fatal(err)
			}
			holes, end := 0, int64(0)
			for _, x := range extents {
				if x.Offset != end {
					t.Fatalf("map: extent at %d after %d", x.Offset, end)
				}
				if x.Type&3 == 3 {
					holes++
					if !isZero(raw[x.Offset : x.Offset+x.Length]) {
						t.Fatalf("map: hole %d+%d holds data", x.Offset, x.Length)
					}
				}
				end = x.Offset + x.Length
			}
			if end != int64(len(raw)) || holes < 2 {
				t.Fatalf("map ends at %d of %d, with %d holes", end, len(raw), holes)
			}

			dst := filepath.Join(t.TempDir(), "copy.raw")
			run(t, "nbdcopy", uri, dst)
			if got, _ := os.ReadFile(dst); !bytes.Equal(got, raw) {
				t.Fatal("nbdcopy's copy differs from the disk at the backup point")
			}
			ref := filepath.Join(t.TempDir(), "ref.raw")
			os.WriteFile(ref, raw, 0o600)
			run(t, "qemu-img", "compare", "-f", "raw", ref, uri)
			conv := filepath.Join(t.TempDir(), "conv.qcow2")
			run(t, "qemu-img", "convert", "-O", "qcow2", uri, conv)
			run(t, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", ref, conv)
			if out := run(t, "qemu-img", "map", "--output=json", uri); !strings.Contains(out, `"zero": true`) {
				t.Fatalf("qemu-img map shows no zero extent:\n%s", out)
			}

			randomReads(t, uri, raw, 4)
			c, err := nbdclient.Dial(t.Context(), nbdclient.Config{URI: uri})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if err := c.WriteAt(t.Context(), make([]byte, 4096), 0); !errors.Is(err, syscall.EPERM) {
				t.Fatalf("write: %v, want EPERM", err)
			}
			if s := e.Stats(); s.Reads == 0 || s.BytesServed < int64(len(raw)) || s.Fetches == 0 || s.ReadErrors != 0 {
				t.Fatalf("stats %+v", s)
			}
		})
	}
}

func isZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// randomReads reads at random offsets and lengths (512-byte aligned and
// not) from conns connections at once, with requests of 512 bytes to 32
// MiB, and compares with raw.
func randomReads(t *testing.T, uri string, raw []byte, conns int) {
	t.Helper()
	var wg sync.WaitGroup
	for g := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			reqSize := []int{512, 4096, 256 << 10, 32 << 20}[g%4]
			c, err := nbdclient.Dial(t.Context(), nbdclient.Config{URI: uri, RequestSize: reqSize})
			if err != nil {
				t.Error(err)
				return
			}
			defer c.Close()
			r := rand.New(rand.NewPCG(uint64(g), 3))
			for range 100 {
				n := 1 + r.Int64N(min(int64(3*reqSize), 3*MiB))
				off := r.Int64N(int64(len(raw)) - n + 1)
				if r.IntN(2) == 0 {
					off &^= 511
				}
				p := make([]byte, n)
				if err := c.ReadAt(t.Context(), p, off); err != nil {
					t.Errorf("read %d+%d: %v", off, n, err)
					return
				}
				if !bytes.Equal(p, raw[off:off+n]) {
					t.Errorf("read %d+%d (requests of %d): wrong bytes", off, n, reqSize)
					return
				}
			}
		}()
	}
	wg.Wait()
}

// A chunk damaged in the repository is an EIO to the client, named in the
// log and recorded as damage (list marks the backup; the next backup
// stores the chunk again); every other read goes on.
func TestExportDamagedChunk(t *testing.T) {
	ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	id, raw := backup(t, ro, 24*MiB)
	r, err := ro.Open(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	m, err := r.Backup(t.Context(), "vm", id)
	if err != nil {
		t.Fatal(err)
	}
	ix, err := r.LoadIndex(t.Context(), m, "vda")
	if err != nil {
		t.Fatal(err)
	}
	i, d := ix.At(1) // a data chunk
	path := filepath.Join(ro.Location, filepath.FromSlash(repo.ChunkKey(d)))
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)/2] ^= 0xff
	os.Chmod(path, 0o600)
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	e := start(t, export.Options{Repo: ro, Domain: "vm", Backup: id})
	c, err := nbdclient.Dial(t.Context(), nbdclient.Config{URI: e.Disks[0].URI})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	off := i * ix.ChunkSize
	p := make([]byte, 4096)
	if err := c.ReadAt(t.Context(), p, off+4096); !errors.Is(err, syscall.EIO) {
		t.Fatalf("read of a damaged chunk: %v, want EIO", err)
	}
	if err := c.ReadAt(t.Context(), p, off-4096); err != nil || !bytes.Equal(p, raw[off-4096:off]) {
		t.Fatalf("read beside the damaged chunk: %v", err)
	}
	recs, damaged, err := r.Damage(t.Context())
	if err != nil || len(recs) != 1 || recs[0].Object != repo.ChunkKey(d) || !damaged["vm/"+id] {
		t.Fatalf("damage records %+v %v %v", recs, damaged, err)
	}
	if s := e.Stats(); s.ReadErrors != 1 {
		t.Fatalf("stats %+v", s)
	}
}

// What can never work is refused before anything listens: an unknown
// backup or disk, a socket path that is not a socket, plain TCP off
// loopback, TLS on a unix socket, a cache too small.
func TestExportRefusals(t *testing.T) {
	ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	id, _ := backup(t, ro, 24*MiB)
	dir := t.TempDir()
	sock := filepath.Join(dir, "s.sock")
	notSocket := filepath.Join(dir, "file")
	os.WriteFile(notSocket, []byte("keep me"), 0o600)
	for _, c := range []struct {
		o       export.Options
		invalid bool
		want    string
	}{
		{export.Options{Backup: "20200101T000000.000Z"}, false, "20200101T000000.000Z"},
		{export.Options{Backup: id, Disks: []string{"vdz"}}, false, "vdz"},
		{export.Options{Domain: "nope"}, false, "nope"},
		{export.Options{Domain: "../x"}, true, "domain"},
		{export.Options{Listen: "unix://" + notSocket}, true, "not a socket"},
		{export.Options{Listen: "unix://relative/s.sock"}, true, "absolute"},
		{export.Options{Listen: "0.0.0.0:0"}, true, "loopback"},
		{export.Options{Listen: "0.0.0.0:0", TLS: listen.TLS{Cert: "c.pem", Key: "k.pem"}}, true, "client certificates"},
		{export.Options{Listen: "tcp://127.0.0.1:0"}, true, "host:port"},
		{export.Options{TLS: listen.TLS{Cert: "c.pem", Key: "k.pem"}}, true, "unix socket"},
		{export.Options{CacheBytes: 1 << 20}, true, "16 MiB"},
	} {
		o := c.o
		o.Repo = ro
		if o.Domain == "" {
			o.Domain = "vm"
		}
		if o.Listen == "" {
			o.Listen = "unix://" + sock
		}
		_, err := export.Start(t.Context(), o)
		if err == nil || !strings.Contains(err.Error(), c.want) || errors.Is(err, export.ErrInvalid) != c.invalid {
			t.Errorf("%+v: %v, want an error with %q (invalid: %v)", c.o, err, c.want, c.invalid)
		}
		if _, err := os.Lstat(sock); err == nil {
			t.Fatalf("%+v: a socket was left", c.o)
		}
	}
	if b, _ := os.ReadFile(notSocket); string(b) != "keep me" {
		t.Fatal("the file in the socket's place was changed")
	}
	if locks, _ := mustOpen(t, ro).Locks(t.Context()); len(locks) != 0 {
		t.Fatalf("locks left: %v", locks)
	}
	// A socket someone listens on is not taken over.
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if _, err := export.Start(t.Context(), export.Options{Repo: ro, Domain: "vm", Listen: "unix://" + sock}); err == nil ||
		!strings.Contains(err.Error(), "listening") {
		t.Fatalf("a live socket: %v", err)
	}
}

func mustOpen(t *testing.T, ro repo.Options) *repo.Repo {
	t.Helper()
	r, err := ro.Open(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// A QEMU domain whose disk is a qcow2 overlay backed by an export reads
// the backup through its device, and its writes stay in the overlay: the
// export (and the backup) are unchanged.
func TestExportBacksAQemuOverlay(t *testing.T) {
	qemutest.NeedLibvirt(t)
	ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	_, raw := backup(t, ro, 24*MiB)
	// QEMU runs as another user: loopback TCP, which it can reach.
	e := start(t, export.Options{Repo: ro, Domain: "vm", Listen: "127.0.0.1:0"})
	uri := e.Disks[0].URI
	if !strings.HasPrefix(uri, "nbd://127.0.0.1:") {
		t.Fatalf("URI %s", uri)
	}
	dom := qemutest.NewDomain(t, false, qemutest.DiskSpec{Dev: "vda", Format: "qcow2", Backing: uri})
	// QEMU's own NBD server exports the guest disk's node (the overlay
	// over our export): what it serves is what the guest device reads.
	qdir := t.TempDir()
	os.Chmod(qdir, 0o777)
	qsock := filepath.Join(qdir, "qemu.sock")
	dom.QMP(fmt.Sprintf(`{"execute":"nbd-server-start","arguments":{"addr":{"type":"unix","data":{"path":%q}}}}`, qsock))
	dom.QMP(fmt.Sprintf(`{"execute":"block-export-add","arguments":{"type":"nbd","id":"e0","node-name":%q,"name":"vda"}}`, dom.NodeName("vda")))
	guest := func() []byte {
		t.Helper()
		c, err := nbdclient.Dial(t.Context(), nbdclient.Config{Socket: qsock, Export: "vda"})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		p := make([]byte, len(raw))
		if err := c.ReadAt(t.Context(), p, 0); err != nil {
			t.Fatal(err)
		}
		return p
	}
	if !bytes.Equal(guest(), raw) {
		t.Fatal("the guest's disk is not the backup")
	}
	if s := e.Stats(); s.Reads == 0 {
		t.Fatalf("QEMU read nothing from the export: %+v", s)
	}
	dom.Write("vda", "write -P 0x77 22M 4k")
	want := bytes.Clone(raw)
	copy(want[22*MiB:], bytes.Repeat([]byte{0x77}, 4096))
	if !bytes.Equal(guest(), want) {
		t.Fatal("the guest's disk after its write is not the backup with the write")
	}
	c, err := nbdclient.Dial(t.Context(), nbdclient.Config{URI: uri})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	p := make([]byte, len(raw))
	if err := c.ReadAt(t.Context(), p, 0); err != nil || !bytes.Equal(p, raw) {
		t.Fatalf("the export after the guest wrote: %v (changed: %v)", err, !bytes.Equal(p, raw))
	}
}

// Over TCP with TLS and client certificates: a client with a certificate
// reads (nbds://), one without is refused, and nothing is negotiated in
// the clear.
func TestExportTLS(t *testing.T) {
	qemutest.Need(t, "nbdinfo")
	ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	_, raw := backup(t, ro, 24*MiB)
	pki := newPKI(t)
	e := start(t, export.Options{Repo: ro, Domain: "vm", Listen: "127.0.0.1:0",
		TLS: listen.TLS{Cert: pki.serverCert, Key: pki.serverKey, ClientCA: pki.caCert}})
	uri := e.Disks[0].URI
	if !strings.HasPrefix(uri, "nbds://127.0.0.1:") {
		t.Fatalf("URI %s", uri)
	}
	out := run(t, "nbdinfo", "--json", uri+"?tls-certificates="+pki.clientDir)
	if !strings.Contains(out, fmt.Sprintf(`"export-size": %d`, len(raw))) {
		t.Fatalf("nbdinfo over TLS: %s", out)
	}
	for _, bad := range []string{
		strings.Replace(uri, "nbds://", "nbd://", 1), // plain
		uri + "?tls-certificates=" + pki.caOnlyDir,   // no client certificate
	} {
		if out, err := exec.Command("nbdinfo", bad).CombinedOutput(); err == nil {
			t.Fatalf("nbdinfo %s: %s", bad, out)
		}
	}
	dst := filepath.Join(t.TempDir(), "copy.raw")
	run(t, "nbdcopy", uri+"?tls-certificates="+pki.clientDir, dst)
	if got, _ := os.ReadFile(dst); !bytes.Equal(got, raw) {
		t.Fatal("nbdcopy over TLS: the copy differs")
	}
}

// pki is a CA, a server certificate for 127.0.0.1 and a client
// certificate, as files; clientDir is laid out as libnbd (GnuTLS) wants
// it: ca-cert.pem, client-cert.pem, client-key.pem.
type pki struct {
	caCert, serverCert, serverKey string
	clientDir, caOnlyDir          string
}

func newPKI(t *testing.T) pki {
	t.Helper()
	dir := t.TempDir()
	write := func(name string, typ string, der []byte) string {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	key := func() *ecdsa.PrivateKey {
		k, err := ecdsa.GenerateKey(elliptic.P256(), crand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	keyDER := func(k *ecdsa.PrivateKey) []byte {
		b, err := x509.MarshalPKCS8PrivateKey(k)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	now := time.Now()
	caKey := key()
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"}, NotBefore: now.Add(-time.Hour),
		NotAfter: now.Add(time.Hour), IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(crand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	leaf := func(serial int64, usage x509.ExtKeyUsage) ([]byte, *ecdsa.PrivateKey) {
		k := key()
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: "127.0.0.1"}, NotBefore: now.Add(-time.Hour),
			NotAfter: now.Add(time.Hour), IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, ExtKeyUsage: []x509.ExtKeyUsage{usage},
			KeyUsage: x509.KeyUsageDigitalSignature}
		der, err := x509.CreateCertificate(crand.Reader, tmpl, ca, &k.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		return der, k
	}
	srvDER, srvKey := leaf(2, x509.ExtKeyUsageServerAuth)
	cliDER, cliKey := leaf(3, x509.ExtKeyUsageClientAuth)
	p := pki{caCert: write("ca.pem", "CERTIFICATE", caDER), serverCert: write("server.pem", "CERTIFICATE", srvDER),
		serverKey: write("server-key.pem", "PRIVATE KEY", keyDER(srvKey)), clientDir: filepath.Join(dir, "client"), caOnlyDir: filepath.Join(dir, "ca-only")}
	write("client/ca-cert.pem", "CERTIFICATE", caDER)
	write("client/client-cert.pem", "CERTIFICATE", cliDER)
	write("client/client-key.pem", "PRIVATE KEY", keyDER(cliKey))
	write("ca-only/ca-cert.pem", "CERTIFICATE", caDER)
	return p
}
