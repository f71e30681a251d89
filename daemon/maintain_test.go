package daemon_test

import (
	"encoding/json"
	"fmt"
	"github.com/nbdmover/nbdmover/repo/lock"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nbdmover/nbdmover/daemon"
	"github.com/nbdmover/nbdmover/internal/backuptest"
	"github.com/nbdmover/nbdmover/internal/qemutest"
	"github.com/nbdmover/nbdmover/mover"
	"github.com/nbdmover/nbdmover/mover/nbd"
	"github.com/nbdmover/nbdmover/repo"
)

// The daemon's retention policy after each backup, and its forget, gc
// and verify jobs: one maintenance job at a time, metrics of what gc
// deleted, and the backups kept still restore.
func TestDaemonMaintenance(t *testing.T) {
	ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	keep := 2
	d := startDaemonWith(t, ro, 2, &repo.Policy{KeepLast: &keep})
	dom := qemutest.NewDomain(t, false, qemutest.DiskSpec{Dev: "vda", Format: "qcow2", Size: 32 * backuptest.MiB})
	var last daemon.JobView
	var points []backuptest.Point
	for i := range 3 {
		dom.Write("vda", fmt.Sprintf("write -P %d 0 4M", 0x31+i)) // each overwrites the last
		id, code, msg := d.submit(fmt.Sprintf(`{"domain": %q, "mode": "full"}`, dom.Name))
		if code != 202 {
			t.Fatalf("submit: %d %s", code, msg)
		}
		if last = d.wait(id, daemon.JobSucceeded, daemon.JobFailed); last.State != daemon.JobSucceeded {
			t.Fatalf("backup %d: %+v", i, last)
		}
		points = append(points, backuptest.Point{ID: last.BackupID, Refs: dom.Snapshot()})
	}
	if last.Retention == nil || last.Retention.Kept != 2 || last.Retention.Forgotten != 1 || last.Kind != "backup" {
		t.Fatalf("retention after the third backup: %+v", last.Retention)
	}
	if ms, err := backuptest.List(t, ro, dom.Name); err != nil || len(ms) != 2 || ms[0].ID != points[1].ID {
		t.Fatalf("backups after retention: %v %v", ms, err)
	}
	time.Sleep(10 * time.Millisecond)

	// While a shared lock is held (a backup elsewhere), gc waits, and a
	// second maintenance job is refused.
	r, err := ro.Open(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	held, _, err := r.Lock(t.Context(), lock.Shared, "backup elsewhere", nil)
	if err != nil {
		t.Fatal(err)
	}
	gcID, code, msg := d.submit(`{"kind": "gc", "grace": "1ms"}`)
	if code != 202 {
		t.Fatalf("submit gc: %d %s", code, msg)
	}
	if _, code, msg := d.submit(`{"kind": "verify"}`); code != 409 || !strings.Contains(msg, gcID) {
		t.Fatalf("a second maintenance job: %d %s", code, msg)
	}
	time.Sleep(300 * time.Millisecond)
	if v := d.wait(gcID, daemon.JobRunning, daemon.JobSucceeded, daemon.JobFailed); v.State != daemon.JobRunning {
		t.Fatalf("gc did not wait for the shared lock: %+v", v)
	}
	held.Release()
	v := d.wait(gcID, daemon.JobSucceeded, daemon.JobFailed)
	var g repo.GCResult
	b, _ := json.Marshal(v.Report)
	if v.State != daemon.JobSucceeded || json.Unmarshal(b, &g) != nil || g.Backups != 2 || g.Chunks.Deleted == 0 {
		t.Fatalf("gc job: %+v %s", v, b)
	}
	m := d.metrics()
	for _, want := range []string{fmt.Sprintf(`nbdmover_gc_deleted_total{kind="chunks"} %d`, g.Chunks.Deleted),
		"nbdmover_backups_forgotten_total 1"} {
		if !strings.Contains(m, want) {
			t.Errorf("metrics lack %q:\n%s", want, grepLines(m, "nbdmover_"))
		}
	}
	if strings.Contains(m, "nbdmover_gc_last_success_timestamp_seconds 0\n") {
		t.Error("the last gc's time is not set")
	}

	id, code, _ := d.submit(fmt.Sprintf(`{"kind": "forget", "domain": %q, "policy": {"keep_last": 1}}`, dom.Name))
	if v := d.wait(id, daemon.JobSucceeded, daemon.JobFailed); code != 202 || v.State != daemon.JobSucceeded {
		t.Fatalf("forget job: %d %+v", code, v)
	}
	id, code, _ = d.submit(`{"kind": "verify", "read_data": true}`)
	if v := d.wait(id, daemon.JobSucceeded, daemon.JobFailed); code != 202 || v.State != daemon.JobSucceeded {
		t.Fatalf("verify job: %d %+v", code, v)
	}
	backuptest.CheckRestores(t, ro, dom.Name, points[2:])

	for _, body := range []string{`{"kind": "defrag"}`, `{"kind": "forget", "all": true}`,
		`{"kind": "forget", "domain": "x", "policy": {}}`, `{"kind": "gc", "domain": "x"}`, `{"kind": "gc", "grace": "soon"}`,
		fmt.Sprintf(`{"domain": %q, "policy": {"keep_last": 1}}`, dom.Name), `{"kind": "verify", "mode": "full"}`} {
		if _, code, msg := d.submit(body); code != 422 || msg == "" {
			t.Errorf("%s: %d %q", body, code, msg)
		}
	}
}

// The daemon's scheduled verify (--verify-every): it finds a corrupt
// chunk, records it, reports it in its job and the metrics, and the
// backups listing marks the backup damaged.
func TestDaemonScheduledVerify(t *testing.T) {
	ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	img := qemutest.NewImage(t, t.TempDir(), 4*backuptest.MiB)
	qemutest.IO(t, img, "write -s "+backuptest.RandomFile(t, 2*backuptest.MiB, 9)+" 0 2M")
	srv := qemutest.Serve(t, img, "-r")
	res, err := mover.Backup(t.Context(), nbd.New(nbd.Options{URI: srv.URI, Name: "vm1", Disk: "vda"}),
		mover.Options{Repo: ro, Init: true, Mode: "full", ChunkSize: 256 << 10, RunDir: t.TempDir(), Log: backuptest.Log(t)})
	srv.Kill()
	if err != nil {
		t.Fatal(err)
	}
	chunks, _ := filepath.Glob(filepath.Join(ro.Location, "chunks", "*", "*"))
	b, _ := os.ReadFile(chunks[2])
	b[len(b)-1] ^= 1
	os.WriteFile(chunks[2], b, 0o600)

	d := startDaemonWith(t, ro, 1, nil, func(o *daemon.RunnerOptions) {
		o.VerifyEvery, o.VerifyReadPercent = 300*time.Millisecond, 100
	})
	for _, body := range []string{`{"kind": "verify", "read_data_percent": 101}`, `{"kind": "gc", "read_data_percent": 5}`,
		`{"domain": "vm1", "read_data_percent": 5}`} {
		if _, code, msg := d.submit(body); code != 422 || msg == "" {
			t.Errorf("%s: %d %q", body, code, msg)
		}
	}
	var found *daemon.JobView
	for deadline := time.Now().Add(time.Minute); found == nil; {
		var jobs struct{ Jobs []daemon.JobView }
		d.do("GET", "/v1/jobs", "", &jobs)
		for _, j := range jobs.Jobs {
			if j.Kind == daemon.KindVerify && j.State == daemon.JobFailed {
				found = &j
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no scheduled verify finished: %+v", jobs)
		}
		time.Sleep(100 * time.Millisecond)
	}
	var rep daemon.VerifyReport
	rb, _ := json.Marshal(found.Report)
	name := "vm1/" + res.ID
	if json.Unmarshal(rb, &rep) != nil || rep.Corrupt != 1 || rep.Quarantined != 1 || rep.ReadPercent != 100 ||
		len(rep.Damaged) != 1 || rep.Damaged[0] != name || !strings.Contains(found.Error, "1 problem ") {
		t.Fatalf("the scheduled verify: %+v %s", found, rb)
	}
	m := d.metrics()
	for _, want := range []string{`nbdmover_verify_chunks_total{result="corrupt"} `, "nbdmover_verify_damaged_backups 1"} {
		if !strings.Contains(m, want) || strings.Contains(m, want+"0\n") {
			t.Errorf("metrics lack %q:\n%s", want, grepLines(m, "nbdmover_verify"))
		}
	}
	var list struct{ Damaged []string }
	if code := d.do("GET", "/v1/backups", "", &list); code != 200 || len(list.Damaged) != 1 || list.Damaged[0] != name {
		t.Errorf("GET /v1/backups: %d %+v", code, list)
	}
}
