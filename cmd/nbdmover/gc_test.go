package main

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nbdmover/nbdmover/internal/qemutest"
	"github.com/nbdmover/nbdmover/sink/sinktest"
)

// proc is an nbdmover running in a helper process.
type proc struct {
	cmd            *exec.Cmd
	stdout, stderr *os.File
	done           chan struct{}
	code           int
}

// start runs nbdmover with args in the background; NBDMOVER_TEST_HOLD
// points at holds, where gate files stop it at steps (internal/hold).
func start(t *testing.T, holds string, args ...string) *proc {
	t.Helper()
	spec, _ := json.Marshal(args)
	p := &proc{done: make(chan struct{})}
	p.cmd = exec.Command(os.Args[0], "-test.run=^$")
	p.cmd.Env = append(os.Environ(), "NBDMOVER_MAIN_ARGS="+string(spec), "NBDMOVER_REPO=", "NBDMOVER_TEST_HOLD="+holds)
	var err error
	dir := t.TempDir()
	if p.stdout, err = os.Create(filepath.Join(dir, "stdout")); err != nil {
		t.Fatal(err)
	}
	if p.stderr, err = os.Create(filepath.Join(dir, "stderr")); err != nil {
		t.Fatal(err)
	}
	p.cmd.Stdout, p.cmd.Stderr = p.stdout, p.stderr
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		err := p.cmd.Wait()
		if ee, ok := err.(*exec.ExitError); ok {
			p.code = ee.ExitCode()
		} else if err != nil {
			p.code = -1
		}
		close(p.done)
	}()
	t.Cleanup(func() { p.cmd.Process.Kill(); <-p.done })
	return p
}

func (p *proc) output() (string, string) {
	o, _ := os.ReadFile(p.stdout.Name())
	e, _ := os.ReadFile(p.stderr.Name())
	return string(o), string(e)
}

// wait waits for the process to end and returns its output and status.
func (p *proc) wait(t *testing.T) (string, string, int) {
	t.Helper()
	select {
	case <-p.done:
	case <-time.After(2 * time.Minute):
		t.Fatal("nbdmover did not end")
	}
	o, e := p.output()
	return o, e, p.code
}

