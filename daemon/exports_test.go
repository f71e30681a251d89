package daemon_test

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nbdmover/nbdmover/daemon"
	"github.com/nbdmover/nbdmover/internal/backuptest"
	"github.com/nbdmover/nbdmover/internal/qemutest"
	"github.com/nbdmover/nbdmover/mover"
	"github.com/nbdmover/nbdmover/mover/domain"
	"github.com/nbdmover/nbdmover/mover/nbd"
	"github.com/nbdmover/nbdmover/nbdclient"
	"github.com/nbdmover/nbdmover/repo"
	"github.com/nbdmover/nbdmover/sink/sinktest"
)

// Exports through the API, from a local and an S3 repository: POST serves
// a backup on a socket the daemon names, nbdcopy reads it bit-exact, GET
// lists it with its counts, the metrics count what was served, the limit
// holds, bad requests get 4xx, DELETE ends it.
func TestDaemonExports(t *testing.T) {
	for _, where := range []string{"local", "s3"} {
		t.Run(where, func(t *testing.T) {
			qemutest.Need(t, "nbdcopy", "nbdinfo")
			ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
			if where == "s3" {
				ro = repo.Options{Location: fmt.Sprintf("s3://daemon-export-%08x", rand.Uint32()), S3Endpoint: sinktest.S3Endpoint(t)}
			}
			img := backuptest.Image(t, 24*backuptest.MiB)
			raw, err := os.ReadFile(qemutest.RawCopy(t, img))
			if err != nil {
				t.Fatal(err)
			}
			srv := qemutest.Serve(t, img, "-r")
			res, err := mover.Backup(t.Context(), nbd.New(nbd.Options{URI: srv.URI, Name: "vm", Disk: "vda"}),
				mover.Options{Repo: ro, Init: true, Mode: "full", ChunkSize: 256 << 10, RunDir: t.TempDir(), Log: backuptest.Log(t)})
			srv.Kill()
			if err != nil {
				t.Fatal(err)
			}
			d := startDaemon(t, ro, 1)

			var v daemon.ExportView
			if code := d.do("POST", "/v1/exports", `{"domain": "vm"}`, &v); code != 201 || v.Backup != res.ID || len(v.Disks) != 1 ||
				!strings.HasPrefix(v.Socket, filepath.Join(runDir, "exports")+"/") {
				t.Fatalf("POST /v1/exports: %d %+v", code, v)
			}
			dst := filepath.Join(t.TempDir(), "copy.raw")
			if out, err := exec.Command("nbdcopy", v.Disks[0].URI, dst).CombinedOutput(); err != nil {
				t.Fatalf("nbdcopy: %v\n%s", err, out)
			}
			if got, _ := os.ReadFile(dst); !bytes.Equal(got, raw) {
				t.Fatal("nbdcopy's copy of the export differs from the disk")
			}
			var list struct{ Exports []daemon.ExportView }
			if code := d.do("GET", "/v1/exports", "", &list); code != 200 || len(list.Exports) != 1 || list.Exports[0].ID != v.ID ||
				list.Exports[0].Stats.BytesServed == 0 || list.Exports[0].Stats.Reads == 0 { // nbdcopy reads no holes
				t.Fatalf("GET /v1/exports: %d %+v", code, list)
			}
			m := d.metrics()
			for _, want := range []string{"nbdmover_exports_open 1", fmt.Sprintf("nbdmover_export_bytes_served_total %g", float64(list.Exports[0].Stats.BytesServed)),
				fmt.Sprintf("nbdmover_export_fetches_total %d", list.Exports[0].Stats.Fetches)} {
				if !strings.Contains(m, want+"\n") {
					t.Errorf("metrics lack %q:\n%s", want, grepLines(m, "export"))
				}
			}

			for body, want := range map[string]int{
				`{"domain": "../vm"}`: 422,
				`{}`:                  422,
				`{"domain": "vm", "backup": "yesterday"}`:            422,
				`{"domain": "vm", "backup": "20200101T000000.000Z"}`: 404,
				`{"domain": "nope"}`:                                 404,
				`{"domain": "vm", "disks": ["vdz"]}`:                 404,
				`{"domain": "vm", "listen": "unix:///etc/x.sock"}`:   400, // no path from a request
				`{"domain": "vm"}}`:                                  400, // trailing data
			} {
				var e map[string]string
				if code := d.do("POST", "/v1/exports", body, &e); code != want || e["error"] == "" {
					t.Errorf("POST %s: %d %v, want %d", body, code, e, want)
				}
			}
			for range 3 { // up to the limit of 4
				if code := d.do("POST", "/v1/exports", `{"domain": "vm"}`, nil); code != 201 {
					t.Fatalf("export below the limit: %d", code)
				}
			}
			var e map[string]string
			if code := d.do("POST", "/v1/exports", `{"domain": "vm"}`, &e); code != 503 || !strings.Contains(e["error"], "max-exports") {
				t.Fatalf("an export over the limit: %d %v", code, e)
			}

			if code := d.do("DELETE", "/v1/exports/"+v.ID, "", nil); code != 200 {
				t.Fatalf("DELETE: %d", code)
			}
			if _, err := os.Lstat(v.Socket); err == nil {
				t.Fatal("the socket of a deleted export is left")
			}
			if code := d.do("DELETE", "/v1/exports/"+v.ID, "", nil); code != 404 {
				t.Fatalf("DELETE again: %d", code)
			}
			if code := d.do("GET", "/v1/exports/"+v.ID, "", nil); code != 404 {
				t.Fatalf("GET a deleted export: %d", code)
			}
		})
	}
}

