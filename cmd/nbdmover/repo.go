package main

import (
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/nbdmover/nbdmover/repo"
	"github.com/nbdmover/nbdmover/restore"
	"github.com/urfave/cli/v2"
)

const defaultRepo = "/var/lib/nbdmover/repo"

func repoFlags() []cli.Flag {
	return append([]cli.Flag{
		&cli.StringFlag{Name: "repo", Value: defaultRepo, EnvVars: []string{"NBDMOVER_REPO"},
			Usage: "repository: a path, file:///path or s3://BUCKET[/PREFIX]"},
		&cli.StringFlag{Name: "s3-endpoint", EnvVars: []string{"NBDMOVER_S3_ENDPOINT"},
			Usage: "S3 endpoint URL for s3:// repositories (credentials come from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)"},
		&cli.StringFlag{Name: "s3-region", EnvVars: []string{"AWS_REGION"}, Usage: "S3 region"},
		&cli.BoolFlag{Name: "s3-path-style", Usage: "force path-style S3 requests"},
	}, keyFlags()...)
}

// jsonFlag is --json, which every command that prints a result has.
func jsonFlag() cli.Flag {
	return &cli.BoolFlag{Name: "json", Usage: "print one JSON document"}
}

// connectFlag is --connect, the libvirt URI of the commands that reach
// domains.
func connectFlag() cli.Flag {
	return &cli.StringFlag{Name: "connect", Value: "qemu:///system", EnvVars: []string{"LIBVIRT_DEFAULT_URI"}, Usage: "libvirt URI"}
}

// checkFlags validates the repository location and the names a command
// was given before anything is touched: bad ones are bad usage.
func checkFlags(c *cli.Context) error {
	if err := noArgs(c); err != nil {
		return err
	}
	for _, f := range []struct{ flag, kind string }{{"domain", "domain"}, {"name", "backup"}, {"disk", "disk"}} {
		if !c.IsSet(f.flag) {
			continue
		}
		vals := c.StringSlice(f.flag) // a repeatable flag, or
		if len(vals) == 0 {
			vals = []string{c.String(f.flag)} // a single one
		}
		for _, v := range vals {
			if err := repo.ValidName(f.kind, v); err != nil {
				return usagef("--%s: %v", f.flag, err)
			}
		}
	}
	if c.IsSet("backup") && c.String("backup") != "latest" {
		if err := repo.ValidBackupID(c.String("backup")); err != nil {
			return usagef("--backup: %v", err)
		}
	}
	if _, err := repoOptions(c).Store(); err != nil {
		return usagef("--repo: %v", err)
	}
	_, err := resolveKeys(c)
	return err
}

// repoOptions is where the repository is and, after checkFlags, the keys
// that open it.
func repoOptions(c *cli.Context) repo.Options {
	keys, _ := c.App.Metadata["keys"].(*repo.Keys)
	return repo.Options{Location: c.String("repo"), S3Endpoint: c.String("s3-endpoint"),
		S3Region: c.String("s3-region"), S3PathStyle: c.Bool("s3-path-style"), Keys: keys}
}

func initCommand() *cli.Command {
	return &cli.Command{
		Name:  "init",
		Usage: "create a repository (backup creates one with defaults on first use)",
		Flags: append(repoFlags(),
			&cli.StringFlag{Name: "chunk-size", Value: "1MiB", Usage: "chunk size, 256KiB to 16MiB, a multiple of 64KiB"},
			&cli.StringFlag{Name: "compression", Value: "zstd", Usage: "default compression: zstd, zstd:1..4, s2 (fastest, larger) or none"},
			&cli.BoolFlag{Name: "encryption", Usage: "encrypt everything with a key wrapped by the password (" + passwordEnv + ", --password-file or --password-command)"},
		),
		Action: func(c *cli.Context) error {
			if err := checkFlags(c); err != nil {
				return err
			}
			size, err := parseSize(c.String("chunk-size"))
			if err != nil {
				return usagef("--chunk-size: %v", err)
			}
			io, err := repo.ParseInit(size, c.String("compression"))
			if err != nil {
				return usagef("%v", err)
			}
			ro := repoOptions(c)
			switch {
			case c.Bool("encryption") && ro.Keys == nil:
				return usagef("init --encryption: give the new repository's password in %s, --password-file or --password-command", passwordEnv)
			case c.Bool("encryption") && c.IsSet("key-file"):
				return usagef("init --encryption makes a password key; add key files afterwards (nbdmover key add --new-key-file)")
			case !c.Bool("encryption") && ro.Keys != nil:
				return usagef("a password or key file was given: add --encryption to create an encrypted repository")
			}
			r, err := ro.Init(c.Context, io) // with ro.Keys: encrypted
			if err != nil {
				return err
			}
			cfg := r.Config()
			enc := ""
			if r.Encrypted() {
				enc = ", encrypted with " + cfg.Encryption.Cipher + "; keep the password safe: without it the backups cannot be read"
			}
			fmt.Fprintf(c.App.Writer, "created repository %s (chunk size %d, compression %s%s)\n", c.String("repo"), cfg.ChunkSize, cfg.Compression, enc)
			return nil
		},
	}
}