func (p *proc) running() bool {
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// waitFor polls until cond holds.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(time.Minute); !cond(); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// gate closes step's gate; the returned function waits until a process
// holds there.
func gate(t *testing.T, holds, step string) (reached func()) {
	t.Helper()
	os.Remove(filepath.Join(holds, step+".reached"))
	if err := os.WriteFile(filepath.Join(holds, step), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	return func() {
		t.Helper()
		waitFor(t, "a process at "+step, func() bool {
			_, err := os.Stat(filepath.Join(holds, step+".reached"))
			return err == nil
		})
	}
}

func open(holds, step string) { os.Remove(filepath.Join(holds, step)) }

type gcJSON struct {
	Backups int   `json:"backups"`
	Late    int   `json:"late_backups"`
	Rescued int64 `json:"rescued"`
	Chunks  struct {
		Kept, Deleted int64
	} `json:"chunks"`
}

func parseGC(t *testing.T, out string) gcJSON {
	t.Helper()
	var g gcJSON
	if err := json.Unmarshal([]byte(out), &g); err != nil {
		t.Fatalf("gc --json: %v: %q", err, out)
	}
	return g
}

// gc beside backups, with real processes stopped at the steps that
// matter (internal/hold), on the local store and on MinIO: a backup that
// deduplicates against gc's candidates and commits while gc waits; a
// backup that starts while gc sweeps; a gc killed mid-sweep; two gcs; a
// backup killed before it commits; a gc that waits for a quiet moment.
// After each, the backups restore
// bit-exact and verify --read-data passes.
func TestGCBesideBackups(t *testing.T) {
	qemutest.Need(t, "qemu-nbd", "qemu-img", "qemu-io")
	for _, where := range []string{"local", "s3"} {
		t.Run(where, func(t *testing.T) {
			newRepo := func() []string {
				if where == "s3" {
					return []string{"--repo", fmt.Sprintf("s3://gc-%d-%08x/r", time.Now().UnixNano()%1e9, rand.Uint32()),
						"--s3-endpoint", sinktest.S3Endpoint(t)}
				}
				return []string{"--repo", filepath.Join(t.TempDir(), "repo")}
			}
			testGCBesideBackups(t, newRepo())
			testGCBesideIncremental(t, newRepo())
		})
	}
}

func testGCBesideBackups(t *testing.T, repoArgs []string) {
	holds := t.TempDir()
	img := qemutest.NewImage(t, t.TempDir(), 8<<20)
	qemutest.IO(t, img, "write -P 0x11 0 3M", "write -P 0x22 5M 1M")
	ref := qemutest.RawCopy(t, img)
	srv := qemutest.Serve(t, img, "-r")
	run := func(args ...string) (string, string, int) {
		t.Helper()
		return nbdmover(t, append(args, repoArgs...)...)
	}
	must := func(args ...string) string {
		t.Helper()
		out, stderr, code := run(args...)
		if code != 0 {
			t.Fatalf("%v: exit %d: %s", args, code, stderr)
		}
		return out
	}
	backupArgs := append([]string{"backup", "--init", "--nbd", srv.URI, "--name", "d1", "--disk", "vda", "--json"}, repoArgs...)
	gcArgs := append([]string{"gc", "--grace", "1ms", "--json"}, repoArgs...)
	backupID := func(out string) string {
		t.Helper()
		var res struct{ ID string }
		if json.Unmarshal([]byte(out), &res) != nil || res.ID == "" {
			t.Fatalf("backup output: %q", out)
		}
		return res.ID
	}
	restored := func(id string) {
		t.Helper()
		dest := filepath.Join(t.TempDir(), "vda.raw")
		must("restore", "--domain", "d1", "--backup", id, "--disk", "vda", "--output", dest)
		qemutest.Compare(t, ref, "raw", dest, "raw")
		must("verify", "--read-data")
	}
	forgetAll := func() {
		t.Helper()
		must("forget", "--domain", "d1", "--keep-last", "0")
		time.Sleep(1100 * time.Millisecond) // S3's Last-Modified has whole seconds: the chunks are older than the grace
	}

	backupID(must(backupArgs[:len(backupArgs)-len(repoArgs)]...))
	forgetAll() // its chunks are garbage now

	// A backup that finds every chunk stored (gc's candidates, all of
	// them) stops before its commit, holding its shared lock; gc computes
	// its candidates and waits for the lock; the backup commits; gc
	// adds its references and deletes none of them.
	reached := gate(t, holds, "backup-commit")
	b := start(t, holds, backupArgs...)
	reached()
	// No patience: gc takes the exclusive lock beside the running backup
	// (the harder case), then waits for the backup's shared lock.
	g := start(t, holds, append(gcArgs, "--patience", "1ms")...)
	waitFor(t, "gc to wait for the backup", func() bool {
		_, e := g.output()
		return strings.Contains(e, "waiting for the backups")
	})
	time.Sleep(500 * time.Millisecond)
	if !g.running() {
		o, e := g.output()
		t.Fatalf("gc did not wait for the backup: %s %s", o, e)
	}
	open(holds, "backup-commit")
	out, stderr, code := b.wait(t)
	if code != 0 {
		t.Fatalf("backup beside gc: %d %s", code, stderr)
	}
	id2 := backupID(out)
	out, stderr, code = g.wait(t)
	if res := parseGC(t, out); code != 0 || res.Late != 1 || res.Rescued == 0 || res.Chunks.Deleted != 0 {
		t.Fatalf("gc beside a backup: %d %+v %s", code, res, stderr)
	}
	restored(id2)

	// gc holds the exclusive lock: a backup that starts waits, and after
	// gc deleted every chunk, stores them again.
	forgetAll()
	reached = gate(t, holds, "gc-locked")
	g = start(t, holds, gcArgs...)
	reached()
	b = start(t, holds, backupArgs...)
	waitFor(t, "the backup to wait for gc", func() bool {
		_, e := b.output()
		return strings.Contains(e, "waiting for the repository's exclusive lock")
	})
	open(holds, "gc-locked")
	out, stderr, code = g.wait(t)
	if res := parseGC(t, out); code != 0 || res.Chunks.Deleted == 0 || res.Chunks.Kept != 0 {
		t.Fatalf("gc before a backup: %d %+v %s", code, res, stderr)
	}
	out, stderr, code = b.wait(t)
	if code != 0 {
		t.Fatalf("backup after gc: %d %s", code, stderr)
	}
	restored(backupID(out))

	// A gc killed after deleting a batch leaves its lock: a backup goes
	// past it (its process is gone), unlock removes it and says whose it
	// was, and a second gc finishes the work.
	forgetAll()
	reached = gate(t, holds, "gc-batch")
	g = start(t, holds, gcArgs...)
	reached()
	g.cmd.Process.Signal(syscall.SIGKILL)
	g.wait(t)
	open(holds, "gc-batch")
	id4 := backupID(must(backupArgs[:len(backupArgs)-len(repoArgs)]...))
	if out := must("unlock"); !strings.Contains(out, "exclusive lock of gc") || !strings.Contains(out, "is gone") {
		t.Fatalf("unlock after a killed gc: %q", out)
	}
	if res := parseGC(t, must(gcArgs[:len(gcArgs)-len(repoArgs)]...)); res.Backups != 1 {
		t.Fatalf("gc after a killed gc: %+v", res)
	}
	restored(id4)

	// Two gcs: the second fails, naming the first, and deletes nothing.
	reached = gate(t, holds, "gc-locked")
	g = start(t, holds, gcArgs...)
	reached()
	if _, stderr, code := run(gcArgs[:len(gcArgs)-len(repoArgs)]...); code != 11 || !strings.Contains(stderr, "another gc") {
		t.Fatalf("a second gc: %d %s", code, stderr)
	}
	open(holds, "gc-locked")
	if _, stderr, code := g.wait(t); code != 0 {
		t.Fatalf("the first gc: %d %s", code, stderr)
	}

	// A backup killed before its commit leaves a shared lock that blocks
	// no gc (its process is gone) and commits nothing.
	reached = gate(t, holds, "backup-commit")
	b = start(t, holds, backupArgs...)
	reached()
	b.cmd.Process.Signal(syscall.SIGKILL)
	b.wait(t)
	open(holds, "backup-commit")
	if res := parseGC(t, must(gcArgs[:len(gcArgs)-len(repoArgs)]...)); res.Backups != 1 {
		t.Fatalf("gc after a killed backup: %+v", res)
	}
	if out := must("unlock"); !strings.Contains(out, "shared lock of backup d1") {
		t.Fatalf("unlock after a killed backup: %q", out)
	}
	restored(id4)

	// With patience, gc waits for a moment without running backups and
	// takes the exclusive lock only then.
	reached = gate(t, holds, "backup-commit")
	b = start(t, holds, backupArgs...)
	reached()
	g = start(t, holds, gcArgs...)
	waitFor(t, "gc to wait for a quiet moment", func() bool {
		_, e := g.output()
		return strings.Contains(e, "waiting for a moment without running backups")
	})
	if locks := must("unlock", "--json"); strings.Contains(locks, `"exclusive"`) {
		t.Fatalf("gc took the exclusive lock while a backup ran: %s", locks)
	}
	open(holds, "backup-commit")
	if _, stderr, code := b.wait(t); code != 0 {
		t.Fatalf("backup: %s", stderr)
	}
	if _, stderr, code := g.wait(t); code != 0 || strings.Contains(stderr, "waiting for the backups") {
		t.Fatalf("gc after a quiet moment: %d %s", code, stderr)
	}
}

// protect, list and forget from the command line: a protected backup is
// listed as such and outlives a policy that keeps nothing; --dry-run
// forgets nothing.
func TestProtectForgetCommands(t *testing.T) {
	qemutest.Need(t, "qemu-nbd", "qemu-img")
	repo := filepath.Join(t.TempDir(), "repo")
	img := qemutest.NewImage(t, t.TempDir(), 4<<20)
	qemutest.IO(t, img, "write -P 0x42 0 1M")
	srv := qemutest.Serve(t, img, "-r")
	var ids []string
	for range 3 {
		out, stderr, code := nbdmover(t, "backup", "--init", "--repo", repo, "--nbd", srv.URI, "--name", "d1", "--json")
		var res struct{ ID string }
		if code != 0 || json.Unmarshal([]byte(out), &res) != nil {
			t.Fatalf("backup: %d %s", code, stderr)
		}
		ids = append(ids, res.ID)
	}
	if out, stderr, code := nbdmover(t, "protect", "--repo", repo, "--domain", "d1", "--backup", ids[0]); code != 0 || !strings.Contains(out, "protected") {
		t.Fatalf("protect: %d %q %s", code, out, stderr)
	}
	if _, _, code := nbdmover(t, "protect", "--repo", repo, "--domain", "d1", "--backup", "20991231T000000.000Z"); code != 1 {
		t.Fatalf("protect of a missing backup: %d", code)
	}
	out, _, _ := nbdmover(t, "list", "--repo", repo)
	if !strings.Contains(out, "PROTECTED") || strings.Count(out, " yes ") != 1 {
		t.Fatalf("list: %q", out)
	}
	out, _, code := nbdmover(t, "forget", "--repo", repo, "--domain", "d1", "--keep-last", "1", "--dry-run")
	if code != 0 || !strings.Contains(out, "would forget 1") || !strings.Contains(out, ids[0]+"  (protected)") {
		t.Fatalf("forget --dry-run: %d %q", code, out)
	}
	out, _, code = nbdmover(t, "forget", "--repo", repo, "--all", "--keep-last", "0", "--json")
	var res struct {
		Domains []struct {
			Kept, Forgotten int
		}
	}
	if code != 0 || json.Unmarshal([]byte(out), &res) != nil || len(res.Domains) != 1 || res.Domains[0].Kept != 1 || res.Domains[0].Forgotten != 2 {
		t.Fatalf("forget --keep-last 0: %d %q", code, out)
	}
	var list struct{ Backups []struct{ ID string } }
	out, _, _ = nbdmover(t, "list", "--repo", repo, "--json")
	if json.Unmarshal([]byte(out), &list) != nil || len(list.Backups) != 1 || list.Backups[0].ID != ids[0] {
		t.Fatalf("list after forget: %q", out)
	}
	dest := filepath.Join(t.TempDir(), "d1.raw")
	if _, stderr, code := nbdmover(t, "gc", "--repo", repo, "--grace", "1ms"); code != 0 {
		t.Fatalf("gc: %s", stderr)
	}
	if _, stderr, code := nbdmover(t, "restore", "--repo", repo, "--domain", "d1", "--backup", ids[0], "--disk", "nbd", "--output", dest); code != 0 {
		t.Fatalf("restore of the protected backup after gc: %s", stderr)
	}
	qemutest.Compare(t, img, "qcow2", dest, "raw")
}

// Bad input to the maintenance commands: a clear error, exit 1, nothing
// deleted.
func TestMaintenanceBadInput(t *testing.T) {
	repo := filepath.Join(t.TempDir(), "repo")
	if _, _, code := nbdmover(t, "init", "--repo", repo); code != 0 {
		t.Fatal("init")
	}
	if _, stderr, code := nbdmover(t, "forget", "--repo", repo, "--domain", "nosuch", "--keep-last", "0"); code != 1 || !strings.Contains(stderr, "nosuch") {
		t.Fatalf("forget of an unknown domain: %d %s", code, stderr)
	}
	if _, stderr, code := nbdmover(t, "protect", "--repo", repo, "--domain", "nosuch", "--backup", "20261128T050058.293Z"); code != 1 || !strings.Contains(stderr, "no such backup") {
		t.Fatalf("protect of an unknown backup: %d %s", code, stderr)
	}
	ep := sinktest.S3Endpoint(t)
	s3 := fmt.Sprintf("s3://creds-%08x", rand.Uint32())
	if _, stderr, code := nbdmover(t, "init", "--repo", s3, "--s3-endpoint", ep); code != 0 {
		t.Fatalf("init on MinIO: %s", stderr)
	}
	t.Setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-123")
	_, stderr, code := nbdmover(t, "gc", "--repo", s3, "--s3-endpoint", ep)
	if code != 1 || !strings.Contains(stderr, "AWS_ACCESS_KEY_ID") || strings.Contains(stderr, "wrong-secret-123") {
		t.Fatalf("gc with wrong credentials: %d %s", code, stderr)
	}
}

// An incremental whose parent is forgotten while it runs, and whose new
// chunks (uploaded, not yet committed) are gc candidates: gc waits for
// it, and everything it references survives.
func testGCBesideIncremental(t *testing.T, repoArgs []string) {
	holds := t.TempDir()
	img := qemutest.NewImage(t, t.TempDir(), 8<<20)
	qemutest.IO(t, img, "write -P 0x31 0 4M")
	qemutest.Run(t, "qemu-img", "bitmap", "--add", img, "b0")
	srv := qemutest.Serve(t, img, "-r", "-B", "b0")
	backupArgs := func(mode string) []string {
		return append([]string{"backup", "--init", "--nbd", srv.URI, "--name", "d2", "--disk", "vda", "--bitmap", "b0", "--mode", mode, "--json"}, repoArgs...)
	}
	if _, stderr, code := nbdmover(t, backupArgs("full")...); code != 0 {
		t.Fatalf("full: %s", stderr)
	}
	srv.Kill()
	qemutest.IO(t, img, "write -P 0x32 1M 1M", "write -P 0x33 6M 1M") // new chunks for the incremental
	ref := qemutest.RawCopy(t, img)
	srv = qemutest.Serve(t, img, "-r", "-B", "b0")

	reached := gate(t, holds, "backup-commit")
	b := start(t, holds, backupArgs("incremental")...)
	reached()
	if _, stderr, code := nbdmover(t, append([]string{"forget", "--domain", "d2", "--keep-last", "0"}, repoArgs...)...); code != 0 {
		t.Fatalf("forget of the parent: %s", stderr)
	}
	time.Sleep(1100 * time.Millisecond) // the incremental's new chunks are older than the grace now
	g := start(t, holds, append([]string{"gc", "--grace", "1ms", "--patience", "1ms", "--json"}, repoArgs...)...)
	waitFor(t, "gc to wait for the incremental", func() bool {
		_, e := g.output()
		return strings.Contains(e, "waiting for the backups")
	})
	open(holds, "backup-commit")
	out, stderr, code := b.wait(t)
	var res struct{ ID, Mode, Parent string }
	if code != 0 || json.Unmarshal([]byte(out), &res) != nil || res.Mode != "incremental" || res.Parent == "" {
		t.Fatalf("incremental beside forget and gc: %d %q %s", code, out, stderr)
	}
	out, stderr, code = g.wait(t)
	if gr := parseGC(t, out); code != 0 || gr.Backups != 1 || gr.Late != 1 || gr.Rescued == 0 {
		t.Fatalf("gc beside the incremental: %d %+v %s", code, gr, stderr)
	}
	dest := filepath.Join(t.TempDir(), "vda.raw")
	if _, stderr, code := nbdmover(t, append([]string{"restore", "--domain", "d2", "--backup", res.ID, "--disk", "vda", "--output", dest}, repoArgs...)...); code != 0 {
		t.Fatalf("restore: %s", stderr)
	}
	qemutest.Compare(t, ref, "raw", dest, "raw")
	if _, stderr, code := nbdmover(t, append([]string{"verify", "--read-data"}, repoArgs...)...); code != 0 {
		t.Fatalf("verify: %s", stderr)
	}
}
