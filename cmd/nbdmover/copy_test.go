package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nbdmover/nbdmover/internal/backuptest"
	"github.com/nbdmover/nbdmover/internal/qemutest"
	"github.com/nbdmover/nbdmover/sink"
	"github.com/nbdmover/nbdmover/sink/sinktest"
)

type copyOut struct {
	Backups []struct {
		Domain, ID, Base string
		Chunks           int64
	}
	Present    int
	Chunks     int64
	ChunksHeld int64 `json:"chunks_held"`
	Reencoded  bool
}

func parseCopy(t *testing.T, out string) copyOut {
	t.Helper()
	var c copyOut
	if err := json.Unmarshal([]byte(out), &c); err != nil {
		t.Fatalf("copy --json: %v: %q", err, out)
	}
	return c
}

// copyFixture is a repository with two backups (d1) of a disk served by
// qemu-nbd: random data, a marker that must never reach an encrypted
// repository in the clear, and a change between the two.
type copyFixture struct {
	repo  []string
	ids   []string
	refs  map[string]string // raw image by backup id
	mark  []byte
	holds string
}

const plainMarker = "NBDMOVER-PLAINTEXT-MARKER-"

func newCopyFixture(t *testing.T) *copyFixture {
	f := &copyFixture{repo: []string{"--repo", filepath.Join(t.TempDir(), "src")}, refs: map[string]string{}, holds: t.TempDir(),
		mark: bytes.Repeat([]byte(plainMarker), 4096/len(plainMarker)+1)[:4096]}
	img := qemutest.NewImage(t, t.TempDir(), 32<<20)
	markFile := filepath.Join(t.TempDir(), "mark")
	os.WriteFile(markFile, f.mark, 0o600)
	qemutest.IO(t, img, "write -s "+backuptest.RandomFile(t, 24<<20, 11)+" 0 24M", "write -s "+markFile+" 28M 4k")
	for k := range 2 {
		if k == 1 {
			qemutest.IO(t, img, "write -s "+backuptest.RandomFile(t, 2<<20, 12)+" 4M 2M")
		}
		srv := qemutest.Serve(t, img, "-r")
		out, stderr, code := nbdmover(t, append([]string{"backup", "--init", "--nbd", srv.URI, "--name", "d1", "--disk", "vda", "--json"}, f.repo...)...)
		srv.Kill()
		if code != 0 {
			t.Fatalf("backup: %s", stderr)
		}
		id := parseBackup(t, out).ID
		f.ids = append(f.ids, id)
		f.refs[id] = qemutest.RawCopy(t, img)
	}
	return f
}

// restored checks that every backup of the fixture restores bit-exact
// from the repository repo alone.
func (f *copyFixture) restored(t *testing.T, repo []string, ids ...string) {
	t.Helper()
	for _, id := range ids {
		dest := filepath.Join(t.TempDir(), "vda.raw")
		if _, stderr, code := nbdmover(t, append([]string{"restore", "--domain", "d1", "--backup", id, "--disk", "vda", "--output", dest}, repo...)...); code != 0 {
			t.Fatalf("restore %s from %v: %s", id, repo, stderr)
		}
		qemutest.Compare(t, f.refs[id], "raw", dest, "raw")
	}
}

func minioRepo(t *testing.T) (args []string, store sink.Store) {
	loc := fmt.Sprintf("s3://copy-%d-%08x/r", time.Now().UnixNano()%1e9, rand.Uint32())
	s, err := sink.Open(loc, sink.Options{S3Endpoint: sinktest.S3Endpoint(t)})
	if err != nil {
		t.Fatal(err)
	}
	return []string{loc, "--s3-endpoint", sinktest.S3Endpoint(t)}, s
}

func mustRun(t *testing.T, args ...string) string {
	t.Helper()
	out, stderr, code := nbdmover(t, args...)
	if code != 0 {
		t.Fatalf("%v: exit %d: %s", args, code, stderr)
	}
	return out
}

