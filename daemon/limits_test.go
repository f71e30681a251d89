package daemon_test

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nbdmover/nbdmover/daemon"
	"github.com/nbdmover/nbdmover/internal/backuptest"
	"github.com/nbdmover/nbdmover/internal/qemutest"
	"github.com/nbdmover/nbdmover/mover"
	"github.com/nbdmover/nbdmover/repo"
	"github.com/nbdmover/nbdmover/sink"
	"github.com/nbdmover/nbdmover/sink/sinktest"
)

// clockRange is a daily rule's time range from now+a to now+b (local
// time, to the second).
func clockRange(now time.Time, a, b time.Duration) string {
	return now.Add(a).Format("15:04:05") + "-" + now.Add(b).Format("15:04:05")
}

// A timetable switching the upload limit in the middle of a backup to
// MinIO, counted on the wire by a proxy: 3 MiB/s while its rule holds
// (within 5% over every 10 s window of it), the flag's 16 MiB/s after,
// and the metric saying which holds.
func TestDaemonLimitSchedule(t *testing.T) {
	direct := sinktest.NewS3(t, "")
	proxy := sinktest.NewCountingProxy(t, strings.TrimPrefix(sinktest.S3Endpoint(t), "http://"))
	bucket, _, _ := strings.Cut(strings.TrimPrefix(direct.Location(), "s3://"), "/")
	ro := repo.Options{Location: "s3://" + bucket + "/r", S3Endpoint: "http://" + proxy.Addr, Upload: sink.NewRate(16 << 20)}
	dom := qemutest.NewDomain(t, false, qemutest.DiskSpec{Dev: "vda", Format: "qcow2", From: backuptest.RandomFile(t, 96<<20, 5)})
	const slow = 3 << 20
	now := time.Now()
	// The rule's times have whole seconds: it ends at the second now+14s
	// falls in (the limiter applies the end within a second after it).
	ruleEnd := now.Add(14 * time.Second).Truncate(time.Second)
	rule, err := sink.ParseScheduleRule("daily " + clockRange(now, -time.Second, 14*time.Second) + " upload=3MiB")
	if err != nil {
		t.Fatal(err)
	}
	d := startDaemonServe(t, ro, 1, nil, func(o *daemon.ServeOptions) { o.LimitSchedule = sink.Schedule{rule} })
	if m := d.metrics(); !strings.Contains(m, "nbdmover_limit_upload_bytes_per_second 3.145728e+06") {
		t.Fatalf("the rule's limit is not in force:\n%s", grepLines(m, "nbdmover_limit"))
	}
	id, code, msg := d.submit(fmt.Sprintf(`{"domain": %q, "compression": "none"}`, dom.Name))
	if code != 202 {
		t.Fatalf("submit: %d %s", code, msg)
	}
	started := time.Now()
	v := d.wait(id, daemon.JobSucceeded, daemon.JobFailed)
	if v.State != daemon.JobSucceeded {
		t.Fatalf("job: %+v", v)
	}
	ended := time.Now()
	if m := d.metrics(); !strings.Contains(m, "nbdmover_limit_upload_bytes_per_second 1.6777216e+07") {
		t.Fatalf("the flag's limit is not back:\n%s", grepLines(m, "nbdmover_limit"))
	}
	time.Sleep(100 * time.Millisecond)
	excess, window := proxy.WorstBetween(started, ruleEnd, 10*time.Second, slow)
	during := proxy.SentBetween(started, ruleEnd)
	afterStart := ruleEnd.Add(1500 * time.Millisecond) // the limiter has applied the end by then
	if !ended.After(afterStart.Add(time.Second)) {
		t.Fatalf("the backup ended %v after the rule did: it did not go on under the flag's limit", ended.Sub(ruleEnd))
	}
	after := proxy.SentBetween(afterStart, ended)
	afterRate := float64(after) / ended.Sub(afterStart).Seconds()
	t.Logf("under the rule: %d bytes in %v; worst 10 s window (%v): %.0f bytes over %d B/s; after it: %d bytes at %.1f MiB/s",
		during, ruleEnd.Sub(started).Round(time.Millisecond), window.Round(time.Millisecond), excess, slow, after, afterRate/(1<<20))
	if window < 10*time.Second {
		t.Fatalf("the backup left no 10 s window under the rule (it started %v after it)", started.Sub(now))
	}
	if excess > 0.05*slow*window.Seconds() {
		t.Errorf("over %v, %.0f bytes more than %d B/s allows: more than 5%%", window, excess, slow)
	}
	if afterRate < 2*slow {
		t.Errorf("after the rule: %.1f MiB/s, want the flag's faster limit to hold", afterRate/(1<<20))
	}
}

