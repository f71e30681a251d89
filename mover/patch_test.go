package mover_test

import (
	"bytes"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nbdmover/nbdmover/internal/backuptest"
	"github.com/nbdmover/nbdmover/internal/qemutest"
	"github.com/nbdmover/nbdmover/mover"
	"github.com/nbdmover/nbdmover/mover/nbd"
	"github.com/nbdmover/nbdmover/repo"
	"github.com/nbdmover/nbdmover/repo/index"
	"github.com/nbdmover/nbdmover/restore"
	"github.com/nbdmover/nbdmover/sink/sinktest"
)

// patchedChunks: incrementals of scattered small writes store patches
// over the parent's chunks, not whole chunks; a chunk dirtied again is
// patched over the same base with the union of its blocks, until they
// pass a quarter of it and it is stored whole; a resized disk; every
// backup restores bit-exact. A corrupt patch is found by verify and
// healed by the next backup (which stores the chunk whole, and the older
// backups read it so); forgetting the backups that stored the bases, and
// a gc, leave every later backup whole.
func patchedChunks(t *testing.T, ro repo.Options) {
	const chunk = 1 << 20
	size := int64(24*MiB + 5*4096)
	img := qemutest.NewImage(t, t.TempDir(), size)
	qemutest.IO(t, img, "write -s "+backuptest.RandomFile(t, 20*MiB, 11)+" 0 20M")
	// The bitmap starts after the data (qemu-nbd never clears it: each
	// incremental sees every block written since).
	qemutest.Run(t, "qemu-img", "bitmap", "--add", img, "b0")
	var points []point
	take := func(mode string) *mover.BackupResult {
		t.Helper()
		srv := qemutest.Serve(t, img, "-r", "-B", "b0")
		defer srv.Kill()
		res, err := mover.Backup(t.Context(), nbd.New(nbd.Options{URI: srv.URI, Name: "offline-vm", Bitmap: "b0", Disk: "vda"}),
			mover.Options{Repo: ro, Init: true, Mode: mode, ChunkSize: chunk, RunDir: t.TempDir(), Log: testLog(t)})
		if err != nil {
			t.Fatal(err)
		}
		points = append(points, point{res.ID, qemutest.RawCopy(t, img)})
		return res
	}
	rng := rand.New(rand.NewPCG(7, 8))
	random := func(n int) string { return backuptest.RandomFile(t, n, rng.Uint64()) }
	index := func(id string) *index.Index {
		t.Helper()
		r, err := ro.Open(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		m, err := r.Backup(t.Context(), "offline-vm", id)
		if err != nil {
			t.Fatal(err)
		}
		ix, err := r.LoadIndex(t.Context(), m, "vda")
		if err != nil {
			t.Fatal(err)
		}
		return ix
	}

	full := take("full")
	r, err := ro.Open(t.Context())
	if err != nil || !r.Patches() {
		t.Fatalf("a new repository does not store patches (%v)", err)
	}
	fix := index(full.ID)
	if fix.Patched() != 0 || full.Disks[0].PatchedChunks != 0 {
		t.Fatalf("a full stores patches: %d", fix.Patched())
	}
	// Ten chunks get a 4 KiB write of random data each (one 64 KiB block
	// dirty): ten patches over the full's chunks, about the dirty bytes.
	var cmds []string
	for k := range 10 {
		cmds = append(cmds, fmt.Sprintf("write -s %s %d 4k", random(4096), int64(2*k)*chunk+100<<10))
	}
	qemutest.IO(t, img, cmds...)
	inc1 := take("incremental")
	d1 := inc1.Disks[0]
	ix1 := index(inc1.ID)
	if d1.PatchedChunks != 10 || ix1.Patched() != 10 || d1.BytesWritten > 3*d1.DirtyBytes || d1.DirtyBytes == 0 {
		t.Fatalf("scattered writes: %d patched chunks (index %d), stored %d bytes for %d dirty", d1.PatchedChunks, ix1.Patched(), d1.BytesWritten, d1.DirtyBytes)
	}
	for k := range int64(10) {
		if ix1.Base(2*k) != fix.Digest(2*k) || ix1.Digest(2*k) == fix.Digest(2*k) {
			t.Fatalf("chunk %d: patched over %v, the full's chunk is %v", 2*k, ix1.Base(2*k), fix.Digest(2*k))
		}
	}

	// Five of them again, in another block: patched over the same bases
	// with both blocks. Chunk 0 gets five blocks more: more than a
	// quarter, stored whole (and the slot's base anew).
	cmds = nil
	for k := range 5 {
		cmds = append(cmds, fmt.Sprintf("write -s %s %d 8k", random(8192), int64(2*k)*chunk+600<<10))
	}
	for b := range 5 {
		cmds = append(cmds, fmt.Sprintf("write -s %s %d 4k", random(4096), int64(b+10)*64<<10))
	}
	qemutest.IO(t, img, cmds...)
	inc2 := take("incremental")
	ix2 := index(inc2.ID)
	if !ix2.Base(0).IsZeroChunk() || ix2.Patched() != 9 {
		t.Fatalf("chunk 0 with 7 of 16 blocks dirty: base %v; %d patched chunks", ix2.Base(0), ix2.Patched())
	}
	for k := range int64(10) {
		if k > 0 && ix2.Base(2*k) != fix.Digest(2*k) {
			t.Fatalf("chunk %d patched again over %v, not over the full's chunk", 2*k, ix2.Base(2*k))
		}
	}

	// The disk grows to an odd size, written across the old end: the
	// last chunk changed length and is stored whole.
	size += 3*MiB + 512
	qemutest.Run(t, "qemu-img", "resize", "-q", "-f", "qcow2", img, fmt.Sprint(size))
	qemutest.IO(t, img, fmt.Sprintf("write -s %s %d 8k", random(8192), 24*MiB), fmt.Sprintf("write -s %s %d 4k", random(4096), 19*MiB+5000))
	inc3 := take("incremental")
	ix3 := index(inc3.ID)
	if !ix3.Base(24).IsZeroChunk() || ix3.Base(19).IsZeroChunk() {
		t.Fatalf("grown disk: chunk 24 base %v, chunk 19 base %v", ix3.Base(24), ix3.Base(19))
	}
	checkRestoresOf(t, ro, points, len(points))

	// A corrupt patch: verify finds it and names the backups that need
	// it; the next backup stores the chunk whole, and they restore.
	r, err = ro.Open(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	bad := repo.PatchKey(ix3.Digest(2), ix3.Base(2))
	store := r.Store()
	b, err := store.Get(t.Context(), bad, nil, 1<<30)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)-9] ^= 0x40
	if err := store.Put(t.Context(), bad, b); err != nil {
		t.Fatal(err)
	}
	var problems []repo.Problem
	if _, err := verify(t, ro, repo.VerifyOptions{ReadData: true}, func(p repo.Problem) { problems = append(problems, p) }); err != nil {
		t.Fatal(err)
	}
	if len(problems) != 1 || problems[0].Object != bad || len(problems[0].AllBackups()) != 2 {
		t.Fatalf("verify of a corrupt patch: %+v", problems)
	}
	out := filepath.Join(t.TempDir(), "vda.raw")
	if _, _, err := restore.Restore(t.Context(), restore.Options{Repo: ro, Domain: "offline-vm", Backup: inc3.ID, Disk: "vda", Output: out}); err == nil ||
		!strings.Contains(err.Error(), bad) {
		t.Fatalf("restore with a corrupt patch: %v", err)
	}
	qemutest.IO(t, img, fmt.Sprintf("write -s %s %d 4k", random(4096), 21*MiB))
	inc4 := take("incremental")
	if inc4.Healed != 1 || !index(inc4.ID).Base(2).IsZeroChunk() {
		t.Fatalf("the next backup healed %d chunks", inc4.Healed)
	}
	checkRestoresOf(t, ro, points, len(points))

	// Forget the full and the first incremental, whose chunks are the
	// bases, and gc: the bases stay, every later backup restores.
	keep := 3
	if res, err := r.Forget(t.Context(), "offline-vm", repo.Policy{KeepLast: &keep}, false); err != nil || res[0].Forgotten != 2 {
		t.Fatalf("forget: %+v %v", res, err)
	}
	time.Sleep(1100 * time.Millisecond) // S3's Last-Modified has whole seconds
	g, err := r.GC(t.Context(), repo.GCOptions{Grace: time.Millisecond})
	if err != nil || g.Chunks.Deleted == 0 {
		t.Fatalf("gc: %+v %v", g, err)
	}
	checkRestoresOf(t, ro, points[2:], 3)
}

