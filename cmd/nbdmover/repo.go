package main

import (
	"context"
	"fmt"
	"github.com/nbdmover/nbdmover/internal/progress"
	"github.com/nbdmover/nbdmover/repo/lock"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/nbdmover/nbdmover/chunker"
	"github.com/nbdmover/nbdmover/repo"
	"github.com/nbdmover/nbdmover/restore"
	"github.com/nbdmover/nbdmover/sink"
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
		&cli.StringFlag{Name: "limit-upload", EnvVars: []string{"NBDMOVER_LIMIT_UPLOAD"},
			Usage: "store at most this much per second into the repository (e.g. 20MiB; the daemon's is shared by all its jobs)", DefaultText: "no limit"},
		&cli.StringFlag{Name: "limit-download", EnvVars: []string{"NBDMOVER_LIMIT_DOWNLOAD"},
			Usage: "read at most this much per second from the repository", DefaultText: "no limit"},
	}, keyFlags()...)
}

// noLockFlag is --no-lock, for the commands that can read a read-only
// repository.
func noLockFlag() cli.Flag {
	return &cli.BoolFlag{Name: "no-lock", Usage: "read without the repository's shared lock, and write nothing to it (a read-only repository); " +
		"a gc running elsewhere meanwhile may delete what is being read"}
}

// asOfFlag is --as-of, for the commands that read backups: the
// repository as it was at a past time (an S3 bucket with versioning).
func asOfFlag() cli.Flag {
	return &cli.StringFlag{Name: "as-of", Usage: "read the repository as it was at this time (RFC 3339, e.g. 2026-12-01T06:00:00Z; " +
		"the S3 server's clock): for each object the newest version from then, ignoring later versions and deletions (an S3 bucket with versioning)"}
}

// parseAsOf reads --as-of (zero when not given).
func parseAsOf(c *cli.Context) (time.Time, error) {
	v := c.String("as-of")
	if v == "" {
		return time.Time{}, nil
	}
	t, err := time.Parse(time.RFC3339, v)
	if err != nil {
		return t, usagef("--as-of %q: want a time as RFC 3339, e.g. 2026-12-01T06:00:00Z", v)
	}
	if t.After(time.Now().Add(sink.MaxClockSkew)) {
		return t, usagef("--as-of %s is in the future", v)
	}
	if !strings.HasPrefix(c.String("repo"), "s3://") {
		return t, usagef("--as-of reads object versions, which only an S3 repository (in a bucket with versioning) keeps")
	}
	return t, nil
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
	return checkOptions(c)
}

// checkOptions is checkFlags for a command that takes arguments.
func checkOptions(c *cli.Context) error {
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
	if _, made := c.App.Metadata["rates"]; !made { // one of each per process (files diff checks twice)
		rates := map[string]*sink.Rate{}
		for _, f := range []string{"limit-upload", "limit-download"} {
			r, err := rateFlag(c, f)
			if err != nil {
				return err
			}
			rates[f] = r
		}
		if c.App.Metadata == nil {
			c.App.Metadata = map[string]any{}
		}
		c.App.Metadata["rates"] = rates
	}
	asOf, err := parseAsOf(c)
	if err != nil {
		return err
	}
	c.App.Metadata["as-of"] = asOf
	if _, err := repoOptions(c).Store(); err != nil {
		return usagef("--repo: %v", err)
	}
	_, err = resolveKeys(c)
	return err
}

// repoOptions is where the repository is and, after checkFlags, the keys
// that open it.
func repoOptions(c *cli.Context) repo.Options {
	keys, _ := c.App.Metadata["keys"].(*repo.Keys)
	rates, _ := c.App.Metadata["rates"].(map[string]*sink.Rate) // one of each for the process
	asOf, _ := c.App.Metadata["as-of"].(time.Time)
	return repo.Options{Location: c.String("repo"), S3Endpoint: c.String("s3-endpoint"),
		S3Region: c.String("s3-region"), S3PathStyle: c.Bool("s3-path-style"), Keys: keys,
		Upload: rates["limit-upload"], Download: rates["limit-download"], AsOf: asOf}
}

