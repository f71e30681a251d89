// Package progress owns the progress events of long operations (backup,
// restore): their schema (docs/api.md, "Progress events"), computed from
// counters sampled on a ticker, and how they are shown: JSON lines for
// machines, a redrawn bar on a terminal, plain lines in a log.
//
// Words: a task is one disk of an operation; bytes_done of bytes_total is
// the work that takes the time (a backup's bytes to read from the disk, as
// planned from its block status and dirty bitmap; a restore's bytes of data
// chunks to write), so a percentage and an ETA are true for an
// incremental that reads 1% of a disk.
package progress

import (
	"encoding/json"
	"fmt"
	"io"
	"math"
	"sync"
	"sync/atomic"
	"time"
)

// Version is the schema's version: fields are only ever added within one.
const Version = 1

// Event types.
const (
	TypeProgress = "progress"
	TypeSummary  = "summary"
)

// Phases every operation may report; operations add their own (a
// backup's "plan", "read", "commit").
const (
	PhaseStart = "start" // before any task is known
	PhaseDone  = "done"  // a task that finished
)

// Task is one disk's counters at a moment.
type Task struct {
	Disk  string
	Phase string
	// Done of Total bytes: the work that takes the time. Total < 0 while
	// it is not known yet.
	Done, Total int64
	// Read and Written: bytes read from the source and written to the
	// destination (a backup's disk and repository).
	Read, Written int64
	// Start is when the task's work began (its rate and ETA count from
	// it); zero: when the operation began.
	Start time.Time
}

// Event is one line of the stream: a task's progress (Disk set), the
// operation's (Disk empty), or the summary at the end.
type Event struct {
	V         int       `json:"v"`
	Type      string    `json:"type"`
	Operation string    `json:"operation"`
	Time      time.Time `json:"time"`
	Elapsed   float64   `json:"elapsed_seconds"`
	Domain    string    `json:"domain,omitempty"`
	Disk      string    `json:"disk,omitempty"`
	Phase     string    `json:"phase,omitempty"`
	// BytesTotal is -1 while not known (a backup planning its reads).
	BytesDone    int64   `json:"bytes_done"`
	BytesTotal   int64   `json:"bytes_total"`
	BytesRead    int64   `json:"bytes_read"`
	BytesWritten int64   `json:"bytes_written"`
	Rate         float64 `json:"bytes_per_second"`
	// ETA is absent when it cannot be told (no total, or nothing done).
	ETA *float64 `json:"eta_seconds,omitempty"`
	// A summary's: success or failure, and the error.
	Result string `json:"result,omitempty"`
	Error  string `json:"error,omitempty"`
}

// Operation describes one run for its events.
type Operation struct {
	Name   string // backup, restore
	Domain string
	Start  time.Time
}

// Events are the progress events at now: one per task, then the
// operation's (phase, the sum of the tasks). A task without a disk is the
// operation's own counters (verify's), with no event of its own. A rate is the average since
// the operation started, so an ETA falls steadily rather than following
// each stall of the network.
func (o Operation) Events(now time.Time, phase string, tasks []Task) []Event {
	out := make([]Event, 0, len(tasks)+1)
	var all Task
	all.Phase = phase
	for _, t := range tasks {
		if t.Disk != "" {
			out = append(out, o.event(now, TypeProgress, t))
		}
		all.Done += t.Done
		all.Read += t.Read
		all.Written += t.Written
		if t.Total < 0 || all.Total < 0 {
			all.Total = -1
		} else {
			all.Total += t.Total
		}
	}
	if len(tasks) == 0 {
		all.Total = -1 // nothing known yet
	}
	return append(out, o.event(now, TypeProgress, all))
}

// Summary is the last event: the operation's totals and its result.
func (o Operation) Summary(now time.Time, tasks []Task, err error) Event {
	e := o.Events(now, "", tasks)
	s := e[len(e)-1]
	s.Type, s.Result, s.ETA = TypeSummary, "success", nil
	s.BytesTotal = max(s.BytesTotal, 0)
	if err != nil {
		s.Result, s.Error = "failure", err.Error()
	}
	return s
}