func listCommand() *cli.Command {
	return &cli.Command{
		Name:  "list",
		Usage: "list committed backups, oldest first",
		Flags: append(repoFlags(),
			&cli.StringFlag{Name: "domain", Usage: "only this domain's backups"},
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
			ms, skipped, err := r.Backups(c.Context, c.String("domain"))
			if err != nil {
				return err
			}
			protected, err := r.Protected(c.Context, c.String("domain"))
			if err != nil {
				return err
			}
			for _, p := range skipped {
				fmt.Fprintf(c.App.ErrWriter, "nbdmover: warning: skipped %s: %s (nbdmover verify reports it)\n", p.Object, p.Problem)
			}
			if c.Bool("json") {
				return printJSON(c.App.Writer, listJSON(ms, skipped, protected))
			}
			return printList(c.App.Writer, ms, protected)
		},
	}
}

// listJSON is the document of list --json.
func listJSON(ms []*repo.Manifest, skipped []repo.Problem, protected map[string]bool) any {
	type disk struct {
		Name string `json:"name"`
		Size int64  `json:"size"`
	}
	type backup struct {
		ID          string    `json:"id"`
		Domain      string    `json:"domain"`
		Mode        string    `json:"mode"`
		Created     time.Time `json:"created"`
		Parent      string    `json:"parent,omitempty"`
		Consistency string    `json:"consistency"`
		Protected   bool      `json:"protected,omitempty"`
		Disks       []disk    `json:"disks"`
	}
	out := struct {
		Backups []backup       `json:"backups"`
		Skipped []repo.Problem `json:"skipped,omitempty"`
	}{Backups: []backup{}, Skipped: skipped}
	for _, m := range ms {
		b := backup{ID: m.ID, Domain: m.Domain, Mode: m.Mode, Created: m.Created, Parent: m.Parent, Consistency: m.Consistency,
			Protected: protected[m.Domain+"/"+m.ID]}
		for _, d := range m.Disks {
			b.Disks = append(b.Disks, disk{d.Name, d.Size})
		}
		out.Backups = append(out.Backups, b)
	}
	return out
}