func initCommand() *cli.Command {
	return &cli.Command{
		Name:  "init",
		Usage: "create a repository (backup creates one with defaults on first use)",
		Flags: append(append(repoFlags(),
			&cli.StringFlag{Name: "chunk-size", Value: "1MiB", Usage: "chunk size, 256KiB to 16MiB, a multiple of 64KiB"},
			&cli.StringFlag{Name: "compression", Value: "zstd", Usage: "compression of new chunks: zstd, zstd:1..4, s2 (fastest, larger) or none"},
			&cli.BoolFlag{Name: "encryption", Usage: "encrypt everything with a key wrapped by the password (" + passwordEnv + ", --password-file or --password-command)"},
			&cli.StringFlag{Name: "object-lock", Usage: "governance or compliance: lock every backup against deletion and overwriting for --lock-period " +
				"(S3 Object Lock; the bucket must have it enabled, and is created with it when missing)"},
			durationFlag("lock-period", 0, "with --object-lock: how long each backup is protected (e.g. 30d); back up more often than this", "none"),
			&cli.StringFlag{Name: "copy-keys-from", Usage: "with --encryption: take the keys of this encrypted repository (its chunk size too), " +
				"so that nbdmover copy between the two moves ciphertext; open it with --from-password-file, --from-password-command, --from-key-file or NBDMOVER_FROM_PASSWORD"},
			jsonFlag(),
		), sideFlags("copy-keys-from", "from-", "NBDMOVER_FROM_PASSWORD")...),
		Action: func(c *cli.Context) error {
			if err := checkFlags(c); err != nil {
				return err
			}
			size, err := parseSize(c.String("chunk-size"))
			if err != nil {
				return usagef("--chunk-size: %v", err)
			}
			if err := chunker.CheckChunkSize(size); err != nil {
				return usagef("--chunk-size: %v", err)
			}
			io := repo.InitOptions{ChunkSize: size}
			if s := c.String("compression"); s != "" {
				if io.Compression, err = chunker.ParseCompression(s); err != nil {
					return usagef("--compression: %v", err)
				}
			}
			switch mode, period := c.String("object-lock"), flagDuration(c, "lock-period"); {
			case mode == "" && period != 0:
				return usagef("--lock-period goes with --object-lock governance|compliance")
			case mode != "" && period == 0:
				return usagef("--object-lock %s needs --lock-period, how long each backup is protected (e.g. 30d)", mode)
			case mode != "":
				if err := repo.CheckLock(mode, period); err != nil {
					return usagef("%v", err)
				}
				if !strings.HasPrefix(c.String("repo"), "s3://") {
					return usagef("--object-lock needs an S3 repository (s3://BUCKET[/PREFIX]): S3 Object Lock keeps what the host's credentials cannot delete")
				}
				io.ObjectLock = &repo.LockConfig{Mode: mode, PeriodSeconds: int64(period / time.Second)}
			}
			ro := repoOptions(c)
			if store, err := ro.Store(); err == nil {
				if _, err := store.Stat(c.Context, "config"); err == nil {
					return fmt.Errorf("init %s: %w: nothing to create (nbdmover list shows what it holds)", store.Location(), repo.ErrExists)
				}
			}
			switch {
			case c.Bool("encryption") && ro.Keys == nil:
				return usagef("init --encryption: give the new repository's password in %s, --password-file or --password-command", passwordEnv)
			case c.Bool("encryption") && c.IsSet("key-file"):
				return usagef("init --encryption makes a password key; add key files afterwards (nbdmover key add --new-key-file)")
			case !c.Bool("encryption") && ro.Keys != nil:
				return usagef("a password or key file was given: add --encryption to create an encrypted repository")
			}
			if from := c.String("copy-keys-from"); from != "" {
				if !c.Bool("encryption") {
					return usagef("--copy-keys-from goes with --encryption")
				}
				src, err := keysSource(c, from)
				if err != nil {
					return err
				}
				if !src.Encrypted() {
					return usagef("--copy-keys-from %s: the repository is not encrypted: it has no keys to share", from)
				}
				if !c.IsSet("chunk-size") {
					io.ChunkSize = src.Config().ChunkSize
				} else if io.ChunkSize != src.Config().ChunkSize {
					return usagef("--chunk-size %d: --copy-keys-from %s has %d-byte chunks, and a copy between them needs the same", io.ChunkSize, from, src.Config().ChunkSize)
				}
				io.KeysFrom = src
			}
			r, err := ro.Init(c.Context, io) // with ro.Keys: encrypted
			if err != nil {
				return err
			}
			cfg := r.Config()
			if c.Bool("json") {
				return printJSON(c.App.Writer, map[string]any{"repository": r.Location(), "id": cfg.ID, "format": cfg.Version, "chunk_size": cfg.ChunkSize,
					"compression": cfg.Compression, "encrypted": r.Encrypted(), "object_lock": cfg.ObjectLock})
			}
			enc := ""
			if l := cfg.ObjectLock; l != nil {
				enc += fmt.Sprintf(", S3 Object Lock in %s mode for %s", l.Mode, time.Duration(l.PeriodSeconds)*time.Second)
			}
			if r.Encrypted() {
				enc += ", encrypted with " + cfg.Encryption.Cipher + "; keep the password safe: without it the backups cannot be read"
			}
			fmt.Fprintf(c.App.Writer, "created repository %s (chunk size %d, compression %s%s)\n", c.String("repo"), cfg.ChunkSize, cfg.Compression, enc)
			return nil
		},
	}
}

