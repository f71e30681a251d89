package main

import (
	"fmt"
	"strings"

	"github.com/nbdmover/nbdmover/mover/domain"
	"github.com/urfave/cli/v2"
)

func cleanupCommand() *cli.Command {
	return &cli.Command{
		Name:  "cleanup",
		Usage: "end what crashed runs left: backup jobs, frozen guests, uncommitted checkpoints, job directories, store temporary files",
		Flags: append(repoFlags(),
			&cli.StringFlag{Name: "domain", Usage: "only this domain (default: every domain)"},
			connectFlag(),
			&cli.StringFlag{Name: "scratch-dir", Value: domain.DefaultScratchDir, Usage: "directory of backup jobs' scratch files"},
			&cli.StringFlag{Name: "forget-repository", Usage: "retire a repository no longer backed up to: delete its checkpoints (its id, or the 12 hex digits checkpoint names hold) instead of the uncommitted ones"},
			jsonFlag(),
		),
		Action: func(c *cli.Context) error {
			if err := checkFlags(c); err != nil {
				return err
			}
			log, err := newLogger(c)
			if err != nil {
				return err
			}
			rep, err := domain.Cleanup(c.Context, domain.CleanupOptions{Repo: repoOptions(c), Connect: c.String("connect"),
				Domain: c.String("domain"), ScratchDir: c.String("scratch-dir"), ForgetRepository: c.String("forget-repository"), Log: log})
			if err != nil {
				return err
			}
			if c.Bool("json") {
				if err := printJSON(c.App.Writer, rep); err != nil {
					return err
				}
			} else {
				printCleanup(c, rep)
			}
			problems := 0
			for _, d := range rep.Domains {
				problems += len(d.Problems)
			}
			if problems > 0 {
				return fmt.Errorf("cleanup: %s (above)", count(problems, "problem"))
			}
			return nil
		},
	}
}

func printCleanup(c *cli.Context, rep *domain.CleanupReport) {
	w := c.App.Writer
	for _, d := range rep.Domains {
		var did []string
		if d.EndedJob != "" {
			did = append(did, "ended its backup job ("+d.EndedJob+")")
		}
		if d.Thawed {
			did = append(did, "thawed the guest's filesystems")
		}
		if len(d.DeletedCheckpoints) > 0 {
			did = append(did, "deleted checkpoints "+strings.Join(d.DeletedCheckpoints, ", "))
		}
		for _, k := range d.KeptCheckpoints {
			did = append(did, "left checkpoint "+k.Name+" alone ("+k.Why+")")
		}
		if len(d.RemovedDirs) > 0 {
			did = append(did, "removed "+strings.Join(d.RemovedDirs, ", "))
		}
		if d.Skipped != "" {
			did = append(did, "left alone: "+d.Skipped)
		}
		for _, p := range d.Problems {
			did = append(did, "PROBLEM: "+p)
		}
		fmt.Fprintf(w, "%s: %s\n", d.Domain, strings.Join(did, "; "))
	}
	if rep.StoreTempFiles > 0 {
		fmt.Fprintf(w, "store: removed %d temporary files of interrupted writes\n", rep.StoreTempFiles)
	}
	if len(rep.Domains) == 0 && rep.StoreTempFiles == 0 {
		fmt.Fprintln(w, "nothing to clean up")
	}
}
