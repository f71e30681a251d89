package domain_test

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nbdmover/nbdmover/internal/backuptest"
	"github.com/nbdmover/nbdmover/internal/qemutest"
	"github.com/nbdmover/nbdmover/mover"
	"github.com/nbdmover/nbdmover/mover/domain"
	"github.com/nbdmover/nbdmover/pipeline"
	"github.com/nbdmover/nbdmover/repo"
	"github.com/nbdmover/nbdmover/sink"
	"github.com/nbdmover/nbdmover/sink/sinktest"
)

// helperSpec is a backup for the helper process to run.
type helperSpec struct {
	Options mover.Options
	Domain  domain.Options
}

// TestMain doubles as a helper process: with NBDMOVER_HELPER_BACKUP set to
// a JSON helperSpec, the test binary runs that backup the way the command
// does (signals cancel it) and exits, so tests can signal or kill it.
func TestMain(m *testing.M) {
	if spec := os.Getenv("NBDMOVER_HELPER_BACKUP"); spec != "" {
		var o helperSpec
		if err := json.Unmarshal([]byte(spec), &o); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		_, err := mover.Backup(ctx, domain.New(o.Domain), o.Options)
		stop()
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

var quickRetry = sink.RetryPolicy{Attempts: 2, Base: time.Millisecond, Cap: time.Millisecond}

// threeDisks: two qcow2 disks and one raw disk (plus the fixture's cdrom).
func threeDisks() []qemutest.DiskSpec {
	return []qemutest.DiskSpec{{Dev: "vda", Format: "qcow2", Size: 96 * MiB}, {Dev: "vdb", Format: "qcow2", Size: 40*MiB + 512},
		{Dev: "vdc", Format: "raw", Size: 24 * MiB}}
}

// backupDomain backs the domain up.
func backupDomain(t *testing.T, ro repo.Options, o domain.Options, mode string) (*mover.BackupResult, error) {
	t.Helper()
	if o.ScratchDir == "" {
		o.ScratchDir = filepath.Join(t.TempDir(), "scratch")
	}
	return mover.Backup(t.Context(), domain.New(o), mover.Options{Repo: ro, Init: true, Mode: mode, Log: testLog(t)})
}

func domainBackup(t *testing.T, ro repo.Options, dom *qemutest.Domain, mode string) *mover.BackupResult {
	t.Helper()
	res, err := backupDomain(t, ro, domain.Options{Name: dom.Name}, mode)
	if err != nil {
		t.Fatal(err)
	}
	checkNoLeftovers(t, dom)
	return res
}

func checkNoLeftovers(t *testing.T, dom *qemutest.Domain) {
	t.Helper()
	backuptest.CheckNoLeftovers(t, dom, mover.DefaultRunDir)
}

var checkDomainRestores = backuptest.CheckRestores

func domainChain(t *testing.T, ro repo.Options) {
	dom := qemutest.NewDomain(t, false, threeDisks()...)
	dom.Write("vda", "write -P 0x5a 1M 20M", "write -P 0x5b 50M 3M")
	dom.Write("vdb", "write -P 0x11 0 1M", "write -P 0x12 40M 512")
	dom.Write("vdc", "write -P 0x21 2M 2M")
	var points []backuptest.Point

	full := domainBackup(t, ro, dom, "auto")
	if full.Mode != "full" || len(full.Disks) != 3 {
		t.Fatalf("full: %+v", full)
	}
	points = append(points, backuptest.Point{ID: full.ID, Refs: dom.Snapshot()})

	dom.Write("vda", "write -P 0x61 4M 64k", "write -z 10M 2M", "discard 50M 1M")
	dom.Write("vdb", "write -P 0x62 39M 1M")
	dom.Write("vdc", "write -P 0x63 0 4k")
	inc := domainBackup(t, ro, dom, "auto")
	byName := map[string]mover.DiskResult{}
	for _, d := range inc.Disks {
		byName[d.Name] = d
	}
	if inc.Mode != "incremental" || inc.Parent != full.ID || byName["vda"].Mode != "incremental" ||
		byName["vdb"].Mode != "incremental" || byName["vdc"].Mode != "full" {
		t.Fatalf("incremental: %+v", inc)
	}
	// Only the chunks the writes touched are read from the qcow2 disks,
	// and a sample of the clean ones that hold data, to check the bitmaps.
	vda, vdb := byName["vda"], byName["vdb"]
	if vda.BytesRead-vda.VerifiedBytes > 16*MiB || vdb.BytesRead-vdb.VerifiedBytes > 4*MiB {
		t.Errorf("incremental read too much: vda %d, vdb %d", vda.BytesRead-vda.VerifiedBytes, vdb.BytesRead-vdb.VerifiedBytes)
	}
	if vda.VerifiedChunks == 0 || inc.Verification == nil || inc.Verification.Outcome != "passed" ||
		inc.Verification.Chunks != vda.VerifiedChunks+vdb.VerifiedChunks {
		t.Errorf("the bitmaps were not checked: %+v %+v", inc.Verification, vda)
	}
	points = append(points, backuptest.Point{ID: inc.ID, Refs: dom.Snapshot()})

	dom.Write("vda", "write -P 0x71 95M 1M")
	dom.Write("vdb", "write -z 0 1M")
	inc2 := domainBackup(t, ro, dom, "incremental")
	if inc2.Mode != "incremental" || inc2.Parent != inc.ID {
		t.Fatalf("second incremental: %+v", inc2)
	}
	points = append(points, backuptest.Point{ID: inc2.ID, Refs: dom.Snapshot()})
	if cps := dom.Checkpoints(); len(cps) != 1 || cps[0] != inc2.Checkpoint {
		t.Fatalf("checkpoints: %v", cps)
	}
	checkDomainRestores(t, ro, dom.Name, points)
}

func TestDomainChainLocal(t *testing.T) {
	domainChain(t, repo.Options{Location: filepath.Join(t.TempDir(), "repo")})
}

func TestDomainChainS3(t *testing.T) {
	ep := sinktest.S3Endpoint(t)
	domainChain(t, repo.Options{Location: fmt.Sprintf("s3://domain-%08x", rand.Uint32()), S3Endpoint: ep})
}

// runHelper starts a backup in a helper process and returns it once the
// backup job is running on the domain.
func runHelper(t *testing.T, o helperSpec, dom *qemutest.Domain) *exec.Cmd {
	t.Helper()
	spec, _ := json.Marshal(o)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "NBDMOVER_HELPER_BACKUP="+string(spec))
	cmd.Stderr = t.Output()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(60 * time.Second)
	for !dom.JobActive() {
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			t.Fatal("the helper's backup job never started")
		}
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond) // let it read and store a little
	return cmd
}