// keysSource opens the repository init --copy-keys-from names, with its
// own secret (--from-password-file, ...).
func keysSource(c *cli.Context, loc string) (*repo.Repo, error) {
	o, _, err := sideOptions(c, "--copy-keys-from", loc, "from-", "NBDMOVER_FROM_PASSWORD")
	if err != nil {
		return nil, err
	}
	r, err := o.Open(c.Context)
	if err != nil {
		return nil, fmt.Errorf("--copy-keys-from %s: %w", loc, err)
	}
	return r, nil
}

// sideFlags are the flags sideOptions reads for the second repository a
// command names with --flag: its S3 endpoint and its own secret, each
// named prefix+..., and env for its password.
func sideFlags(flag, prefix, env string) []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: prefix + "s3-endpoint", Usage: "S3 endpoint of --" + flag + " (default: --s3-endpoint)"},
		&cli.StringFlag{Name: prefix + "password-file", Usage: "--" + flag + "'s password, from this file (or set " + env + ")"},
		&cli.StringFlag{Name: prefix + "password-command", Usage: "--" + flag + "'s password, the output of this shell command"},
		&cli.StringFlag{Name: prefix + "key-file", Usage: "open --" + flag + " with this key file"},
		&cli.StringFlag{Name: prefix + "key-id", Usage: "with --" + flag + "'s password: try only this key"},
	}
}

// sideOptions are the options of a second repository a command names
// (flag, at loc): its S3 endpoint (prefix+"s3-endpoint", else the
// shared --s3-endpoint; region and path style are shared) and its own
// secret (prefix+"password-file", ..., or the environment variable env),
// if any (own says whether one was given).
func sideOptions(c *cli.Context, flag, loc, prefix, env string) (o repo.Options, own bool, err error) {
	o = repo.Options{Location: loc, S3Endpoint: c.String(prefix + "s3-endpoint"), S3Region: c.String("s3-region"),
		S3PathStyle: c.Bool("s3-path-style")}
	if o.S3Endpoint == "" {
		o.S3Endpoint = c.String("s3-endpoint")
	}
	if _, err := o.Store(); err != nil {
		return o, false, usagef("%s: %v", flag, err)
	}
	s, err := readSecret(c, prefix, env)
	if err != nil {
		return o, false, err
	}
	defer s.wipe()
	o.Keys, err = s.keys()
	return o, s != nil, err
}

// rateFlag is the limit a size-per-second flag gives (nil: none).
func rateFlag(c *cli.Context, flag string) (*sink.Rate, error) {
	v := c.String(flag)
	if v == "" {
		return nil, nil
	}
	n, err := parseSize(v)
	if err != nil || n < 64<<10 {
		return nil, usagef("--%s %q: a size per second of at least 64KiB, like 20MiB", flag, v)
	}
	return sink.NewRate(n), nil
}

