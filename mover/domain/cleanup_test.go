package domain_test

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nbdmover/nbdmover/internal/qemutest"
	"github.com/nbdmover/nbdmover/mover"
	"github.com/nbdmover/nbdmover/mover/domain"
	"github.com/nbdmover/nbdmover/pipeline"
	"github.com/nbdmover/nbdmover/repo"
)

// After a SIGKILLed backup, cleanup ends the job it left, deletes its
// uncommitted checkpoint and job directories, and removes old temporary
// files of the store (never new ones); a domain a backup is working on is
// left alone.
func TestCleanupAfterKill(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "repo")
	ro := repo.Options{Location: dir}
	dom := qemutest.NewDomain(t, false, qemutest.DiskSpec{Dev: "vda", Format: "qcow2", Size: 1024 * MiB})
	for off := 0; off < 512; off += 128 {
		dom.Write("vda", fmt.Sprintf("write -P 0x%02x %dM 128M", 0x30+off/128, off))
	}
	full := domainBackup(t, ro, dom, "full")
	slow := helperSpec{Options: mover.Options{Repo: ro, Init: true, Mode: "full", Compression: "zstd:4",
		Tuning: pipeline.Tuning{Readers: 1, Workers: 1, Uploads: 1}},
		Domain: domain.Options{Name: dom.Name, ScratchDir: filepath.Join(t.TempDir(), "scratch")}}
	cmd := runHelper(t, slow, dom)
	cmd.Process.Kill()
	cmd.Wait()
	if !dom.JobActive() || len(dom.Checkpoints()) != 2 {
		t.Fatalf("the kill left no job or checkpoint: job %v, checkpoints %v", dom.JobActive(), dom.Checkpoints())
	}
	old, fresh := filepath.Join(dir, "chunks", ".tmp-old"), filepath.Join(dir, "chunks", ".tmp-fresh")
	os.WriteFile(old, []byte("x"), 0o600)
	os.WriteFile(fresh, []byte("x"), 0o600)
	os.Chtimes(old, time.Now().Add(-2*time.Hour), time.Now().Add(-2*time.Hour))

	rep, err := domain.Cleanup(t.Context(), domain.CleanupOptions{Repo: ro, Domain: dom.Name,
		ScratchDir: slow.Domain.ScratchDir, Log: testLog(t)})
	if err != nil || len(rep.Domains) != 1 {
		t.Fatalf("cleanup: %+v %v", rep, err)
	}
	d := rep.Domains[0]
	t.Logf("%+v", d)
	if d.EndedJob == "" || len(d.DeletedCheckpoints) != 1 || len(d.RemovedDirs) != 2 || len(d.Problems) > 0 || rep.StoreTempFiles != 1 {
		t.Fatalf("cleanup did %+v, store temp files %d", d, rep.StoreTempFiles)
	}
	checkNoLeftovers(t, dom)
	if cps := dom.Checkpoints(); !slices.Equal(cps, []string{full.Checkpoint}) {
		t.Fatalf("checkpoints after cleanup: %v", cps)
	}
	if _, err := os.Stat(old); err == nil {
		t.Error("an old temporary file was left")
	}
	if _, err := os.Stat(fresh); err != nil {
		t.Error("a fresh temporary file (a write in progress) was removed")
	}
	// Nothing left: a second run does nothing.
	if rep, err := domain.Cleanup(t.Context(), domain.CleanupOptions{Repo: ro, Domain: dom.Name}); err != nil || len(rep.Domains) != 0 {
		t.Fatalf("second cleanup: %+v %v", rep, err)
	}

	// A backup in progress is left alone.
	cmd = runHelper(t, slow, dom)
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	rep, err = domain.Cleanup(t.Context(), domain.CleanupOptions{Repo: ro, Domain: dom.Name})
	if err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-exited:
		t.Fatalf("the helper's backup ended before the check (%v): the test needs a slower one", err)
	default:
	}
	if len(rep.Domains) != 1 || !strings.Contains(rep.Domains[0].Skipped, "working on it") || !dom.JobActive() {
		t.Fatalf("cleanup beside a running backup: %+v", rep)
	}
	cmd.Process.Signal(syscall.SIGTERM)
	<-exited
	checkNoLeftovers(t, dom)
}

// A freeze marker left by a run killed between freeze and thaw makes the
// next cleanup thaw the guest. (This domain has no guest agent, so it
// cannot have been frozen: the marker goes without a thaw. Freezing a
// real guest needs a guest OS with an agent, which these tests lack.)
func TestCleanupFreezeMarker(t *testing.T) {
	ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	dom := qemutest.NewDomain(t, false, qemutest.DiskSpec{Dev: "vda", Format: "qcow2", Size: 8 * MiB})
	marker := filepath.Join(mover.DefaultRunDir, "frozen", dom.Name)
	os.MkdirAll(filepath.Dir(marker), 0o700)
	os.WriteFile(marker, []byte("pid 1\n"), 0o600)
	rep, err := domain.Cleanup(t.Context(), domain.CleanupOptions{Repo: ro, Domain: dom.Name})
	if err != nil || len(rep.Domains) > 0 && len(rep.Domains[0].Problems) > 0 {
		t.Fatalf("cleanup: %+v %v", rep, err)
	}
	if _, err := os.Stat(marker); err == nil {
		t.Fatal("the freeze marker of a domain without a guest agent was kept")
	}
}
