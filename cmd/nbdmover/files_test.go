package main

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/nbdmover/nbdmover/internal/backuptest"
	"github.com/nbdmover/nbdmover/internal/qemutest"
)

// TestFilesCommands reads files from backups in an encrypted repository
// on MinIO through the command line: files fs, ls (text, long, JSON),
// get into a directory and as a tar stream, diff between two backups,
// with every byte compared to the source; and the errors: an unknown
// path (exit 1, named), an unknown filesystem and bad flags (exit 2), a
// disk with no filesystem. The images are ext4 made by mkfs.ext4 -d from
// directories; the appliance is libguestfs's.
func TestFilesCommands(t *testing.T) {
	qemutest.Need(t, "qemu-nbd", "qemu-img", "mkfs.ext4", "guestfish")
	s := &session{t: t}
	t.Cleanup(func() {
		if t.Failed() {
			t.Log(s.logs.String())
		}
	})
	dir := t.TempDir()
	mt := time.Date(2025, 6, 1, 12, 0, 0, 0, time.UTC)
	big, err := os.ReadFile(backuptest.RandomFile(t, 8<<20, 7))
	if err != nil {
		t.Fatal(err)
	}
	mk := func(name string, files map[string]string, links map[string]string, modes map[string]os.FileMode) string {
		root := filepath.Join(dir, name)
		for p, data := range files {
			full := filepath.Join(root, p)
			os.MkdirAll(filepath.Dir(full), 0o755)
			if err := os.WriteFile(full, []byte(data), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		for p, target := range links {
			if err := os.Symlink(target, filepath.Join(root, p)); err != nil {
				t.Fatal(err)
			}
		}
		for p, m := range modes {
			os.Chmod(filepath.Join(root, p), m)
		}
		filepath.Walk(root, func(p string, _ os.FileInfo, _ error) error {
			if p != root {
				os.Chtimes(p, mt, mt)
			}
			return nil
		})
		img := filepath.Join(dir, name+".img")
		qemutest.Run(t, "mkfs.ext4", "-q", "-F", "-d", root, img, "32M")
		return img
	}
	filesA := map[string]string{"etc/hosts": "127.0.0.1 localhost\n", "etc/gone": "gone\n", "etc/secret": "s3cret\n",
		"etc/we ird\nname": "newline\n", "data/big": string(big)}
	filesB := map[string]string{"etc/hosts": "127.0.0.1 localhost\n::1 localhost\n", "etc/secret": "s3cret\n",
		"etc/we ird\nname": "newline\n", "etc/new": "new\n", "data/big": string(big)}
	imgA := mk("a", filesA, map[string]string{"etc/link": "hosts", "etc/out": "../../../../etc/shadow"}, map[string]os.FileMode{"etc/secret": 0o600})
	imgB := mk("b", filesB, map[string]string{"etc/link": "hosts", "etc/out": "../../../../etc/shadow"}, map[string]os.FileMode{"etc/secret": 0o640})
	blank := filepath.Join(dir, "blank.img")
	os.WriteFile(blank, nil, 0o644)
	os.Truncate(blank, 16<<20)

	r := s3RepoArgs(t)
	env := []string{"NBDMOVER_PASSWORD=files test password"}
	s.must(env, append([]string{"init", "--encryption"}, r...)...)
	backup := func(img, name string) string {
		q := filepath.Join(dir, filepath.Base(img)+".qcow2")
		qemutest.Run(t, "qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", img, q)
		srv := qemutest.Serve(t, q, "-r")
		defer srv.Kill()
		out := s.must(env, append([]string{"backup", "--nbd", srv.URI, "--name", name, "--json"}, r...)...)
		var res struct{ ID string }
		if err := json.Unmarshal([]byte(out), &res); err != nil || res.ID == "" {
			t.Fatalf("backup --json: %v: %s", err, out)
		}
		return res.ID
	}
	idA, idB := backup(imgA, "web"), backup(imgB, "web")
	backup(blank, "empty")
	// f is a files command line: the test's flags first, so that args
	// (after the subcommand) may override them.
	f := func(args ...string) []string {
		l := append(append(slices.Clone(args[:2]), r...), "--accel", accel(), "--run-dir", t.TempDir())
		return append(l, args[2:]...)
	}

	// Usage errors, before any appliance starts.
	s.fails(2, "--output DIR or --tar", env, f("files", "get", "--domain", "web", "/etc")...)
	s.fails(2, "--accel", env, f("files", "ls", "--domain", "web", "--accel", "quick", "/")...)
	s.fails(2, "one PATH", env, f("files", "ls", "--domain", "web", "/a", "/b")...)
	s.fails(2, "must be absolute", env, f("files", "ls", "--domain", "web", "etc")...)
	s.fails(2, "--from", env, f("files", "diff", "--domain", "web", "/")...)
	s.fails(2, "--domain", env, f("files", "ls", "--domain", "../x", "/")...)

	// ls: flags after the path, as people type it.
	out := s.must(env, f("files", "ls", "/etc", "--domain", "web", "--backup", idA, "--long")...)
	for _, want := range []string{"-rw------- 0 0", " secret\n", "link -> hosts", `out -> ../../../../etc/shadow`, `"we ird\nname"`} {
		if !strings.Contains(out, want) {
			t.Errorf("files ls --long: no %q in\n%s", want, out)
		}
	}
	var ls struct {
		Domain, ID string
		Entries    []struct {
			Name, Type, Mode, Target string
			Size                     int64
			Mtime                    time.Time
		}
	}
	out = s.must(env, f("files", "ls", "--json", "--domain", "web", "--backup", idA, "/etc")...)
	if err := json.Unmarshal([]byte(out), &ls); err != nil {
		t.Fatalf("files ls --json: %v: %s", err, out)
	}
	var names []string
	for _, e := range ls.Entries {
		names = append(names, e.Name)
		if want, ok := filesA["etc/"+e.Name]; ok && (e.Type != "file" || e.Size != int64(len(want)) || !e.Mtime.Equal(mt)) {
			t.Errorf("files ls --json: %+v, want a file of %d bytes, mtime %v", e, len(want), mt)
		}
	}
	if want := []string{"gone", "hosts", "link", "out", "secret", "we ird\nname"}; !slices.Equal(names, want) || ls.ID != idA {
		t.Errorf("files ls --json: %s %q, want %s %q", ls.ID, names, idA, want)
	}

	// get into a directory: bytes, modes, the link as a link.
	outDir := filepath.Join(dir, "out")
	s.must(env, f("files", "get", "--domain", "web", "--backup", idA, "/etc", "/data/big", "--output", outDir)...)
	for p, want := range filesA {
		got, err := os.ReadFile(filepath.Join(outDir, p))
		if err != nil || !bytes.Equal(got, []byte(want)) {
			t.Errorf("files get: %s: %d bytes, err %v; want %d bytes", p, len(got), err, len(want))
		}
	}
	if l, err := os.Readlink(filepath.Join(outDir, "etc/out")); err != nil || l != "../../../../etc/shadow" {
		t.Errorf("files get: etc/out: %q, %v", l, err)
	}
	if fi, err := os.Stat(filepath.Join(outDir, "etc/secret")); err != nil || fi.Mode().Perm() != 0o600 || !fi.ModTime().Equal(mt) {
		t.Errorf("files get: etc/secret: %v", fi)
	}
	// An existing file is never overwritten.
	s.fails(1, "exists", env, f("files", "get", "--domain", "web", "--backup", idA, "/etc/hosts", "--output", outDir)...)

	// get as tar on stdout.
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	spec, _ := json.Marshal(f("files", "get", "--domain", "web", "--tar", "-", "/etc"))
	cmd.Env = append(append(os.Environ(), "NBDMOVER_MAIN_ARGS="+string(spec), "NBDMOVER_REPO="), env...)
	var tarOut, tarErr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &tarOut, &tarErr
	if err := cmd.Run(); err != nil {
		t.Fatalf("files get --tar -: %v: %s", err, tarErr.String())
	}
	got := map[string]string{}
	tr := tar.NewReader(&tarOut)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(tr)
		got[h.Name] = string(b) + h.Linkname
	}
	for p, want := range filesB {
		if strings.HasPrefix(p, "etc/") && got[p] != want {
			t.Errorf("files get --tar: %q = %q, want %q", p, got[p], want)
		}
	}
	if got["etc/link"] != "hosts" || len(got) != 7 {
		t.Errorf("files get --tar: %d entries %q", len(got), got)
	}

	// diff between the two backups.
	out = s.must(env, f("files", "diff", "--domain", "web", "--from", idA, "--to", idB, "/etc")...)
	want := []string{"+ /etc/new", "- /etc/gone", "~ /etc/hosts (size)", "~ /etc/secret (mode)"}
	for _, w := range want {
		if !strings.Contains(out, w+"\n") {
			t.Errorf("files diff: no %q in\n%s", w, out)
		}
	}
	if n := strings.Count(out, "\n"); n != len(want)+1 {
		t.Errorf("files diff: %d lines, want %d:\n%s", n, len(want)+1, out)
	}

	// The errors.
	s.fails(1, "no such file in the backup: /etc/nope", env, f("files", "ls", "--domain", "web", "/etc/nope")...)
	s.fails(2, "filesystem bogus: not among", env, f("files", "ls", "--domain", "web", "--fs", "bogus", "/")...)
	s.fails(1, "no filesystem", env, f("files", "ls", "--domain", "empty", "/")...)
}

// accel is how the tests run the appliance: TCG unless
// NBDMOVER_TEST_GUESTFS_KVM says KVM works for it here (on nested
// virtualisation its launch aborts, and the fallback costs a launch).
func accel() string {
	if os.Getenv("NBDMOVER_TEST_GUESTFS_KVM") != "" {
		return "auto"
	}
	return "tcg"
}
