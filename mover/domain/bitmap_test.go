package domain_test

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/nbdmover/nbdmover/internal/backuptest"
	"github.com/nbdmover/nbdmover/internal/qemutest"
	"github.com/nbdmover/nbdmover/mover"
	"github.com/nbdmover/nbdmover/mover/domain"
	"github.com/nbdmover/nbdmover/repo"
	"libvirt.org/go/libvirtxml"
)

// Tests of the ways a dirty bitmap can lie, each against the real peer:
// the result is a correct backup (auto) or a clear failure (incremental),
// never a wrong restore.

// checkRestore restores the newest backup of name and compares it with img.
func checkRestore(t *testing.T, ro repo.Options, name, img string) {
	t.Helper()
	backuptest.CheckRestores(t, ro, name, []backuptest.Point{{ID: latestID(t, ro, name), Refs: map[string]string{"vda": qemutest.RawCopy(t, img)}}})
}

const MiB = backuptest.MiB

var testLog = backuptest.Log

func latestID(t *testing.T, ro repo.Options, name string) string {
	t.Helper()
	ms, err := backuptest.List(t, ro, name)
	if err != nil || len(ms) == 0 {
		t.Fatalf("no backups of %s: %v", name, err)
	}
	return ms[len(ms)-1].ID
}

func expectLie(t *testing.T, err error, says ...string) {
	t.Helper()
	if err == nil {
		t.Fatal("a forced incremental over a lying bitmap succeeded")
	}
	t.Log(err)
	for _, s := range says {
		if !strings.Contains(err.Error(), s) {
			t.Errorf("error does not say %q", s)
		}
	}
}

// A persistent bitmap removed and added again (empty) under the same name:
// the incremental would copy the parent's digests for everything written
// before. It marks fewer bytes than it did at the last backup, which a
// bitmap that is never cleared cannot do.
func TestBitmapRecreatedEmpty(t *testing.T) {
	ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	img := backuptest.Image(t, 24*MiB)
	if res, err := backuptest.ExportBackup(t, ro, img, "vm", "auto", ""); err != nil || res.Disks[0].DirtyBytes == 0 {
		t.Fatalf("full: %+v %v", res, err)
	}
	qemutest.IO(t, img, "write -P 0x71 1M 2M")
	qemutest.Run(t, "qemu-img", "bitmap", "--remove", img, "b0")
	qemutest.Run(t, "qemu-img", "bitmap", "--add", img, "b0")
	qemutest.IO(t, img, "write -P 0x72 20M 256k")

	_, err := backuptest.ExportBackup(t, ro, img, "vm", "incremental", "")
	expectLie(t, err, "vda", "cleared or re-created", "nothing was committed")
	res, err := backuptest.ExportBackup(t, ro, img, "vm", "auto", "")
	if err != nil || res.Mode != "full" || !strings.Contains(res.Fallback, "cleared or re-created") ||
		res.Verification == nil || res.Verification.Outcome != "mismatch" {
		t.Fatalf("auto over a re-created bitmap: %+v %v", res, err)
	}
	checkRestore(t, ro, "vm", img)
	// The next incremental trusts the new bitmap from this full on.
	qemutest.IO(t, img, "write -P 0x73 5M 64k")
	if res, err := backuptest.ExportBackup(t, ro, img, "vm", "incremental", ""); err != nil || res.Verification.Outcome != "passed" {
		t.Fatalf("after the full: %+v %v", res, err)
	}
	checkRestore(t, ro, "vm", img)
}

// The same --name pointed at another export with a bitmap of the same
// name, which marks more than the first one did: only reading clean
// chunks shows that they are not the parent's.
func TestBitmapExportSwapped(t *testing.T) {
	ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	a := qemutest.NewImage(t, t.TempDir(), 16*MiB)
	qemutest.Run(t, "qemu-img", "bitmap", "--add", a, "b0")
	qemutest.IO(t, a, "write -P 0x11 0 4M")
	b := qemutest.NewImage(t, t.TempDir(), 16*MiB)
	qemutest.IO(t, b, "write -P 0x22 0 4M")
	qemutest.Run(t, "qemu-img", "bitmap", "--add", b, "b0")
	qemutest.IO(t, b, "write -P 0x23 8M 6M")
	if _, err := backuptest.ExportBackup(t, ro, a, "vm", "auto", ""); err != nil {
		t.Fatal(err)
	}
	_, err := backuptest.ExportBackup(t, ro, b, "vm", "incremental", "")
	expectLie(t, err, "disk vda", "chunk", "missed a change")
	res, err := backuptest.ExportBackup(t, ro, b, "vm", "auto", "")
	if err != nil || res.Mode != "full" || !strings.Contains(res.Fallback, "missed a change") {
		t.Fatalf("auto over a swapped export: %+v %v", res, err)
	}
	t.Log("fallback:", res.Fallback)
	checkRestore(t, ro, "vm", b)
}