func TestPatchedChunksLocal(t *testing.T) {
	patchedChunks(t, repo.Options{Location: filepath.Join(t.TempDir(), "repo")})
}

func TestPatchedChunksS3(t *testing.T) {
	ep := sinktest.S3Endpoint(t)
	patchedChunks(t, repo.Options{Location: fmt.Sprintf("s3://patches-%08x/nbdmover", rand.Uint32()), S3Endpoint: ep})
}

func TestPatchedChunksEncrypted(t *testing.T) {
	patchedChunks(t, encryptedRepo(t, repo.Options{Location: filepath.Join(t.TempDir(), "repo")})) // 1 MiB chunks
}

// A repository of config version 2 (made before patches) is written as
// before: whole chunks only, so the nbdmover that made it reads it.
func TestNoPatchesInFormat2(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "repo")
	ro := repo.Options{Location: dir}
	if _, err := ro.Init(t.Context(), repo.InitOptions{}); err != nil {
		t.Fatal(err)
	}
	cfgPath := filepath.Join(dir, "config")
	b, err := os.ReadFile(cfgPath)
	if err != nil || !bytes.Contains(b, []byte(`"version": 3,`)) {
		t.Fatalf("config of a new repository: %s %v", b, err)
	}
	if err := os.WriteFile(cfgPath, bytes.Replace(b, []byte(`"version": 3,`), []byte(`"version": 2,`), 1), 0o600); err != nil {
		t.Fatal(err)
	}
	img := qemutest.NewImage(t, t.TempDir(), 8*MiB)
	qemutest.IO(t, img, "write -s "+backuptest.RandomFile(t, 8*MiB, 3)+" 0 8M")
	qemutest.Run(t, "qemu-img", "bitmap", "--add", img, "b0")
	var points []point
	for k := range 2 {
		if k > 0 {
			qemutest.IO(t, img, "write -s "+backuptest.RandomFile(t, 4096, 4)+" 3M 4k")
		}
		res, err := backuptest.ExportBackup(t, ro, img, "offline-vm", "auto", "")
		if err != nil {
			t.Fatal(err)
		}
		if res.Disks[0].PatchedChunks != 0 {
			t.Fatalf("backup %d of a format 2 repository stored %d patches", k, res.Disks[0].PatchedChunks)
		}
		points = append(points, point{res.ID, qemutest.RawCopy(t, img)})
	}
	if err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err == nil && d.Name() == "patches" {
			err = fmt.Errorf("%s in a format 2 repository", p)
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	checkRestoresOf(t, ro, points, 2)
}

