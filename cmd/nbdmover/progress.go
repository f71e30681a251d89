package main

import (
	"os"
	"time"

	"github.com/nbdmover/nbdmover/internal/progress"
	"github.com/urfave/cli/v2"
)

func progressFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "progress", Value: progress.ModeAuto, EnvVars: []string{"NBDMOVER_PROGRESS"},
			Usage: "auto (a bar on a terminal, nothing elsewhere), bar, plain (a line per disk), " +
				"json (JSON lines on stderr, docs/api.md \"Progress events\") or none"},
		&cli.StringFlag{Name: "progress-interval", EnvVars: []string{"NBDMOVER_PROGRESS_INTERVAL"},
			Usage: "time between progress reports, 100ms to 1h", DefaultText: "1s for json, 10s for plain"},
	}
}

// progressReporter is the reporter --progress asks for, writing to
// stderr; Start it once the operation's counters can be sampled.
func progressReporter(c *cli.Context, op, domain string, sample func() (string, []progress.Task)) (*progress.Reporter, error) {
	mode := c.String("progress")
	if err := progress.CheckMode(mode); err != nil {
		return nil, usagef("--progress %q: %v", mode, err)
	}
	var every time.Duration
	if v := c.String("progress-interval"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d < 100*time.Millisecond || d > time.Hour {
			return nil, usagef("--progress-interval %q: a duration from 100ms to 1h, like 5s", v)
		}
		every = d
	}
	if mode == progress.ModeAuto {
		mode = progress.ModeNone
		if isTerminal(os.Stderr) {
			mode = progress.ModeBar
		}
	}
	return &progress.Reporter{Mode: mode, W: os.Stderr, Interval: every, Op: progress.Operation{Name: op, Domain: domain}, Sample: sample}, nil
}