func TestDomainInterrupted(t *testing.T) {
	ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	dom := qemutest.NewDomain(t, false, qemutest.DiskSpec{Dev: "vda", Format: "qcow2", Size: 1024 * MiB})
	for off := 0; off < 768; off += 128 {
		dom.Write("vda", fmt.Sprintf("write -P 0x%02x %dM 128M", 0x30+off/128, off))
	}
	full := domainBackup(t, ro, dom, "full")
	dom.Write("vda", "write -P 0x77 700M 64M", "write -P 0x78 100M 1M")
	refs := dom.Snapshot()

	// A slow backup (one reader, the slowest compression, everything
	// re-read) so that it is surely killed mid-way.
	slow := helperSpec{Options: mover.Options{Repo: ro, Init: true, Mode: "full", Compression: "zstd:4",
		Tuning: pipeline.Tuning{Readers: 1, Workers: 1, Uploads: 1}},
		Domain: domain.Options{Name: dom.Name, ScratchDir: filepath.Join(t.TempDir(), "scratch")}}

	t.Run("SIGTERM", func(t *testing.T) {
		cmd := runHelper(t, slow, dom)
		cmd.Process.Signal(syscall.SIGTERM)
		err := cmd.Wait()
		if err == nil {
			t.Fatal("the interrupted backup reported success")
		}
		// A clean stop: the job is ended and the uncommitted checkpoint
		// dropped by the process itself.
		checkNoLeftovers(t, dom)
		if cps := dom.Checkpoints(); len(cps) != 1 || cps[0] != full.Checkpoint {
			t.Fatalf("checkpoints after SIGTERM: %v", cps)
		}
	})
	t.Run("SIGKILL", func(t *testing.T) {
		cmd := runHelper(t, slow, dom)
		cmd.Process.Kill()
		cmd.Wait()
		if !dom.JobActive() || len(dom.Checkpoints()) != 2 {
			t.Fatalf("expected a killed run to leave its job and checkpoint behind (job %v, checkpoints %v)", dom.JobActive(), dom.Checkpoints())
		}
	})
	ms, err := backuptest.List(t, ro, dom.Name)
	if err != nil || len(ms) != 1 {
		t.Fatalf("interrupted backups were committed: %d backups, %v", len(ms), err)
	}
	// The next run cleans up after the killed one and is incremental from
	// the last committed backup: the killed run's changes are not lost.
	next := domainBackup(t, ro, dom, "auto")
	if next.Mode != "incremental" || next.Parent != full.ID {
		t.Fatalf("after the kill: %+v", next)
	}
	checkDomainRestores(t, ro, dom.Name, []backuptest.Point{{ID: next.ID, Refs: refs}})
}