// Copies and patches: a copy stores a patched chunk whole in its target,
// and a copy back into the repository that holds the base backup with
// patches keeps the base's entries as patches there (not as whole chunks
// the repository does not have). Every backup restores from both.
func TestPatchedChunksCopy(t *testing.T) {
	y := repo.Options{Location: filepath.Join(t.TempDir(), "y")}
	z := repo.Options{Location: filepath.Join(t.TempDir(), "z")}
	img := qemutest.NewImage(t, t.TempDir(), 8*MiB)
	qemutest.IO(t, img, "write -s "+backuptest.RandomFile(t, 8*MiB, 5)+" 0 8M")
	qemutest.Run(t, "qemu-img", "bitmap", "--add", img, "b0")
	var points []point
	take := func(ro repo.Options) *mover.BackupResult {
		t.Helper()
		res, err := backuptest.ExportBackup(t, ro, img, "offline-vm", "auto", "")
		if err != nil {
			t.Fatal(err)
		}
		points = append(points, point{res.ID, qemutest.RawCopy(t, img)})
		return res
	}
	open := func(ro repo.Options) *repo.Repo {
		t.Helper()
		r, err := ro.Open(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	take(y)
	qemutest.IO(t, img, "write -s "+backuptest.RandomFile(t, 4096, 6)+" 1M 4k")
	if x2 := take(y); x2.Disks[0].PatchedChunks != 1 {
		t.Fatalf("the incremental stored %d patches", x2.Disks[0].PatchedChunks)
	}
	if _, err := z.Init(t.Context(), repo.InitOptions{ChunkSize: 256 << 10}); err != nil {
		t.Fatal(err)
	}
	if _, err := repo.Copy(t.Context(), open(y), open(z), repo.CopyOptions{}); err != nil {
		t.Fatal(err)
	}
	// Backups go on in z (incremental from the copy), then come back to y.
	qemutest.IO(t, img, "write -s "+backuptest.RandomFile(t, 4096, 7)+" 5M 4k")
	w := take(z)
	if w.Mode != "incremental" {
		t.Fatalf("backup in the copy: %s", w.Mode)
	}
	if _, err := repo.Copy(t.Context(), open(z), open(y), repo.CopyOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, ro := range []repo.Options{y, z} {
		checkRestoresOf(t, ro, points, 3)
	}
}
