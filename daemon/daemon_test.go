package daemon_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nbdmover/nbdmover/daemon"
	"github.com/nbdmover/nbdmover/internal/backuptest"
	"github.com/nbdmover/nbdmover/internal/qemutest"
	"github.com/nbdmover/nbdmover/mover"
	"github.com/nbdmover/nbdmover/mover/domain"
	"github.com/nbdmover/nbdmover/mover/nbd"
	"github.com/nbdmover/nbdmover/repo"
	"github.com/nbdmover/nbdmover/sink/sinktest"
)

// daemon is a running nbdmover serve and a client for it.
type testDaemon struct {
	t      testing.TB
	client *http.Client
	base   string
	token  string
	stop   func() // stops it (once), as SIGTERM would
}

// unixClient is a client of the daemon's socket. Its timeout only stops
// a hung test: a first file-level request launches a libguestfs
// appliance, which a fresh machine builds first and may run under TCG
// (35 s seen: a slow machine must not fail a test).
func unixClient(sock string) *http.Client {
	return &http.Client{Timeout: 3 * time.Minute, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", sock)
		}}}
}

const MiB = backuptest.MiB

// TestMain doubles as a helper process: with NBDMOVER_HELPER_SERVE set to
// a JSON ServeOptions, the test binary runs the daemon the way the command
// does (signals stop it) and exits, so tests can signal it.
func TestMain(m *testing.M) {
	if spec := os.Getenv("NBDMOVER_HELPER_SERVE"); spec != "" {
		var o daemon.ServeOptions
		if err := json.Unmarshal([]byte(spec), &o); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		err := daemon.Serve(ctx, o)
		stop()
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	// The daemons of these tests keep their locks and job sockets apart
	// from other tests' backups, which their start-up cleanup must not
	// see as its own leftovers.
	dir, err := os.MkdirTemp("", "nbdmover-daemon-test-")
	if err == nil {
		err = os.Chmod(dir, 0o711)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	runDir = dir
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// runDir is the run directory of the tests' daemons.
var runDir string

// startDaemon runs Serve in-process on a unix socket until the test ends.
func startDaemon(t testing.TB, ro repo.Options, maxJobs int) *testDaemon {
	return startDaemonWith(t, ro, maxJobs, nil)
}

// startDaemonWith is startDaemon with retention policy p, and the runner's
// options changed by opts.
func startDaemonWith(t testing.TB, ro repo.Options, maxJobs int, p *repo.Policy, opts ...func(*daemon.RunnerOptions)) *testDaemon {
	return startDaemonServe(t, ro, maxJobs, p, nil, opts...)
}

// startDaemonServe is startDaemonWith with the daemon's options changed by
// serve (when not nil).
func startDaemonServe(t testing.TB, ro repo.Options, maxJobs int, p *repo.Policy, serve func(*daemon.ServeOptions),
	opts ...func(*daemon.RunnerOptions)) *testDaemon {
	sock := filepath.Join(t.TempDir(), "nbdmover.sock")
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	ready := make(chan struct{})
	ropts := daemon.RunnerOptions{MaxJobs: maxJobs, Backup: mover.Options{Repo: ro, RunDir: runDir}, Retention: p,
		Domain: domain.Options{ScratchDir: filepath.Join(t.TempDir(), "scratch")}}
	for _, o := range opts {
		o(&ropts)
	}
	so := daemon.ServeOptions{Listen: "unix://" + sock, Log: backuptest.Log(t), Init: true,
		Ready: func(string) { close(ready) }, Runner: ropts}
	if serve != nil {
		serve(&so)
	}
	go func() { done <- daemon.Serve(ctx, so) }()
	select {
	case <-ready:
	case err := <-done:
		t.Fatalf("serve: %v", err)
	}
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("serve: %v", err)
			}
		})
	}
	t.Cleanup(stop)
	st, err := os.Stat(sock)
	if err != nil || st.Mode().Perm() != 0o600 || st.Mode()&os.ModeSocket == 0 {
		t.Fatalf("the socket must be mode 0600: %v %v", st.Mode(), err)
	}
	return &testDaemon{t: t, client: unixClient(sock), base: "http://nbdmover", stop: stop}
}

// do sends a request and decodes the JSON answer into out (if not nil).
func (d *testDaemon) do(method, path, body string, out any) int {
	d.t.Helper()
	req, _ := http.NewRequest(method, d.base+path, strings.NewReader(body))
	if d.token != "" {
		req.Header.Set("Authorization", "Bearer "+d.token)
	}
	resp, err := d.client.Do(req)
	if err != nil {
		d.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			d.t.Fatalf("%s %s: %d %s: %v", method, path, resp.StatusCode, b, err)
		}
	}
	return resp.StatusCode
}