func (o Operation) event(now time.Time, typ string, t Task) Event {
	secs := max(now.Sub(o.Start).Seconds(), 0)
	e := Event{V: Version, Type: typ, Operation: o.Name, Time: now.UTC(), Elapsed: round(secs, 3), Domain: o.Domain,
		Disk: t.Disk, Phase: t.Phase, BytesDone: t.Done, BytesTotal: t.Total, BytesRead: t.Read, BytesWritten: t.Written}
	if !t.Start.IsZero() && t.Start.After(o.Start) {
		secs = max(now.Sub(t.Start).Seconds(), 0) // the task's own time
	}
	if secs > 0 {
		e.Rate = round(float64(t.Done)/secs, 0)
	}
	switch {
	case t.Total >= 0 && t.Done >= t.Total:
		e.ETA = new(float64)
	case t.Total >= 0 && e.Rate > 0:
		eta := round(float64(t.Total-t.Done)/e.Rate, 1)
		e.ETA = &eta
	}
	return e
}

func round(x float64, places int) float64 {
	p := math.Pow(10, float64(places))
	return math.Round(x*p) / p
}

// WriteJSON writes events as JSON lines.
func WriteJSON(w io.Writer, events ...Event) error {
	enc := json.NewEncoder(w)
	for _, e := range events {
		if err := enc.Encode(e); err != nil {
			return err
		}
	}
	return nil
}

// Bytes formats a byte count with binary units (1.5 GiB).
func Bytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for x := n / unit; x >= unit; x /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}

// Duration formats an ETA: 45s, 3m05s, 2h04m.
func Duration(secs float64) string {
	s := int64(math.Ceil(secs))
	switch {
	case s < 60:
		return fmt.Sprintf("%ds", s)
	case s < 3600:
		return fmt.Sprintf("%dm%02ds", s/60, s%60)
	default:
		return fmt.Sprintf("%dh%02dm", s/3600, s/60%60)
	}
}

// Counter is one task's counters, updated atomically by the work (any
// goroutine) and read by Task.
type Counter struct {
	Disk                       string
	Done, Total, Read, Written atomic.Int64
	phase                      atomic.Pointer[string]
	start                      atomic.Int64 // unix nanoseconds; 0: not begun
}

// NewCounter is a task's counter in phase, with total bytes of work
// (-1: not known yet).
func NewCounter(disk, phase string, total int64) *Counter {
	c := &Counter{Disk: disk}
	c.Total.Store(total)
	c.SetPhase(phase)
	return c
}

// SetPhase records the task's phase.
func (c *Counter) SetPhase(p string) { c.phase.Store(&p) }

// Begin records that the task's work begins now, in phase p: its rate and
// ETA count from here.
func (c *Counter) Begin(p string) {
	c.start.Store(time.Now().UnixNano())
	c.SetPhase(p)
}

// Task reads the counters.
func (c *Counter) Task() Task {
	t := Task{Disk: c.Disk, Done: c.Done.Load(), Total: c.Total.Load(), Read: c.Read.Load(), Written: c.Written.Load()}
	if ns := c.start.Load(); ns != 0 {
		t.Start = time.Unix(0, ns)
	}
	if p := c.phase.Load(); p != nil {
		t.Phase = *p
	}
	return t
}

// Counters is an operation's counters, one per task, as the operation
// hands them over. Safe for concurrent use.
type Counters struct {
	mu   sync.Mutex
	list []*Counter
}

// Add registers a task's counter.
func (cs *Counters) Add(c *Counter) {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	cs.list = append(cs.list, c)
}

// Sample is the tasks' state and the operation's phase: start before any
// task, done when all are, else the phase of the first task not done.
func (cs *Counters) Sample() (string, []Task) {
	cs.mu.Lock()
	defer cs.mu.Unlock()
	tasks := make([]Task, len(cs.list))
	phase := PhaseStart
	for i, c := range cs.list {
		tasks[i] = c.Task()
		if phase == PhaseStart || phase == PhaseDone {
			phase = tasks[i].Phase
		}
	}
	return phase, tasks
}
