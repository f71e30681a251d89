package main

import (
	"errors"
	"fmt"
	"github.com/nbdmover/nbdmover/internal/progress"
	"github.com/nbdmover/nbdmover/repo/lock"
	"time"

	"github.com/nbdmover/nbdmover/repo"
	"github.com/urfave/cli/v2"
)

// policyFlags are forget's (and serve's) --keep-* options.
func policyFlags() []cli.Flag {
	var fs []cli.Flag
	for _, p := range []struct{ name, what string }{{"last", "backups"}, {"hourly", "hours"}, {"daily", "days"},
		{"weekly", "ISO weeks"}, {"monthly", "months"}, {"yearly", "years"}} {
		fs = append(fs, &cli.IntFlag{Name: "keep-" + p.name, Usage: fmt.Sprintf("keep the newest backup of each of the last N %s", p.what)})
	}
	return append(fs, durationFlag("keep-within", 0, "keep every backup this much younger than the domain's newest (e.g. 7d, 72h)", "none"))
}

// retentionFlags are serve's --keep-* options: the policy applied to a
// domain after each of its backups.
func retentionFlags() []cli.Flag {
	fs := policyFlags()
	for _, f := range fs {
		switch f := f.(type) {
		case *cli.IntFlag:
			f.Usage = "retention after each backup: " + f.Usage
		case *cli.GenericFlag:
			f.Usage = "retention after each backup: " + f.Usage
		}
	}
	return fs
}

// parsePolicy reads the --keep-* options; set is false when none is given.
func parsePolicy(c *cli.Context) (p repo.Policy, set bool, err error) {
	for _, f := range []struct {
		name string
		dst  **int
	}{{"last", &p.KeepLast}, {"hourly", &p.KeepHourly}, {"daily", &p.KeepDaily}, {"weekly", &p.KeepWeekly},
		{"monthly", &p.KeepMonthly}, {"yearly", &p.KeepYearly}} {
		if c.IsSet("keep-" + f.name) {
			n := c.Int("keep-" + f.name)
			*f.dst, set = &n, true
		}
	}
	if c.IsSet("keep-within") {
		p.KeepWithin, set = repo.Duration(flagDuration(c, "keep-within")), true
	}
	if set {
		if err := p.Validate(); err != nil {
			return p, true, usagef("%v", err)
		}
	}
	return p, set, nil
}

func forgetCommand() *cli.Command {
	return &cli.Command{
		Name:  "forget",
		Usage: "forget backups a retention policy does not keep (manifests only; gc reclaims the space)",
		Flags: append(append(repoFlags(),
			&cli.StringFlag{Name: "domain", Usage: "apply the policy to this domain's backups"},
			&cli.BoolFlag{Name: "all", Usage: "apply it to every domain's backups"},
			&cli.BoolFlag{Name: "dry-run", Usage: "print what would be forgotten, forget nothing"},
			&cli.BoolFlag{Name: "bypass-governance", Usage: "S3 Object Lock in governance mode: forget backups inside their window too, " +
				"removing their manifests' versions (the credentials need s3:BypassGovernanceRetention)"},
			jsonFlag()), policyFlags()...),
		Action: func(c *cli.Context) error {
			if err := checkFlags(c); err != nil {
				return err
			}
			if (c.String("domain") == "") == !c.Bool("all") {
				return usagef("forget needs --domain NAME or --all")
			}
			p, set, err := parsePolicy(c)
			if err != nil {
				return err
			}
			if !set {
				return usagef("forget needs at least one --keep-* option (to forget every backup, say --keep-last 0)")
			}
			r, err := repoOptions(c).Open(c.Context)
			if err != nil {
				return err
			}
			res, err := r.ForgetWith(c.Context, c.String("domain"), p, repo.ForgetOptions{DryRun: c.Bool("dry-run"), BypassGovernance: c.Bool("bypass-governance")})
			var win *repo.WindowError
			if c.Bool("json") && (err == nil || errors.As(err, &win)) {
				out := map[string]any{"dry_run": c.Bool("dry-run"), "policy": p, "domains": res}
				if win != nil {
					out["inside_window"] = win.Backups
				}
				if perr := printJSON(c.App.Writer, out); perr != nil {
					return perr
				}
				return err
			}
			printForget(c, res, c.Bool("dry-run"))
			return err
		},
	}
}

