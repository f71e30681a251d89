package progress

import (
	"bytes"
	"errors"
	"strings"
	"testing"
	"time"
)

// The schema is a contract (docs/api.md, "Progress events"): this pins
// every field's name, and what a total not yet known, a finished task and
// a failure look like.
func TestEventSchema(t *testing.T) {
	start := time.Date(2026, 12, 7, 10, 0, 0, 0, time.UTC)
	op := Operation{Name: "backup", Domain: "vm1", Start: start}
	now := start.Add(4 * time.Second)
	tasks := []Task{
		{Disk: "vda", Phase: "read", Done: 400, Total: 1000, Read: 400, Written: 100},
		{Disk: "vdb", Phase: "plan", Total: -1},
	}
	var b bytes.Buffer
	WriteJSON(&b, op.Events(now, "read", tasks)...)
	tasks[0] = Task{Disk: "vda", Phase: PhaseDone, Done: 1000, Total: 1000, Read: 1000, Written: 300}
	tasks[1] = Task{Disk: "vdb", Phase: PhaseDone}
	WriteJSON(&b, op.Summary(now.Add(time.Second), tasks, nil), op.Summary(now, tasks[1:], errors.New("disk vdb: gone")))
	want := `{"v":1,"type":"progress","operation":"backup","time":"2026-12-07T10:00:04Z","elapsed_seconds":4,"domain":"vm1","disk":"vda","phase":"read","bytes_done":400,"bytes_total":1000,"bytes_read":400,"bytes_written":100,"bytes_per_second":100,"eta_seconds":6}
{"v":1,"type":"progress","operation":"backup","time":"2026-12-07T10:00:04Z","elapsed_seconds":4,"domain":"vm1","disk":"vdb","phase":"plan","bytes_done":0,"bytes_total":-1,"bytes_read":0,"bytes_written":0,"bytes_per_second":0}
{"v":1,"type":"progress","operation":"backup","time":"2026-12-07T10:00:04Z","elapsed_seconds":4,"domain":"vm1","phase":"read","bytes_done":400,"bytes_total":-1,"bytes_read":400,"bytes_written":100,"bytes_per_second":100}
{"v":1,"type":"summary","operation":"backup","time":"2026-12-07T10:00:05Z","elapsed_seconds":5,"domain":"vm1","bytes_done":1000,"bytes_total":1000,"bytes_read":1000,"bytes_written":300,"bytes_per_second":200,"result":"success"}
{"v":1,"type":"summary","operation":"backup","time":"2026-12-07T10:00:04Z","elapsed_seconds":4,"domain":"vm1","bytes_done":0,"bytes_total":0,"bytes_read":0,"bytes_written":0,"bytes_per_second":0,"result":"failure","error":"disk vdb: gone"}
`
	if b.String() != want {
		t.Fatalf("events:\n%s\nwant:\n%s", b.String(), want)
	}
}

// Before any task is known the operation's total is not known either,
// and no ETA is told; a summary without tasks did nothing.
func TestNoTasks(t *testing.T) {
	op := Operation{Name: "gc", Start: time.Now()}
	e := op.Events(time.Now().Add(time.Second), "running", nil)
	if len(e) != 1 || e[0].BytesTotal != -1 || e[0].ETA != nil {
		t.Fatalf("events without tasks: %+v", e)
	}
	if s := op.Summary(time.Now(), nil, nil); s.BytesTotal != 0 || s.Result != "success" {
		t.Fatalf("summary without tasks: %+v", s)
	}
}

// A task's rate counts from its own start: a second disk restored after
// a first is not slowed by the first's time.
func TestTaskRate(t *testing.T) {
	start := time.Now()
	op := Operation{Name: "restore", Start: start}
	e := op.Events(start.Add(10*time.Second), "write", []Task{{Disk: "vdb", Done: 100, Total: 200, Start: start.Add(9 * time.Second)}})
	if e[0].Rate != 100 || e[0].ETA == nil || *e[0].ETA != 1 {
		t.Fatalf("a task begun a second ago: %+v", e[0])
	}
}

// An ETA falls as the work goes on at a steady rate, and is 0 at the end.
func TestETA(t *testing.T) {
	start := time.Now()
	op := Operation{Name: "restore", Start: start}
	last := -1.0
	for s := 1; s <= 10; s++ {
		e := op.Events(start.Add(time.Duration(s)*time.Second), "write", []Task{{Disk: "vda", Done: int64(s) * 100, Total: 1000}})
		if e[0].ETA == nil || (last >= 0 && *e[0].ETA >= last && s < 10) {
			t.Fatalf("second %d: eta %v after %v", s, e[0].ETA, last)
		}
		last = *e[0].ETA
	}
	if last != 0 {
		t.Fatalf("eta at the end %v", last)
	}
}

func TestReporterPlainAndBar(t *testing.T) {
	for mode, want := range map[string]string{ModePlain: "vda read: 50.0% of 2.0 KiB", ModeBar: "vda [########........]  50%"} {
		var b bytes.Buffer
		r := &Reporter{Mode: mode, W: &b, Interval: time.Hour, Op: Operation{Name: "backup"},
			Sample: func() (string, []Task) { return "read", []Task{{Disk: "vda", Phase: "read", Done: 1024, Total: 2048}} }}
		r.Start(t.Context())
		r.Finish(nil)
		if !strings.Contains(b.String(), want) {
			t.Fatalf("%s: %q lacks %q", mode, b.String(), want)
		}
	}
}