// The daemon opens its repository once and shares it: a config that
// vanishes after the start leaves listings (and jobs) working on the
// repository it opened, while /healthz, which opens it anew, says the
// repository cannot be used.
func TestDaemonOpensTheRepositoryOnce(t *testing.T) {
	ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	img := qemutest.NewImage(t, t.TempDir(), 4*backuptest.MiB)
	srv := qemutest.Serve(t, img, "-r")
	if _, err := mover.Backup(t.Context(), nbd.New(nbd.Options{URI: srv.URI, Name: "vm", Disk: "vda"}),
		mover.Options{Repo: ro, Init: true, RunDir: t.TempDir()}); err != nil {
		t.Fatal(err)
	}
	srv.Kill()
	d := startDaemon(t, ro, 1)
	cfg := filepath.Join(ro.Location, "config")
	if err := os.Rename(cfg, cfg+".away"); err != nil {
		t.Fatal(err)
	}
	defer os.Rename(cfg+".away", cfg)
	var list struct{ Backups []map[string]any }
	if code := d.do("GET", "/v1/backups", "", &list); code != 200 || len(list.Backups) != 1 {
		t.Fatalf("GET /v1/backups without the config on disk: %d %v", code, list)
	}
	var h map[string]any
	if code := d.do("GET", "/healthz", "", &h); code != 503 {
		t.Fatalf("/healthz without the config on disk: %d %v", code, h)
	}
}

// A repository replaced under a running daemon (removed and created
// again elsewhere's way: a new id) is not written into: backups, exports
// and maintenance fail, naming it, until the daemon restarts.
func TestDaemonRefusesAReplacedRepository(t *testing.T) {
	ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	d := startDaemon(t, ro, 1)
	if err := os.RemoveAll(ro.Location); err != nil {
		t.Fatal(err)
	}
	if _, err := ro.Init(t.Context(), repo.InitOptions{}); err != nil {
		t.Fatal(err)
	}
	var e map[string]string
	if code := d.do("POST", "/v1/exports", `{"domain": "vm"}`, &e); code < 400 || !strings.Contains(e["error"], "replaced") {
		t.Fatalf("an export of a replaced repository: %d %v", code, e)
	}
	id, code, _ := d.submit(`{"kind": "gc"}`)
	if code != 202 {
		t.Fatalf("submit gc: %d", code)
	}
	if v := d.wait(id, daemon.JobSucceeded, daemon.JobFailed); v.State != daemon.JobFailed || !strings.Contains(v.Error, "replaced") {
		t.Fatalf("gc of a replaced repository: %+v", v)
	}
}

// An export no client is connected to ends after the idle timeout; one
// a client holds open does not.
func TestDaemonExportIdleTimeout(t *testing.T) {
	ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	if _, err := backuptest.ExportBackup(t, ro, backuptest.Image(t, 24*backuptest.MiB), "vm", "full", ""); err != nil {
		t.Fatal(err)
	}
	d := startDaemonServe(t, ro, 1, nil, func(o *daemon.ServeOptions) { o.ExportIdleTimeout = 500 * time.Millisecond })
	open := func() int {
		var list struct{ Exports []daemon.ExportView }
		d.do("GET", "/v1/exports", "", &list)
		return len(list.Exports)
	}
	var v daemon.ExportView
	if code := d.do("POST", "/v1/exports", `{"domain": "vm"}`, &v); code != 201 {
		t.Fatalf("POST /v1/exports: %d", code)
	}
	c, err := nbdclient.Dial(t.Context(), nbdclient.Config{URI: v.Disks[0].URI})
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(1500 * time.Millisecond) // three timeouts with a client connected
	if open() != 1 {
		t.Fatal("an export with a client connected ended")
	}
	c.Close()
	waitFor(t, "the idle export to end", func() bool { return open() == 0 })
	if m := d.metrics(); !strings.Contains(m, "nbdmover_exports_open 0\n") {
		t.Errorf("metrics after the idle export ended:\n%s", grepLines(m, "exports_open"))
	}
}

