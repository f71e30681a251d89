package main

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nbdmover/nbdmover/internal/backuptest"
	"github.com/nbdmover/nbdmover/internal/qemutest"
	nbdrepo "github.com/nbdmover/nbdmover/repo"
)

// TestMain runs the real main in a helper process when NBDMOVER_MAIN_ARGS
// holds its arguments (a JSON list), so tests see real exit statuses.
func TestMain(m *testing.M) {
	// Password keys cheap to derive (the repositories these tests make
	// record it); TestEncryptedCommands checks a key by the format alone.
	nbdrepo.SetPasswordCost(nbdrepo.Cost{Time: 1, MemoryKiB: 8 << 10, Threads: 1})
	if args := os.Getenv("NBDMOVER_MAIN_ARGS"); args != "" {
		if err := json.Unmarshal([]byte(args), &os.Args); err != nil {
			panic(err)
		}
		os.Args = append([]string{"nbdmover"}, os.Args...)
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// nbdmover runs the command and returns stdout, stderr and exit status.
func nbdmover(t *testing.T, args ...string) (string, string, int) {
	t.Helper()
	return nbdmoverEnv(t, nil, args...)
}

// nbdmoverEnv is nbdmover with more environment variables.
func nbdmoverEnv(t *testing.T, env []string, args ...string) (string, string, int) {
	t.Helper()
	spec, _ := json.Marshal(args)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(append(os.Environ(), "NBDMOVER_MAIN_ARGS="+string(spec), "NBDMOVER_REPO="), env...)
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return stdout.String(), stderr.String(), code
}

func TestUsageErrorsExit2(t *testing.T) {
	for _, args := range [][]string{
		{"backup"},
		{"backup", "--domain", "a", "--nbd", "nbd://x"},
		{"backup", "--bogus"},
		{"restore", "--domain", "vm1"},
		{"list", "extra-argument"},
		{"verify", "--backup", "20261128T000000.000Z"},
		{"init", "--chunk-size", "lots"},
		{"nosuchcommand"},
		// Bad values, caught before anything is touched.
		{"backup", "--domain", "vm1", "--mode", "sideways"},
		{"backup", "--domain", "vm1", "--compression", "lz4"},
		{"backup", "--domain", "../etc"},
		{"backup", "--nbd", "nbd://127.0.0.1:9", "--name", "a/b"},
		{"backup", "--domain", "vm1", "--readers", "1000"},
		{"backup", "--domain", "vm1", "--verify-sample", "-3"},
		{"init", "--compression", "brotli"},
		{"restore", "--domain", "vm1", "--output", "/tmp/x", "--format", "vmdk"},
		{"restore", "--domain", "../vm1", "--output", "/tmp/x"},
		{"list", "--domain", "a b"},
		{"verify", "--domain", "vm1/.."},
		{"cleanup", "--domain", "../x"},
		{"forget", "--domain", "vm1"},
		{"forget", "--keep-last", "1"},
		{"forget", "--domain", "vm1", "--all", "--keep-last", "1"},
		{"forget", "--domain", "vm1", "--keep-daily", "-1"},
		{"forget", "--domain", "../vm1", "--keep-last", "1"},
		{"protect", "--domain", "vm1"},
		{"protect", "--domain", "vm1", "--backup", "yesterday"},
		{"unprotect", "--domain", "vm1", "--backup", "latest"},
		{"gc", "--grace", "-1h"},
		{"gc", "extra"},
		{"unlock", "--bogus"},
		{"serve", "--keep-last", "-2"},
		{"serve", "--max-memory", "plenty"},
		{"serve", "--token-file", "/nonexistent/token"},
		// Encryption: secrets never from a flag value; one source.
		{"list", "--password", "secret"},
		{"init", "--encryption"},
		{"list", "--password-file", "/nonexistent/password"},
		{"list", "--key-file", "/nonexistent/key"},
		{"list", "--key-file", "/etc/hostname"},
		{"key", "remove"},
		{"key", "remove", "not-an-id"},
		{"key", "add", "--new-key-file", "/etc/hostname"},
		{"key", "passwd"},
		{"key", "lst"},
		// File-level restore: checked before an appliance starts.
		{"files", "lss"},
		{"files", "ls", "--domain", "vm1", "--bogus", "/"},
		{"files", "get", "--domain", "vm1", "/etc", "--output"},
		{"files", "get", "--domain", "vm1", "/etc"},
		{"files", "get", "--domain", "vm1", "/etc", "--output", "/tmp/x", "--tar", "-"},
		{"files", "ls", "--domain", "vm1", "--appliance-memory", "100MiB", "/"},
		{"files", "ls", "--domain", "vm1", "--run-dir", "/tmp", "/"},
		{"files", "diff", "--domain", "vm1", "--from", "yesterday", "/"},
		{"files", "fs", "--domain", "vm1", "/etc"},
		{"serve", "--files-memory", "100MiB"},
		{"serve", "--files-idle-timeout", "0"},
		{"serve", "--files-accel", "fast"},
		{"backup", "--domain", "vm1", "--hook-timeout", "0"},
		{"backup", "--domain", "vm1", "--pre-hook", " "},
		{"serve", "--hook-timeout", "soon"},
		{"backup", "--domain", "vm1", "--limit-upload", "fast"},
		{"list", "--limit-download", "1KiB"},
		{"backup", "--domain", "vm1", "--limit-read", "1"},
		{"backup", "--domain", "vm1", "--repo", "/nonexistent/r", "--progress", "loud"},
		{"restore", "--domain", "vm1", "--repo", "/nonexistent/r", "--output", "/tmp/x", "--progress", "json", "--progress-interval", "5ms"},
		{"verify", "--repo", "/nonexistent/r", "--progress-interval", "soon"},
		{"copy", "--from", "/tmp/a", "--to", "/tmp/b"},
	} {
		_, stderr, code := nbdmover(t, args...)
		if code != 2 || !strings.Contains(stderr, "nbdmover:") && args[0] != "nosuchcommand" {
			t.Errorf("%v: exit %d, stderr %q; want 2 and a message", args, code, stderr)
		}
	}
}

func TestCommandsAndJSON(t *testing.T) {
	repo := filepath.Join(t.TempDir(), "repo")
	if _, stderr, code := nbdmover(t, "list", "--repo", repo); code != 10 || !strings.Contains(stderr, "nbdmover init") {
		t.Fatalf("list of a missing repository: %d %q", code, stderr)
	}
	if out, _, code := nbdmover(t, "init", "--repo", repo, "--chunk-size", "256KiB"); code != 0 || !strings.Contains(out, "262144") {
		t.Fatalf("init: %d %q", code, out)
	}
	if _, _, code := nbdmover(t, "init", "--repo", repo); code != 1 {
		t.Fatalf("a second init must fail: %d", code)
	}
	var empty struct{ Backups []any }
	out, _, code := nbdmover(t, "list", "--repo", repo, "--json")
	if code != 0 || json.Unmarshal([]byte(out), &empty) != nil || empty.Backups == nil || len(empty.Backups) != 0 {
		t.Fatalf("empty list --json: %d %q", code, out)
	}

	img := qemutest.NewImage(t, t.TempDir(), 8<<20)
	qemutest.IO(t, img, "write -P 0x42 1M 2M")
	srv := qemutest.Serve(t, img, "-r")
	out, stderr, code := nbdmover(t, "backup", "--repo", repo, "--nbd", srv.URI, "--name", "disk1", "--disk", "vdb", "--json")
	var res struct {
		ID, Domain, Mode string
		Disks            []struct {
			Name         string
			BytesRead    int64 `json:"bytes_read"`
			BytesWritten int64 `json:"bytes_written"`
		}
	}
	if code != 0 || json.Unmarshal([]byte(out), &res) != nil || res.ID == "" || res.Domain != "disk1" || res.Mode != "full" ||
		len(res.Disks) != 1 || res.Disks[0].Name != "vdb" || res.Disks[0].BytesRead != 2<<20 || res.Disks[0].BytesWritten == 0 {
		t.Fatalf("backup --json: %d %q %q", code, out, stderr)
	}
	var list struct {
		Backups []struct {
			ID, Domain, Mode, Created string
			Disks                     []struct {
				Name string
				Size int64
			}
		}
	}
	out, _, _ = nbdmover(t, "list", "--repo", repo, "--json")
	if json.Unmarshal([]byte(out), &list) != nil || len(list.Backups) != 1 || list.Backups[0].ID != res.ID ||
		list.Backups[0].Created == "" || list.Backups[0].Disks[0].Size != 8<<20 {
		t.Fatalf("list --json: %q", out)
	}
	dest := filepath.Join(t.TempDir(), "vdb.raw")
	if _, stderr, code := nbdmover(t, "restore", "--repo", repo, "--domain", "disk1", "--disk", "vdb", "--output", dest); code != 0 {
		t.Fatalf("restore: %d %q", code, stderr)
	}
	qemutest.Compare(t, img, "qcow2", dest, "raw")
	if _, _, code := nbdmover(t, "verify", "--repo", repo, "--read-data"); code != 0 {
		t.Fatalf("verify of a good repository: %d", code)
	}
	// A manifest of a newer nbdmover is skipped by list (with a warning)
	// and reported by verify.
	backuptest.PutManifest(t, repo, "disk1", "20991231T000000.000Z", []byte(`{"version": 9}`), true)
	out, stderr, code = nbdmover(t, "list", "--repo", repo, "--json")
	if code != 0 || json.Unmarshal([]byte(out), &list) != nil || len(list.Backups) != 1 || !strings.Contains(stderr, "20991231T000000.000Z") {
		t.Fatalf("list next to a newer manifest: %d %q %q", code, out, stderr)
	}
	if out, _, code := nbdmover(t, "verify", "--repo", repo); code != 1 || !strings.Contains(out, "format 9") {
		t.Fatalf("verify next to a newer manifest: %d %q", code, out)
	}
	os.Remove(filepath.Join(repo, filepath.FromSlash(nbdrepo.ManifestKey("disk1", "20991231T000000.000Z"))))
	chunks, _ := filepath.Glob(filepath.Join(repo, "chunks", "*", "*"))
	os.Remove(chunks[0])
	out, _, code = nbdmover(t, "verify", "--repo", repo, "--json")
	var v struct{ Problems []struct{ Object string } }
	if code != 1 || json.Unmarshal([]byte(out), &v) != nil || len(v.Problems) != 1 || !strings.HasSuffix(chunks[0], v.Problems[0].Object) {
		t.Fatalf("verify of a damaged repository: %d %q", code, out)
	}
}

// verify says whether it found problems (1) or could not check (3; 10
// when there is no repository).
func TestVerifyCannotCheckExit3(t *testing.T) {
	if _, stderr, code := nbdmover(t, "verify", "--repo", filepath.Join(t.TempDir(), "none")); code != 10 || !strings.Contains(stderr, "nbdmover init") {
		t.Fatalf("verify of a missing repository: %d %q", code, stderr)
	}
	_, stderr, code := nbdmover(t, "verify", "--repo", "s3://bucket", "--s3-endpoint", "http://127.0.0.1:9")
	if code != 3 || !strings.Contains(stderr, "127.0.0.1:9") {
		t.Fatalf("verify of an unreachable store: %d %q", code, stderr)
	}
}

// serve reads --hooks-file at start: one others may write stops it.
func TestServeHooksFile(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "hooks.json")
	os.WriteFile(file, []byte(`{"domains": {}}`), 0o666)
	os.Chmod(file, 0o666)
	_, stderr, code := nbdmover(t, "serve", "--repo", filepath.Join(t.TempDir(), "r"), "--init", "--listen", "unix://"+filepath.Join(dir, "s.sock"), "--hooks-file", file)
	if code != 2 || !strings.Contains(stderr, "others may write it") {
		t.Fatalf("exit %d: %s", code, stderr)
	}
}

// A --limit-schedule rule is taken whole: the comma of a day list does
// not split it (the second, bad, rule is the one refused).
func TestLimitScheduleFlagKeepsCommas(t *testing.T) {
	_, stderr, code := nbdmover(t, "serve", "--repo", t.TempDir(), "--limit-schedule", "sat,sun 00:00-24:00 upload=off", "--limit-schedule", "weekends upload=off")
	if code != 2 || !strings.Contains(stderr, `"weekends upload=off"`) || strings.Contains(stderr, `"sat"`) {
		t.Fatalf("exit %d: %s", code, stderr)
	}
}
