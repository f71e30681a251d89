// Package backuptest holds what the tests of several packages share to
// check backups against the real peers: test data, the checks that a
// backup left nothing behind, and restores compared with reference
// copies. It is imported by tests only.
package backuptest

import (
	"bytes"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nbdmover/nbdmover/chunker"
	"github.com/nbdmover/nbdmover/internal/qemutest"
	"github.com/nbdmover/nbdmover/mover"
	"github.com/nbdmover/nbdmover/mover/nbd"
	"github.com/nbdmover/nbdmover/repo"
	"github.com/nbdmover/nbdmover/restore"
)

// MiB is a mebibyte.
const MiB = 1 << 20

// Log is a logger writing to the test's output.
func Log(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// RandomFile writes n incompressible bytes to a new file (for qemu-io -s).
func RandomFile(t testing.TB, n int, seed uint64) string {
	r := rand.New(rand.NewPCG(seed, 3))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	p := filepath.Join(t.TempDir(), fmt.Sprintf("random-%d", seed))
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// TextFile writes n bytes of compressible text.
func TextFile(t testing.TB, n int) string {
	var b bytes.Buffer
	for i := 0; b.Len() < n; i++ {
		fmt.Fprintf(&b, "line %d: the quick brown fox jumps over the lazy dog\n", i)
	}
	p := filepath.Join(t.TempDir(), "text")
	if err := os.WriteFile(p, b.Bytes()[:n], 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// Image is a qcow2 image with a persistent bitmap b0, holding holes,
// allocated zero runs, incompressible and compressible data, with a size
// that is not a multiple of the chunk size.
func Image(t testing.TB, size int64) string {
	img := qemutest.NewImage(t, t.TempDir(), size)
	qemutest.Run(t, "qemu-img", "bitmap", "--add", img, "b0")
	qemutest.IO(t, img,
		"write -s "+RandomFile(t, 6*MiB, 1)+" 1M 6M", // incompressible, across chunks
		"write -s "+TextFile(t, 5*MiB)+" 9M 5M",      // compressible
		"write -z 16M 3M",                               // allocated zeroes
		"write -P 0x5a 22M 64k",                         // a small island
		fmt.Sprintf("write -P 0x33 %d 4096", size-4096), // the short last chunk
	)
	return img
}

// CheckNoLeftovers fails the test unless the domain has no backup job, at
// most one (our newest) checkpoint and no job directory under runDir.
func CheckNoLeftovers(t testing.TB, dom *qemutest.Domain, runDir string) {
	t.Helper()
	if dom.JobActive() {
		t.Fatal("a libvirt job is left running")
	}
	if cps := dom.Checkpoints(); len(cps) > 1 {
		t.Fatalf("checkpoints left: %v", cps)
	}
	left, _ := filepath.Glob(filepath.Join(runDir, "job-"+dom.Name+"-*"))
	for _, d := range left {
		if repo.ValidBackupID(strings.TrimPrefix(filepath.Base(d), "job-"+dom.Name+"-")) == nil {
			t.Fatalf("run directory left: %s", d)
		}
	}
}

// Point is a backup and the raw reference copies of its disks at the
// moment it was taken.
type Point struct {
	ID   string
	Refs map[string]string // disk -> raw image
}

// CheckRestores restores every disk of every point (raw and qcow2 in
// turn) and compares each with its reference copy.
func CheckRestores(t testing.TB, ro repo.Options, domain string, points []Point) {
	t.Helper()
	for i, p := range points {
		format := []string{"raw", "qcow2"}[i%2]
		out := filepath.Join(t.TempDir(), "restore")
		_, disks, err := restore.Restore(t.Context(), restore.Options{Repo: ro, Domain: domain, Backup: p.ID, Output: out, Format: format})
		if err != nil {
			t.Fatalf("restore %s: %v", p.ID, err)
		}
		if len(disks) != len(p.Refs) {
			t.Fatalf("restored %d disks, want %d", len(disks), len(p.Refs))
		}
		for _, d := range disks {
			qemutest.Compare(t, p.Refs[d.Name], "raw", d.Path, format)
		}
	}
}

// PutManifest writes content as the manifest of backup domain/id in the
// local repository at dir: wrapped as the store wraps manifests when
// asBlob, raw (a damaged object) otherwise.
func PutManifest(t testing.TB, dir, domain, id string, content []byte, asBlob bool) {
	t.Helper()
	if asBlob {
		content = chunker.NewMetaCodec().Encode(nil, content, repo.ManifestKey(domain, id))
	}
	p := filepath.Join(dir, filepath.FromSlash(repo.ManifestKey(domain, id)))
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, content, 0o600); err != nil {
		t.Fatal(err)
	}
}

// ExportBackup backs up an image served by qemu-nbd -B b0 as name (disk
// vda, 256 KiB chunks), compressing new chunks as compression says (""
// for the repository's default).
func ExportBackup(t *testing.T, ro repo.Options, img, name, mode, compression string) (*mover.BackupResult, error) {
	t.Helper()
	srv := qemutest.Serve(t, img, "-r", "-B", "b0")
	defer srv.Kill()
	return mover.Backup(t.Context(), nbd.New(nbd.Options{URI: srv.URI, Name: name, Bitmap: "b0", Disk: "vda"}),
		mover.Options{Repo: ro, Init: true, Mode: mode, ChunkSize: 256 << 10, Compression: compression, RunDir: t.TempDir(), Log: Log(t)})
}

// RawBackup backs up a raw image, converted to qcow2 and served by
// qemu-nbd, as name's disk vda; it returns the backup's id.
func RawBackup(t *testing.T, ro repo.Options, img, name string) string {
	t.Helper()
	q := filepath.Join(t.TempDir(), "d.qcow2")
	qemutest.Run(t, "qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", img, q)
	srv := qemutest.Serve(t, q, "-r")
	defer srv.Kill()
	res, err := mover.Backup(t.Context(), nbd.New(nbd.Options{URI: srv.URI, Name: name, Disk: "vda"}),
		mover.Options{Repo: ro, Init: true, RunDir: t.TempDir(), Log: Log(t)})
	if err != nil {
		t.Fatal(err)
	}
	return res.ID
}

// List lists the committed backups of name.
func List(t testing.TB, ro repo.Options, name string) ([]*repo.Manifest, error) {
	t.Helper()
	r, err := ro.Open(t.Context())
	if err != nil {
		return nil, err
	}
	ms, _, err := r.Backups(t.Context(), name)
	return ms, err
}