func TestDomainCheckpointLost(t *testing.T) {
	ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	dom := qemutest.NewDomain(t, false, qemutest.DiskSpec{Dev: "vda", Format: "qcow2", Size: 32 * MiB})
	dom.Write("vda", "write -P 0x41 0 8M")
	full := domainBackup(t, ro, dom, "auto")
	dom.Write("vda", "write -P 0x42 20M 1M")
	// libvirt forgets the checkpoint; the bitmap stays in the image.
	qemutest.Virsh(t, "checkpoint-delete", dom.Name, full.Checkpoint, "--metadata")
	refs := dom.Snapshot()
	inc := domainBackup(t, ro, dom, "incremental")
	if inc.Mode != "incremental" || inc.Disks[0].BytesRead-inc.Disks[0].VerifiedBytes > 4*MiB {
		t.Fatalf("after redefining the checkpoint: %+v", inc)
	}
	checkDomainRestores(t, ro, dom.Name, []backuptest.Point{{ID: inc.ID, Refs: refs}})
}

func TestDomainBitmapRemoved(t *testing.T) {
	ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	dom := qemutest.NewDomain(t, true, qemutest.DiskSpec{Dev: "vda", Format: "qcow2", Size: 32 * MiB})
	dom.Write("vda", "write -P 0x41 0 8M")
	full := domainBackup(t, ro, dom, "auto")
	// Stop the domain, remove the checkpoint's bitmap from the image behind
	// libvirt's back, start it again.
	qemutest.Virsh(t, "destroy", dom.Name)
	qemutest.Run(t, "qemu-img", "bitmap", "--remove", dom.Path("vda"), full.Checkpoint)
	qemutest.Virsh(t, "start", dom.Name)
	dom.Write("vda", "write -P 0x43 24M 1M")
	refs := dom.Snapshot()
	if _, err := backupDomain(t, ro, domain.Options{Name: dom.Name}, "incremental"); err == nil {
		t.Fatal("a forced incremental without its bitmap succeeded")
	}
	checkNoLeftovers(t, dom)
	next := domainBackup(t, ro, dom, "auto")
	if next.Mode != "full" || next.Fallback == "" {
		t.Fatalf("without the bitmap: %+v", next)
	}
	t.Log("fallback:", next.Fallback)
	checkDomainRestores(t, ro, dom.Name, []backuptest.Point{{ID: next.ID, Refs: refs}})
	after := domainBackup(t, ro, dom, "auto") // the new chain works
	if after.Mode != "incremental" {
		t.Fatalf("after the fallback: %+v", after)
	}
}

