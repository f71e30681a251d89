package main

import (
	"errors"
	"fmt"
	"os"

	"github.com/nbdmover/nbdmover/internal/progress"
	"github.com/nbdmover/nbdmover/repo"
	"github.com/urfave/cli/v2"
)

// copySides are the two repositories of a copy, and their environment
// variables for a password of their own.
var copySides = []struct{ side, env string }{{"from", "NBDMOVER_FROM_PASSWORD"}, {"to", "NBDMOVER_TO_PASSWORD"}}

func copyCommand() *cli.Command {
	flags := []cli.Flag{
		&cli.StringFlag{Name: "from", Usage: "the repository to copy from: a path, file:///path or s3://BUCKET[/PREFIX] (required)"},
		&cli.StringFlag{Name: "to", Usage: "the repository to copy into; it must exist, with the same chunk size (nbdmover init) (required)"},
		&cli.StringFlag{Name: "domain", Usage: "only this domain's backups"},
		&cli.StringFlag{Name: "backup", Usage: "only this backup id (with --domain)"},
		&cli.BoolFlag{Name: "all", Usage: "every domain's backups (without --domain)"},
		&cli.BoolFlag{Name: "dry-run", Usage: "list what would be copied; copy nothing"},
		&cli.BoolFlag{Name: "allow-plaintext", Usage: "copy an encrypted repository's backups into one that is not (the target then holds them in the clear)"},
		&cli.IntFlag{Name: "parallel", Usage: "chunks in flight, 1 to 64", DefaultText: "8; 32 when either side is S3"},
		&cli.StringFlag{Name: "s3-endpoint", EnvVars: []string{"NBDMOVER_S3_ENDPOINT"}, Usage: "S3 endpoint of whichever side is s3:// (credentials from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"},
		&cli.StringFlag{Name: "s3-region", EnvVars: []string{"AWS_REGION"}, Usage: "S3 region"},
		&cli.BoolFlag{Name: "s3-path-style", Usage: "force path-style S3 requests"},
		&cli.StringFlag{Name: "limit-upload", EnvVars: []string{"NBDMOVER_LIMIT_UPLOAD"}, Usage: "store at most this much per second into --to (e.g. 20MiB)", DefaultText: "no limit"},
		&cli.StringFlag{Name: "limit-download", EnvVars: []string{"NBDMOVER_LIMIT_DOWNLOAD"}, Usage: "read at most this much per second from --from", DefaultText: "no limit"},
		jsonFlag(),
	}
	flags = append(flags, keyFlags()...) // a secret both sides share
	for _, s := range copySides {
		flags = append(flags, sideFlags(s.side, s.side+"-", s.env)...)
	}
	return &cli.Command{
		Name: "copy",
		Usage: "copy the backups one repository has and another lacks (3-2-1: a local repository every hour, a copy offsite every night); " +
			"only chunks the target lacks are stored there, and a killed copy is finished by a rerun",
		Flags:  append(flags, progressFlags()...),
		Action: runCopy,
	}
}