func (d *testDaemon) submit(body string) (string, int, string) {
	d.t.Helper()
	var out map[string]string
	code := d.do("POST", "/v1/jobs", body, &out)
	return out["id"], code, out["error"]
}

// wait polls a job until it is in one of the states.
func (d *testDaemon) wait(id string, states ...string) daemon.JobView {
	d.t.Helper()
	deadline := time.Now().Add(3 * time.Minute)
	for {
		var v daemon.JobView
		if code := d.do("GET", "/v1/jobs/"+id, "", &v); code != 200 {
			d.t.Fatalf("GET job %s: %d", id, code)
		}
		for _, s := range states {
			if v.State == s {
				return v
			}
		}
		if time.Now().After(deadline) {
			d.t.Fatalf("job %s stuck in %s", id, v.State)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (d *testDaemon) metrics() string {
	d.t.Helper()
	resp, err := d.client.Get(d.base + "/metrics")
	if err != nil {
		d.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

func daemonBackupAndRestore(t *testing.T, ro repo.Options) {
	dom := qemutest.NewDomain(t, false, qemutest.DiskSpec{Dev: "vda", Format: "qcow2", Size: 64 * backuptest.MiB})
	dom.Write("vda", "write -P 0x5a 1M 20M")
	d := startDaemon(t, ro, 2)
	id, code, msg := d.submit(fmt.Sprintf(`{"domain": %q}`, dom.Name))
	if code != 202 {
		t.Fatalf("submit: %d %s", code, msg)
	}
	v := d.wait(id, daemon.JobSucceeded, daemon.JobFailed)
	if v.State != daemon.JobSucceeded || v.BackupID == "" || v.BytesDone != v.BytesTotal || v.BytesTotal != 20*backuptest.MiB ||
		v.Progress == nil || v.Progress.Phase != "commit" || len(v.Disks) != 1 || v.Disks[0].Phase != "done" {
		t.Fatalf("job: %+v", v)
	}
	refs := dom.Snapshot()
	backuptest.CheckNoLeftovers(t, dom, runDir)
	backuptest.CheckRestores(t, ro, dom.Name, []backuptest.Point{{ID: v.BackupID, Refs: refs}})

	var backups struct {
		Backups []map[string]any
		Domains []daemon.DomainSummary
	}
	if code := d.do("GET", "/v1/backups?domain="+dom.Name, "", &backups); code != 200 || len(backups.Backups) != 1 ||
		len(backups.Domains) != 1 || backups.Domains[0].Newest != v.BackupID || backups.Domains[0].NewestAgeSeconds <= 0 {
		t.Fatalf("backups: %d %+v", code, backups)
	}
	m := d.metrics()
	for _, want := range []string{`nbdmover_jobs_finished_total{state="succeeded"} 1`, `nbdmover_jobs_running 0`,
		`nbdmover_job_duration_seconds_count{state="succeeded"} 1`, `nbdmover_backup_last_result{domain="` + dom.Name + `"} 1`,
		`nbdmover_backup_last_success_timestamp_seconds{domain="` + dom.Name + `"} 1.`} {
		if !strings.Contains(m, want) {
			t.Errorf("metrics lack %q", want)
		}
	}
	if !strings.Contains(m, `nbdmover_bytes_total{kind="read"} 2.097152e+07`) {
		t.Errorf("metrics do not count the 20 MiB read:\n%s", grepLines(m, "nbdmover_bytes"))
	}
	// A daemon started later knows the domain's last success from the
	// repository.
	if m := startDaemon(t, ro, 1).metrics(); !strings.Contains(m, `nbdmover_backup_last_success_timestamp_seconds{domain="`+dom.Name+`"} 1.`) {
		t.Errorf("a new daemon's metrics lack the last success:\n%s", grepLines(m, "nbdmover_backup_last"))
	}
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

func TestDaemonLocal(t *testing.T) {
	daemonBackupAndRestore(t, repo.Options{Location: filepath.Join(t.TempDir(), "repo")})
}

func TestDaemonS3(t *testing.T) {
	ep := sinktest.S3Endpoint(t)
	daemonBackupAndRestore(t, repo.Options{Location: fmt.Sprintf("s3://daemon-%08x", rand.Uint32()), S3Endpoint: ep})
}

// slowDomain holds enough data that a backup with slowJob settings runs for
// seconds, long enough to cancel or interrupt it.
func slowDomain(t testing.TB) *qemutest.Domain {
	dom := qemutest.NewDomain(t, false, qemutest.DiskSpec{Dev: "vda", Format: "qcow2", Size: 1024 * backuptest.MiB})
	for off := 0; off < 768; off += 128 {
		dom.Write("vda", fmt.Sprintf("write -P 0x%02x %dM 128M", 0x30+off/128, off))
	}
	return dom
}

const slowJob = `, "compression": "zstd:4", "readers": 1`

func TestDaemonConcurrencyAndCancel(t *testing.T) {
	ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	slow := slowDomain(t)
	quick := qemutest.NewDomain(t, false, qemutest.DiskSpec{Dev: "vda", Format: "qcow2", Size: 16 * backuptest.MiB})
	quick.Write("vda", "write -P 0x21 0 1M")
	d := startDaemon(t, ro, 1) // one job at a time on this host

	a, code, msg := d.submit(fmt.Sprintf(`{"domain": %q%s}`, slow.Name, slowJob))
	if code != 202 {
		t.Fatalf("submit: %d %s", code, msg)
	}
	d.wait(a, daemon.JobRunning)
	_, code, msg = d.submit(fmt.Sprintf(`{"domain": %q}`, slow.Name))
	if code != 409 || !strings.Contains(msg, a) {
		t.Fatalf("a second job for the same domain: %d %q, want 409 naming %s", code, msg, a)
	}
	b, code, _ := d.submit(fmt.Sprintf(`{"domain": %q}`, quick.Name))
	if code != 202 {
		t.Fatalf("another domain: %d", code)
	}
	if v := d.wait(b, daemon.JobQueued, daemon.JobRunning, daemon.JobSucceeded); v.State != daemon.JobQueued {
		t.Fatalf("with max-jobs 1 the second job must queue, it is %s", v.State)
	}
	var cancelled map[string]string
	if code := d.do("DELETE", "/v1/jobs/"+a, "", &cancelled); code != 202 || cancelled["state"] != daemon.JobCancelling && cancelled["state"] != daemon.JobCancelled {
		t.Fatalf("cancel: %d %v", code, cancelled)
	}
	if v := d.wait(a, daemon.JobCancelled, daemon.JobSucceeded, daemon.JobFailed); v.State != daemon.JobCancelled {
		t.Fatalf("cancelled job: %+v", v)
	}
	backuptest.CheckNoLeftovers(t, slow, runDir)
	if cps := slow.Checkpoints(); len(cps) != 0 {
		t.Fatalf("a cancelled first backup left checkpoints %v", cps)
	}
	if ms, err := backuptest.List(t, ro, slow.Name); err != nil || len(ms) != 0 {
		t.Fatalf("a cancelled job committed: %v %v", ms, err)
	}
	if v := d.wait(b, daemon.JobSucceeded, daemon.JobFailed); v.State != daemon.JobSucceeded {
		t.Fatalf("queued job: %+v", v)
	}
	if code := d.do("DELETE", "/v1/jobs/"+b, "", nil); code != 409 {
		t.Fatalf("cancel of a finished job: %d, want 409", code)
	}
	var list struct{ Jobs []daemon.JobView }
	if d.do("GET", "/v1/jobs", "", &list); len(list.Jobs) != 2 || list.Jobs[0].ID != b {
		t.Fatalf("jobs: %+v", list.Jobs)
	}
	if m := d.metrics(); !strings.Contains(m, `nbdmover_jobs_finished_total{state="cancelled"} 1`) ||
		!strings.Contains(m, `nbdmover_job_errors_total{kind="cancelled"} 1`) {
		t.Errorf("metrics:\n%s", grepLines(m, "nbdmover_job"))
	}
}

func TestDaemonBadRequests(t *testing.T) {
	qemutest.NeedLibvirt(t)
	d := startDaemon(t, repo.Options{Location: filepath.Join(t.TempDir(), "repo")}, 1)
	for _, tt := range []struct {
		method, path, body string
		code               int
	}{
		{"POST", "/v1/jobs", `{"domain":`, 400},
		{"POST", "/v1/jobs", `{"domain": "x", "color": "red"}`, 400},
		{"POST", "/v1/jobs", `{"domain": "x"} {"domain": "y"}`, 400},
		{"POST", "/v1/jobs", `{"domain": "../../etc"}`, 422},
		{"POST", "/v1/jobs", `{}`, 422},
		{"POST", "/v1/jobs", `{"domain": "vm1", "disks": ["vda/../x"]}`, 422},
		{"POST", "/v1/jobs", `{"domain": "vm1", "mode": "sideways"}`, 422},
		{"POST", "/v1/jobs", `{"domain": "vm1", "compression": "lz4"}`, 422},
		{"POST", "/v1/jobs", `{"domain": "no-such-domain-x"}`, 404},
		{"GET", "/v1/jobs/nope", "", 404},
		{"DELETE", "/v1/jobs/nope", "", 404},
		{"GET", "/v1/backups?domain=../x", "", 422},
		{"GET", "/v1/backups?domain=never-backed-up", "", 200},
		{"GET", "/v2/anything", "", 404},
		{"PUT", "/v1/jobs", "", 405},
	} {
		var out map[string]any
		code := d.do(tt.method, tt.path, tt.body, &out)
		if code == 200 && tt.code == 200 {
			if b, ok := out["backups"].([]any); !ok || len(b) != 0 {
				t.Errorf("backups of an empty repository: %v", out)
			}
			continue
		}
		if code != tt.code || out["error"] == nil {
			t.Errorf("%s %s %s: %d %v, want %d with an error", tt.method, tt.path, tt.body, code, out, tt.code)
		}
	}
	var health map[string]any
	if code := d.do("GET", "/healthz", "", &health); code != 200 || health["status"] != "ok" {
		t.Fatalf("health after bad requests: %d %v", code, health)
	}
}

func TestDaemonTCPNeedsToken(t *testing.T) {
	ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	if err := daemon.Serve(t.Context(), daemon.ServeOptions{Listen: "127.0.0.1:0",
		Runner: daemon.RunnerOptions{Backup: mover.Options{Repo: ro, RunDir: runDir}}}); err == nil || !strings.Contains(err.Error(), "token") {
		t.Fatalf("TCP without a token: %v", err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	addr := make(chan string, 1)
	go daemon.Serve(ctx, daemon.ServeOptions{Listen: "127.0.0.1:0", Token: "s3cret-token", Init: true,
		Ready:  func(a string) { addr <- a },
		Runner: daemon.RunnerOptions{Backup: mover.Options{Repo: ro, RunDir: runDir}}})
	d := &testDaemon{t: t, client: &http.Client{Timeout: 10 * time.Second}, base: "http://" + <-addr}
	for _, tok := range []string{"", "wrong", "s3cret-token-longer"} {
		d.token = tok
		var out map[string]any
		if code := d.do("GET", "/v1/jobs", "", &out); code != 401 || out["error"] == nil {
			t.Errorf("token %q: %d %v, want 401", tok, code, out)
		}
	}
	d.token = "s3cret-token"
	if code := d.do("GET", "/v1/jobs", "", nil); code != 200 {
		t.Fatalf("right token: %d", code)
	}
}

// A SIGTERM during a job ends the job cleanly and the daemon exits.
func TestDaemonSIGTERM(t *testing.T) {
	ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	dom := slowDomain(t)
	sock := filepath.Join(t.TempDir(), "nbdmover.sock")
	spec, _ := json.Marshal(daemon.ServeOptions{Listen: "unix://" + sock, Init: true,
		Runner: daemon.RunnerOptions{Backup: mover.Options{Repo: ro, RunDir: runDir},
			Domain: domain.Options{ScratchDir: filepath.Join(t.TempDir(), "scratch")}}})
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "NBDMOVER_HELPER_SERVE="+string(spec))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the daemon did not start: %s", stderr.String())
		}
	}
	d := &testDaemon{t: t, client: unixClient(sock), base: "http://nbdmover"}
	id, code, msg := d.submit(fmt.Sprintf(`{"domain": %q%s}`, dom.Name, slowJob))
	if code != 202 {
		t.Fatalf("submit: %d %s", code, msg)
	}
	d.wait(id, daemon.JobRunning)
	for !dom.JobActive() {
		time.Sleep(20 * time.Millisecond)
	}
	start := time.Now()
	cmd.Process.Signal(syscall.SIGTERM)
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	select {
	case err := <-exited:
		t.Logf("daemon exited after %v: %v", time.Since(start), err)
	case <-time.After(60 * time.Second):
		t.Fatalf("the daemon did not exit within 60s of SIGTERM: %s", stderr.String())
	}
	backuptest.CheckNoLeftovers(t, dom, runDir)
	if ms, err := backuptest.List(t, ro, dom.Name); err != nil || len(ms) != 0 {
		t.Fatalf("an interrupted job committed: %v %v", ms, err)
	}
	if _, err := os.Stat(sock); err == nil {
		t.Error("the socket was left behind")
	}
}

// An incremental whose bitmap is caught missing writes (disabled through
// QMP around them) is taken in full, and the metrics count it.
func TestDaemonBitmapMismatch(t *testing.T) {
	ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	dom := qemutest.NewDomain(t, false, qemutest.DiskSpec{Dev: "vda", Format: "qcow2", Size: 16 * MiB})
	dom.Write("vda", "write -P 0x51 0 4M")
	d := startDaemon(t, ro, 1)
	id, code, msg := d.submit(fmt.Sprintf(`{"domain": %q}`, dom.Name))
	if code != 202 {
		t.Fatalf("submit: %d %s", code, msg)
	}
	full := d.wait(id, daemon.JobSucceeded, daemon.JobFailed)
	r, err := ro.Open(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	dom.BehindBitmap("vda", domain.CheckpointName(r.Config().ID, full.BackupID), func() { dom.Write("vda", "write -P 0x52 0 4M") })
	refs := dom.Snapshot()
	id, _, _ = d.submit(fmt.Sprintf(`{"domain": %q}`, dom.Name))
	v := d.wait(id, daemon.JobSucceeded, daemon.JobFailed)
	if v.State != daemon.JobSucceeded || v.Result.Mode != "full" || v.Result.Verification == nil || v.Result.Verification.Outcome != "mismatch" {
		t.Fatalf("job over a lying bitmap: %+v", v)
	}
	backuptest.CheckRestores(t, ro, dom.Name, []backuptest.Point{{ID: v.BackupID, Refs: refs}})
	if m := d.metrics(); !strings.Contains(m, "nbdmover_bitmap_mismatches_total 1") {
		t.Errorf("metrics:\n%s", grepLines(m, "bitmap"))
	}
}

// GET /v1/backups lists what it can read and names what it cannot.
func TestDaemonBackupsSkipDamaged(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "repo")
	ro := repo.Options{Location: dir}
	img := backuptest.Image(t, 24*MiB)
	srv := qemutest.Serve(t, img, "-r")
	var ids []string
	for range 2 {
		res, err := mover.Backup(t.Context(), nbd.New(nbd.Options{URI: srv.URI, Name: "vm"}), mover.Options{Repo: ro, RunDir: runDir, Init: true})
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, res.ID)
	}
	backuptest.PutManifest(t, dir, "vm", ids[0], []byte(`{"version": 7}`), true)
	d := startDaemon(t, ro, 1)
	var out struct {
		Backups []struct{ ID string }
		Skipped []struct{ Object, Problem string }
	}
	if code := d.do("GET", "/v1/backups?domain=vm", "", &out); code != 200 || len(out.Backups) != 1 || out.Backups[0].ID != ids[1] ||
		len(out.Skipped) != 1 || !strings.Contains(out.Skipped[0].Object, ids[0]) || !strings.Contains(out.Skipped[0].Problem, "format 7") {
		t.Fatalf("backups: %d %+v", code, out)
	}
}

// At start-up the daemon ends what a crashed run of its own left: here a
// backup job serving on a socket in its run directory.
func TestDaemonStartupCleanup(t *testing.T) {
	ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	dom := qemutest.NewDomain(t, false, qemutest.DiskSpec{Dev: "vda", Format: "qcow2", Size: 8 * MiB})
	jobDir := filepath.Join(runDir, "job-"+dom.Name+"-20261128T050058.293Z")
	os.MkdirAll(jobDir, 0o777)
	os.Chmod(jobDir, 0o777)
	xml := filepath.Join(t.TempDir(), "backup.xml")
	os.WriteFile(xml, []byte(`<domainbackup mode='pull'><server transport='unix' socket='`+filepath.Join(jobDir, "nbd.sock")+`'/>`+
		`<disks><disk name='vda' backup='yes' type='file'><scratch file='`+filepath.Join(jobDir, "vda.scratch")+`'/></disk></disks></domainbackup>`), 0o644)
	qemutest.Virsh(t, "backup-begin", dom.Name, xml)
	if !dom.JobActive() {
		t.Fatal("no job to clean up")
	}
	startDaemon(t, ro, 1)
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		_, err := os.Stat(jobDir)
		if !dom.JobActive() && err != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the daemon left a crashed run's backup job (or its directory)")
		}
	}
}