func printForget(c *cli.Context, res []repo.ForgetResult, dryRun bool) {
	w := c.App.Writer
	forgot := "forgotten"
	if dryRun {
		forgot = "would forget"
	}
	for _, d := range res {
		fmt.Fprintf(w, "%s: keeping %d, %s %d\n", d.Domain, d.Kept, forgot, d.Forgotten)
		for _, dec := range d.Decisions {
			if dec.Keep {
				fmt.Fprintf(w, "  keep    %s  (%s)\n", dec.ID, dec.Reason)
			} else {
				fmt.Fprintf(w, "  forget  %s\n", dec.ID)
			}
		}
		for _, s := range d.Skipped {
			fmt.Fprintf(w, "  left    %s  (cannot be read: %s)\n", s.Backup, s.Problem)
		}
	}
	if len(res) == 0 {
		fmt.Fprintln(w, "no backups")
	}
}

func protectCommand(on bool) *cli.Command {
	name, usage := "protect", "protect a backup: no retention policy forgets it"
	if !on {
		name, usage = "unprotect", "remove a backup's protection"
	}
	return &cli.Command{
		Name:  name,
		Usage: usage,
		Flags: append(repoFlags(),
			&cli.StringFlag{Name: "domain", Usage: "the backup's domain (required)"},
			&cli.StringFlag{Name: "backup", Usage: "the backup's id (required; not latest)"},
		),
		Action: func(c *cli.Context) error {
			if err := checkFlags(c); err != nil {
				return err
			}
			switch {
			case c.String("domain") == "" || c.String("backup") == "":
				return usagef("%s needs --domain NAME and --backup ID", name)
			case c.String("backup") == "latest":
				return usagef("%s --backup latest: name the backup by its id (nbdmover list --domain %s shows them); "+
					"latest changes with every backup", name, c.String("domain"))
			}
			r, err := repoOptions(c).Open(c.Context)
			if err != nil {
				return err
			}
			if err := r.Protect(c.Context, c.String("domain"), c.String("backup"), on); err != nil {
				return err
			}
			fmt.Fprintf(c.App.Writer, "%s/%s: %sed\n", c.String("domain"), c.String("backup"), name)
			return nil
		},
	}
}

func gcCommand() *cli.Command {
	return &cli.Command{
		Name:  "gc",
		Usage: "delete the chunks and objects no committed backup references (safe beside running backups; new ones wait while it deletes)",
		Flags: append(append(repoFlags(),
			durationFlag("grace", repo.DefaultGrace, "only delete objects older than this (e.g. 1d, 36h)", ""),
			&cli.BoolFlag{Name: "dry-run", Usage: "count what would be deleted, delete nothing"},
			&cli.IntFlag{Name: "parallel", Value: 8, Usage: "delete requests in flight"},
			durationFlag("patience", 30*time.Minute, "wait this long for a moment without running backups before making new ones wait for the sweep", ""),
			jsonFlag(),
		), progressFlags()...),
		Action: func(c *cli.Context) error {
			if err := checkFlags(c); err != nil {
				return err
			}
			if flagDuration(c, "grace") <= 0 {
				return usagef("--grace %s: must be positive", formatDuration(flagDuration(c, "grace")))
			}
			log, err := newLogger(c)
			if err != nil {
				return err
			}
			var counters progress.Counters
			counter := progress.NewCounter("", "list", -1)
			counters.Add(counter)
			rep, err := progressReporter(c, "gc", "", counters.Sample)
			if err != nil {
				return err
			}
			rep.Start(c.Context)
			r, err := repoOptions(c).Open(c.Context)
			if err != nil {
				rep.Finish(err)
				return err
			}
			res, err := r.GC(c.Context, repo.GCOptions{Grace: flagDuration(c, "grace"), DryRun: c.Bool("dry-run"),
				Parallel: c.Int("parallel"), Patience: flagDuration(c, "patience"), Log: log, Counter: counter})
			rep.Finish(err)
			if err != nil {
				return err
			}
			if c.Bool("json") {
				return printJSON(c.App.Writer, res)
			}
			printGC(c, res)
			return nil
		},
	}
}

