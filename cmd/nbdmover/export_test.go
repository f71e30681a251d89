package main

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/nbdmover/nbdmover/internal/backuptest"
	"github.com/nbdmover/nbdmover/internal/qemutest"
)

// exportDoc is what export --json prints once it listens.
type exportDoc struct {
	Version int    `json:"version"`
	Domain  string `json:"domain"`
	ID      string `json:"id"`
	Address string `json:"address"`
	Disks   []struct {
		Name string `json:"name"`
		Size int64  `json:"size"`
		URI  string `json:"uri"`
	} `json:"disks"`
}

// startExport runs nbdmover export --json in the background and returns
// it once it listens, with its document.
func startExport(t *testing.T, args ...string) (*proc, exportDoc) {
	t.Helper()
	p := start(t, t.TempDir(), append([]string{"export", "--json"}, args...)...)
	var doc exportDoc
	waitFor(t, "the export's document", func() bool {
		out, _ := p.output()
		if !p.running() {
			_, stderr := p.output()
			t.Fatalf("export ended: %s", stderr)
		}
		return json.Unmarshal([]byte(out), &doc) == nil
	})
	return p, doc
}

// An export from the command line: every client reads the backup point;
// list shows the backup exported; a gc while it runs deletes nothing
// (even of a backup forgotten meanwhile: it fails, naming the export,
// rather than make backups wait behind it); interrupted, it ends with
// status 0, its socket and lock gone, and gc then deletes.
func TestExportCommand(t *testing.T) {
	qemutest.Need(t, "nbdcopy", "nbdinfo")
	repoDir := filepath.Join(t.TempDir(), "repo")
	img := backuptest.Image(t, 24<<20)
	ref := qemutest.RawCopy(t, img)
	srv := qemutest.Serve(t, img, "-r")
	if _, stderr, code := nbdmover(t, "backup", "--init", "--repo", repoDir, "--nbd", srv.URI, "--name", "vm", "--disk", "vda"); code != 0 {
		t.Fatalf("backup: %s", stderr)
	}
	srv.Kill()
	sock := filepath.Join(t.TempDir(), "export.sock")
	p, doc := startExport(t, "--repo", repoDir, "--domain", "vm", "--listen", "unix://"+sock, "--cache-size", "32MiB")
	if doc.Version != 1 || doc.Domain != "vm" || doc.Address != sock || len(doc.Disks) != 1 || doc.Disks[0].Name != "vda" ||
		doc.Disks[0].URI != "nbd+unix:///vda?socket="+sock {
		t.Fatalf("export document %+v", doc)
	}
	if st, err := os.Stat(sock); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("socket %v %v, want mode 0600", st, err)
	}
	copied := func() {
		t.Helper()
		dst := filepath.Join(t.TempDir(), "copy.raw")
		if out, err := exec.Command("nbdcopy", doc.Disks[0].URI, dst).CombinedOutput(); err != nil {
			t.Fatalf("nbdcopy: %v\n%s", err, out)
		}
		qemutest.Compare(t, ref, "raw", dst, "raw")
	}
	copied()

	out, _, _ := nbdmover(t, "list", "--repo", repoDir, "--json")
	var list struct {
		Backups []struct {
			ID         string   `json:"id"`
			ExportedBy []string `json:"exported_by"`
		} `json:"backups"`
	}
	if json.Unmarshal([]byte(out), &list) != nil || len(list.Backups) != 1 || list.Backups[0].ID != doc.ID || len(list.Backups[0].ExportedBy) != 1 {
		t.Fatalf("list --json: %s", out)
	}
	if out, _, _ := nbdmover(t, "list", "--repo", repoDir); !strings.Contains(out, "EXPORTED") || !strings.Contains(out, "yes (1)") {
		t.Fatalf("list:\n%s", out)
	}

	// Forgotten while exported: gc deletes nothing of it while it runs.
	if _, stderr, code := nbdmover(t, "forget", "--repo", repoDir, "--domain", "vm", "--keep-last", "0"); code != 0 {
		t.Fatalf("forget: %s", stderr)
	}
	if _, stderr, code := nbdmover(t, "gc", "--repo", repoDir, "--grace", "1ms", "--patience", "1s"); code != 11 || !strings.Contains(stderr, "export") {
		t.Fatalf("gc beside an export: exit %d, %s; want 11 naming the export", code, stderr)
	}
	copied()

	p.cmd.Process.Signal(syscall.SIGINT)
	if _, stderr, code := p.wait(t); code != 0 || !strings.Contains(stderr, "export ended") {
		t.Fatalf("interrupted export: exit %d, %s", code, stderr)
	}
	if _, err := os.Lstat(sock); err == nil {
		t.Fatal("the socket was left")
	}
	out, stderr, code := nbdmover(t, "gc", "--repo", repoDir, "--grace", "1ms", "--json")
	var gc struct {
		Chunks struct {
			Deleted int `json:"deleted"`
		} `json:"chunks"`
	}
	if code != 0 || json.Unmarshal([]byte(out), &gc) != nil || gc.Chunks.Deleted == 0 {
		t.Fatalf("gc after the export: exit %d, %s %s", code, out, stderr)
	}
}

// export --once ends when its last client leaves; a usage error is exit
// status 2 and leaves nothing behind.
func TestExportOnceAndUsage(t *testing.T) {
	qemutest.Need(t, "nbdinfo")
	repoDir := filepath.Join(t.TempDir(), "repo")
	img := backuptest.Image(t, 24<<20)
	srv := qemutest.Serve(t, img, "-r")
	if _, stderr, code := nbdmover(t, "backup", "--init", "--repo", repoDir, "--nbd", srv.URI, "--name", "vm", "--disk", "vda"); code != 0 {
		t.Fatalf("backup: %s", stderr)
	}
	sock := filepath.Join(t.TempDir(), "export.sock")
	p, doc := startExport(t, "--repo", repoDir, "--domain", "vm", "--listen", "unix://"+sock, "--once")
	if out, err := exec.Command("nbdinfo", doc.Disks[0].URI).CombinedOutput(); err != nil {
		t.Fatalf("nbdinfo: %v\n%s", err, out)
	}
	if _, stderr, code := p.wait(t); code != 0 {
		t.Fatalf("export --once: exit %d: %s", code, stderr)
	}
	for _, args := range [][]string{
		{"export", "--repo", repoDir},
		{"export", "--repo", repoDir, "--domain", "vm", "--cache-size", "lots"},
		{"export", "--repo", repoDir, "--domain", "vm", "--cache-size", "1MiB", "--listen", "unix://" + sock},
		{"export", "--repo", repoDir, "--domain", "vm", "--listen", "0.0.0.0:10809"},
		{"export", "--repo", repoDir, "--domain", "vm", "--listen", "unix://" + sock, "--tls-cert", "c", "--tls-key", "k"},
		{"export", "--repo", repoDir, "--domain", "../vm"},
		{"export", "--repo", repoDir, "--domain", "vm", "--disk", "a/b"},
	} {
		if _, stderr, code := nbdmover(t, args...); code != 2 || !strings.Contains(stderr, "nbdmover:") {
			t.Errorf("%v: exit %d, %s; want 2", args, code, stderr)
		}
	}
	if _, stderr, code := nbdmover(t, "export", "--repo", repoDir, "--domain", "vm", "--disk", "vdz", "--listen", "unix://"+sock); code != 1 ||
		!strings.Contains(stderr, "vdz") {
		t.Errorf("an unknown disk: exit %d, %s", code, stderr)
	}
	if _, err := os.Lstat(sock); err == nil {
		t.Fatal("a socket was left")
	}
}
