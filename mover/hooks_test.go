package mover_test

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nbdmover/nbdmover/internal/backuptest"
	"github.com/nbdmover/nbdmover/internal/qemutest"
	"github.com/nbdmover/nbdmover/mover"
	"github.com/nbdmover/nbdmover/mover/nbd"
	"github.com/nbdmover/nbdmover/pipeline"
	"github.com/nbdmover/nbdmover/repo"
	"github.com/nbdmover/nbdmover/sink"
)

// hookBackup backs up img (served by qemu-nbd) as "hooked" with hooks.
func hookBackup(t *testing.T, ro repo.Options, img string, h mover.Hooks) (*mover.BackupResult, error) {
	t.Helper()
	srv := qemutest.Serve(t, img, "-r")
	defer srv.Kill()
	return mover.Backup(t.Context(), nbd.New(nbd.Options{URI: srv.URI, Name: "hooked", Disk: "vda"}),
		mover.Options{Repo: ro, Init: true, RunDir: t.TempDir(), Hooks: h, Log: backuptest.Log(t)})
}

// envOf reads the environment a hook wrote with env -0.
func envOf(t *testing.T, path string) map[string]string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("the hook did not run: %v", err)
	}
	env := map[string]string{}
	for _, kv := range strings.Split(string(b), "\x00") {
		if k, v, ok := strings.Cut(kv, "="); ok {
			env[k] = v
		}
	}
	return env
}

