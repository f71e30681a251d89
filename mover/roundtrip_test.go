package mover_test

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nbdmover/nbdmover/internal/qemutest"
	"github.com/nbdmover/nbdmover/mover"
	"github.com/nbdmover/nbdmover/repo"
	"github.com/nbdmover/nbdmover/sink/sinktest"
)

const MiB = 1 << 20

func testLog(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// randomFile writes n incompressible bytes to a new file for qemu-io -s.
func randomFile(t *testing.T, n int, seed uint64) string {
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

// textFile writes n bytes of compressible text.
func textFile(t *testing.T, n int) string {
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

// testImage is a qcow2 image with a persistent bitmap b0, holding holes,
// allocated zero runs, incompressible and compressible data, with a size
// that is not a multiple of the chunk size.
func testImage(t *testing.T, size int64) string {
	img := qemutest.NewImage(t, t.TempDir(), size)
	qemutest.Run(t, "qemu-img", "bitmap", "--add", img, "b0")
	qemutest.IO(t, img,
		"write -s "+randomFile(t, 6*MiB, 1)+" 1M 6M", // incompressible, across chunks
		"write -s "+textFile(t, 5*MiB)+" 9M 5M",      // compressible
		"write -z 16M 3M",                               // allocated zeroes
		"write -P 0x5a 22M 64k",                         // a small island
		fmt.Sprintf("write -P 0x33 %d 4096", size-4096), // the short last chunk
	)
	return img
}

type point struct {
	id  string
	ref string // raw reference copy at the backup point
}

func backupNBD(t *testing.T, ro mover.RepoOptions, img, mode string) *mover.BackupResult {
	t.Helper()
	return backupNBDWith(t, ro, img, mode, "")
}

func backupNBDWith(t *testing.T, ro mover.RepoOptions, img, mode, compression string) *mover.BackupResult {
	t.Helper()
	srv := qemutest.Serve(t, img, "-r", "-B", "b0")
	defer srv.Kill()
	res, err := mover.Backup(t.Context(), mover.BackupOptions{Repo: ro, NBD: srv.URI, Name: "offline-vm", Bitmap: "b0",
		Mode: mode, ChunkSize: 256 << 10, Disks: []string{"vda"}, Compression: compression, Log: testLog(t)})
	if err != nil {
		t.Fatal(err)
	}
	return res
}

func checkRestores(t *testing.T, ro mover.RepoOptions, points []point) {
	t.Helper()
	for _, p := range points {
		for _, format := range []string{"raw", "qcow2"} {
			out := filepath.Join(t.TempDir(), "vda."+format)
			_, disks, err := mover.Restore(t.Context(), mover.RestoreOptions{Repo: ro, Domain: "offline-vm", Backup: p.id,
				Disk: "vda", Output: out, Format: format})
			if err != nil || len(disks) != 1 {
				t.Fatalf("restore %s as %s: %v", p.id, format, err)
			}
			qemutest.Compare(t, p.ref, "raw", out, format)
		}
	}
	var problems []repo.Problem
	stats, err := mover.Verify(t.Context(), mover.VerifyOptions{Repo: ro, VerifyOptions: repo.VerifyOptions{ReadData: true}},
		func(p repo.Problem) { problems = append(problems, p) })
	if err != nil || len(problems) > 0 || stats.Backups != len(points) {
		t.Fatalf("verify: %v %+v %+v", err, problems, stats)
	}
}

func roundTrip(t *testing.T, ro mover.RepoOptions, compression string) {
	const size = 37*MiB + 3*512
	img := testImage(t, size)
	var points []point

	full := backupNBDWith(t, ro, img, "auto", compression)
	if full.Mode != "full" || full.Fallback != "" || full.BytesRead == 0 || full.BytesRead > 20*MiB {
		t.Fatalf("first backup: %+v", full)
	}
	points = append(points, point{full.ID, qemutest.RawCopy(t, img)})

	// Writes of every kind, some across chunk boundaries; a zeroed and a
	// discarded range that held data must restore as zeroes.
	qemutest.IO(t, img,
		"write -s "+randomFile(t, 300<<10, 2)+" 3968k 300k",
		"write -z 10M 512k",
		"discard 1M 1M",
		"write -P 0x77 30M 4k",
	)
	inc := backupNBDWith(t, ro, img, "auto", compression)
	if inc.Mode != "incremental" || inc.Parent != full.ID {
		t.Fatalf("second backup: %+v", inc)
	}
	points = append(points, point{inc.ID, qemutest.RawCopy(t, img)})

	qemutest.IO(t, img, fmt.Sprintf("write -P 0x44 %d 512", size-512), "write -P 0x12 0 1k")
	inc2 := backupNBD(t, ro, img, "incremental")
	if inc2.Mode != "incremental" || inc2.Parent != inc.ID {
		t.Fatalf("third backup: %+v", inc2)
	}
	points = append(points, point{inc2.ID, qemutest.RawCopy(t, img)})
	// The bitmap is never cleared through a read-only export, so each
	// incremental rereads everything written since it was created: still
	// far less than the disk, and nothing stored twice.
	if inc2.BytesRead >= full.BytesRead+4*MiB || inc2.BytesWritten > 64<<10 {
		t.Errorf("third backup read %d (full read %d), stored %d", inc2.BytesRead, full.BytesRead, inc2.BytesWritten)
	}
	checkRestores(t, ro, points)

	// A full of the same disk under another name has no parent whose
	// digests it may trust: every chunk goes through the uploaders' check
	// of the store, and none is stored again.
	srv := qemutest.Serve(t, img, "-r", "-B", "b0")
	defer srv.Kill()
	dup, err := mover.Backup(t.Context(), mover.BackupOptions{Repo: ro, NBD: srv.URI, Name: "offline-copy", Bitmap: "b0",
		Mode: "full", Disks: []string{"vda"}, Log: testLog(t)})
	if err != nil {
		t.Fatal(err)
	}
	if dup.BytesWritten != 0 || dup.BytesDedup+dup.BytesZero != size || dup.BytesDedup == 0 {
		t.Errorf("backup of an already stored disk: %+v", dup)
	}
	out := filepath.Join(t.TempDir(), "copy.raw")
	if _, _, err := mover.Restore(t.Context(), mover.RestoreOptions{Repo: ro, Domain: "offline-copy", Disk: "vda", Output: out}); err != nil {
		t.Fatal(err)
	}
	qemutest.Compare(t, points[len(points)-1].ref, "raw", out, "raw")
}

func TestRoundTripLocal(t *testing.T) {
	roundTrip(t, mover.RepoOptions{Location: filepath.Join(t.TempDir(), "repo")}, "")
}

// The same with the s2 codec for new chunks; the last backup switches back
// to the repository's zstd, so one backup mixes both.
func TestRoundTripS2(t *testing.T) {
	roundTrip(t, mover.RepoOptions{Location: filepath.Join(t.TempDir(), "repo")}, "s2")
}

func TestRoundTripS3(t *testing.T) {
	ep := sinktest.S3Endpoint(t)
	bucket := fmt.Sprintf("roundtrip-%08x", rand.Uint32())
	roundTrip(t, mover.RepoOptions{Location: "s3://" + bucket + "/nbdmover", S3Endpoint: ep}, "")
}

func TestModeDecisions(t *testing.T) {
	ro := mover.RepoOptions{Location: filepath.Join(t.TempDir(), "repo")}
	img := qemutest.NewImage(t, t.TempDir(), 8*MiB)
	qemutest.Run(t, "qemu-img", "bitmap", "--add", img, "b0")
	qemutest.Run(t, "qemu-img", "bitmap", "--add", img, "b1")
	srv := qemutest.Serve(t, img, "-r", "-B", "b0", "-B", "b1")
	backup := func(bitmap, mode string) (*mover.BackupResult, error) {
		return mover.Backup(t.Context(), mover.BackupOptions{Repo: ro, NBD: srv.URI, Name: "d", Bitmap: bitmap, Mode: mode})
	}
	if _, err := backup("b0", "incremental"); err == nil || !strings.Contains(err.Error(), "no earlier backup") {
		t.Fatalf("forced incremental without a parent: %v", err)
	}
	if res, err := backup("", "auto"); err != nil || res.Mode != "full" || res.Fallback != "" {
		t.Fatalf("first backup: %+v %v", res, err)
	}
	if res, err := backup("", "auto"); err != nil || res.Mode != "full" || !strings.Contains(res.Fallback, "no --bitmap") {
		t.Fatalf("no bitmap: %+v %v", res, err)
	}
	if res, err := backup("b0", "auto"); err != nil || res.Mode != "full" || !strings.Contains(res.Fallback, "not taken at bitmap b0") {
		t.Fatalf("parent without the bitmap: %+v %v", res, err)
	}
	if res, err := backup("b1", "auto"); err != nil || res.Mode != "full" {
		t.Fatalf("other bitmap: %+v %v", res, err)
	}
	if res, err := backup("b1", "auto"); err != nil || res.Mode != "incremental" {
		t.Fatalf("same bitmap: %+v %v", res, err)
	}
	if res, err := backup("b1", "full"); err != nil || res.Mode != "full" || res.Fallback != "" {
		t.Fatalf("forced full: %+v %v", res, err)
	}
	if _, err := backup("nope", "auto"); err == nil || !strings.Contains(err.Error(), `"nope"`) {
		t.Fatalf("missing bitmap: %v", err)
	}
	if _, err := backup("", "sideways"); err == nil {
		t.Fatal("bad mode accepted")
	}
}

// Damaged chunks, indexes and manifests are reported by name, and restore
// refuses them and leaves no output behind.
func TestDamage(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "repo")
	ro := mover.RepoOptions{Location: dir}
	img := testImage(t, 37*MiB+3*512)
	res := backupNBD(t, ro, img, "full")

	var chunks []string
	filepath.WalkDir(filepath.Join(dir, "chunks"), func(p string, d os.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			chunks = append(chunks, p)
		}
		return nil
	})
	if len(chunks) < 3 {
		t.Fatalf("only %d chunks stored", len(chunks))
	}
	flipped, truncated, deleted := chunks[0], chunks[1], chunks[2]
	b, _ := os.ReadFile(flipped)
	b[len(b)/2] ^= 0x40
	os.WriteFile(flipped, b, 0o600)
	os.Truncate(truncated, 100)
	os.Remove(deleted)
	key := func(p string) string { return strings.TrimPrefix(p, dir+"/") }

	verify := func(readData bool) map[string]string {
		found := map[string]string{}
		_, err := mover.Verify(t.Context(), mover.VerifyOptions{Repo: ro, VerifyOptions: repo.VerifyOptions{ReadData: readData}},
			func(p repo.Problem) { found[p.Object] = p.Problem })
		if err != nil {
			t.Fatal(err)
		}
		return found
	}
	if found := verify(false); len(found) != 1 || !strings.Contains(found[key(deleted)], "missing") {
		t.Errorf("verify without data: %v", found)
	}
	found := verify(true)
	if len(found) != 3 || !strings.Contains(found[key(flipped)], "crc") ||
		!strings.Contains(found[key(truncated)], "length") || !strings.Contains(found[key(deleted)], "missing") {
		t.Errorf("verify --read-data: %v", found)
	}
	for name, p := range found {
		t.Logf("%s: %s", name, p)
	}

	out := filepath.Join(t.TempDir(), "vda.raw")
	_, _, err := mover.Restore(t.Context(), mover.RestoreOptions{Repo: ro, Domain: "offline-vm", Disk: "vda", Output: out})
	var ce *repo.ChunkError
	if !errors.As(err, &ce) || !strings.HasPrefix(ce.Key, "chunks/") {
		t.Fatalf("restore of a damaged backup: %v", err)
	}
	t.Log(err)
	if _, err := os.Stat(out); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("a failed restore left its output file")
	}

	// A truncated index, then a truncated manifest.
	bdir := filepath.Join(dir, "backups", "offline-vm", res.ID)
	os.Truncate(filepath.Join(bdir, "vda.index"), 40)
	_, _, err = mover.Restore(t.Context(), mover.RestoreOptions{Repo: ro, Domain: "offline-vm", Disk: "vda", Output: out})
	if !errors.Is(err, repo.ErrBadIndex) || !strings.Contains(err.Error(), "vda.index") {
		t.Fatalf("truncated index: %v", err)
	}
	os.Truncate(filepath.Join(bdir, "manifest.json"), 50)
	if _, err := mover.List(t.Context(), ro, ""); err == nil || !strings.Contains(err.Error(), "manifest.json") {
		t.Fatalf("truncated manifest: %v", err)
	}
	if found := verify(false); !strings.Contains(found["backups/offline-vm/"+res.ID+"/manifest.json"], "damaged") {
		t.Errorf("verify of a truncated manifest: %v", found)
	}
}

