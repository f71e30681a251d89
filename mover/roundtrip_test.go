package mover_test

import (
	"fmt"
	"math/rand/v2"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nbdmover/nbdmover/internal/backuptest"
	"github.com/nbdmover/nbdmover/internal/qemutest"
	"github.com/nbdmover/nbdmover/mover"
	"github.com/nbdmover/nbdmover/repo"
	"github.com/nbdmover/nbdmover/restore"
	"github.com/nbdmover/nbdmover/sink/sinktest"
)

const MiB = backuptest.MiB

var testLog = backuptest.Log

type point struct {
	id  string
	ref string // raw reference copy at the backup point
}

func backupNBD(t *testing.T, ro repo.Options, img, mode string) *mover.BackupResult {
	t.Helper()
	return backupNBDWith(t, ro, img, mode, "")
}

func backupNBDWith(t *testing.T, ro repo.Options, img, mode, compression string) *mover.BackupResult {
	t.Helper()
	srv := qemutest.Serve(t, img, "-r", "-B", "b0")
	defer srv.Kill()
	res, err := mover.Backup(t.Context(), mover.NewNBDExport(mover.NBDOptions{URI: srv.URI, Name: "offline-vm", Bitmap: "b0", Disk: "vda"}),
		mover.Options{Repo: ro, Mode: mode, ChunkSize: 256 << 10, Compression: compression, RunDir: t.TempDir(), Log: testLog(t)})
	if err != nil {
		t.Fatal(err)
	}
	return res
}

func checkRestores(t *testing.T, ro repo.Options, points []point) {
	t.Helper()
	for _, p := range points {
		for _, format := range []string{"raw", "qcow2"} {
			out := filepath.Join(t.TempDir(), "vda."+format)
			_, disks, err := restore.Restore(t.Context(), restore.Options{Repo: ro, Domain: "offline-vm", Backup: p.id,
				Disk: "vda", Output: out, Format: format})
			if err != nil || len(disks) != 1 {
				t.Fatalf("restore %s as %s: %v", p.id, format, err)
			}
			qemutest.Compare(t, p.ref, "raw", out, format)
		}
	}
	var problems []repo.Problem
	stats, err := verify(t, ro, repo.VerifyOptions{ReadData: true}, func(p repo.Problem) { problems = append(problems, p) })
	if err != nil || len(problems) > 0 || stats.Backups != len(points) {
		t.Fatalf("verify: %v %+v %+v", err, problems, stats)
	}
}

func roundTrip(t *testing.T, ro repo.Options, compression string) {
	const size = 37*MiB + 3*512
	img := backuptest.Image(t, size)
	var points []point

	full := backupNBDWith(t, ro, img, "auto", compression)
	if full.Mode != "full" || full.Fallback != "" || full.BytesRead == 0 || full.BytesRead > 20*MiB {
		t.Fatalf("first backup: %+v", full)
	}
	points = append(points, point{full.ID, qemutest.RawCopy(t, img)})

	// Writes of every kind, some across chunk boundaries; a zeroed and a
	// discarded range that held data must restore as zeroes.
	qemutest.IO(t, img,
		"write -s "+backuptest.RandomFile(t, 300<<10, 2)+" 3968k 300k",
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
	if inc2.BytesRead-inc2.Disks[0].VerifiedBytes >= full.BytesRead+4*MiB || inc2.BytesWritten > 64<<10 {
		t.Errorf("third backup read %d (full read %d), stored %d", inc2.BytesRead, full.BytesRead, inc2.BytesWritten)
	}
	checkRestores(t, ro, points)

	// A full of the same disk under another name has no parent whose
	// digests it may trust: every chunk goes through the uploaders' check
	// of the store, and none is stored again.
	srv := qemutest.Serve(t, img, "-r", "-B", "b0")
	defer srv.Kill()
	dup, err := mover.Backup(t.Context(), mover.NewNBDExport(mover.NBDOptions{URI: srv.URI, Name: "offline-copy", Bitmap: "b0", Disk: "vda"}),
		mover.Options{Repo: ro, Mode: "full", RunDir: t.TempDir(), Log: testLog(t)})
	if err != nil {
		t.Fatal(err)
	}
	if dup.BytesWritten != 0 || dup.BytesDedup+dup.BytesZero != size || dup.BytesDedup == 0 {
		t.Errorf("backup of an already stored disk: %+v", dup)
	}
	out := filepath.Join(t.TempDir(), "copy.raw")
	if _, _, err := restore.Restore(t.Context(), restore.Options{Repo: ro, Domain: "offline-copy", Disk: "vda", Output: out}); err != nil {
		t.Fatal(err)
	}
	qemutest.Compare(t, points[len(points)-1].ref, "raw", out, "raw")
}

func TestRoundTripLocal(t *testing.T) {
	roundTrip(t, repo.Options{Location: filepath.Join(t.TempDir(), "repo")}, "")
}

// The same with the s2 codec for new chunks; the last backup switches back
// to the repository's zstd, so one backup mixes both.
func TestRoundTripS2(t *testing.T) {
	roundTrip(t, repo.Options{Location: filepath.Join(t.TempDir(), "repo")}, "s2")
}

func TestRoundTripS3(t *testing.T) {
	ep := sinktest.S3Endpoint(t)
	bucket := fmt.Sprintf("roundtrip-%08x", rand.Uint32())
	roundTrip(t, repo.Options{Location: "s3://" + bucket + "/nbdmover", S3Endpoint: ep}, "")
}

func TestModeDecisions(t *testing.T) {
	ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	img := qemutest.NewImage(t, t.TempDir(), 8*MiB)
	qemutest.Run(t, "qemu-img", "bitmap", "--add", img, "b0")
	qemutest.Run(t, "qemu-img", "bitmap", "--add", img, "b1")
	srv := qemutest.Serve(t, img, "-r", "-B", "b0", "-B", "b1")
	backup := func(bitmap, mode string) (*mover.BackupResult, error) {
		return mover.Backup(t.Context(), mover.NewNBDExport(mover.NBDOptions{URI: srv.URI, Name: "d", Bitmap: bitmap}),
			mover.Options{Repo: ro, Mode: mode, RunDir: t.TempDir()})
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

// verify opens the repository and verifies it.
func verify(t testing.TB, ro repo.Options, o repo.VerifyOptions, report func(repo.Problem)) (repo.VerifyStats, error) {
	t.Helper()
	r, err := ro.Open(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	return r.Verify(t.Context(), o, report)
}