// An instant restore through the API: POST /v1/restores answers at once,
// the job shows the copy's progress by disk, a second restore as the same
// name is a conflict while it runs, bad requests (a path the daemon was
// not given among them) are 4xx; the daemon stopped mid-copy resumes it
// when it starts again, and when that job has succeeded the new domain
// runs from its own image, which holds the backup.
func TestDaemonInstantRestore(t *testing.T) {
	qemutest.NeedLibvirt(t)
	ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	src := qemutest.NewDomain(t, true, qemutest.DiskSpec{Dev: "vda", Format: "raw", Size: 16 * backuptest.MiB})
	src.Write("vda", "write -P 0x44 1M 3M")
	if _, err := mover.Backup(t.Context(), domain.New(domain.Options{Name: src.Name, ScratchDir: filepath.Join(t.TempDir(), "scratch")}),
		mover.Options{Repo: ro, Init: true, Mode: "full", RunDir: runDir, Log: backuptest.Log(t)}); err != nil {
		t.Fatal(err)
	}
	ref := src.Snapshot()["vda"]
	images := t.TempDir()
	os.Chmod(images, 0o755)
	withImages := func(o *daemon.RunnerOptions) { o.RestoreImageDirs = []string{images} }
	d := startDaemonWith(t, ro, 1, nil, withImages)
	as := src.Name + "-r"
	for body, want := range map[string]int{
		fmt.Sprintf(`{"domain": %q, "as": %q}`, src.Name, as):                                    422, // not live
		fmt.Sprintf(`{"live": true, "domain": %q}`, src.Name):                                    422,
		fmt.Sprintf(`{"live": true, "domain": %q, "as": %q, "image_dir": "/etc"}`, src.Name, as): 422,
		fmt.Sprintf(`{"live": true, "domain": %q, "as": "../x"}`, src.Name):                      422,
		fmt.Sprintf(`{"live": true, "resume": %q, "image_dir": %q}`, as, images):                 422,
		fmt.Sprintf(`{"live": true, "domain": %q, "as": %q, "format": "vmdk"}`, src.Name, as):    422,
		`{"live": true, "nope": 1}`: 400,
	} {
		if code := d.do("POST", "/v1/restores", body, nil); code != want {
			t.Errorf("POST /v1/restores %s: %d, want %d", body, code, want)
		}
	}
	var sub struct{ ID, State string }
	body := fmt.Sprintf(`{"live": true, "domain": %q, "as": %q, "image_dir": %q, "bandwidth_bytes": %d}`, src.Name, as, images, backuptest.MiB)
	if code := d.do("POST", "/v1/restores", body, &sub); code != 202 {
		t.Fatalf("POST /v1/restores: %d", code)
	}
	dst := qemutest.Attach(t, as, qemutest.DiskSpec{Dev: "vda", Format: "qcow2"})
	if code := d.do("POST", "/v1/restores", body, nil); code != 409 {
		t.Errorf("a second restore as %s: %d, want 409", as, code)
	}
	var seen daemon.JobView
	waitFor(t, "a quarter of the copy", func() bool {
		d.do("GET", "/v1/jobs/"+sub.ID, "", &seen)
		return seen.BytesDone*4 > seen.BytesTotal && len(seen.Disks) == 1 || seen.State != daemon.JobRunning
	})
	if seen.Kind != daemon.KindInstantRestore || seen.Domain != as || seen.Disks[0].Name != "vda" || seen.BytesTotal != 16*backuptest.MiB {
		t.Fatalf("the job while copying: %+v", seen)
	}
	d.stop() // mid-copy: the export ends, the domain runs on
	if st := qemutest.Virsh(t, "domstate", as); !strings.Contains(st, "running") {
		t.Fatalf("%s is %s after the daemon stopped", as, st)
	}

	d = startDaemonWith(t, ro, 1, nil, withImages)
	var list struct{ Jobs []daemon.JobView }
	if code := d.do("GET", "/v1/jobs", "", &list); code != 200 || len(list.Jobs) != 1 || list.Jobs[0].Kind != daemon.KindInstantRestore ||
		list.Jobs[0].Request.Restore == nil || list.Jobs[0].Request.Restore.Resume != as {
		t.Fatalf("after a restart, the daemon did not resume the restore: %d %+v", code, list)
	}
	v := d.wait(list.Jobs[0].ID, daemon.JobSucceeded, daemon.JobFailed)
	if v.State != daemon.JobSucceeded || v.BytesDone != v.BytesTotal {
		t.Fatalf("the resumed job: %+v", v)
	}
	img := filepath.Join(images, as+"-vda.qcow2")
	if got := dst.Read("vda"); !sameBytes(t, got, ref) {
		t.Fatal("the restored domain does not read the backup")
	}
	dst.Write("vda")
	qemutest.Run(t, "qemu-img", "compare", "-U", "-f", "qcow2", "-F", "raw", img, ref)
	if x := qemutest.Virsh(t, "dumpxml", "--inactive", as); strings.Contains(x, "protocol='nbd'") {
		t.Fatalf("the definition still uses the export:\n%s", x)
	}
}

func sameBytes(t *testing.T, a, b string) bool {
	x, err1 := os.ReadFile(a)
	y, err2 := os.ReadFile(b)
	if err1 != nil || err2 != nil {
		t.Fatal(err1, err2)
	}
	return bytes.Equal(x, y)
}

// waitFor polls cond for up to a minute.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(time.Minute); !cond(); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("waited a minute for %s", what)
		}
	}
}