func printGC(c *cli.Context, res *repo.GCResult) {
	w := c.App.Writer
	verb := "deleted"
	if res.DryRun {
		verb = "would delete"
	}
	for _, k := range []struct {
		name string
		n    repo.GCCount
	}{{"chunks", res.Chunks}, {"index and file objects", res.Metadata}} {
		fmt.Fprintf(w, "%s: examined %d (%s), kept %d (%s), younger than %s %d (%s), %s %d (%s)\n", k.name,
			k.n.Examined, progress.Bytes(k.n.ExaminedBytes), k.n.Kept, progress.Bytes(k.n.KeptBytes), res.Grace,
			k.n.Young, progress.Bytes(k.n.YoungBytes), verb, k.n.Deleted, progress.Bytes(k.n.DeletedBytes))
	}
	fmt.Fprintf(w, "references of %d committed backups kept (%d committed during gc)", res.Backups, res.Late)
	if res.Catalogs+res.TempFiles > 0 {
		fmt.Fprintf(w, "; %s %d catalogs of domains without backups, %d temporary files", verb, res.Catalogs, res.TempFiles)
	}
	fmt.Fprintf(w, " in %.1f s\n", res.Seconds)
}

func unlockCommand() *cli.Command {
	return &cli.Command{
		Name:  "unlock",
		Usage: "remove stale repository locks (of crashed backups or gcs) and say whose they were",
		Flags: append(repoFlags(),
			&cli.BoolFlag{Name: "remove-all", Usage: "remove live locks too: only when no nbdmover uses the repository anywhere"},
			jsonFlag(),
		),
		Action: func(c *cli.Context) error {
			if err := checkFlags(c); err != nil {
				return err
			}
			r, err := repoOptions(c).Open(c.Context)
			if err != nil {
				return err
			}
			removed, live, err := r.Unlock(c.Context, c.Bool("remove-all"))
			if c.Bool("json") && err == nil {
				return printJSON(c.App.Writer, map[string]any{"removed": lockViews(removed), "live": lockViews(live)})
			}
			now := time.Now()
			for _, l := range removed {
				fmt.Fprintf(c.App.Writer, "removed %s: %s\n", l.Holder(), staleWhy(l, now))
			}
			for _, l := range live {
				fmt.Fprintf(c.App.Writer, "left   %s: it is live\n", l.Holder())
			}
			if len(removed)+len(live) == 0 && err == nil {
				fmt.Fprintln(c.App.Writer, "no locks")
			}
			return err
		},
	}
}

func staleWhy(l *lock.Info, now time.Time) string {
	if why := l.Stale(now); why != "" {
		return why
	}
	return "removed with --remove-all"
}

// lockViews is the JSON of locks.
func lockViews(ls []*lock.Info) []map[string]any {
	out := []map[string]any{}
	now := time.Now()
	for _, l := range ls {
		v := map[string]any{"key": l.Key, "kind": l.Kind, "purpose": l.Purpose, "host": l.Host, "pid": l.PID,
			"started": l.Started, "heartbeat": l.Heartbeat, "stale": l.Stale(now)}
		if l.Damaged != "" {
			v["damaged"] = l.Damaged
		}
		out = append(out, v)
	}
	return out
}
