package main

import (
	"bytes"
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

	"github.com/nbdmover/nbdmover/internal/backuptest"
	"github.com/nbdmover/nbdmover/internal/qemutest"
	"github.com/nbdmover/nbdmover/internal/sentinel"
	"github.com/nbdmover/nbdmover/sink/sinktest"
)

// A repository written by someone else, against every command that reads
// or writes it: a local repository with directories replaced by symbolic
// links to a host directory (the sentinel) and objects replaced by links,
// FIFOs, device nodes and oversized sparse files. After each command: no
// file of the sentinel was created, changed or deleted, the command ended
// within its timeout, its peak RSS stayed far below the planted sizes,
// and a failure names the planted object.

// hostileRun is one command's outcome.
type hostileRun struct {
	stdout, stderr string
	code           int
	rssMiB         int64
}

// nbdmoverBounded runs nbdmover like nbdmover(), killing it after limit,
// and measures its peak RSS.
func nbdmoverBounded(t *testing.T, limit time.Duration, env []string, args ...string) hostileRun {
	t.Helper()
	spec, _ := json.Marshal(args)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(append(os.Environ(), "NBDMOVER_MAIN_ARGS="+string(spec), "NBDMOVER_REPO="), env...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	var err error
	select {
	case err = <-done:
	case <-time.After(limit):
		cmd.Process.Kill()
		<-done
		t.Fatalf("%v hangs (killed after %v): %s", args, limit, stderr.String())
	}
	run := hostileRun{stdout: stdout.String(), stderr: stderr.String()}
	if ee, ok := err.(*exec.ExitError); ok {
		run.code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	if ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage); ok {
		run.rssMiB = ru.Maxrss >> 10
	}
	return run
}

// plant changes the repository at dir as its hostile writer would, and
// returns what a failing command must name.
type plant struct {
	name  string
	do    func(t *testing.T, dir, outside string) string
	cmds  []string // which commands to run (keys of hostileCommands)
	crypt bool     // in an encrypted repository
}

func TestHostileRepository(t *testing.T) {
	qemutest.Need(t, "qemu-nbd", "qemu-img", "qemu-io")
	img := backuptest.Image(t, 24<<20+4096)
	srv := qemutest.Serve(t, img, "-r", "-B", "b0")
	const password = "a password for the hostile test"
	var env []string

	// Two template repositories (plain and encrypted), each with two
	// backups of the export.
	template := func(encrypted bool) string {
		dir := filepath.Join(t.TempDir(), "repo")
		args := []string{"init", "--repo", dir, "--chunk-size", "256KiB"}
		var e []string
		if encrypted {
			args = append(args, "--encryption")
			e = []string{"NBDMOVER_PASSWORD=" + password}
		}
		if _, stderr, code := nbdmoverEnv(t, e, args...); code != 0 {
			t.Fatalf("init: %s", stderr)
		}
		for range 2 {
			if _, stderr, code := nbdmoverEnv(t, e, "backup", "--repo", dir, "--nbd", srv.URI, "--name", "disk1", "--bitmap", "b0"); code != 0 {
				t.Fatalf("backup: %s", stderr)
			}
		}
		return dir
	}
	plain, encrypted := template(false), template(true)

	commands := map[string][]string{
		"backup":    {"backup", "--nbd", srv.URI, "--name", "disk1", "--bitmap", "b0"},
		"list":      {"list"},
		"restore":   {"restore", "--domain", "disk1", "--output", "OUT"},
		"verify":    {"verify"},
		"read-data": {"verify", "--read-data"},
		"gc":        {"gc", "--grace", "1ms", "--patience", "1s"},
		"forget":    {"forget", "--domain", "disk1", "--keep-last", "1"},
		"unlock":    {"unlock"},
		"cleanup":   {"cleanup", "--domain", "nosuchdomain", "--json"},
		"key-list":  {"key", "list"},
	}
	all := []string{"backup", "list", "restore", "verify", "read-data", "gc", "forget", "unlock"}

	for _, p := range hostilePlants() {
		t.Run(p.name, func(t *testing.T) {
			outside, check := sentinel.New(t)
			dir := filepath.Join(t.TempDir(), "repo")
			from := plain
			e := env
			if p.crypt {
				from = encrypted
				e = append(e, "NBDMOVER_PASSWORD="+password)
			}
			if out, err := exec.Command("cp", "-a", from, dir).CombinedOutput(); err != nil {
				t.Fatalf("%v: %s", err, out)
			}
			culprit := p.do(t, dir, outside)
			cmds := p.cmds
			if cmds == nil {
				cmds = all
			}
			for _, name := range cmds {
				args := append([]string(nil), commands[name]...)
				for i, a := range args {
					if a == "OUT" {
						args[i] = filepath.Join(t.TempDir(), "restore")
					}
				}
				args = append(args, "--repo", dir)
				run := nbdmoverBounded(t, 90*time.Second, e, args...)
				t.Logf("%s: exit %d, %d MiB: %s", name, run.code, run.rssMiB, firstLine(run.stderr+run.stdout))
				if run.rssMiB > 400 {
					t.Errorf("%s took %d MiB (a planted object was read into memory?)", name, run.rssMiB)
				}
				if run.code != 0 && !strings.Contains(run.stdout+run.stderr, culprit) {
					t.Errorf("%s failed (exit %d) without naming %s:\n%s%s", name, run.code, culprit, run.stdout, run.stderr)
				}
			}
			check()
		})
	}
}

func firstLine(s string) string {
	s, _, _ = strings.Cut(strings.TrimSpace(s), "\n")
	return s
}

// some returns the first file matching pattern below dir, relative to it.
func some(t *testing.T, dir, pattern string) string {
	t.Helper()
	m, _ := filepath.Glob(filepath.Join(dir, pattern))
	if len(m) == 0 {
		t.Fatalf("no %s in %s", pattern, dir)
	}
	rel, _ := filepath.Rel(dir, m[0])
	return rel
}

// replace puts what at rel: "link" (to the sentinel's victim, or to the
// sentinel itself for a directory), "fifo", "device" (/dev/zero's
// numbers) or "huge" (a sparse file of 768 MiB). Its time is an hour ago,
// as an attacker's lock that is not refreshed would be.
func replace(t *testing.T, dir, rel, what, outside string) {
	t.Helper()
	p := filepath.Join(dir, rel)
	st, err := os.Lstat(p)
	isDir := err == nil && st.IsDir()
	os.RemoveAll(p)
	os.MkdirAll(filepath.Dir(p), 0o700)
	switch what {
	case "link":
		target := filepath.Join(outside, "victim")
		if isDir {
			target = outside
		}
		err = os.Symlink(target, p)
	case "fifo":
		err = syscall.Mkfifo(p, 0o600)
	case "device":
		err = syscall.Mknod(p, syscall.S_IFCHR|0o600, 1<<8|5)
	case "huge":
		if err = os.WriteFile(p, nil, 0o600); err == nil {
			err = os.Truncate(p, 768<<20)
		}
	}
	if err != nil {
		t.Skipf("cannot plant a %s here: %v", what, err)
	}
	old := time.Now().Add(-time.Hour)
	if what != "link" {
		os.Chtimes(p, old, old)
	}
}

func hostilePlants() []plant {
	var out []plant
	dirLink := func(name, pattern string, cmds []string, crypt bool) {
		out = append(out, plant{name: name + "-dir-link", cmds: cmds, crypt: crypt, do: func(t *testing.T, dir, outside string) string {
			rel := some(t, dir, pattern)
			replace(t, dir, rel, "link", outside)
			return filepath.ToSlash(rel)
		}})
	}
	dirLink("fanout", "chunks/*", nil, false)
	dirLink("manifests", "manifests/disk1", nil, false)
	dirLink("locks", "locks", append([]string{"cleanup"}, "backup", "gc", "unlock", "verify"), false)
	dirLink("keys", "keys", []string{"list", "key-list"}, true)
	// The worst case a review found: a referenced chunk overwritten with
	// chosen bytes, its quarantine directory a link to a host directory
	// (/etc/cron.d). verify --read-data must not write there.
	out = append(out, plant{name: "quarantine-dir-link", cmds: []string{"read-data", "gc", "backup", "read-data"}, do: func(t *testing.T, dir, outside string) string {
		rel := some(t, dir, "chunks/*/*")
		os.WriteFile(filepath.Join(dir, rel), []byte("* * * * * root touch /tmp/pwned\n"), 0o600)
		q := filepath.Join("state/quarantine", filepath.Dir(rel))
		os.MkdirAll(filepath.Join(dir, q), 0o700)
		replace(t, dir, q, "link", outside)
		return filepath.ToSlash(q)
	}})
	kinds := []struct {
		kind, pattern string
		crypt         bool
		forms         []string
	}{
		{"chunk", "chunks/*/*", false, []string{"link", "fifo", "device", "huge"}},
		{"manifest", "manifests/disk1/*", false, []string{"link", "fifo", "device", "huge"}},
		{"index", "indexes/*/*", false, []string{"link", "fifo", "huge"}},
		{"lock", "locks/shared-0123456789abcdef", false, []string{"link", "fifo", "huge"}},
		{"exclusive-lock", "locks/exclusive-0123456789abcdef", false, []string{"fifo", "huge"}},
		{"key", "keys/*", true, []string{"link", "fifo", "huge"}},
		{"config", "config", false, []string{"link", "fifo", "device", "huge"}},
	}
	for _, k := range kinds {
		for _, form := range k.forms {
			cmds := []string(nil)
			switch k.kind {
			case "key":
				cmds = []string{"list", "key-list", "verify", "restore"}
			case "config":
				cmds = []string{"list", "backup", "gc", "cleanup"}
			}
			out = append(out, plant{name: k.kind + "-" + form, cmds: cmds, crypt: k.crypt, do: func(t *testing.T, dir, outside string) string {
				rel := k.pattern
				if strings.Contains(rel, "*") {
					rel = some(t, dir, rel)
				}
				replace(t, dir, rel, form, outside)
				return filepath.ToSlash(rel)
			}})
		}
	}
	return out
}

// Several concurrent key removals never leave an encrypted repository
// without a key: two sessions, each opened with one key, each remove the
// other's key at once (forced with holds after each delete), on the local
// store and on MinIO.
func TestConcurrentKeyRemoval(t *testing.T) {
	for _, where := range []string{"local", "s3"} {
		t.Run(where, func(t *testing.T) {
			repoArgs := []string{"--repo", filepath.Join(t.TempDir(), "repo")}
			if where == "s3" {
				repoArgs = s3RepoArgs(t)
			}
			pwA, pwB := filepath.Join(t.TempDir(), "a"), filepath.Join(t.TempDir(), "b")
			os.WriteFile(pwA, []byte("password A"), 0o600)
			os.WriteFile(pwB, []byte("password B"), 0o600)
			if _, stderr, code := nbdmover(t, append([]string{"init", "--encryption", "--password-file", pwA}, repoArgs...)...); code != 0 {
				t.Fatal(stderr)
			}
			if _, stderr, code := nbdmover(t, append([]string{"key", "add", "--password-file", pwA, "--new-password-file", pwB}, repoArgs...)...); code != 0 {
				t.Fatal(stderr)
			}
			ids, idA := keyIDs(t, pwA, repoArgs) // idA: the key A's password opens
			if len(ids) != 2 {
				t.Fatalf("keys: %v", ids)
			}
			idB := ids[0]
			if idB == idA {
				idB = ids[1]
			}
			// Both sessions open, then both delete, then both check.
			holdA, holdB := t.TempDir(), t.TempDir()
			openedA, openedB := gate(t, holdA, "key-remove"), gate(t, holdB, "key-remove")
			deletedA, deletedB := gate(t, holdA, "key-removed"), gate(t, holdB, "key-removed")
			a := start(t, holdA, append(append([]string{"key", "remove", "--password-file", pwA}, repoArgs...), idB)...)
			b := start(t, holdB, append(append([]string{"key", "remove", "--password-file", pwB}, repoArgs...), idA)...)
			openedA()
			openedB()
			open(holdA, "key-remove")
			open(holdB, "key-remove")
			deletedA()
			deletedB()
			open(holdA, "key-removed")
			open(holdB, "key-removed")
			// Whichever checks first finds its key gone and puts back the
			// key it removed; the other then may find its key back.
			_, errA, codeA := a.wait(t)
			_, errB, codeB := b.wait(t)
			t.Logf("A: exit %d %s; B: exit %d %s", codeA, errA, codeB, errB)
			if codeA == 0 && codeB == 0 {
				t.Fatal("both removals succeeded: the repository has no key")
			}
			for _, e := range []string{errA, errB} {
				if e != "" && !strings.Contains(e, "was put back") {
					t.Errorf("a refused removal does not say what it did: %s", e)
				}
			}
			want := 2
			if codeA == 0 || codeB == 0 {
				want = 1
			}
			opened := 0
			for _, pw := range []string{pwA, pwB} {
				if _, _, code := nbdmover(t, append([]string{"list", "--password-file", pw}, repoArgs...)...); code == 0 {
					opened++
				}
			}
			if opened != want {
				t.Fatalf("%d passwords open the repository, want %d", opened, want)
			}
			if codeA == 0 || codeB == 0 { // start again with both keys
				have, lost := pwA, pwB // A's removal of B's key went through
				if codeB == 0 {
					have, lost = pwB, pwA
				}
				if _, stderr, code := nbdmover(t, append([]string{"key", "add", "--password-file", have, "--new-password-file", lost}, repoArgs...)...); code != 0 {
					t.Fatal(stderr)
				}
				ids, idA = keyIDs(t, pwA, repoArgs)
				if idB = ids[0]; idB == idA {
					idB = ids[1]
				}
			}
			// B's session opens, then A removes B's key; B's removal of A's
			// key comes after that and finds its own key gone: A's key is
			// put back, and A's password still opens the repository.
			openedB = gate(t, holdB, "key-remove")
			b = start(t, holdB, append(append([]string{"key", "remove", "--password-file", pwB}, repoArgs...), idA)...)
			openedB()
			if _, stderr, code := nbdmover(t, append(append([]string{"key", "remove", "--password-file", pwA}, repoArgs...), idB)...); code != 0 {
				t.Fatalf("remove B: %s", stderr)
			}
			open(holdB, "key-remove")
			if _, stderr, code := b.wait(t); code == 0 || !strings.Contains(stderr, "was put back") {
				t.Fatalf("B's removal after its own key went: exit %d %s", code, stderr)
			}
			if ids, cur := keyIDs(t, pwA, repoArgs); len(ids) != 1 || cur != idA {
				t.Fatalf("keys left: %v (current %s)", ids, cur)
			}
		})
	}
}

// keyIDs lists the repository's keys, opened with the password in pw,
// and says which one that password opens.
func keyIDs(t *testing.T, pw string, repoArgs []string) (ids []string, current string) {
	t.Helper()
	out, stderr, code := nbdmover(t, append([]string{"key", "list", "--json", "--password-file", pw}, repoArgs...)...)
	if code != 0 {
		t.Fatalf("key list: %s", stderr)
	}
	var doc struct {
		Keys []struct {
			ID      string `json:"id"`
			Current bool   `json:"current"`
		} `json:"keys"`
	}
	if err := json.Unmarshal([]byte(out), &doc); err != nil {
		t.Fatalf("key list --json: %v: %q", err, out)
	}
	for _, k := range doc.Keys {
		ids = append(ids, k.ID)
		if k.Current {
			current = k.ID
		}
	}
	return ids, current
}

// s3RepoArgs names a repository in a new bucket of the test MinIO.
func s3RepoArgs(t *testing.T) []string {
	return []string{"--repo", fmt.Sprintf("s3://t-%d-%08x/r", time.Now().UnixNano()%1e9, rand.Uint32()), "--s3-endpoint", sinktest.S3Endpoint(t)}
}