// Hooks around a backup: their environment (no secrets), the result file,
// a failing pre-hook that stops the backup before anything is made (not
// even the repository) while the post-hook still runs, a failing
// post-hook that leaves the backup committed, and a hook that outlasts its
// timeout killed with what it started.
func TestHooks(t *testing.T) {
	dir := t.TempDir()
	img := qemutest.NewImage(t, dir, 8*MiB)
	qemutest.IO(t, img, "write -P 0x42 1M 2M")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "do-not-pass-on")
	t.Setenv("NBDMOVER_PASSWORD", "do-not-pass-on")
	ro := repo.Options{Location: filepath.Join(dir, "repo")}
	pre, post, result := filepath.Join(dir, "pre.env"), filepath.Join(dir, "post.env"), filepath.Join(dir, "result.json")

	res, err := hookBackup(t, ro, img, mover.Hooks{Pre: "env -0 > " + pre,
		Post: "env -0 > " + post + " && cp \"$NBDMOVER_RESULT_FILE\" " + result})
	if err != nil {
		t.Fatal(err)
	}
	e := envOf(t, pre)
	if e["NBDMOVER_HOOK"] != "pre" || e["NBDMOVER_DOMAIN"] != "hooked" || e["NBDMOVER_MODE"] != "auto" || e["NBDMOVER_REPOSITORY"] != ro.Location {
		t.Errorf("pre-hook environment: %v", e)
	}
	e = envOf(t, post)
	if e["NBDMOVER_HOOK"] != "post" || e["NBDMOVER_RESULT"] != "success" || e["NBDMOVER_BACKUP_ID"] != res.ID || e["NBDMOVER_ERROR"] != "" {
		t.Errorf("post-hook environment: %v", e)
	}
	for _, f := range []string{pre, post} {
		if b, _ := os.ReadFile(f); strings.Contains(string(b), "do-not-pass-on") {
			t.Errorf("%s: a hook got a secret", f)
		}
	}
	var r mover.BackupResult
	if b, err := os.ReadFile(result); err != nil || json.Unmarshal(b, &r) != nil || r.ID != res.ID || r.BytesRead != res.BytesRead {
		t.Errorf("the result file: %+v, %v", r, err)
	}
	if _, err := os.Stat(e["NBDMOVER_RESULT_FILE"]); err == nil {
		t.Error("the result file was left behind")
	}

	// A failing pre-hook: nothing made, not even the repository; the
	// post-hook runs and is told.
	fresh := repo.Options{Location: filepath.Join(dir, "fresh")}
	os.Remove(post)
	_, err = hookBackup(t, fresh, img, mover.Hooks{Pre: "echo cannot stop the database; exit 7", Post: "env -0 > " + post})
	if err == nil || !strings.Contains(err.Error(), "pre-hook failed") || !strings.Contains(err.Error(), "cannot stop the database") {
		t.Fatalf("a failing pre-hook: %v", err)
	}
	if _, serr := os.Stat(fresh.Location); serr == nil {
		t.Error("a backup whose pre-hook failed created the repository")
	}
	if e := envOf(t, post); e["NBDMOVER_RESULT"] != "failure" || !strings.Contains(e["NBDMOVER_ERROR"], "pre-hook failed") || e["NBDMOVER_BACKUP_ID"] != "" {
		t.Errorf("post-hook after a failed pre-hook: %v", e)
	}

	// A failing post-hook: the backup stands.
	res, err = hookBackup(t, ro, img, mover.Hooks{Post: "echo the chat is down >&2; exit 1"})
	if err != nil || !strings.Contains(res.PostHookError, "the chat is down") {
		t.Fatalf("a failing post-hook: %v, %+v", err, res)
	}
	if ms, _ := backuptest.List(t, ro, "hooked"); len(ms) != 2 || ms[1].ID != res.ID {
		t.Errorf("after a failing post-hook: %d backups", len(ms))
	}

	// A hook that exits in time may leave a process running, even one
	// that holds its output: the backup goes on, the process is left be.
	bg := filepath.Join(dir, "bg.pid")
	if _, err := hookBackup(t, ro, img, mover.Hooks{Pre: "sleep 30 & echo $! > " + bg}); err != nil {
		t.Fatalf("a pre-hook that leaves a process running: %v", err)
	}
	if b, _ := os.ReadFile(bg); len(b) > 0 {
		pid := strings.TrimSpace(string(b))
		if _, err := os.Stat("/proc/" + pid); err != nil {
			t.Errorf("the process the hook left (%s) was killed", pid)
		}
		qemutest.Run(t, "kill", pid)
	}

	// A hook that outlasts its timeout is killed, and what it started.
	pidFile := filepath.Join(dir, "child.pid")
	start := time.Now()
	_, err = hookBackup(t, ro, img, mover.Hooks{Pre: "sleep 60 & echo $! > " + pidFile + "; wait", Timeout: time.Second})
	if err == nil || !strings.Contains(err.Error(), "timed out") || time.Since(start) > 30*time.Second {
		t.Fatalf("a hook past its timeout: %v after %v", err, time.Since(start))
	}
	b, _ := os.ReadFile(pidFile)
	if pid := strings.TrimSpace(string(b)); pid == "" {
		t.Error("the hook's child did not start")
	} else if _, err := os.Stat("/proc/" + pid); err == nil {
		if st, _ := os.ReadFile("/proc/" + pid + "/stat"); !strings.Contains(string(st), ") Z ") {
			t.Errorf("the hook's child %s outlived it", pid)
		}
	}
}

// --limit-read paces the reads from the NBD server: a backup that reads
// 6 MiB at 2 MiB/s takes at least what the limit allows (a lower bound:
// a slow machine cannot fail this).
func TestLimitRead(t *testing.T) {
	dir := t.TempDir()
	img := qemutest.NewImage(t, dir, 16*MiB)
	qemutest.IO(t, img, "write -P 0x42 0 6M")
	srv := qemutest.Serve(t, img, "-r")
	defer srv.Kill()
	const rate = 2 << 20
	start := time.Now()
	res, err := mover.Backup(t.Context(), nbd.New(nbd.Options{URI: srv.URI, Name: "paced", Disk: "vda"}),
		mover.Options{Repo: repo.Options{Location: filepath.Join(dir, "repo")}, Init: true, RunDir: t.TempDir(),
			Tuning: pipeline.Tuning{ReadRate: sink.NewRate(rate)}, Log: backuptest.Log(t)})
	if err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	if min := time.Duration(float64(res.BytesRead-MiB) / rate * float64(time.Second)); res.BytesRead < 6*MiB || took < min {
		t.Errorf("read %d bytes at %d bytes/s in %v: faster than the limit allows (%v)", res.BytesRead, rate, took, min)
	}
}
