package main

import (
	"context"
	"fmt"
	"io"
	"strings"
	"sync"
	"time"

	"github.com/nbdmover/nbdmover/pipeline"
)

// Progress prints the progress of a backup's disks from their counters:
// one redrawn line on a terminal, a plain line per disk every Interval
// elsewhere. It is safe for concurrent use.
type Progress struct {
	W        io.Writer
	Terminal bool
	Interval time.Duration // between plain lines (default 10s)

	mu    sync.Mutex
	names []string
	stats []*pipeline.Stats
	start time.Time
}

// Add registers a disk; pass it as mover.Options.Progress.
func (p *Progress) Add(name string, st *pipeline.Stats) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.start.IsZero() {
		p.start = time.Now()
	}
	p.names = append(p.names, name)
	p.stats = append(p.stats, st)
}

// Run prints until ctx is done, then clears a terminal line.
func (p *Progress) Run(ctx context.Context) {
	every := p.Interval
	if every <= 0 {
		every = 10 * time.Second
	}
	if p.Terminal {
		every = 250 * time.Millisecond
	}
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			if p.Terminal {
				fmt.Fprint(p.W, "\r\033[K")
			}
			return
		case <-t.C:
			p.print()
		}
	}
}

func (p *Progress) print() {
	p.mu.Lock()
	defer p.mu.Unlock()
	secs := time.Since(p.start).Seconds()
	var parts []string
	for i, st := range p.stats {
		total, done := st.Total.Load(), st.Done.Load()
		pct := 0.0
		if total > 0 {
			pct = 100 * float64(done) / float64(total)
		}
		rate := float64(st.BytesRead.Load()) / max(secs, 1e-9) / 1e6
		line := fmt.Sprintf("%s %5.1f%% of %s, read %s (%.0f MB/s), stored %s",
			p.names[i], pct, humanBytes(total), humanBytes(st.BytesRead.Load()), rate, humanBytes(st.BytesWritten.Load()))
		if p.Terminal {
			parts = append(parts, fmt.Sprintf("%s %s %3.0f%%", p.names[i], bar(pct, 20), pct))
		} else {
			fmt.Fprintln(p.W, line)
		}
	}
	if p.Terminal && len(parts) > 0 {
		fmt.Fprintf(p.W, "\r\033[K%s  %.0fs", strings.Join(parts, "  "), secs)
	}
}

func bar(pct float64, width int) string {
	n := min(width, max(0, int(pct/100*float64(width))))
	return "[" + strings.Repeat("#", n) + strings.Repeat(".", width-n) + "]"
}

// humanBytes formats a byte count with binary units (1.5 GiB).
func humanBytes(n int64) string {
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
