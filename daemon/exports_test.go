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

	"github.com/nbdmover/nbdmover/daemon"
	"github.com/nbdmover/nbdmover/internal/backuptest"
	"github.com/nbdmover/nbdmover/internal/qemutest"
	"github.com/nbdmover/nbdmover/mover"
	"github.com/nbdmover/nbdmover/mover/nbd"
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