// The schedule file is read again when it changes: a rule added, then a
// bad file (the rules before stay, the daemon goes on), then a good one.
// A bad file at start stops the daemon as bad usage.
func TestDaemonLimitScheduleFile(t *testing.T) {
	ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	file := filepath.Join(t.TempDir(), "limits")
	write := func(s string) {
		tmp := file + ".tmp"
		if err := os.WriteFile(tmp, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
		os.Rename(tmp, file)
	}
	write("# none yet\n")
	d := startDaemonServe(t, ro, 1, nil, func(o *daemon.ServeOptions) { o.LimitScheduleFile = file })
	waitMetric := func(want string) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Millisecond) {
			m := d.metrics()
			if strings.Contains(m, want) {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("no %q:\n%s", want, grepLines(m, "nbdmover_limit"))
			}
		}
	}
	waitMetric("nbdmover_limit_read_bytes_per_second 0")
	write("daily 00:00-24:00 read=8MiB download=2MiB\n")
	waitMetric("nbdmover_limit_read_bytes_per_second 8.388608e+06")
	waitMetric("nbdmover_limit_download_bytes_per_second 2.097152e+06")
	write("daily 00:00-24:00 read=lots\n")
	time.Sleep(2500 * time.Millisecond)
	waitMetric("nbdmover_limit_read_bytes_per_second 8.388608e+06")
	write("daily 00:00-24:00 read=off\n")
	waitMetric("nbdmover_limit_read_bytes_per_second 0")
	waitMetric("nbdmover_limit_download_bytes_per_second 0")
	write("daily 00:00-24:00 upload=3MiB\n")
	waitMetric("nbdmover_limit_upload_bytes_per_second 3.145728e+06")
	os.Remove(file) // gone: its rules no longer hold
	waitMetric("nbdmover_limit_upload_bytes_per_second 0")

	write("mon-fri nine-to-five upload=1MiB\n")
	err := daemon.Serve(t.Context(), daemon.ServeOptions{Listen: "unix://" + filepath.Join(t.TempDir(), "s.sock"), LimitScheduleFile: file,
		Log: backuptest.Log(t), Runner: daemon.RunnerOptions{Backup: mover.Options{Repo: ro, RunDir: runDir}}})
	if err == nil || !strings.Contains(err.Error(), "line 1") || !strings.Contains(err.Error(), "time range") {
		t.Fatalf("a bad schedule file at start: %v", err)
	}
	// A FIFO (no writer) is refused at once, not waited on.
	os.Remove(file)
	if err := syscall.Mkfifo(file, 0o600); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		done <- daemon.Serve(t.Context(), daemon.ServeOptions{Listen: "unix://" + filepath.Join(t.TempDir(), "s.sock"), LimitScheduleFile: file,
			Log: backuptest.Log(t), Runner: daemon.RunnerOptions{Backup: mover.Options{Repo: ro, RunDir: runDir}}})
	}()
	select {
	case err := <-done:
		if err == nil || !strings.Contains(err.Error(), "not a regular file") {
			t.Fatalf("a FIFO as the schedule file: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the daemon hangs on a FIFO as its schedule file")
	}
}
