package domain_test

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/nbdmover/nbdmover/internal/backuptest"
	"github.com/nbdmover/nbdmover/internal/qemutest"
	"github.com/nbdmover/nbdmover/mover"
	"github.com/nbdmover/nbdmover/mover/domain"
	"github.com/nbdmover/nbdmover/mover/nbd"
	"github.com/nbdmover/nbdmover/repo"
	"libvirt.org/go/libvirt"
)

// A failed BackupBegin that is not about bitmaps (here: --quiesce without
// a guest agent) fails the run and keeps the chain: the next backup is
// incremental from the same checkpoint.
func TestFailedBeginKeepsChain(t *testing.T) {
	ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	dom := qemutest.NewDomain(t, false, qemutest.DiskSpec{Dev: "vda", Format: "qcow2", Size: 16 * MiB})
	dom.Write("vda", "write -P 0x41 0 4M")
	full := domainBackup(t, ro, dom, "auto")
	dom.Write("vda", "write -P 0x42 1M 64k")
	_, err := backupDomain(t, ro, domain.Options{Name: dom.Name, Quiesce: true}, "auto")
	if err == nil || !strings.Contains(err.Error(), "guest agent") {
		t.Fatalf("quiesce without an agent: %v", err)
	}
	checkNoLeftovers(t, dom)
	if cps := dom.Checkpoints(); !slices.Equal(cps, []string{full.Checkpoint}) {
		t.Fatalf("the failed run changed the chain: checkpoints %v", cps)
	}
	if inc := domainBackup(t, ro, dom, "auto"); inc.Mode != "incremental" || inc.Parent != full.ID {
		t.Fatalf("after the failed run: %+v", inc)
	}
}

// A backup job nbdmover did not start (here: virsh backup-begin) is never
// aborted: the backup refuses, names the job and how to end it.
func TestForeignBackupJob(t *testing.T) {
	ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	dom := qemutest.NewDomain(t, false, qemutest.DiskSpec{Dev: "vda", Format: "qcow2", Size: 16 * MiB})
	dom.Write("vda", "write -P 0x41 0 4M")
	dir := t.TempDir()
	os.Chmod(dir, 0o777)
	sock := filepath.Join(dir, "foreign.sock")
	xml := filepath.Join(dir, "backup.xml")
	os.WriteFile(xml, []byte(`<domainbackup mode='pull'><server transport='unix' socket='`+sock+`'/>`+
		`<disks><disk name='vda' backup='yes' type='file'><scratch file='`+filepath.Join(dir, "vda.scratch")+`'/></disk></disks></domainbackup>`), 0o644)
	qemutest.Virsh(t, "backup-begin", dom.Name, xml)
	defer qemutest.Virsh(t, "domjobabort", dom.Name)
	_, err := backupDomain(t, ro, domain.Options{Name: dom.Name}, "auto")
	if err == nil || !strings.Contains(err.Error(), "did not start") || !strings.Contains(err.Error(), sock) ||
		!strings.Contains(err.Error(), "virsh domjobabort "+dom.Name) {
		t.Fatalf("backup over a foreign job: %v", err)
	}
	if !dom.JobActive() {
		t.Fatal("the foreign backup job was ended")
	}
}

// Stale job directories are matched exactly: backing up a domain never
// removes those of a domain whose name it prefixes.
func TestJobDirsMatchExactly(t *testing.T) {
	ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	dom := qemutest.NewDomain(t, false, qemutest.DiskSpec{Dev: "vda", Format: "qcow2", Size: 8 * MiB})
	other := filepath.Join(mover.DefaultRunDir, "job-"+dom.Name+"-replica-20261128T050058.293Z")
	if err := os.MkdirAll(other, 0o700); err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(other)
	stale := filepath.Join(mover.DefaultRunDir, "job-"+dom.Name+"-20261128T050058.293Z")
	os.MkdirAll(stale, 0o700)
	domainBackup(t, ro, dom, "auto")
	if _, err := os.Stat(other); err != nil {
		t.Fatalf("the backup of %s removed %s: %v", dom.Name, other, err)
	}
	if _, err := os.Stat(stale); err == nil {
		t.Fatalf("its own stale directory %s was left", stale)
	}
}

// A checkpoint deletion that fails for any reason but a missing bitmap
// (here a state lock timeout, injected through a seam: real libvirt gives
// it only under contention a test cannot stage) leaves the checkpoint
// whole, metadata and bitmap, for a later run to delete; it never leaves a
// recording bitmap in the image without the metadata that names it.
func TestCheckpointDeleteFailureKeepsMetadata(t *testing.T) {
	ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	dom := qemutest.NewDomain(t, false, qemutest.DiskSpec{Dev: "vda", Format: "qcow2", Size: 16 * MiB})
	dom.Write("vda", "write -P 0x41 0 4M")
	full := domainBackup(t, ro, dom, "auto")
	old := full.Checkpoint
	dom.Write("vda", "write -P 0x42 1M 64k")
	restoreHook := domain.SetDeleteCheckpointHook(func(name string) error {
		return libvirt.Error{Code: libvirt.ERR_OPERATION_TIMEOUT, Domain: libvirt.FROM_QEMU,
			Message: "Timed out during operation: cannot acquire state change lock"}
	})
	inc, err := backupDomain(t, ro, domain.Options{Name: dom.Name}, "auto")
	restoreHook()
	if err != nil || inc.Mode != "incremental" {
		t.Fatalf("incremental: %+v %v", inc, err)
	}
	if cps := dom.Checkpoints(); !slices.Contains(cps, old) || !slices.Contains(dom.Bitmaps("vda"), old) {
		t.Fatalf("checkpoints %v, bitmaps %v: the old checkpoint must stay whole", cps, dom.Bitmaps("vda"))
	}
	next := domainBackup(t, ro, dom, "auto")
	if bm := dom.Bitmaps("vda"); len(bm) != 1 || bm[0] != next.Checkpoint {
		t.Fatalf("bitmaps after the next run: %v", bm)
	}
}