// Copies local -> MinIO -> local, and local -> encrypted MinIO ->
// another encrypted repository: every copied backup restores bit-exact
// from the target alone, a rerun copies nothing, and the encrypted
// target never receives a plaintext chunk name or byte. Bad usage exits 2.
func TestCopyCommands(t *testing.T) {
	qemutest.Need(t, "qemu-nbd", "qemu-img", "qemu-io")
	f := newCopyFixture(t)
	src := f.repo[1]
	minio, _ := minioRepo(t)
	mustRun(t, append([]string{"init", "--repo"}, minio...)...)

	dry := mustRun(t, append([]string{"copy", "--from", src, "--all", "--dry-run", "--to"}, minio...)...)
	if !strings.Contains(dry, "would copy d1/"+f.ids[1]+" (on "+f.ids[0]+")") {
		t.Fatalf("dry run: %q", dry)
	}
	res := parseCopy(t, mustRun(t, append([]string{"copy", "--from", src, "--all", "--json", "--to"}, minio...)...))
	if len(res.Backups) != 2 || res.Backups[1].Base != f.ids[0] || res.Backups[1].Chunks > 3 || res.Reencoded {
		t.Fatalf("local to MinIO: %+v", res)
	}
	f.restored(t, append([]string{"--repo"}, minio...), f.ids...)
	if res := parseCopy(t, mustRun(t, append([]string{"copy", "--from", src, "--all", "--json", "--to"}, minio...)...)); len(res.Backups) != 0 || res.Present != 2 {
		t.Fatalf("a rerun: %+v", res)
	}

	back := filepath.Join(t.TempDir(), "back")
	mustRun(t, "init", "--repo", back)
	out, stderr, code := nbdmover(t, append([]string{"copy", "--to", back, "--domain", "d1", "--json", "--progress", "json", "--from"}, minio...)...)
	if res = parseCopy(t, out); code != 0 || len(res.Backups) != 2 {
		t.Fatalf("MinIO to local: %+v %s", res, stderr)
	}
	events, sum := parseEvents(t, stderr)
	if sum.Operation != "copy" || sum.Result != "success" || events[len(events)-2].Disk != "d1/"+f.ids[1] || events[len(events)-2].Phase != "done" {
		t.Fatalf("copy's progress ends with %+v, summary %+v", events[len(events)-2], sum)
	}
	f.restored(t, []string{"--repo", back}, f.ids...)

	// Encrypted, on MinIO: what the bucket holds names no plaintext
	// chunk and holds no plaintext byte; then to another encrypted
	// repository with another password.
	dir := t.TempDir()
	pw1, pw2 := filepath.Join(dir, "pw1"), filepath.Join(dir, "pw2")
	os.WriteFile(pw1, []byte("first password"), 0o600)
	os.WriteFile(pw2, []byte("second password"), 0o600)
	enc, encStore := minioRepo(t)
	mustRun(t, append([]string{"init", "--encryption", "--password-file", pw1, "--repo"}, enc...)...)
	res = parseCopy(t, mustRun(t, append([]string{"copy", "--from", src, "--all", "--json", "--to-password-file", pw1, "--to"}, enc...)...))
	if len(res.Backups) != 2 || !res.Reencoded {
		t.Fatalf("to an encrypted repository: %+v", res)
	}
	f.restored(t, append([]string{"--password-file", pw1, "--repo"}, enc...), f.ids...)
	plainNames := map[string]bool{}
	local, _ := sink.Open(src, sink.Options{})
	local.List(t.Context(), "chunks/", func(o sink.ObjectInfo) error { plainNames[filepath.Base(o.Key)] = true; return nil })
	objects := 0
	encStore.List(t.Context(), "", func(o sink.ObjectInfo) error {
		objects++
		if plainNames[filepath.Base(o.Key)] {
			t.Errorf("the encrypted bucket names a plaintext chunk: %s", o.Key)
		}
		b, err := encStore.Get(t.Context(), o.Key, nil, 64<<20)
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Contains(b, []byte(plainMarker)) {
			t.Errorf("%s holds plaintext", o.Key)
		}
		return nil
	})
	if objects < 20 || len(plainNames) < 20 {
		t.Fatalf("%d objects in the bucket, %d plain chunks", objects, len(plainNames))
	}
	enc2 := filepath.Join(t.TempDir(), "enc2")
	mustRun(t, "init", "--encryption", "--password-file", pw2, "--repo", enc2)
	res = parseCopy(t, mustRun(t, append([]string{"copy", "--to", enc2, "--to-password-file", pw2, "--from-password-file", pw1,
		"--domain", "d1", "--backup", f.ids[1], "--json", "--from"}, enc...)...))
	if len(res.Backups) != 1 || res.Backups[0].ID != f.ids[1] {
		t.Fatalf("encrypted to encrypted: %+v", res)
	}
	f.restored(t, []string{"--repo", enc2, "--password-file", pw2}, f.ids[1])

	// Shared keys (init --copy-keys-from): the ciphertext moves as it is,
	// the same object for the same chunk in both buckets.
	enc3, enc3Store := minioRepo(t)
	mustRun(t, append(append([]string{"init", "--encryption", "--password-file", pw2, "--copy-keys-from", enc[0], "--from-password-file", pw1,
		"--repo"}, enc3...), "--chunk-size", "1MiB")...)
	res = parseCopy(t, mustRun(t, append([]string{"copy", "--to", enc3[0], "--to-password-file", pw2, "--from-password-file", pw1,
		"--all", "--json", "--from"}, enc...)...))
	if len(res.Backups) != 2 || res.Reencoded || res.Chunks == 0 {
		t.Fatalf("between repositories that share keys: %+v", res)
	}
	f.restored(t, append([]string{"--password-file", pw2, "--repo"}, enc3...), f.ids...)
	same := 0
	encStore.List(t.Context(), "chunks/", func(o sink.ObjectInfo) error {
		a, _ := encStore.Get(t.Context(), o.Key, nil, 64<<20)
		b, err := enc3Store.Get(t.Context(), o.Key, nil, 64<<20)
		if err != nil || !bytes.Equal(a, b) {
			t.Errorf("chunk %s is not the same object in both buckets: %v", o.Key, err)
		}
		same++
		return nil
	})
	if same < 20 {
		t.Fatalf("%d chunks compared", same)
	}
	if _, stderr, code := nbdmover(t, "init", "--encryption", "--password-file", pw2, "--copy-keys-from", src, "--repo", filepath.Join(t.TempDir(), "x")); code != 2 {
		t.Errorf("keys from an unencrypted repository: exit %d %s", code, stderr)
	}

	// An encrypted source into a plain target needs --allow-plaintext; a
	// shared password never opens a side in the clear.
	if _, stderr, code := nbdmover(t, append([]string{"copy", "--to", back, "--from-password-file", pw1, "--all", "--from"}, enc...)...); code != 2 || !strings.Contains(stderr, "--allow-plaintext") {
		t.Errorf("encrypted into plain: exit %d: %s", code, stderr)
	}
	if _, stderr, code := nbdmover(t, append([]string{"copy", "--from", src, "--password-file", pw1, "--all", "--to"}, enc...)...); code != 12 || !strings.Contains(stderr, "--from-password-file") {
		t.Errorf("a shared password with a plain side: exit %d: %s", code, stderr)
	}

	// Bad usage, and repositories a copy cannot go between.
	small := filepath.Join(t.TempDir(), "small")
	mustRun(t, "init", "--repo", small, "--chunk-size", "256KiB")
	for _, args := range [][]string{
		{"copy", "--from", src, "--to", back},
		{"copy", "--from", src, "--to", back, "--all", "--domain", "d1"},
		{"copy", "--from", src, "--to", back, "--backup", f.ids[0]},
		{"copy", "--from", src, "--to", back, "--all", "--limit-upload", "1"},
		{"copy", "--to", back, "--all"},
		{"copy", "--from", src, "--to", small, "--all"},
		{"copy", "--from", src, "--to", src, "--all"},
	} {
		if _, stderr, code := nbdmover(t, args...); code != 2 {
			t.Errorf("%v: exit %d, want 2: %s", args, code, stderr)
		}
	}
	if _, stderr, code := nbdmover(t, "copy", "--from", src, "--to", filepath.Join(t.TempDir(), "none"), "--all"); code != 10 {
		t.Errorf("a target that does not exist: exit %d: %s", code, stderr)
	}

	// A damaged chunk in the source: the backups that need it are not
	// copied, the result says so (JSON too), exit 1.
	var chunk string
	filepath.WalkDir(filepath.Join(src, "chunks"), func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() && chunk == "" {
			chunk = p
		}
		return nil
	})
	b, _ := os.ReadFile(chunk)
	b[len(b)-1] ^= 0xff
	os.WriteFile(chunk, b, 0o600)
	fresh := filepath.Join(t.TempDir(), "fresh")
	mustRun(t, "init", "--repo", fresh)
	out, stderr, code = nbdmover(t, "copy", "--from", src, "--to", fresh, "--all", "--json")
	var partial struct {
		Failed []struct{ Domain, ID, Error string }
	}
	if err := json.Unmarshal([]byte(out), &partial); code != 1 || err != nil || len(partial.Failed) == 0 || !strings.Contains(partial.Failed[0].Error, "chunk") {
		t.Fatalf("a copy past a damaged chunk: exit %d, %v, %q %s", code, err, out, stderr)
	}
}