func TestRestoreRefusesToOverwrite(t *testing.T) {
	ro := mover.RepoOptions{Location: filepath.Join(t.TempDir(), "repo")}
	img := testImage(t, 24*MiB)
	backupNBD(t, ro, img, "full")
	out := filepath.Join(t.TempDir(), "existing.raw")
	os.WriteFile(out, []byte("precious"), 0o600)
	for _, format := range []string{"raw", "qcow2"} {
		_, _, err := mover.Restore(t.Context(), mover.RestoreOptions{Repo: ro, Domain: "offline-vm", Disk: "vda", Output: out, Format: format})
		if err == nil || !strings.Contains(err.Error(), "exists") {
			t.Fatalf("%s: %v", format, err)
		}
	}
	if b, _ := os.ReadFile(out); string(b) != "precious" {
		t.Fatal("restore overwrote an existing file")
	}
	// Without --disk every disk goes into the directory.
	dir := filepath.Join(t.TempDir(), "all")
	_, disks, err := mover.Restore(t.Context(), mover.RestoreOptions{Repo: ro, Domain: "offline-vm", Output: dir, Format: "qcow2"})
	if err != nil || len(disks) != 1 || disks[0].Path != filepath.Join(dir, "vda.qcow2") {
		t.Fatalf("%+v %v", disks, err)
	}
	qemutest.Compare(t, img, "qcow2", disks[0].Path, "qcow2")
}
