package mover_test

import (
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nbdmover/nbdmover/internal/backuptest"
	"github.com/nbdmover/nbdmover/internal/qemutest"
	"github.com/nbdmover/nbdmover/mover"
	"github.com/nbdmover/nbdmover/mover/nbd"
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
	res, err := backuptest.ExportBackup(t, ro, img, "offline-vm", mode, compression)
	if err != nil {
		t.Fatal(err)
	}
	return res
}

// checkRestores restores every point (raw and qcow2), compares, and
// verifies the repository, which holds exactly those backups.
func checkRestores(t *testing.T, ro repo.Options, points []point) {
	t.Helper()
	checkRestoresOf(t, ro, points, len(points))
}

// checkRestoresOf restores the points and verifies a repository of
// backups backups.
func checkRestoresOf(t *testing.T, ro repo.Options, points []point, backups int) {
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
	if err != nil || len(problems) > 0 || stats.Backups != backups {
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
	// Its rates are what it moved over its time, not the disk's size.
	near := func(rate float64, n int64, secs float64) bool {
		return math.Abs(rate*secs*1e6-float64(n)) <= 1+float64(n)*1e-9
	}
	d := inc2.Disks[0]
	if !near(inc2.RateMBps, inc2.BytesRead, inc2.Seconds) || !near(inc2.ReadMBps, inc2.BytesRead, inc2.Seconds) ||
		!near(inc2.WrittenMBps, inc2.BytesWritten, inc2.Seconds) || !near(d.ReadMBps, d.BytesRead, d.Seconds) ||
		!near(d.WrittenMBps, d.BytesWritten, d.Seconds) || inc2.ReadMBps == 0 {
		t.Errorf("rates of an incremental that read %d and stored %d bytes in %.3fs: rate %.1f, read %.1f, stored %.1f MB/s; disk %+v",
			inc2.BytesRead, inc2.BytesWritten, inc2.Seconds, inc2.RateMBps, inc2.ReadMBps, inc2.WrittenMBps, d)
	}
	checkRestores(t, ro, points)

	// A full of the same disk under another name has no parent whose
	// digests it may trust: every chunk goes through the uploaders' check
	// of the store, and none is stored again.
	srv := qemutest.Serve(t, img, "-r", "-B", "b0")
	defer srv.Kill()
	dup, err := mover.Backup(t.Context(), nbd.New(nbd.Options{URI: srv.URI, Name: "offline-copy", Bitmap: "b0", Disk: "vda"}),
		mover.Options{Repo: ro, Init: true, Mode: "full", RunDir: t.TempDir(), Log: testLog(t)})
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

	// Forgetting the full and the first incremental, the parents of the
	// last one, and a gc leave the last one whole: every backup is a
	// synthetic full that names its whole index chain.
	r, err := ro.Open(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	keep := 1
	if res, err := r.Forget(t.Context(), "offline-vm", repo.Policy{KeepLast: &keep}, false); err != nil || res[0].Forgotten != 2 {
		t.Fatalf("forget: %+v %v", res, err)
	}
	time.Sleep(1100 * time.Millisecond) // S3's Last-Modified has whole seconds
	if g, err := r.GC(t.Context(), repo.GCOptions{Grace: time.Millisecond}); err != nil || g.Backups != 2 {
		t.Fatalf("gc: %+v %v", g, err)
	}
	checkRestoresOf(t, ro, points[2:], 2)
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

// encryptedRepo creates an encrypted repository at o and returns o with
// the keys that open it: one Keys, so the password is derived once.
func encryptedRepo(t *testing.T, o repo.Options) repo.Options {
	t.Helper()
	keys, err := repo.PasswordKeys([]byte("roundtrip password"))
	if err != nil {
		t.Fatal(err)
	}
	o.Keys = keys
	if _, err := o.Init(t.Context(), repo.InitOptions{}); err != nil {
		t.Fatal(err)
	}
	return o
}

// The same round trips through an encrypted repository.
func TestRoundTripEncryptedLocal(t *testing.T) {
	roundTrip(t, encryptedRepo(t, repo.Options{Location: filepath.Join(t.TempDir(), "repo")}), "")
}

func TestRoundTripEncryptedS3(t *testing.T) {
	ep := sinktest.S3Endpoint(t)
	bucket := fmt.Sprintf("roundtrip-enc-%08x", rand.Uint32())
	roundTrip(t, encryptedRepo(t, repo.Options{Location: "s3://" + bucket + "/nbdmover", S3Endpoint: ep}), "s2")
}

func TestModeDecisions(t *testing.T) {
	ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	img := qemutest.NewImage(t, t.TempDir(), 8*MiB)
	qemutest.Run(t, "qemu-img", "bitmap", "--add", img, "b0")
	qemutest.Run(t, "qemu-img", "bitmap", "--add", img, "b1")
	srv := qemutest.Serve(t, img, "-r", "-B", "b0", "-B", "b1")
	backup := func(bitmap, mode string) (*mover.BackupResult, error) {
		return mover.Backup(t.Context(), nbd.New(nbd.Options{URI: srv.URI, Name: "d", Bitmap: bitmap}),
			mover.Options{Repo: ro, Init: true, Mode: mode, RunDir: t.TempDir()})
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

// A sparse 4 TiB disk, written at its start, middle and end, then grown
// (to an odd size) and shrunk: every backup restores exactly, and each
// incremental writes index objects of a few KiB, whatever the disk size.
func TestLargeSparseDisk(t *testing.T) {
	const TiB = int64(1) << 40
	dir := filepath.Join(t.TempDir(), "repo")
	ro := repo.Options{Location: dir}
	img := qemutest.NewImage(t, t.TempDir(), 4*TiB)
	qemutest.Run(t, "qemu-img", "bitmap", "--add", img, "b0")
	type step struct {
		resize []string // qemu-img resize arguments before the image and the size, then the size; nil for none
		writes []string
	}
	steps := []step{
		{nil, []string{"write -P 0x11 0 1M", "write -P 0x12 2T 3M", fmt.Sprintf("write -P 0x13 %d 4096", 4*TiB-4096)}},
		{nil, []string{"write -P 0x21 64k 64k", "write -z 2T 1M", fmt.Sprintf("write -P 0x22 %d 512", 4*TiB-512)}},
		{[]string{fmt.Sprint(4*TiB + 64<<20 + 512)}, []string{fmt.Sprintf("write -P 0x31 %d 1M", 4*TiB+32<<20)}},
		{[]string{"--shrink", fmt.Sprint(3*TiB + 1536)}, []string{"write -P 0x41 3T 1k"}},
	}
	var points []backuptest.Point
	var prev []string // index objects of the backup before
	for k, st := range steps {
		if n := len(st.resize); n > 0 {
			args := append(append([]string{"resize", "-q", "-f", "qcow2"}, st.resize[:n-1]...), img, st.resize[n-1])
			qemutest.Run(t, "qemu-img", args...)
		}
		qemutest.IO(t, img, st.writes...)
		res := backupNBDWith(t, ro, img, "auto", "")
		want := []string{"full", "incremental", "incremental", "incremental"}[k]
		if res.Mode != want {
			t.Fatalf("step %d: %s backup, want %s: %+v", k, res.Mode, want, res)
		}
		points = append(points, backuptest.Point{ID: res.ID, Refs: map[string]string{"vda": qemutest.RawCopy(t, img)}})
		r, _ := ro.Open(t.Context())
		m, err := r.Backup(t.Context(), "offline-vm", res.ID)
		if err != nil {
			t.Fatal(err)
		}
		var written int64
		var objs []string
		for _, ref := range m.Disks[0].Index {
			for _, o := range ref.Objects {
				objs = append(objs, o)
				if !slices.Contains(prev, o) {
					st, _ := os.Stat(filepath.Join(dir, filepath.FromSlash(o)))
					written += st.Size()
				}
			}
		}
		mst, _ := os.Stat(filepath.Join(dir, filepath.FromSlash(m.Key())))
		t.Logf("step %d: %s of a %d-byte disk: %d index links, %d bytes of new index objects, manifest %d bytes",
			k, res.Mode, m.Disks[0].Size, len(m.Disks[0].Index), written, mst.Size())
		if written > 64<<10 || mst.Size() > 64<<10 {
			t.Errorf("step %d wrote %d bytes of index objects and a %d-byte manifest", k, written, mst.Size())
		}
		prev = objs
	}
	checkRestores(t, ro, pointsOf(points))
}

// pointsOf turns domain points of the one disk vda into restore points.
func pointsOf(ps []backuptest.Point) []point {
	var out []point
	for _, p := range ps {
		out = append(out, point{p.ID, p.Refs["vda"]})
	}
	return out
}

// Many incrementals in a row of a disk written at random between them:
// the first, a middle and the last backup restore exactly.
func TestManyIncrementals(t *testing.T) {
	ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	img := backuptest.Image(t, 48*MiB)
	rng := rand.New(rand.NewPCG(5, 6))
	var points []point
	for n := range 24 {
		if n > 0 {
			var cmds []string
			for range 1 + rng.IntN(4) {
				cmds = append(cmds, fmt.Sprintf("write -P 0x%02x %d %d", rng.IntN(250)+1, rng.Int64N(47*MiB/4096)*4096, (1+rng.IntN(64))*4096))
			}
			if n%7 == 0 {
				cmds = append(cmds, fmt.Sprintf("discard %d 1M", rng.Int64N(46)*MiB))
			}
			qemutest.IO(t, img, cmds...)
		}
		res := backupNBDWith(t, ro, img, "auto", "")
		if want := map[bool]string{true: "full", false: "incremental"}[n == 0]; res.Mode != want {
			t.Fatalf("backup %d: %s", n, res.Mode)
		}
		points = append(points, point{res.ID, qemutest.RawCopy(t, img)})
	}
	checkRestoresOf(t, ro, []point{points[0], points[11], points[23]}, len(points))
}
