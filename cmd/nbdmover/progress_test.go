package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nbdmover/nbdmover/internal/qemutest"
)

// progressEvent is the documented schema (docs/api.md, "Progress
// events"): a line with any other field fails to parse.
type progressEvent struct {
	V            int      `json:"v"`
	Type         string   `json:"type"`
	Operation    string   `json:"operation"`
	Time         string   `json:"time"`
	Elapsed      float64  `json:"elapsed_seconds"`
	Domain       string   `json:"domain"`
	Disk         string   `json:"disk"`
	Phase        string   `json:"phase"`
	BytesDone    int64    `json:"bytes_done"`
	BytesTotal   int64    `json:"bytes_total"`
	BytesRead    int64    `json:"bytes_read"`
	BytesWritten int64    `json:"bytes_written"`
	Rate         float64  `json:"bytes_per_second"`
	ETA          *float64 `json:"eta_seconds"`
	Result       string   `json:"result"`
	Error        string   `json:"error"`
}

// parseEvents parses JSON lines strictly: every line a log record (with
// --progress json, logs are JSON too) or an event of the schema, the last
// one the summary.
func parseEvents(t *testing.T, out string) (events []progressEvent, summary progressEvent) {
	t.Helper()
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		var rec map[string]any
		if err := json.Unmarshal(sc.Bytes(), &rec); err != nil {
			t.Fatalf("stderr line %q: not JSON: %v", sc.Text(), err)
		}
		if rec["level"] != nil && rec["msg"] != nil && rec["type"] == nil {
			continue
		}
		dec := json.NewDecoder(bytes.NewReader(sc.Bytes()))
		dec.DisallowUnknownFields()
		var e progressEvent
		if err := dec.Decode(&e); err != nil {
			t.Fatalf("progress line %q: %v", sc.Text(), err)
		}
		if e.V != 1 || (e.Type != "progress" && e.Type != "summary") || e.Time == "" {
			t.Fatalf("progress line %q: not a v1 event", sc.Text())
		}
		events = append(events, e)
	}
	if len(events) == 0 || events[len(events)-1].Type != "summary" {
		t.Fatalf("no summary last in %q", out)
	}
	return events[:len(events)-1], events[len(events)-1]
}

type backupTotals struct {
	ID           string `json:"id"`
	Mode         string `json:"mode"`
	BytesRead    int64  `json:"bytes_read"`
	BytesWritten int64  `json:"bytes_written"`
}

