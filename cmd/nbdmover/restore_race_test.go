package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/nbdmover/nbdmover/internal/qemutest"
	"github.com/nbdmover/nbdmover/internal/sentinel"
)

// A restore as root into a directory another user owns: that user renames
// and replaces entries while the restore runs (a racer process as nobody,
// stopped restores at the two windows a name-based restore had: after
// its private directory exists, and while the image is written). No file
// outside may be touched, and the output is our image or nothing.
func TestRestoreOutputRace(t *testing.T) {
	qemutest.Need(t, "qemu-nbd", "qemu-img", "qemu-io")
	if os.Geteuid() != 0 {
		t.Skip("needs root, to run the racer as another user")
	}
	repo := filepath.Join(t.TempDir(), "repo")
	img := qemutest.NewImage(t, t.TempDir(), 8<<20)
	qemutest.IO(t, img, "write -P 0x42 1M 2M", "write -P 0x17 6M 1M")
	ref := qemutest.RawCopy(t, img)
	srv := qemutest.Serve(t, img, "-r")
	if _, stderr, code := nbdmover(t, "backup", "--init", "--repo", repo, "--nbd", srv.URI, "--name", "vm", "--disk", "vda"); code != 0 {
		t.Fatal(stderr)
	}
	victims, check := sentinel.New(t)
	defer check()
	for _, format := range []string{"raw", "qcow2"} {
		for _, step := range []string{"restore-partial", "restore-writing"} {
			for _, alsoOutput := range []bool{false, true} {
				name := format + "/" + step
				if alsoOutput {
					name += "/output-link"
				}
				t.Run(name, func(t *testing.T) {
					out := ownedByNobody(t)
					target := filepath.Join(out, "disk."+format)
					holds := t.TempDir()
					reached := gate(t, holds, step)
					p := start(t, holds, "restore", "--repo", repo, "--domain", "vm", "--disk", "vda", "--output", target, "--format", format)
					reached()
					// The owner of the directory moves the private directory
					// away and puts links to a root-owned place instead.
					script := `mv "$1.partial" "$1.moved" && ln -s "$2" "$1.partial"`
					if alsoOutput {
						script += ` && ln -s "$2/victim" "$1"`
					}
					asNobody(t, script, target, victims)
					open(holds, step)
					_, stderr, code := p.wait(t)
					st, err := os.Lstat(target)
					switch {
					case step == "restore-partial" && (code == 0 || !strings.Contains(stderr, "replaced")):
						t.Fatalf("the restore went on in a directory someone replaced (exit %d): %s", code, stderr)
					case alsoOutput && (code == 0 || step == "restore-writing" && !strings.Contains(stderr, "exists")):
						t.Fatalf("exit %d beside an output link: %s", code, stderr)
					case alsoOutput:
						if st == nil || st.Mode()&os.ModeSymlink == 0 {
							t.Fatalf("the racer's link was replaced: %v %v", st, err)
						}
					case code == 0:
						if err != nil || !st.Mode().IsRegular() {
							t.Fatalf("output %v %v", st, err)
						}
						qemutest.Compare(t, ref, "raw", target, format)
					}
					t.Logf("exit %d: %s", code, firstLine(stderr))
				})
			}
		}
	}
}

// ownedByNobody returns a new directory owned by nobody, reachable by it.
func ownedByNobody(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	for d := dir; d != os.TempDir() && d != "/"; d = filepath.Dir(d) {
		os.Chmod(d, 0o755)
	}
	out := filepath.Join(dir, "out")
	if err := os.Mkdir(out, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(out, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	return out
}

// asNobody runs a shell script as the user nobody.
func asNobody(t *testing.T, script string, args ...string) {
	t.Helper()
	cmd := exec.Command("/bin/sh", append([]string{"-c", script, "sh"}, args...)...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("racer: %v: %s", err, out)
	}
}

// Output names that qemu-img and qemu-nbd would parse as options or
// protocols never reach them.
func TestRestoreOddNames(t *testing.T) {
	qemutest.Need(t, "qemu-nbd", "qemu-img", "qemu-io")
	repo := filepath.Join(t.TempDir(), "repo")
	img := qemutest.NewImage(t, t.TempDir(), 4<<20)
	qemutest.IO(t, img, "write -P 0x42 1M 1M")
	srv := qemutest.Serve(t, img, "-r")
	if _, stderr, code := nbdmover(t, "backup", "--init", "--repo", repo, "--nbd", srv.URI, "--name", "vm", "--disk", "vda"); code != 0 {
		t.Fatal(stderr)
	}
	dir := t.TempDir()
	t.Chdir(dir)
	for _, name := range []string{"vm:2024.qcow2", "-x.qcow2", "nbd:127.0.0.1:9", "json:{}.qcow2"} {
		if _, stderr, code := nbdmover(t, "restore", "--repo", repo, "--domain", "vm", "--disk", "vda", "--output", name, "--format", "qcow2"); code != 0 {
			t.Fatalf("%s: %s", name, stderr)
		}
		qemutest.Compare(t, img, "qcow2", filepath.Join(dir, name), "qcow2")
	}
}

// The owner of the output directory's parent (a VM owner's home) replaces
// the output directory with a link to a root-only directory before the
// restore opens it: the link is not followed. And --disk with an output
// that names a directory is bad usage.
func TestRestoreOutputDirectoryLink(t *testing.T) {
	qemutest.Need(t, "qemu-nbd", "qemu-img", "qemu-io")
	if os.Geteuid() != 0 {
		t.Skip("needs root, to act as another user")
	}
	repo := filepath.Join(t.TempDir(), "repo")
	img := qemutest.NewImage(t, t.TempDir(), 4<<20)
	qemutest.IO(t, img, "write -P 0x42 1M 1M")
	srv := qemutest.Serve(t, img, "-r")
	if _, stderr, code := nbdmover(t, "backup", "--init", "--repo", repo, "--nbd", srv.URI, "--name", "vm", "--disk", "vda"); code != 0 {
		t.Fatal(stderr)
	}
	victims, check := sentinel.New(t)
	defer check()
	home := ownedByNobody(t)
	asNobody(t, `mkdir "$1/vms" && mv "$1/vms" "$1/old" && ln -s "$2" "$1/vms"`, home, victims)
	_, stderr, code := nbdmover(t, "restore", "--repo", repo, "--domain", "vm", "--disk", "vda", "--output", filepath.Join(home, "vms", "disk.raw"))
	if code == 0 || !strings.Contains(stderr, "another user could change it") {
		t.Fatalf("a restore through a link the directory's owner planted: exit %d: %s", code, stderr)
	}
	_, stderr, code = nbdmover(t, "restore", "--repo", repo, "--domain", "vm", "--disk", "vda", "--output", home+"/")
	if code != 2 || !strings.Contains(stderr, "names a directory") {
		t.Fatalf("--disk with a directory as --output: exit %d: %s", code, stderr)
	}
	// A run directory owned by another user, or reached through one.
	for _, dir := range []string{home, filepath.Join(home, "vms")} {
		if _, stderr, code := nbdmover(t, "backup", "--repo", repo, "--domain", "vm1", "--scratch-dir", dir); code != 2 {
			t.Errorf("--scratch-dir %s: exit %d: %s", dir, code, stderr)
		}
	}
}