func TestDomainOutcomes(t *testing.T) {
	ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	scratch := filepath.Join(t.TempDir(), "scratch")
	backup := func(o domain.Options, mode string) (*mover.BackupResult, error) {
		o.ScratchDir = scratch
		return backupDomain(t, ro, o, mode)
	}
	expect := func(t *testing.T, err error, says ...string) {
		t.Helper()
		if err == nil {
			t.Fatal("succeeded")
		}
		t.Log(err)
		for _, s := range says {
			if !strings.Contains(err.Error(), s) {
				t.Errorf("error does not say %q", s)
			}
		}
	}
	qemutest.NeedLibvirt(t)

	t.Run("unknown domain", func(t *testing.T) {
		_, err := backup(domain.Options{Name: "no-such-domain-x"}, "")
		expect(t, err, "no-such-domain-x", "not found")
	})
	t.Run("invalid name", func(t *testing.T) {
		_, err := backup(domain.Options{Name: "../etc"}, "")
		expect(t, err, "../etc")
	})
	t.Run("shut off", func(t *testing.T) {
		dom := qemutest.NewDomain(t, true, qemutest.DiskSpec{Dev: "vda", Format: "qcow2", Size: 8 * MiB})
		qemutest.Virsh(t, "destroy", dom.Name)
		_, err := backup(domain.Options{Name: dom.Name}, "")
		expect(t, err, dom.Name, "shut off", "--nbd")
	})
	dom := qemutest.NewDomain(t, false, qemutest.DiskSpec{Dev: "vda", Format: "raw", Size: 8 * MiB},
		qemutest.DiskSpec{Dev: "vdb", Format: "raw", Size: 4 * MiB})
	dom.Write("vda", "write -P 0x55 1M 1M")
	t.Run("only raw disks", func(t *testing.T) {
		for i := range 2 {
			res, err := backup(domain.Options{Name: dom.Name}, "")
			if err != nil || res.Mode != "full" {
				t.Fatalf("backup %d: %+v %v", i, res, err)
			}
			if cps := dom.Checkpoints(); len(cps) != 0 {
				t.Fatalf("checkpoints on a raw-only domain: %v", cps)
			}
		}
		_, err := backup(domain.Options{Name: dom.Name}, "incremental")
		expect(t, err, "incremental")
	})
	t.Run("unknown disk", func(t *testing.T) {
		_, err := backup(domain.Options{Name: dom.Name, Disks: []string{"vdz"}}, "")
		expect(t, err, "vdz", "vda")
	})
	t.Run("quiesce without an agent", func(t *testing.T) {
		_, err := backup(domain.Options{Name: dom.Name, Quiesce: true}, "")
		expect(t, err, "guest agent", "--quiesce-optional")
		checkNoLeftovers(t, dom)
		res, err := backup(domain.Options{Name: dom.Name, QuiesceOptional: true}, "")
		if err != nil || res.Consistency != "crash-consistent" {
			t.Fatalf("%+v %v", res, err)
		}
	})
	t.Run("unreachable repository", func(t *testing.T) {
		_, err := backupDomain(t, repo.Options{Location: "s3://bkt", S3Endpoint: "http://127.0.0.1:9", Retry: quickRetry},
			domain.Options{Name: dom.Name, ScratchDir: scratch}, "")
		expect(t, err, "127.0.0.1:9")
		checkNoLeftovers(t, dom)
	})
}

// Checkpoints named before checkpoints named their repository
// (nbdmover-<backup id>): one is the repository's that holds that backup,
// so its next backup is incremental from it and then deletes it; one no
// backup of the repository names is another's, and left alone.
func TestLegacyCheckpointNames(t *testing.T) {
	legacyBackup := func(t *testing.T, ro repo.Options, dom *qemutest.Domain, mode string) *mover.BackupResult {
		t.Helper()
		res, err := backupDomain(t, ro, domain.Options{Name: dom.Name}, mode)
		if err != nil {
			t.Fatal(err)
		}
		return res
	}
	dom := qemutest.NewDomain(t, false, qemutest.DiskSpec{Dev: "vda", Format: "qcow2", Size: 16 * MiB})
	dom.Write("vda", "write -P 0x11 0 4M")
	a := repo.Options{Location: filepath.Join(t.TempDir(), "a")}
	b := repo.Options{Location: filepath.Join(t.TempDir(), "b")}
	restore := domain.NameCheckpointsAsBefore()
	fullA := legacyBackup(t, a, dom, "full")
	dom.Write("vda", "write -P 0x12 4M 1M")
	fullB := legacyBackup(t, b, dom, "full")
	restore()
	if fullA.Checkpoint != "nbdmover-"+fullA.ID || !slices.Equal(sorted(dom.Checkpoints()), sorted([]string{fullA.Checkpoint, fullB.Checkpoint})) {
		t.Fatalf("old-style checkpoints: %v", dom.Checkpoints())
	}
	dom.Write("vda", "write -P 0x13 8M 1M")
	inc := legacyBackup(t, a, dom, "incremental")
	if inc.Mode != "incremental" || inc.Parent != fullA.ID {
		t.Fatalf("the incremental from an old-style checkpoint: %+v", inc)
	}
	// In any order: virsh lists them by name, and the new one's name
	// starts with the repository's random id.
	if cps := dom.Checkpoints(); !slices.Equal(sorted(cps), sorted([]string{fullB.Checkpoint, inc.Checkpoint})) {
		t.Fatalf("checkpoints after the incremental: %v (want %s kept, %s gone)", cps, fullB.Checkpoint, fullA.Checkpoint)
	}
	refs := dom.Snapshot()
	dom.Write("vda", "write -P 0x14 12M 1M")
	incB := legacyBackup(t, b, dom, "incremental")
	if incB.Parent != fullB.ID {
		t.Fatalf("B's incremental: %+v", incB)
	}
	checkDomainRestores(t, a, dom.Name, []backuptest.Point{{ID: inc.ID, Refs: refs}})
}

func sorted(s []string) []string { return slices.Sorted(slices.Values(s)) }
