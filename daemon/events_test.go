package daemon_test

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"path/filepath"
	"strings"
	"testing"

	"github.com/nbdmover/nbdmover/daemon"
	"github.com/nbdmover/nbdmover/internal/backuptest"
	"github.com/nbdmover/nbdmover/internal/progress"
	"github.com/nbdmover/nbdmover/internal/qemutest"
	"github.com/nbdmover/nbdmover/repo"
	"github.com/nbdmover/nbdmover/sink"
)

// A running backup's event stream: JSON lines of the documented schema
// while it runs (its total known, bytes done rising, ETA falling), the
// in-flight gauges meanwhile, then the summary that matches the job's
// result; a finished job answers with its summary at once.
func TestDaemonEvents(t *testing.T) {
	dom := qemutest.NewDomain(t, false, qemutest.DiskSpec{Dev: "vda", Format: "qcow2", Size: 128 * backuptest.MiB})
	dom.Write("vda", "write -P 0x5b 0 24M")
	ro := repo.Options{Location: filepath.Join(t.TempDir(), "repo")}
	d := startDaemonWith(t, ro, 1, nil, func(o *daemon.RunnerOptions) { o.Backup.Tuning.ReadRate = sink.NewRate(8 << 20) })
	id, code, msg := d.submit(fmt.Sprintf(`{"domain": %q}`, dom.Name))
	if code != 202 {
		t.Fatalf("submit: %d %s", code, msg)
	}
	if code := d.do("GET", "/v1/jobs/"+id+"/events?interval=1h", "", nil); code != 400 {
		t.Fatalf("a bad interval: %d", code)
	}
	resp, err := d.client.Get(d.base + "/v1/jobs/" + id + "/events?interval=200ms")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "application/x-ndjson" {
		t.Fatalf("events: %d %s", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	var reads []progress.Event
	var summary *progress.Event
	sawGauge := false
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		dec := json.NewDecoder(bytes.NewReader(sc.Bytes()))
		dec.DisallowUnknownFields()
		var e progress.Event
		if err := dec.Decode(&e); err != nil || e.V != 1 || e.Operation != "backup" || e.Domain != dom.Name {
			t.Fatalf("event %q: %v", sc.Text(), err)
		}
		switch {
		case e.Type == progress.TypeSummary:
			summary = &e
		case e.Disk == "vda" && e.Phase == "read" && e.BytesDone > 0:
			reads = append(reads, e)
			if !sawGauge && e.BytesDone < e.BytesTotal {
				m := d.metrics()
				sawGauge = strings.Contains(m, "nbdmover_jobs_bytes_total 2.5165824e+07") && !strings.Contains(m, "nbdmover_jobs_bytes_done 0\n")
			}
		}
	}
	v := d.wait(id, daemon.JobSucceeded, daemon.JobFailed)
	if summary == nil || summary.Result != "success" || v.Result == nil || summary.BytesRead != v.Result.BytesRead ||
		summary.BytesWritten != v.Result.BytesWritten || summary.BytesDone != 24<<20 {
		t.Fatalf("summary %+v, job %+v", summary, v)
	}
	if len(reads) < 4 || reads[0].BytesTotal != 24<<20 || *reads[0].ETA <= *reads[len(reads)-1].ETA ||
		reads[0].BytesDone >= reads[len(reads)-1].BytesDone {
		t.Fatalf("read events: %+v", reads)
	}
	if !sawGauge {
		t.Errorf("the in-flight gauges never showed the running backup")
	}
	// ended: the summary at once
	resp2, err := d.client.Get(d.base + "/v1/jobs/" + id + "/events")
	if err != nil {
		t.Fatal(err)
	}
	defer resp2.Body.Close()
	var lines []string
	for sc := bufio.NewScanner(resp2.Body); sc.Scan(); {
		lines = append(lines, sc.Text())
	}
	if len(lines) < 3 || !strings.Contains(lines[len(lines)-1], `"type":"summary"`) || !strings.Contains(lines[len(lines)-1], `"result":"success"`) {
		t.Fatalf("a finished job's events: %q", lines)
	}
	if code := d.do("GET", "/v1/jobs/nope/events", "", nil); code != http.StatusNotFound {
		t.Fatalf("an unknown job's events: %d", code)
	}
}
