package restore_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nbdmover/nbdmover/internal/backuptest"
	"github.com/nbdmover/nbdmover/internal/qemutest"
	"github.com/nbdmover/nbdmover/mover"
	"github.com/nbdmover/nbdmover/mover/nbd"
	"github.com/nbdmover/nbdmover/repo"
	"github.com/nbdmover/nbdmover/restore"
	"golang.org/x/sync/errgroup"
)

// backupImage takes a full backup of a qcow2 image served by qemu-nbd as
// domain offline-vm, disk vda, in 256 KiB chunks.
func backupImage(t *testing.T, ro repo.Options, img string) *mover.BackupResult {
	t.Helper()
	srv := qemutest.Serve(t, img, "-r")
	defer srv.Kill()
	res, err := mover.Backup(t.Context(), nbd.New(nbd.Options{URI: srv.URI, Name: "offline-vm", Disk: "vda"}),
		mover.Options{Repo: ro, Init: true, Mode: "full", ChunkSize: 256 << 10, RunDir: t.TempDir(), Log: backuptest.Log(t)})
	if err != nil {
		t.Fatal(err)
	}
	return res
}

func listAll(t *testing.T, ro repo.Options) ([]*repo.Manifest, []repo.Problem, error) {
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
	r, _ := ro.Open(t.Context())
	m, err := r.Backup(t.Context(), "offline-vm", res.ID)
	if err != nil {
		t.Fatal(err)
	}
	indexObject := m.Disks[0].Index[0].Objects[0]
	os.Truncate(filepath.Join(dir, filepath.FromSlash(indexObject)), 40)
	_, _, err = restore.Restore(t.Context(), restore.Options{Repo: ro, Domain: "offline-vm", Disk: "vda", Output: out})
	var oe *repo.ObjectError
	if !errors.As(err, &oe) || oe.Key != indexObject {
		t.Fatalf("truncated index: %v", err)
	}
	manifest := repo.ManifestKey("offline-vm", res.ID)
	os.Truncate(filepath.Join(dir, filepath.FromSlash(manifest)), 50)
	// Restoring "latest" over an unreadable newest manifest is refused,
	// not an older backup restored in its place.
	_, _, err = restore.Restore(t.Context(), restore.Options{Repo: ro, Domain: "offline-vm", Disk: "vda", Output: out})
	if err == nil || !strings.Contains(err.Error(), "offline-vm/"+res.ID) || !strings.Contains(err.Error(), "--backup") {
		t.Fatalf("restore latest over an unreadable manifest: %v", err)
	}
	// A damaged manifest does not stop the listing: it is skipped and named.
	if ms, skipped, err := listAll(t, ro); err != nil || len(ms) != 0 || len(skipped) != 1 || skipped[0].Object != manifest {
		t.Fatalf("truncated manifest: %v %+v %v", ms, skipped, err)
	}
	if found := verify(false); !strings.Contains(found[manifest], "damaged") {
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

// TestMain doubles as a helper process: with NBDMOVER_HELPER_RESTORE set
// to a JSON restore.Options, the test binary runs that restore and exits,
// so a test can kill it.
func TestMain(m *testing.M) {
	if spec := os.Getenv("NBDMOVER_HELPER_RESTORE"); spec != "" {
		var o restore.Options
		if err := json.Unmarshal([]byte(spec), &o); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		if _, _, err := restore.Restore(context.Background(), o); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// A restore SIGKILLed mid-way leaves no file under the output's name, only
// <output>.partial, and no qemu-nbd behind; the next restore to the same
// output says what to remove.
func TestRestoreKilled(t *testing.T) {
	ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	img := qemutest.NewImage(t, t.TempDir(), 192*backuptest.MiB)
	qemutest.IO(t, img, "write -s "+backuptest.RandomFile(t, 160*backuptest.MiB, 7)+" 0 160M")
	backupImage(t, ro, img)
	for _, format := range []string{"raw", "qcow2"} {
		t.Run(format, func(t *testing.T) {
			out := filepath.Join(t.TempDir(), "vda."+format)
			spec, _ := json.Marshal(restore.Options{Repo: ro, Domain: "offline-vm", Disk: "vda", Output: out, Format: format, Parallel: 1})
			cmd := exec.Command(os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(), "NBDMOVER_HELPER_RESTORE="+string(spec))
			cmd.Stderr = t.Output()
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			partial := out + ".partial"
			for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(5 * time.Millisecond) {
				if st, err := os.Stat(filepath.Join(partial, "image")); err == nil && st.Size() > 0 && (format == "raw" || qemuNBDServing(partial)) {
					break
				}
				if time.Now().After(deadline) {
					cmd.Process.Kill()
					t.Fatal("the restore never started writing")
				}
			}
			cmd.Process.Kill()
			cmd.Wait()
			if _, err := os.Stat(out); !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("a killed restore left %s: %v", out, err)
			}
			if _, err := os.Stat(partial); err != nil {
				t.Fatalf("no %s after the kill: %v", partial, err)
			}
			for deadline := time.Now().Add(10 * time.Second); qemuNBDServing(partial); time.Sleep(20 * time.Millisecond) {
				if time.Now().After(deadline) {
					t.Fatal("qemu-nbd outlived the killed restore")
				}
			}
			_, _, err := restore.Restore(t.Context(), restore.Options{Repo: ro, Domain: "offline-vm", Disk: "vda", Output: out, Format: format})
			if err == nil || !strings.Contains(err.Error(), partial) {
				t.Fatalf("restore over a killed one's leftover: %v", err)
			}
			os.RemoveAll(partial)
			if _, _, err := restore.Restore(t.Context(), restore.Options{Repo: ro, Domain: "offline-vm", Disk: "vda", Output: out, Format: format}); err != nil {
				t.Fatal(err)
			}
			qemutest.Compare(t, img, "qcow2", out, format)
		})
	}
}

// qemuNBDServing reports whether a qemu-nbd process has the image in the
// restore's private directory partial open.
func qemuNBDServing(partial string) bool {
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err != nil || filepath.Base(strings.Split(string(b), "\x00")[0]) != "qemu-nbd" {
			continue
		}
		fds, _ := filepath.Glob(filepath.Join(filepath.Dir(p), "fd", "*"))
		for _, fd := range fds {
			if target, _ := os.Readlink(fd); target == filepath.Join(partial, "image") {
				return true
			}
		}
	}
	return false
}

// Many qcow2 restores at once, on a busy machine: each waits for its
// qemu-nbd to accept a connection, not just for the socket file (which
// appears before qemu-nbd listens; that check failed with ECONNREFUSED
// now and then).
func TestRestoreQcow2Repeated(t *testing.T) {
	ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	img := qemutest.NewImage(t, t.TempDir(), 4*backuptest.MiB)
	qemutest.IO(t, img, "write -P 0x61 1M 1M")
	backupImage(t, ro, img)
	dir := t.TempDir()
	var g errgroup.Group
	for i := range 48 {
		if i%8 == 7 {
			g.Wait()
		}
		g.Go(func() error {
			out := filepath.Join(dir, fmt.Sprintf("vda-%d.qcow2", i))
			_, _, err := restore.Restore(t.Context(), restore.Options{Repo: ro, Domain: "offline-vm", Disk: "vda", Output: out, Format: "qcow2"})
			return err
		})
	}
	if err := g.Wait(); err != nil {
		t.Fatal(err)
	}
}