// A real backup's progress (full, then an incremental, on a local and a
// MinIO repository): strict v1 lines, a total known from the first read
// on that is what the backup then read (an incremental's is its dirty
// bytes and sample, not the disk), an ETA falling to 0 at a steady rate
// (--limit-read), and a summary that adds up to the result. Then a
// restore's and a verify's.
func TestProgressEvents(t *testing.T) {
	qemutest.Need(t, "qemu-img", "qemu-io")
	dom := qemutest.NewDomain(t, false, qemutest.DiskSpec{Dev: "vda", Format: "qcow2", Size: 256 << 20})
	dom.Write("vda", "write -P 0x21 0 24M", "write -P 0x22 100M 8M")
	for name, repo := range map[string][]string{"local": {"--repo", filepath.Join(t.TempDir(), "repo")}, "minio": s3RepoArgs(t)} {
		t.Run(name, func(t *testing.T) {
			if _, stderr, code := nbdmover(t, append([]string{"init", "--compression", "none"}, repo...)...); code != 0 {
				t.Fatalf("init: %s", stderr)
			}
			for _, mode := range []string{"full", "incremental"} {
				args := append([]string{"backup", "--domain", dom.Name, "--mode", mode, "--json", "--progress", "json",
					"--progress-interval", "150ms", "--limit-read", "12MiB"}, repo...)
				if mode == "incremental" {
					dom.Write("vda", "write -P 0x23 4M 2M", "write -P 0x24 200M 64k")
					args = append(args, "--verify-sample", "0")
				}
				stdout, stderr, code := nbdmover(t, args...)
				if code != 0 {
					t.Fatalf("backup: %s", stderr)
				}
				var res backupTotals
				if err := json.Unmarshal([]byte(stdout), &res); err != nil {
					t.Fatal(err)
				}
				events, sum := parseEvents(t, stderr)
				checkBackupEvents(t, mode, dom.Name, events, sum, res)
			}
			out := filepath.Join(t.TempDir(), "vda.raw")
			_, stderr, code := nbdmover(t, append([]string{"restore", "--domain", dom.Name, "--disk", "vda", "--output", out,
				"--progress", "json"}, repo...)...)
			if code != 0 {
				t.Fatalf("restore: %s", stderr)
			}
			events, sum := parseEvents(t, stderr)
			last := events[len(events)-2] // vda's, before the restore's own
			st, _ := os.Stat(out)
			if sum.Result != "success" || sum.Operation != "restore" || last.Disk != "vda" || last.Phase != "done" ||
				last.BytesDone != last.BytesTotal || last.BytesDone != 33<<20 || st == nil {
				t.Fatalf("restore's events end with %+v, summary %+v", last, sum)
			}
			qemutest.Compare(t, out, "raw", dom.Path("vda"), "qcow2")

			stdout, stderr, code := nbdmover(t, append([]string{"verify", "--read-data", "--json", "--progress", "json"}, repo...)...)
			if code != 0 {
				t.Fatalf("verify: %s", stderr)
			}
			var stats struct {
				Bytes         int64 `json:"bytes"`
				VerifiedBytes int64 `json:"verified_bytes"`
			}
			json.Unmarshal([]byte(stdout), &stats)
			events, sum = parseEvents(t, stderr)
			last = events[len(events)-1]
			if sum.Result != "success" || sum.Operation != "verify" || last.Disk != "" || last.Phase != "record" ||
				last.BytesDone != stats.VerifiedBytes || last.BytesTotal != stats.Bytes || stats.Bytes == 0 || stats.Bytes != stats.VerifiedBytes {
				t.Fatalf("verify's events end with %+v, summary %+v; verify: %s", last, sum, stdout)
			}

			// gc: the bytes it swept of its candidates' bytes.
			mustRun(t, append([]string{"forget", "--domain", dom.Name, "--keep-last", "1"}, repo...)...)
			time.Sleep(1100 * time.Millisecond) // S3's times have whole seconds
			stdout, stderr, code = nbdmover(t, append([]string{"gc", "--grace", "1ms", "--json", "--progress", "json"}, repo...)...)
			if code != 0 {
				t.Fatalf("gc: %s", stderr)
			}
			var gc struct {
				Chunks, Metadata struct {
					DeletedBytes int64 `json:"deleted_bytes"`
				}
			}
			json.Unmarshal([]byte(stdout), &gc)
			events, sum = parseEvents(t, stderr)
			last = events[len(events)-1]
			deleted := gc.Chunks.DeletedBytes + gc.Metadata.DeletedBytes
			if sum.Result != "success" || sum.Operation != "gc" || last.Phase != "sweep" || deleted == 0 ||
				last.BytesDone != deleted || last.BytesTotal != deleted {
				t.Fatalf("gc's events end with %+v, summary %+v; gc: %s", last, sum, stdout)
			}
		})
	}
}

func checkBackupEvents(t *testing.T, mode, domain string, events []progressEvent, sum progressEvent, res backupTotals) {
	t.Helper()
	if sum.Result != "success" || sum.Operation != "backup" || sum.Domain != domain || res.Mode != mode ||
		sum.BytesRead != res.BytesRead || sum.BytesWritten != res.BytesWritten || sum.BytesDone != res.BytesRead || sum.BytesTotal != res.BytesRead {
		t.Fatalf("%s: summary %+v, result %+v", mode, sum, res)
	}
	var etas []float64
	var reads int
	for _, e := range events {
		if e.Disk != "vda" {
			continue
		}
		if e.Phase == "read" || e.Phase == "done" {
			if e.BytesTotal != res.BytesRead || (e.ETA == nil && e.BytesDone > 0) {
				t.Fatalf("%s: the total must be known from the first read on, and an ETA with it: %+v (read %d)", mode, e, res.BytesRead)
			}
			if e.BytesDone > 0 {
				etas = append(etas, *e.ETA)
			}
			reads++
		}
	}
	last := events[len(events)-2]
	if last.Disk != "vda" || last.Phase != "done" || last.BytesDone != res.BytesRead || last.ETA == nil || *last.ETA != 0 {
		t.Fatalf("%s: vda's last event %+v, result read %d", mode, last, res.BytesRead)
	}
	// 24+8 MiB at 12 MiB/s: near 3 s of events every 150 ms
	if mode == "full" && (len(etas) < 5 || etas[0] <= etas[len(etas)-1]+1) {
		t.Fatalf("%s: %d read events, ETAs %v: want them falling", mode, reads, etas)
	}
	if mode == "incremental" && res.BytesRead != 2<<20+64<<10 {
		t.Fatalf("incremental read %d bytes: want its dirty bytes (2 MiB + 64 KiB), not the disk", res.BytesRead)
	}
}
