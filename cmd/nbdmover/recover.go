package main

import (
	"fmt"
	"sort"
	"time"

	"github.com/nbdmover/nbdmover/repo"
	"github.com/urfave/cli/v2"
)

func recoverCommand() *cli.Command {
	return &cli.Command{
		Name: "recover",
		Usage: "after an attack on an S3 repository (deleted or overwritten objects): make it what it was at --as-of again, " +
			"from the versions S3 kept; run --dry-run first, and stop every host that uses the repository",
		Flags: append(repoFlags(),
			&cli.StringFlag{Name: "as-of", Usage: "the time to go back to (RFC 3339, e.g. 2026-12-01T06:00:00Z; the S3 server's clock): " +
				"before the attack; what was written after it is dropped (required)"},
			&cli.BoolFlag{Name: "dry-run", Usage: "print what would be restored and removed, change nothing"},
			jsonFlag()),
		Action: func(c *cli.Context) error {
			if err := noArgs(c); err != nil {
				return err
			}
			if c.String("as-of") == "" {
				return usagef("recover needs --as-of TIME: a time before the attack (nbdmover list --as-of TIME shows the backups of then)")
			}
			t, err := parseAsOf(c)
			if err != nil {
				return err
			}
			ro := repoOptions(c)
			store, err := ro.Store()
			if err != nil {
				return usagef("--repo: %v", err)
			}
			res, err := repo.Recover(c.Context, store, t, c.Bool("dry-run"))
			if err != nil && res == nil {
				return err
			}
			if c.Bool("json") {
				if perr := printJSON(c.App.Writer, res); perr != nil {
					return perr
				}
				return err
			}
			w := c.App.Writer
			what := map[bool]string{true: "would restore", false: "restored"}[res.DryRun]
			gone := map[bool]string{true: "would remove", false: "removed"}[res.DryRun]
			fmt.Fprintf(w, "%s as of %s: %s %s, %s %s\n", store.Location(), t.UTC().Format(time.RFC3339),
				what, countKinds(res.Restored), gone, countKinds(res.Removed))
			for _, k := range res.RestoredKeys {
				fmt.Fprintf(w, "  restore  %s\n", k)
			}
			for _, k := range res.RemovedKeys {
				fmt.Fprintf(w, "  remove   %s\n", k)
			}
			if res.DryRun && len(res.RestoredKeys)+len(res.RemovedKeys) > 0 {
				fmt.Fprintln(w, "nothing was changed: run it again without --dry-run to recover")
			}
			return err
		},
	}
}

// countKinds is "3 chunks, 1 manifests" (or "nothing").
func countKinds(m map[string]int) string {
	if len(m) == 0 {
		return "nothing"
	}
	var kinds []string
	for k := range m {
		kinds = append(kinds, k)
	}
	sort.Strings(kinds)
	s := ""
	for i, k := range kinds {
		if i > 0 {
			s += ", "
		}
		s += fmt.Sprintf("%d %s", m[k], k)
	}
	return s
}