// A copy SIGKILLed while it stores chunks leaves no backup in the target,
// and a rerun finishes it, finding the chunks already there; a gc of the
// target that starts while a copy has stored every chunk and not yet
// committed waits for it and deletes none of them; a gc of the source
// after the backups being copied were forgotten waits until the copy has
// read them. Every copied backup restores bit-exact from its target.
func TestCopyKilledAndBesideGC(t *testing.T) {
	qemutest.Need(t, "qemu-nbd", "qemu-img", "qemu-io")
	f := newCopyFixture(t)
	src := f.repo[1]
	target := func() []string {
		args, _ := minioRepo(t)
		mustRun(t, append([]string{"init", "--repo"}, args...)...)
		return args
	}
	copyArgs := func(to []string) []string {
		return append([]string{"copy", "--from", src, "--all", "--json", "--parallel", "2", "--to"}, to...)
	}

	// Killed mid-way.
	to := target()
	reached := gate(t, f.holds, "copy-chunk")
	p := start(t, f.holds, copyArgs(to)...)
	reached()
	p.cmd.Process.Signal(syscall.SIGKILL)
	p.wait(t)
	open(f.holds, "copy-chunk")
	if out := mustRun(t, append([]string{"list", "--json", "--repo"}, to...)...); strings.Contains(out, f.ids[0]) {
		t.Fatalf("a killed copy left a backup: %s", out)
	}
	res := parseCopy(t, mustRun(t, copyArgs(to)...))
	if len(res.Backups) != 2 || res.ChunksHeld == 0 {
		t.Fatalf("the rerun of a killed copy: %+v", res)
	}
	f.restored(t, append([]string{"--repo"}, to...), f.ids...)

	// gc of the target, while the copy has stored the first backup's
	// chunks and not committed it.
	to = target()
	reached = gate(t, f.holds, "copy-commit")
	p = start(t, f.holds, copyArgs(to)...)
	reached()
	time.Sleep(1100 * time.Millisecond) // S3's times have whole seconds: the chunks are older than the grace
	g := start(t, f.holds, append([]string{"gc", "--grace", "1ms", "--patience", "1ms", "--json", "--repo"}, to...)...)
	waitFor(t, "gc to wait for the copy", func() bool { _, e := g.output(); return strings.Contains(e, "waiting for the backups") })
	open(f.holds, "copy-commit")
	if out, stderr, code := p.wait(t); code != 0 || len(parseCopy(t, out).Backups) != 2 {
		t.Fatalf("a copy beside gc: %d %s %s", code, out, stderr)
	}
	out, stderr, code := g.wait(t)
	if r := parseGC(t, out); code != 0 || r.Chunks.Deleted != 0 {
		t.Fatalf("gc beside a copy: %d %+v %s", code, r, stderr)
	}
	f.restored(t, append([]string{"--repo"}, to...), f.ids...)
	mustRun(t, append([]string{"verify", "--read-data", "--repo"}, to...)...)

	// gc of the source, after the backups being copied were forgotten.
	to = target()
	reached = gate(t, f.holds, "copy-chunk")
	p = start(t, f.holds, copyArgs(to)...)
	reached()
	mustRun(t, "forget", "--domain", "d1", "--keep-last", "0", "--repo", src)
	g = start(t, f.holds, "gc", "--grace", "1ms", "--patience", "1ms", "--json", "--repo", src)
	waitFor(t, "gc to wait for the copy", func() bool { _, e := g.output(); return strings.Contains(e, "waiting for the backups") })
	open(f.holds, "copy-chunk")
	if out, stderr, code := p.wait(t); code != 0 || len(parseCopy(t, out).Backups) != 2 {
		t.Fatalf("a copy beside gc of its source: %d %s %s", code, out, stderr)
	}
	out, stderr, code = g.wait(t)
	if r := parseGC(t, out); code != 0 || r.Chunks.Deleted == 0 {
		t.Fatalf("gc of the source after the copy: %d %+v %s", code, r, stderr)
	}
	f.restored(t, append([]string{"--repo"}, to...), f.ids...)
}