func runCopy(c *cli.Context) error {
	if err := noArgs(c); err != nil {
		return err
	}
	if c.String("from") == "" || c.String("to") == "" {
		return usagef("copy needs --from REPO and --to REPO")
	}
	switch {
	case c.String("backup") != "" && c.String("domain") == "":
		return usagef("copy --backup needs --domain")
	case c.Bool("all") && c.String("domain") != "":
		return usagef("copy: give --domain NAME or --all, not both")
	case !c.Bool("all") && c.String("domain") == "":
		return usagef("copy: give --domain NAME (and --backup ID for one backup), or --all for every domain's backups")
	}
	if d := c.String("domain"); d != "" {
		if err := repo.ValidName("domain", d); err != nil {
			return usagef("--domain: %v", err)
		}
	}
	if b := c.String("backup"); b != "" {
		if err := repo.ValidBackupID(b); err != nil {
			return usagef("--backup: %v", err)
		}
	}
	if n := c.Int("parallel"); c.IsSet("parallel") && (n < 1 || n > 64) {
		return usagef("--parallel %d: want 1 to 64", n)
	}
	log, err := newLogger(c)
	if err != nil {
		return err
	}
	// Every secret variable is read now and taken out of the environment,
	// before a password command runs.
	env := map[string]string{}
	for _, name := range []string{passwordEnv, copySides[0].env, copySides[1].env} {
		if v, ok := os.LookupEnv(name); ok {
			env[name] = v
		}
	}
	restoreEnv := func(name string) {
		if v, ok := env[name]; ok {
			os.Setenv(name, v)
		}
	}
	for name := range env {
		os.Unsetenv(name)
	}
	restoreEnv(passwordEnv) // readPassword reads and unsets each in turn
	shared, err := readSecret(c, "", passwordEnv)
	if err != nil {
		return err
	}
	defer shared.wipe()
	var opts [2]repo.Options
	var sharedKeys [2]bool
	for k, s := range copySides {
		restoreEnv(s.env)
		if opts[k], sharedKeys[k], err = copySide(c, s.side, s.env, shared); err != nil {
			return err
		}
	}
	var counters progress.Counters
	rep, err := progressReporter(c, "copy", c.String("domain"), counters.Sample)
	if err != nil {
		return err
	}
	rep.Start(c.Context)
	var rs [2]*repo.Repo
	for k, o := range opts {
		r, err := o.Open(c.Context)
		if errors.Is(err, repo.ErrNotEncrypted) && sharedKeys[k] {
			// Never opened in the clear when a secret was given: a config
			// swapped for an unencrypted one must not make this copy
			// write plaintext (or read a forger's).
			err = fmt.Errorf("%w: the shared password or key file is for an encrypted repository; give each side its own (--%s-password-file, ...)", err, copySides[k].side)
		}
		if err != nil {
			err = fmt.Errorf("--%s: %w", copySides[k].side, err)
			rep.Finish(err)
			return err
		}
		rs[k] = r
	}
	from, to := rs[0], rs[1]
	if from.Encrypted() && !to.Encrypted() && !c.Bool("allow-plaintext") {
		err := usagef("--from %s is encrypted and --to %s is not: its backups would be stored in the clear; add --allow-plaintext if that is meant", from.Location(), to.Location())
		rep.Finish(err)
		return err
	}
	res, err := repo.Copy(c.Context, from, to, repo.CopyOptions{Domain: c.String("domain"), Backup: c.String("backup"),
		DryRun: c.Bool("dry-run"), Parallel: c.Int("parallel"), Log: log, Progress: counters.Add})
	rep.Finish(err)
	if err != nil && res != nil && len(res.Failed) > 0 {
		// Some backups were not copied, the others were: the result says
		// which, and the exit status that not all were.
		if c.Bool("json") {
			printJSON(c.App.Writer, res)
		}
		return fmt.Errorf("%w (%s copied, %d not; a rerun tries those again)", err, count(len(res.Backups), "backup"), len(res.Failed))
	}
	if err != nil {
		if res != nil && len(res.Backups) > 0 {
			err = fmt.Errorf("%w (%s copied before it; a rerun copies the rest)", err, count(len(res.Backups), "backup"))
		}
		return err
	}
	if c.Bool("json") {
		return printJSON(c.App.Writer, res)
	}
	w := c.App.Writer
	verb := "copied"
	if c.Bool("dry-run") {
		verb = "would copy"
	}
	for _, b := range res.Backups {
		line := fmt.Sprintf("%s %s/%s", verb, b.Domain, b.ID)
		if b.Base != "" {
			line += " (on " + b.Base + ")"
		}
		if !c.Bool("dry-run") {
			line += fmt.Sprintf(": %s, %s", count(int(b.Chunks), "chunk"), progress.Bytes(b.Bytes))
		}
		fmt.Fprintln(w, line)
	}
	fmt.Fprintf(w, "%s %s in %.1fs: stored %s (%s), %s already there, read %s; %d already in the target\n", verb,
		count(len(res.Backups), "backup"), res.Seconds, count(int(res.Chunks), "chunk"), progress.Bytes(res.Bytes),
		count(int(res.ChunksHeld), "chunk"), progress.Bytes(res.BytesRead), res.Present)
	return nil
}

// copySide is the repository of one side of a copy: sideOptions, with
// the shared secret when the side has none of its own, and its limit
// (uploads into --to, downloads from --from).
func copySide(c *cli.Context, side, env string, shared *secret) (o repo.Options, sharedKeys bool, err error) {
	o, own, err := sideOptions(c, "--"+side, c.String(side), side+"-", env)
	if err != nil {
		return o, false, err
	}
	if !own && shared != nil {
		if o.Keys, err = shared.keys(); err != nil {
			return o, false, err
		}
		sharedKeys = true
	}
	limit := map[string]string{"from": "limit-download", "to": "limit-upload"}[side]
	rate, err := rateFlag(c, limit)
	if side == "from" {
		o.Download = rate
	} else {
		o.Upload = rate
	}
	return o, sharedKeys, err
}
