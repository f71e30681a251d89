package main

import (
	"bufio"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nbdmover/nbdmover/internal/qemutest"
)

// instant-restore from the command line: bad usage is exit 2 before
// anything is made; a restore killed (SIGKILL, the export with it) at
// half its copy leaves the domain running on what it has, and --resume
// finishes the copy; the JSON events say running, progress and done.
func TestInstantRestoreCommand(t *testing.T) {
	qemutest.NeedLibvirt(t)
	repoDir := filepath.Join(t.TempDir(), "repo")
	src := qemutest.NewDomain(t, true, qemutest.DiskSpec{Dev: "vda", Format: "qcow2", Size: 24 << 20})
	src.Write("vda", "write -P 0x61 2M 6M", "write -P 0x62 20M 1M")
	if _, e, code := nbdmover(t, "backup", "--init", "--domain", src.Name, "--repo", repoDir); code != 0 {
		t.Fatalf("backup: %d %s", code, e)
	}
	ref := src.Snapshot()["vda"]
	images := t.TempDir()
	os.Chmod(images, 0o755)
	run := runDir(t)
	as := src.Name + "-r"
	base := []string{"instant-restore", "--repo", repoDir, "--run-dir", run}
	for _, args := range [][]string{
		{"--as", as, "--image-dir", images},           // no --domain
		{"--domain", src.Name, "--image-dir", images}, // no --as
		{"--domain", src.Name, "--as", as},            // no --image-dir
		{"--domain", src.Name, "--as", as, "--image-dir", images, "--format", "vmdk"},
		{"--domain", src.Name, "--as", as, "--image-dir", images, "--bandwidth", "fast"},
		{"--resume", as, "--domain", src.Name},
		{"--domain", src.Name, "--as", as, "--image-dir", filepath.Join(images, "missing")},
	} {
		if _, e, code := nbdmover(t, append(base, args...)...); code != 2 {
			t.Errorf("%v: exit %d, want 2: %s", args, code, e)
		}
	}
	if files, _ := os.ReadDir(images); len(files) > 0 {
		t.Fatalf("bad usage left %v", files)
	}

	p := start(t, t.TempDir(), append(base, "--domain", src.Name, "--as", as, "--image-dir", images, "--bandwidth", "2MiB", "--json")...)
	dst := qemutest.Attach(t, as, qemutest.DiskSpec{Dev: "vda", Format: "qcow2"})
	type event struct {
		Event    string
		Progress struct {
			Done  int64 `json:"bytes_done"`
			Total int64 `json:"bytes_total"`
		}
	}
	var events []event
	waitFor(t, "half the copy", func() bool {
		o, _ := p.output()
		events = events[:0]
		sc := bufio.NewScanner(strings.NewReader(o))
		for sc.Scan() {
			var ev event
			if json.Unmarshal(sc.Bytes(), &ev) == nil {
				events = append(events, ev)
			}
		}
		n := len(events)
		return n > 1 && events[n-1].Progress.Done*2 >= events[n-1].Progress.Total && events[n-1].Progress.Total > 0
	})
	if events[0].Event != "running" {
		t.Fatalf("first event %q", events[0].Event)
	}
	p.cmd.Process.Kill()
	p.wait(t)
	if st := qemutest.Virsh(t, "domstate", as); !strings.Contains(st, "running") {
		t.Fatalf("%s is %s after the command was killed", as, st)
	}
	dst.Write("vda", "write -P 0x63 21M 64k")

	o, e, code := nbdmover(t, "instant-restore", "--resume", as, "--repo", repoDir, "--run-dir", run, "--json", "--progress", "json")
	if code != 0 {
		t.Fatalf("--resume: %d %s", code, e)
	}
	if _, sum := parseEvents(t, e); sum.Operation != "instant-restore" || sum.Result != "success" || sum.BytesDone == 0 {
		t.Fatalf("--resume's progress summary: %+v", sum)
	}
	lines := strings.Split(strings.TrimSpace(o), "\n")
	var last struct {
		Version int
		Event   string
		Result  struct{ Disks []struct{ Image string } }
	}
	if err := json.Unmarshal([]byte(lines[len(lines)-1]), &last); err != nil || last.Version != 1 || last.Event != "done" || len(last.Result.Disks) != 1 {
		t.Fatalf("--resume's last line: %v %s", err, lines[len(lines)-1])
	}
	want := filepath.Join(t.TempDir(), "want.raw")
	b, _ := os.ReadFile(ref)
	os.WriteFile(want, b, 0o600)
	qemutest.Run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x63 21M 64k", want)
	dst.Write("vda") // flush
	qemutest.Run(t, "qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", last.Result.Disks[0].Image, want)
	if _, e, code := nbdmover(t, "instant-restore", "--resume", as, "--repo", repoDir, "--run-dir", run); code != 2 || !strings.Contains(e, "no instant restore") {
		t.Fatalf("resume of a finished restore: %d %s", code, e)
	}
}

// runDir is a run directory QEMU's user can reach (for the export's
// socket).
func runDir(t *testing.T) string {
	dir := t.TempDir()
	os.Chmod(dir, 0o711)
	return dir
}
