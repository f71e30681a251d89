package progress

import (
	"context"
	"fmt"
	"io"
	"strings"
	"sync"
	"time"
)

// Modes of a Reporter (the CLI's --progress).
const (
	ModeAuto  = "auto" // bar on a terminal, none elsewhere
	ModeBar   = "bar"
	ModePlain = "plain"
	ModeJSON  = "json"
	ModeNone  = "none"
)

// CheckMode says why m is not a mode, or returns nil.
func CheckMode(m string) error {
	switch m {
	case ModeAuto, ModeBar, ModePlain, ModeJSON, ModeNone:
		return nil
	}
	return fmt.Errorf("want auto, bar, plain, json or none")
}

// Reporter writes an operation's progress while it runs: JSON lines (a
// progress event per task and one for the operation every Interval, a
// summary at the end), one redrawn line on a terminal, or a plain line
// per task every Interval.
type Reporter struct {
	Mode     string // bar, plain, json or none (auto is resolved by the caller)
	W        io.Writer
	Interval time.Duration // between events (default: 1s for json, 250ms for bar, 10s plain)
	Op       Operation
	// Sample reads the counters: the operation's phase and its tasks. It
	// is called from Run's goroutine and from Finish.
	Sample func() (phase string, tasks []Task)
	now    func() time.Time

	mu      sync.Mutex
	stop    context.CancelFunc
	stopped chan struct{}
	drawn   bool // a bar is on the terminal's line
}

// Start begins reporting in a goroutine; Finish ends it.
func (r *Reporter) Start(ctx context.Context) {
	if r.now == nil {
		r.now = time.Now
	}
	if r.Op.Start.IsZero() {
		r.Op.Start = r.now()
	}
	every := r.Interval
	if every <= 0 {
		every = map[string]time.Duration{ModeJSON: time.Second, ModeBar: 250 * time.Millisecond}[r.Mode]
		if every == 0 {
			every = 10 * time.Second
		}
	}
	ctx, r.stop = context.WithCancel(ctx)
	r.stopped = make(chan struct{})
	go func() {
		defer close(r.stopped)
		if r.Mode == ModeNone {
			return
		}
		t := time.NewTicker(every)
		defer t.Stop()
		r.emit() // at once: a caller sees the operation start
		for {
			select {
			case <-ctx.Done():
				return
			case <-t.C:
				r.emit()
			}
		}
	}()
}

// Finish stops the reporting and writes the last word: the final progress
// and the summary (json), the cleared bar, or the last plain lines. err
// is the operation's outcome.
func (r *Reporter) Finish(err error) {
	if r.stop == nil {
		return
	}
	r.stop()
	<-r.stopped
	r.mu.Lock()
	defer r.mu.Unlock()
	switch r.Mode {
	case ModeJSON:
		now := r.now()
		phase, tasks := r.Sample()
		WriteJSON(r.W, r.Op.Events(now, phase, tasks)...)
		WriteJSON(r.W, r.Op.Summary(now, tasks, err))
	case ModeBar:
		if r.drawn {
			fmt.Fprint(r.W, "\r\033[K")
		}
	}
}

func (r *Reporter) emit() {
	r.mu.Lock()
	defer r.mu.Unlock()
	phase, tasks := r.Sample()
	events := r.Op.Events(r.now(), phase, tasks)
	all := events[len(events)-1]
	shown := events[:len(events)-1] // the disks'; or the operation's, when it has none
	if len(shown) == 0 {
		all.Disk = r.Op.Name
		if len(tasks) == 0 { // nothing counted yet: the phase alone
			all.BytesTotal = -1
		}
		shown = []Event{all}
	}
	switch r.Mode {
	case ModeJSON:
		WriteJSON(r.W, events...)
	case ModeBar:
		var parts []string
		for _, e := range shown {
			parts = append(parts, barPart(e))
		}
		tail := fmt.Sprintf("%s/s", Bytes(int64(all.Rate)))
		if all.ETA != nil {
			tail += ", ETA " + Duration(*all.ETA)
		}
		fmt.Fprintf(r.W, "\r\033[K%s  %s", strings.Join(parts, "  "), tail)
		r.drawn = true
	case ModePlain:
		for _, e := range shown {
			fmt.Fprintln(r.W, plainLine(e))
		}
	}
}

// barPart is one task on the bar: vda [####......] 41% 1.2 GiB/2.9 GiB.
func barPart(e Event) string {
	if e.BytesTotal < 0 {
		return fmt.Sprintf("%s %s", e.Disk, e.Phase)
	}
	pct := percent(e)
	return fmt.Sprintf("%s %s %3.0f%% %s/%s", e.Disk, Bar(pct, 16), pct, Bytes(e.BytesDone), Bytes(e.BytesTotal))
}

// plainLine is one task in a log: vda read: 41.0% of 2.9 GiB, 1.2 GiB at 120.0 MiB/s, ETA 14s, stored 500.0 MiB.
func plainLine(e Event) string {
	if e.BytesTotal < 0 {
		return fmt.Sprintf("%s %s", e.Disk, e.Phase)
	}
	line := fmt.Sprintf("%s %s: %.1f%% of %s, %s at %s/s", e.Disk, e.Phase, percent(e), Bytes(e.BytesTotal),
		Bytes(e.BytesDone), Bytes(int64(e.Rate)))
	if e.ETA != nil {
		line += ", ETA " + Duration(*e.ETA)
	}
	return line + ", written " + Bytes(e.BytesWritten)
}

func percent(e Event) float64 {
	if e.BytesTotal <= 0 {
		return 100
	}
	return min(100, 100*float64(e.BytesDone)/float64(e.BytesTotal))
}

// Bar draws pct percent in width characters: [####......].
func Bar(pct float64, width int) string {
	n := min(width, max(0, int(pct/100*float64(width))))
	return "[" + strings.Repeat("#", n) + strings.Repeat(".", width-n) + "]"
}
