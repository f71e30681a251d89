package daemon_test

import (
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nbdmover/nbdmover/daemon"
	"github.com/nbdmover/nbdmover/internal/backuptest"
	"github.com/nbdmover/nbdmover/internal/qemutest"
	"github.com/nbdmover/nbdmover/mover"
	"github.com/nbdmover/nbdmover/repo"
	"github.com/nbdmover/nbdmover/sink/sinktest"
)

// Copy jobs into the daemon's --copy-to (MinIO): one asked for, its
// events and metrics, then one the schedule starts after a second
// backup; every backup restores bit-exact from the target. A daemon
// without a target refuses copy jobs.
func TestDaemonCopy(t *testing.T) {
	dom := qemutest.NewDomain(t, false, qemutest.DiskSpec{Dev: "vda", Format: "qcow2", Size: 64 * backuptest.MiB})
	dom.Write("vda", "write -P 0x61 0 8M")
	ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	target := repo.Options{Location: fmt.Sprintf("s3://%s/copy", strings.Split(strings.TrimPrefix(sinktest.NewS3(t, "").Location(), "s3://"), "/")[0]),
		S3Endpoint: sinktest.S3Endpoint(t)}
	tr, _, err := target.OpenOrInit(t.Context(), repo.InitOptions{})
	if err != nil {
		t.Fatal(err)
	}
	d := startDaemonServe(t, ro, 1, nil, func(o *daemon.ServeOptions) { o.CopyTo = &target },
		func(o *daemon.RunnerOptions) { o.CopyEvery = 2 * time.Second })
	backup := func() backuptest.Point {
		t.Helper()
		id, code, msg := d.submit(fmt.Sprintf(`{"domain": %q}`, dom.Name))
		if code != 202 {
			t.Fatalf("submit: %d %s", code, msg)
		}
		v := d.wait(id, daemon.JobSucceeded, daemon.JobFailed)
		if v.State != daemon.JobSucceeded {
			t.Fatalf("backup: %+v", v)
		}
		return backuptest.Point{ID: v.BackupID, Refs: dom.Snapshot()}
	}
	p1 := backup()
	var id string
	var code int
	var msg string
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(100 * time.Millisecond) { // a scheduled copy may hold the slot
		if id, code, msg = d.submit(`{"kind": "copy"}`); code == 202 || time.Now().After(deadline) {
			break
		}
	}
	if code != 202 {
		t.Fatalf("submit a copy: %d %s", code, msg)
	}
	v := d.wait(id, daemon.JobSucceeded, daemon.JobFailed)
	if v.State != daemon.JobSucceeded || v.Progress == nil {
		t.Fatalf("copy job: %+v", v)
	}
	backuptest.CheckRestores(t, target, dom.Name, []backuptest.Point{p1})
	if m := d.metrics(); !strings.Contains(m, `nbdmover_copy_last_success_timestamp_seconds 1.`) {
		t.Fatalf("metrics:\n%s", grepLines(m, "nbdmover_copy"))
	}

	dom.Write("vda", "write -P 0x62 2M 1M")
	p2 := backup()
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(200 * time.Millisecond) {
		if ms, _, err := tr.Backups(t.Context(), dom.Name); err == nil && len(ms) == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no scheduled copy brought the second backup")
		}
	}
	backuptest.CheckRestores(t, target, dom.Name, []backuptest.Point{p1, p2})

	plain := startDaemon(t, repo.Options{Location: filepath.Join(t.TempDir(), "other")}, 1)
	if _, code, msg := plain.submit(`{"kind": "copy"}`); code != 422 || !strings.Contains(msg, "--copy-to") {
		t.Fatalf("a copy job without a target: %d %s", code, msg)
	}
	if _, code, _ := d.submit(`{"kind": "copy", "grace": "1h"}`); code != 422 {
		t.Fatalf("a copy job with gc's options: %d", code)
	}

	// Targets refused at start: its own repository, another chunk size.
	small := repo.Options{Location: filepath.Join(t.TempDir(), "small")}
	if _, err := small.Init(t.Context(), repo.InitOptions{ChunkSize: 256 << 10}); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []struct {
		to   repo.Options
		want string
	}{{ro, "own repository"}, {small, "chunk size"}} {
		err := daemon.Serve(t.Context(), daemon.ServeOptions{Listen: "unix://" + filepath.Join(t.TempDir(), "s.sock"), Log: backuptest.Log(t),
			CopyTo: &bad.to, Runner: daemon.RunnerOptions{Backup: mover.Options{Repo: ro, RunDir: runDir}}})
		if err == nil || !strings.Contains(err.Error(), bad.want) {
			t.Fatalf("--copy-to %s: %v", bad.to.Location, err)
		}
	}
}