// A parent index whose chunk size is not the repository's (a config
// rewritten behind nbdmover's back) is a clear error, not a panic, and
// nothing is committed.
func TestParentChunkSizeDiffers(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "repo")
	ro := repo.Options{Location: dir}
	img := qemutest.NewImage(t, t.TempDir(), 8*MiB)
	qemutest.Run(t, "qemu-img", "bitmap", "--add", img, "b0")
	qemutest.IO(t, img, "write -P 0x61 0 3M")
	srv := qemutest.Serve(t, img, "-r", "-B", "b0")
	backup := func() (*mover.BackupResult, error) {
		return mover.Backup(t.Context(), nbd.New(nbd.Options{URI: srv.URI, Name: "vm", Bitmap: "b0"}),
			mover.Options{Repo: ro, Init: true, ChunkSize: 512 << 10, RunDir: t.TempDir(), Log: testLog(t)})
	}
	if _, err := backup(); err != nil {
		t.Fatal(err)
	}
	cfg, _ := os.ReadFile(filepath.Join(dir, "config"))
	os.WriteFile(filepath.Join(dir, "config"), []byte(strings.Replace(string(cfg), `"chunk_size": 524288`, `"chunk_size": 262144`, 1)), 0o600)
	_, err := backup()
	if err == nil || !strings.Contains(err.Error(), "chunk") || !strings.Contains(err.Error(), "524288") {
		t.Fatalf("incremental over a parent with other chunks: %v", err)
	}
	if ms, _ := backuptest.List(t, ro, "vm"); len(ms) != 1 {
		t.Fatalf("%d backups committed", len(ms))
	}
}

// One unreadable manifest (damaged, or written by a newer nbdmover) does
// not stop backups of its domain: it is skipped, and the next backup's id
// still sorts after it.
func TestUnreadableManifestSkipped(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "repo")
	ro := repo.Options{Location: dir}
	img := backuptest.Image(t, 24*MiB)
	first, err := backuptest.ExportBackup(t, ro, img, "vm", "auto", "")
	if err != nil {
		t.Fatal(err)
	}
	second, err := backuptest.ExportBackup(t, ro, img, "vm", "auto", "")
	if err != nil {
		t.Fatal(err)
	}
	for _, damage := range []struct {
		content string
		asBlob  bool
	}{{`{"version": 3, "id": "` + second.ID + `"}`, true}, {`NBMC damaged`, false}} {
		backuptest.PutManifest(t, dir, "vm", second.ID, []byte(damage.content), damage.asBlob)
		qemutest.IO(t, img, "write -P 0x44 1M 64k")
		res, err := backuptest.ExportBackup(t, ro, img, "vm", "auto", "")
		if err != nil || res.Parent != first.ID || res.ID <= second.ID {
			t.Fatalf("backup next to %q: %+v %v", damage.content, res, err)
		}
		checkRestore(t, ro, "vm", img)
		r, _ := ro.Open(t.Context())
		ms, skipped, err := r.Backups(t.Context(), "vm")
		if err != nil || len(ms) != 2 || len(skipped) != 1 || !strings.Contains(skipped[0].Object, second.ID) {
			t.Fatalf("list: %d backups, skipped %+v, %v", len(ms), skipped, err)
		}
		t.Log(skipped[0].Problem)
		os.Remove(filepath.Join(dir, filepath.FromSlash(repo.ManifestKey("vm", res.ID))))
	}
}

// A pre-hook that fails stops the backup of a running domain before
// libvirt is asked for anything: no checkpoint, no job, no scratch; the
// next backup is a full one as if nothing had happened.
func TestPreHookFailsBeforeTheJob(t *testing.T) {
	ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	dom := qemutest.NewDomain(t, false, qemutest.DiskSpec{Dev: "vda", Format: "qcow2", Size: 16 * MiB})
	dom.Write("vda", "write -P 0x41 0 4M")
	scratch := filepath.Join(t.TempDir(), "scratch")
	_, err := mover.Backup(t.Context(), domain.New(domain.Options{Name: dom.Name, ScratchDir: scratch}),
		mover.Options{Repo: ro, Init: true, Hooks: mover.Hooks{Pre: "exit 3"}, Log: testLog(t)})
	if err == nil || !strings.Contains(err.Error(), "pre-hook failed") {
		t.Fatalf("a failing pre-hook: %v", err)
	}
	checkNoLeftovers(t, dom)
	if cps := dom.Checkpoints(); len(cps) != 0 {
		t.Fatalf("checkpoints after a failed pre-hook: %v", cps)
	}
	if left, _ := os.ReadDir(scratch); len(left) != 0 {
		t.Fatalf("scratch files after a failed pre-hook: %v", left)
	}
	if full := domainBackup(t, ro, dom, "auto"); full.Mode != "full" {
		t.Fatalf("the backup after: %+v", full)
	}
}