func listCommand() *cli.Command {
	return &cli.Command{
		Name:  "list",
		Usage: "list committed backups, oldest first",
		Flags: append(repoFlags(),
			&cli.StringFlag{Name: "domain", Usage: "only this domain's backups"},
			asOfFlag(),
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
			_, damaged, err := r.Damage(c.Context)
			if err != nil {
				fmt.Fprintf(c.App.ErrWriter, "nbdmover: warning: the backups verify found damaged are not marked: %v\n", err)
			}
			for _, p := range skipped {
				fmt.Fprintf(c.App.ErrWriter, "nbdmover: warning: skipped %s: %s (nbdmover verify reports it)\n", p.Object, p.Problem)
			}
			exported, err := exportedBackups(c.Context, r)
			if err != nil {
				fmt.Fprintf(c.App.ErrWriter, "nbdmover: warning: the backups being exported are not marked: %v\n", err)
			}
			marks := listMarks{protected, damaged, exported}
			if c.Bool("json") {
				return printJSON(c.App.Writer, listJSON(ms, skipped, marks))
			}
			return printList(c.App.Writer, ms, marks)
		},
	}
}

// listMarks: the backups ("domain/id") protected, referencing damaged
// objects, and being exported (by whom: "host pid").
type listMarks struct {
	protected, damaged map[string]bool
	exported           map[string][]string
}

// exportedBackups reads the live locks of NBD exports: the backups they
// serve, and their holders.
func exportedBackups(ctx context.Context, r *repo.Repo) (map[string][]string, error) {
	locks, err := r.Locks(ctx)
	out := map[string][]string{}
	for _, l := range locks {
		if b, ok := lock.ExportedBackup(l.Purpose); ok && l.Damaged == "" && l.Stale(time.Now()) == "" {
			out[b] = append(out[b], l.Holder())
		}
	}
	return out, err
}

// listJSON is the document of list --json.
func listJSON(ms []*repo.Manifest, skipped []repo.Problem, marks listMarks) any {
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
		Damaged     bool      `json:"damaged,omitempty"`     // references an object verify found damaged
		ExportedBy  []string  `json:"exported_by,omitempty"` // the NBD exports serving it
		// ProtectedUntil: the end of its S3 Object Lock window.
		ProtectedUntil *time.Time `json:"protected_until,omitempty"`
		Disks          []disk     `json:"disks"`
	}
	out := struct {
		Backups []backup       `json:"backups"`
		Skipped []repo.Problem `json:"skipped,omitempty"`
	}{Backups: []backup{}, Skipped: skipped}
	for _, m := range ms {
		b := backup{ID: m.ID, Domain: m.Domain, Mode: m.Mode, Created: m.Created, Parent: m.Parent, Consistency: m.Consistency,
			Protected: marks.protected[m.Domain+"/"+m.ID], Damaged: marks.damaged[m.Domain+"/"+m.ID], ExportedBy: marks.exported[m.Domain+"/"+m.ID]}
		if m.ObjectLock != nil {
			b.ProtectedUntil = &m.ObjectLock.ProtectedUntil
		}
		for _, d := range m.Disks {
			b.Disks = append(b.Disks, disk{d.Name, d.Size})
		}
		out.Backups = append(out.Backups, b)
	}
	return out
}

