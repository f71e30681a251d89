package restore_test

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nbdmover/nbdmover/internal/backuptest"
	"github.com/nbdmover/nbdmover/internal/qemutest"
	"github.com/nbdmover/nbdmover/mover"
	"github.com/nbdmover/nbdmover/repo"
	"github.com/nbdmover/nbdmover/restore"
)

// backupImage takes a full backup of a qcow2 image served by qemu-nbd as
// domain offline-vm, disk vda, in 256 KiB chunks.
func backupImage(t *testing.T, ro repo.Options, img string) *mover.BackupResult {
	t.Helper()
	srv := qemutest.Serve(t, img, "-r")
	defer srv.Kill()
	res, err := mover.Backup(t.Context(), mover.NewNBDExport(mover.NBDOptions{URI: srv.URI, Name: "offline-vm", Disk: "vda"}),
		mover.Options{Repo: ro, Mode: "full", ChunkSize: 256 << 10, Log: backuptest.Log(t)})
	if err != nil {
		t.Fatal(err)
	}
	return res
}

func listAll(t *testing.T, ro repo.Options) ([]*repo.Manifest, error) {
	r, err := ro.Open(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	return r.Backups(t.Context(), "")
}

// Damaged chunks, indexes and manifests are reported by name, and restore
// refuses them and leaves no output behind.
func TestDamage(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "repo")
	ro := repo.Options{Location: dir}
	img := backuptest.Image(t, 37*backuptest.MiB+3*512)
	res := backupImage(t, ro, img)

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
		r, err := ro.Open(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		_, err = r.Verify(t.Context(), repo.VerifyOptions{ReadData: readData}, func(p repo.Problem) { found[p.Object] = p.Problem })
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
	_, _, err := restore.Restore(t.Context(), restore.Options{Repo: ro, Domain: "offline-vm", Disk: "vda", Output: out})
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
	_, _, err = restore.Restore(t.Context(), restore.Options{Repo: ro, Domain: "offline-vm", Disk: "vda", Output: out})
	if !errors.Is(err, repo.ErrBadIndex) || !strings.Contains(err.Error(), "vda.index") {
		t.Fatalf("truncated index: %v", err)
	}
	os.Truncate(filepath.Join(bdir, "manifest.json"), 50)
	if _, err := listAll(t, ro); err == nil || !strings.Contains(err.Error(), "manifest.json") {
		t.Fatalf("truncated manifest: %v", err)
	}
	if found := verify(false); !strings.Contains(found["backups/offline-vm/"+res.ID+"/manifest.json"], "damaged") {
		t.Errorf("verify of a truncated manifest: %v", found)
	}
}

func TestRestoreRefusesToOverwrite(t *testing.T) {
	ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	img := backuptest.Image(t, 24*backuptest.MiB)
	backupImage(t, ro, img)
	out := filepath.Join(t.TempDir(), "existing.raw")
	os.WriteFile(out, []byte("precious"), 0o600)
	for _, format := range []string{"raw", "qcow2"} {
		_, _, err := restore.Restore(t.Context(), restore.Options{Repo: ro, Domain: "offline-vm", Disk: "vda", Output: out, Format: format})
		if err == nil || !strings.Contains(err.Error(), "exists") {
			t.Fatalf("%s: %v", format, err)
		}
	}
	if b, _ := os.ReadFile(out); string(b) != "precious" {
		t.Fatal("restore overwrote an existing file")
	}
	// Without --disk every disk goes into the directory.
	dir := filepath.Join(t.TempDir(), "all")
	_, disks, err := restore.Restore(t.Context(), restore.Options{Repo: ro, Domain: "offline-vm", Output: dir, Format: "qcow2"})
	if err != nil || len(disks) != 1 || disks[0].Path != filepath.Join(dir, "vda.qcow2") {
		t.Fatalf("%+v %v", disks, err)
	}
	qemutest.Compare(t, img, "qcow2", disks[0].Path, "qcow2")
}