// printList prints the backups as a table.
func printList(w io.Writer, ms []*repo.Manifest, protected map[string]bool) error {
	if len(ms) == 0 {
		fmt.Fprintln(w, "no backups")
		return nil
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "DOMAIN\tID\tMODE\tCONSISTENCY\tPROTECTED\tDISKS")
	for _, m := range ms {
		var disks []string
		for _, d := range m.Disks {
			disks = append(disks, fmt.Sprintf("%s:%s", d.Name, humanBytes(d.Size)))
		}
		prot := "-"
		if protected[m.Domain+"/"+m.ID] {
			prot = "yes"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", m.Domain, m.ID, m.Mode, m.Consistency, prot, strings.Join(disks, " "))
	}
	return tw.Flush()
}

func restoreCommand() *cli.Command {
	return &cli.Command{
		Name:  "restore",
		Usage: "write the disks of a backup to new image files",
		Flags: append(repoFlags(),
			&cli.StringFlag{Name: "domain", Usage: "domain (or --nbd backup name) to restore (required)"},
			&cli.StringFlag{Name: "backup", Value: "latest", Usage: "backup id, or latest"},
			&cli.StringFlag{Name: "disk", Usage: "restore only this disk, to the file --output"},
			&cli.StringFlag{Name: "output", Usage: "output file (with --disk) or directory (required)"},
			&cli.StringFlag{Name: "format", Value: "raw", Usage: "raw or qcow2"},
			&cli.IntFlag{Name: "parallel", Value: 8, Usage: "chunks fetched at once"},
			jsonFlag(),
		),
		Action: func(c *cli.Context) error {
			if err := checkFlags(c); err != nil {
				return err
			}
			if c.String("domain") == "" || c.String("output") == "" {
				return usagef("restore needs --domain NAME and --output PATH")
			}
			log, err := newLogger(c)
			if err != nil {
				return err
			}
			m, disks, err := restore.Restore(c.Context, restore.Options{Repo: repoOptions(c), Domain: c.String("domain"),
				Backup: c.String("backup"), Disk: c.String("disk"), Output: c.String("output"),
				Format: c.String("format"), Parallel: c.Int("parallel"), Log: log})
			if err != nil {
				return err
			}
			if c.Bool("json") {
				return printJSON(c.App.Writer, map[string]any{"domain": m.Domain, "id": m.ID, "disks": disks})
			}
			for _, d := range disks {
				fmt.Fprintf(c.App.Writer, "restored %s/%s disk %s to %s (%s)\n", m.Domain, m.ID, d.Name, d.Path, humanBytes(d.Size))
			}
			return nil
		},
	}
}

func verifyCommand() *cli.Command {
	return &cli.Command{
		Name:  "verify",
		Usage: "check that backups are complete (and with --read-data, intact); exit 1: problems found, 3: could not check",
		Flags: append(repoFlags(),
			&cli.StringFlag{Name: "domain", Usage: "only this domain's backups"},
			&cli.StringFlag{Name: "backup", Usage: "only this backup id (needs --domain)"},
			&cli.BoolFlag{Name: "read-data", Usage: "also read, decode and re-hash every chunk"},
			jsonFlag(),
		),
		Action: func(c *cli.Context) error {
			if err := checkFlags(c); err != nil {
				return err
			}
			if c.String("backup") != "" && c.String("domain") == "" {
				return usagef("verify --backup needs --domain")
			}
			log, err := newLogger(c)
			if err != nil {
				return err
			}
			problems := []repo.Problem{}
			r, err := repoOptions(c).Open(c.Context)
			if err != nil {
				return checkError{err}
			}
			stats, err := r.Verify(c.Context, repo.VerifyOptions{
				Domain: c.String("domain"), Backup: c.String("backup"), ReadData: c.Bool("read-data"), Log: log},
				func(p repo.Problem) {
					problems = append(problems, p)
					if !c.Bool("json") {
						fmt.Fprintf(c.App.Writer, "BAD %s: %s (backup %s)\n", p.Object, p.Problem, p.Backup)
					}
				})
			if err != nil {
				return checkError{fmt.Errorf("verify could not finish (%d problems found before): %w", len(problems), err)}
			}
			if c.Bool("json") {
				if err := printJSON(c.App.Writer, map[string]any{"backups": stats.Backups, "chunks": stats.Chunks,
					"bytes": stats.Bytes, "read_data": c.Bool("read-data"), "problems": problems}); err != nil {
					return err
				}
			} else {
				fmt.Fprintf(c.App.Writer, "checked %d backups, %d chunks (%s)%s: %d problems\n", stats.Backups, stats.Chunks,
					humanBytes(stats.Bytes), map[bool]string{true: " with their data", false: ""}[c.Bool("read-data")], len(problems))
			}
			if len(problems) > 0 {
				return fmt.Errorf("verify found %d problems", len(problems))
			}
			return nil
		},
	}
}

func migrateCommand() *cli.Command {
	return &cli.Command{
		Name:  "migrate",
		Usage: "convert a repository of format 1 to format 2 (safe to interrupt and to run again; no backup may run meanwhile)",
		Flags: append(repoFlags(), jsonFlag()),
		Action: func(c *cli.Context) error {
			if err := checkFlags(c); err != nil {
				return err
			}
			s, err := repoOptions(c).Store()
			if err != nil {
				return usagef("--repo: %v", err)
			}
			report := func(line string) {
				if !c.Bool("json") {
					fmt.Fprintln(c.App.Writer, line)
				}
			}
			res, err := repo.Migrate(c.Context, s, report)
			if err != nil {
				return err
			}
			if c.Bool("json") {
				return printJSON(c.App.Writer, res)
			}
			fmt.Fprintf(c.App.Writer, "format 2: %d backups, %d format-1 objects removed", res.Backups, res.Removed)
			if res.Skipped > 0 {
				fmt.Fprintf(c.App.Writer, "; %d backups could not be read and were left under backups/", res.Skipped)
			}
			fmt.Fprintln(c.App.Writer)
			return nil
		},
	}
}