// printList prints the backups as a table.
func printList(w io.Writer, ms []*repo.Manifest, marks listMarks) error {
	if len(ms) == 0 {
		fmt.Fprintln(w, "no backups")
		return nil
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "DOMAIN\tID\tMODE\tCONSISTENCY\tPROTECTED\tDAMAGED\tEXPORTED\tDISKS")
	ndamaged := 0
	for _, m := range ms {
		var disks []string
		for _, d := range m.Disks {
			disks = append(disks, fmt.Sprintf("%s:%s", d.Name, progress.Bytes(d.Size)))
		}
		prot := "-"
		switch {
		case marks.protected[m.Domain+"/"+m.ID]:
			prot = "yes"
		case m.ObjectLock != nil && time.Now().Before(m.ObjectLock.ProtectedUntil):
			prot = "locked until " + m.ObjectLock.ProtectedUntil.UTC().Format(time.RFC3339)
		}
		dmg := "-"
		if marks.damaged[m.Domain+"/"+m.ID] {
			dmg = "DAMAGED"
			ndamaged++
		}
		exp := "-"
		if n := len(marks.exported[m.Domain+"/"+m.ID]); n > 0 {
			exp = fmt.Sprintf("yes (%d)", n)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", m.Domain, m.ID, m.Mode, m.Consistency, prot, dmg, exp, strings.Join(disks, " "))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	if ndamaged > 0 {
		fmt.Fprintf(w, "%s reference objects verify found damaged: a restore of one fails on them until the next backups store those chunks again (nbdmover verify --read-data shows what is left)\n", count(ndamaged, "backup"))
	}
	return nil
}

func restoreCommand() *cli.Command {
	return &cli.Command{
		Name:  "restore",
		Usage: "write the disks of a backup to new image files",
		Flags: append(append(repoFlags(), progressFlags()...),
			&cli.StringFlag{Name: "domain", Usage: "domain (or --nbd backup name) to restore (required)"},
			asOfFlag(),
			&cli.StringFlag{Name: "backup", Value: "latest", Usage: "backup id, or latest"},
			&cli.StringFlag{Name: "disk", Usage: "restore only this disk, to the file --output"},
			&cli.StringFlag{Name: "output", Usage: "output file (with --disk) or directory (required)"},
			&cli.StringFlag{Name: "format", Value: "raw", Usage: "raw or qcow2"},
			&cli.IntFlag{Name: "parallel", Usage: "chunks fetched at once", DefaultText: "8; from S3, 32 MiB of chunks, at least 8: 32 at 1 MiB"},
			noLockFlag(),
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
			var counters progress.Counters
			rep, err := progressReporter(c, "restore", c.String("domain"), counters.Sample)
			if err != nil {
				return err
			}
			start := time.Now()
			rep.Start(c.Context)
			m, disks, err := restore.Restore(c.Context, restore.Options{Repo: repoOptions(c), Domain: c.String("domain"),
				Backup: c.String("backup"), Disk: c.String("disk"), Output: c.String("output"),
				Format: c.String("format"), Parallel: c.Int("parallel"), NoLock: c.Bool("no-lock"), Log: log, Progress: counters.Add})
			rep.Finish(err)
			if err != nil {
				return err
			}
			secs := time.Since(start).Seconds()
			var size int64
			for _, d := range disks {
				size += d.Size
			}
			if c.Bool("json") {
				return printJSON(c.App.Writer, map[string]any{"domain": m.Domain, "id": m.ID, "format": c.String("format"), "disks": disks,
					"bytes": size, "seconds": secs, "mb_per_s": float64(size) / 1e6 / max(secs, 1e-9)})
			}
			for _, d := range disks {
				fmt.Fprintf(c.App.Writer, "restored %s/%s disk %s to %s (%s in %.1fs, %.0f MB/s)\n", m.Domain, m.ID, d.Name, d.Path,
					progress.Bytes(d.Size), d.Seconds, float64(d.Size)/1e6/max(d.Seconds, 1e-9))
			}
			return nil
		},
	}
}

// readShare is --read-data: alone, every chunk; =PERCENT (e.g. 10%), that
// share of them, the least recently verified first.
type readShare struct{ percent int }

func (r *readShare) IsBoolFlag() bool { return true }

func (r *readShare) String() string {
	if r == nil || r.percent == 0 {
		return ""
	}
	return fmt.Sprintf("%d%%", r.percent)
}

func (r *readShare) Set(s string) error {
	p, err := parsePercent(s)
	if err != nil {
		return err
	}
	r.percent = p
	return nil
}

// parsePercent parses "true" (100), "false" (0), "N" or "N%" (1 to 100).
func parsePercent(s string) (int, error) {
	switch s {
	case "true":
		return 100, nil
	case "false":
		return 0, nil
	}
	p, err := strconv.Atoi(strings.TrimSuffix(s, "%"))
	if err != nil || p < 1 || p > 100 {
		return 0, fmt.Errorf("%q: want a share of the chunks from 1%% to 100%%, e.g. 10%%", s)
	}
	return p, nil
}

func verifyCommand() *cli.Command {
	share := &readShare{}
	return &cli.Command{
		Name: "verify",
		Usage: "check that backups are complete (and with --read-data, intact), record what is damaged so that the next backups heal it; " +
			"exit 1: problems found, 3: could not check",
		Flags: append(append(repoFlags(),
			&cli.StringFlag{Name: "domain", Usage: "only this domain's backups"},
			&cli.StringFlag{Name: "backup", Usage: "only this backup id (needs --domain)"},
			asOfFlag(),
			&cli.GenericFlag{Name: "read-data", Value: share,
				Usage: "also read, decode and re-hash every chunk; --read-data=10% reads a tenth of them, those verified least recently (ten nightly runs of the whole repository read every chunk; with --domain or --backup the share is read, not recorded)"},
			&cli.Uint64Flag{Name: "seed", Hidden: true, Usage: "seed of the choice among parts verified as long ago (tests)"},
			noLockFlag(),
			jsonFlag(),
		), progressFlags()...),
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
			var counters progress.Counters
			counter := progress.NewCounter("", "check", -1)
			counters.Add(counter)
			rep, err := progressReporter(c, "verify", c.String("domain"), counters.Sample)
			if err != nil {
				return err
			}
			problems := []repo.Problem{}
			rep.Start(c.Context)
			r, err := repoOptions(c).Open(c.Context)
			if err != nil {
				rep.Finish(err)
				return checkError{err}
			}
			stats, err := r.Verify(c.Context, repo.VerifyOptions{Domain: c.String("domain"), Backup: c.String("backup"),
				ReadPercent: share.percent, Seed: c.Uint64("seed"), NoLock: c.Bool("no-lock"), Log: log, Progress: counter},
				func(p repo.Problem) {
					problems = append(problems, p)
					if !c.Bool("json") {
						fmt.Fprintf(c.App.Writer, "BAD %s: %s (backup %s)\n", p.Object, p.Problem, shortList(p.AllBackups(), 5))
					}
				})
			outcome := err
			if err == nil && len(problems) > 0 {
				outcome = fmt.Errorf("verify found %s", count(len(problems), "problem"))
			}
			rep.Finish(outcome)
			if err != nil {
				return checkError{fmt.Errorf("verify could not finish (%s found before): %w", count(len(problems), "problem"), err)}
			}
			if c.Bool("json") {
				if err := printJSON(c.App.Writer, verifyJSON{VerifyStats: stats, ReadData: stats.ReadPercent > 0, Problems: problems}); err != nil {
					return err
				}
			} else {
				printVerify(c.App.Writer, stats, len(problems))
			}
			if len(problems) > 0 {
				return fmt.Errorf("verify found %s", count(len(problems), "problem"))
			}
			return nil
		},
	}
}

