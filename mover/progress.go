package mover

import (
	"sync"
	"time"

	"github.com/nbdmover/nbdmover/internal/progress"
	"github.com/nbdmover/nbdmover/pipeline"
)

// Tracker collects a backup's disks' counters as they start (pass its Add
// as Options.Progress) and reads them as progress tasks: bytes read of the
// bytes the run planned to read. Safe for concurrent use.
type Tracker struct {
	mu    sync.Mutex
	names []string
	stats []*pipeline.Stats
}

// Add registers a disk.
func (t *Tracker) Add(disk string, st *pipeline.Stats) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.names = append(t.names, disk)
	t.stats = append(t.stats, st)
}

// Sample is the backup's phase (start, plan, read, commit) and its disks
// (plan, read, done).
func (t *Tracker) Sample() (string, []progress.Task) {
	t.mu.Lock()
	defer t.mu.Unlock()
	tasks := make([]progress.Task, len(t.stats))
	phase, finished := progress.PhaseStart, 0
	for i, st := range t.stats {
		task := progress.Task{Disk: t.names[i], Phase: "plan", Total: -1, Done: st.BytesRead.Load(),
			Read: st.BytesRead.Load(), Written: st.BytesWritten.Load()}
		if st.Planned.Load() {
			task.Phase, task.Total = "read", st.ToRead.Load()
			task.Start = time.Unix(0, st.Started.Load())
			phase = "read"
		}
		if st.Finished.Load() {
			task.Phase = progress.PhaseDone
			finished++
		}
		if phase == progress.PhaseStart {
			phase = "plan"
		}
		tasks[i] = task
	}
	if finished > 0 && finished == len(tasks) {
		phase = "commit"
	}
	return phase, tasks
}