// A discard the bitmap did not record (bitmap disabled around it): the
// clean chunk is unallocated now but held data at the parent, so it is
// stored as zero.
func TestBitmapMissedDiscard(t *testing.T) {
	ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	img := qemutest.NewImage(t, t.TempDir(), 16*MiB)
	qemutest.IO(t, img, "write -P 0x61 0 8M") // before the bitmap: clean
	qemutest.Run(t, "qemu-img", "bitmap", "--add", img, "b0")
	if _, err := backuptest.ExportBackup(t, ro, img, "vm", "auto", ""); err != nil {
		t.Fatal(err)
	}
	qemutest.Run(t, "qemu-img", "bitmap", "--disable", img, "b0")
	qemutest.IO(t, img, "discard 1M 1M")
	qemutest.Run(t, "qemu-img", "bitmap", "--enable", img, "b0")
	res, err := backuptest.ExportBackup(t, ro, img, "vm", "incremental", "")
	if err != nil || res.Mode != "incremental" || res.Disks[0].ZeroedChunks != 4 || res.Verification.Outcome != "passed" {
		t.Fatalf("incremental over a missed discard: %+v %v", res, err)
	}
	checkRestore(t, ro, "vm", img)
}

// libvirt's job XML names no bitmap for a disk it exports incrementally
// (a test seam: libvirt does not do this on its own): without a dirty
// context every chunk would keep the parent's digest.
func TestBitmapNotExported(t *testing.T) {
	ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	dom := qemutest.NewDomain(t, false, qemutest.DiskSpec{Dev: "vda", Format: "qcow2", Size: 32 * MiB},
		qemutest.DiskSpec{Dev: "vdb", Format: "qcow2", Size: 16 * MiB})
	dom.Write("vda", "write -P 0x41 0 8M")
	dom.Write("vdb", "write -P 0x42 0 1M")
	domainBackup(t, ro, dom, "auto")
	dom.Write("vda", "write -P 0x43 2M 1M")
	dom.Write("vdb", "write -P 0x44 0 64k")
	refs := dom.Snapshot()
	defer domain.SetExportsHook(func(ex map[string]libvirtxml.DomainBackupPullDisk) {
		d := ex["vda"]
		d.ExportBitmap = ""
		ex["vda"] = d
	})()

	_, err := backupDomain(t, ro, domain.Options{Name: dom.Name}, "incremental")
	expectLie(t, err, "vda", "without a dirty bitmap")
	checkNoLeftovers(t, dom)
	res := domainBackup(t, ro, dom, "auto")
	byName := map[string]mover.DiskResult{}
	for _, d := range res.Disks {
		byName[d.Name] = d
	}
	if res.Mode != "incremental" || byName["vda"].Mode != "full" || byName["vdb"].Mode != "incremental" ||
		!strings.Contains(res.Fallback, "vda is exported without a dirty bitmap") {
		t.Fatalf("auto without vda's bitmap: %+v", res)
	}
	checkDomainRestores(t, ro, dom.Name, []backuptest.Point{{ID: res.ID, Refs: refs}})
}

// QEMU's own bitmap of a running domain misses writes (disabled through
// QMP around them, as a bug or a tool behind libvirt's back could): the
// sample of clean chunks catches it, and the backup is a correct full.
func TestBitmapLiesInRunningDomain(t *testing.T) {
	ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	dom := qemutest.NewDomain(t, false, qemutest.DiskSpec{Dev: "vda", Format: "qcow2", Size: 16 * MiB})
	dom.Write("vda", "write -P 0x51 0 4M")
	full := domainBackup(t, ro, dom, "auto")
	dom.BehindBitmap("vda", full.Checkpoint, func() {
		dom.Write("vda", "write -P 0x52 0 4M") // every chunk that holds data, unseen
	})
	dom.Write("vda", "write -P 0x53 8M 64k") // seen
	refs := dom.Snapshot()

	_, err := backupDomain(t, ro, domain.Options{Name: dom.Name}, "incremental")
	expectLie(t, err, "disk vda", "missed a change")
	checkNoLeftovers(t, dom)
	res := domainBackup(t, ro, dom, "auto")
	if res.Mode != "full" || res.Verification == nil || res.Verification.Outcome != "mismatch" {
		t.Fatalf("auto over a lying bitmap: %+v", res)
	}
	checkDomainRestores(t, ro, dom.Name, []backuptest.Point{{ID: res.ID, Refs: refs}})
	if after := domainBackup(t, ro, dom, "auto"); after.Mode != "incremental" || after.Verification.Outcome != "passed" {
		t.Fatalf("after the full: %+v", after)
	}
}