// shortList joins the first n names, and counts the rest.
func shortList(names []string, n int) string {
	if len(names) <= n {
		return strings.Join(names, ", ")
	}
	return fmt.Sprintf("%s and %d more", strings.Join(names[:n], ", "), len(names)-n)
}

// verifyJSON is the document of verify --json.
type verifyJSON struct {
	repo.VerifyStats
	ReadData bool           `json:"read_data"`
	Problems []repo.Problem `json:"problems"`
}

// printVerify prints verify's summary.
func printVerify(w io.Writer, st repo.VerifyStats, problems int) {
	read := ""
	switch {
	case st.ReadPercent >= 100:
		read = fmt.Sprintf(", read %d of them whole", st.Verified)
	case st.ReadPercent > 0:
		read = fmt.Sprintf(", read %d of them whole (the %d%% verified least recently, and any recorded damaged)", st.Verified, st.ReadPercent)
	}
	fmt.Fprintf(w, "checked %s, %s (%s)%s: %s\n", count(st.Backups, "backup"), count(st.Chunks, "chunk"), progress.Bytes(st.Bytes), read, count(problems, "problem"))
	if st.Corrupt+st.Missing > 0 {
		fmt.Fprintf(w, "damaged: %s (%d quarantined), %d missing, referenced by %s: %s\n",
			count(st.Corrupt, "corrupt chunk"), st.Quarantined, st.Missing, count(len(st.Damaged), "backup"), shortList(st.Damaged, 20))
		fmt.Fprintln(w, "the next backup of a domain stores again those chunks its disks still hold; nbdmover list marks the damaged backups")
	} else if len(st.Damaged) > 0 {
		fmt.Fprintf(w, "damaged backups: %s\n", shortList(st.Damaged, 20))
	}
	if st.Repaired > 0 {
		fmt.Fprintf(w, "repaired: %d objects recorded damaged before are whole again\n", st.Repaired)
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
			fmt.Fprintf(c.App.Writer, "format 2: %s, %s removed", count(res.Backups, "backup"), count(res.Removed, "format-1 object"))
			if res.Skipped > 0 {
				fmt.Fprintf(c.App.Writer, "; %s could not be read and were left under backups/", count(res.Skipped, "backup"))
			}
			fmt.Fprintln(c.App.Writer)
			return nil
		},
	}
}
