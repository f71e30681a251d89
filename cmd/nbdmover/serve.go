package main

import (
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/nbdmover/nbdmover/daemon"
	"github.com/nbdmover/nbdmover/mover"
	"github.com/nbdmover/nbdmover/mover/domain"
	"github.com/nbdmover/nbdmover/pipeline"
	"github.com/nbdmover/nbdmover/repo"
	"github.com/nbdmover/nbdmover/sink"
	"github.com/urfave/cli/v2"
)

func serveCommand() *cli.Command {
	return &cli.Command{
		Name:  "serve",
		Usage: "run the host agent: an HTTP/JSON API for schedulers (see docs/api.md)",
		Flags: append(append(repoFlags(),
			&cli.StringFlag{Name: "listen", Value: daemon.DefaultListen, EnvVars: []string{"NBDMOVER_LISTEN"},
				Usage: "unix:///path (a 0600 socket) or host:port (TCP: needs a token, and TLS unless on loopback)"},
			&cli.StringFlag{Name: "token-file", Usage: "file holding the bearer token clients must send (required on TCP)"},
			&cli.StringFlag{Name: "token", EnvVars: []string{"NBDMOVER_TOKEN"}, Usage: "the bearer token (prefer --token-file or the environment: a command line is visible in ps)"},
			&cli.StringFlag{Name: "tls-cert", Usage: "PEM certificate to serve TCP with TLS"},
			&cli.StringFlag{Name: "tls-key", Usage: "PEM key of --tls-cert"},
			&cli.StringFlag{Name: "tls-client-ca", Usage: "PEM CA certificates that client certificates must chain to (mutual TLS)"},
			&cli.IntFlag{Name: "max-connections", Value: 64, Usage: "connections served at once"},
			connectFlag(),
			&cli.IntFlag{Name: "max-exports", Value: 4, Usage: "NBD exports (POST /v1/exports) served at once"},
			&cli.IntFlag{Name: "max-restores", Value: 2, Usage: "instant restores (POST /v1/restores) running at once"},
			&cli.StringSliceFlag{Name: "restore-image-dir", Usage: "directory instant restores may make images in (repeatable; a request chooses among them, the first when it names none)",
				DefaultText: "/var/lib/libvirt/images"},
			&cli.StringFlag{Name: "export-cache-size", Value: "256MiB", Usage: "decoded chunks each export keeps in memory"},
			&cli.StringFlag{Name: "export-idle-timeout", Value: "1h", Usage: "end an export no client has been connected to for this long (0: never)"},
			&cli.StringFlag{Name: "files-idle-timeout", Value: "60s", Usage: "close a file-level restore session (its appliance) no request used for this long"},
			&cli.StringFlag{Name: "files-memory", Value: "512MiB", Usage: "memory of each file-level restore appliance (at least 256MiB)"},
			&cli.StringFlag{Name: "files-memory-budget", Value: "2GiB", Usage: "memory of all file-level restore appliances together (sessions beyond it close idle ones or wait)"},
			&cli.StringFlag{Name: "files-accel", Value: "auto", Usage: "file-level restore appliances' accelerator: auto (KVM, falling back to TCG), kvm or tcg"},
			&cli.IntFlag{Name: "max-jobs", Value: 2, Usage: "backup jobs running at once on this host; more queue"},
			&cli.StringFlag{Name: "max-memory", Value: "1GiB", Usage: "buffers of all running jobs together; a job that would exceed it queues"},
			&cli.IntFlag{Name: "readers", Value: 4, Usage: "NBD connections per disk of a job that does not ask for a number (4, not backup's 8: jobs share the host and its memory budget)"},
			&cli.StringFlag{Name: "scratch-dir", Value: domain.DefaultScratchDir, Usage: "directory for backup jobs' scratch files"},
			&cli.StringFlag{Name: "run-dir", Value: mover.DefaultRunDir, Usage: "directory for the per-domain locks and the jobs' NBD sockets"},
			durationFlag("keep-for", 24*time.Hour, "keep finished jobs (for GET /v1/jobs) this long", ""),
			&cli.IntFlag{Name: "keep-max", Value: 1000, Usage: "keep at most this many finished jobs"},
			durationFlag("shutdown-timeout", 2*time.Minute, "on SIGTERM, wait this long for jobs to end", ""),
			durationFlag("verify-every", 0, "run a verify job of the whole repository this often (e.g. 1d)", "never"),
			&cli.BoolFlag{Name: "init", Usage: "create the repository at start if there is none (without it, one is created only at /var/lib/nbdmover/repo, when --repo and NBDMOVER_REPO are not set)"},
			&cli.GenericFlag{Name: "limit-schedule", Value: &repeated{}, Usage: "a weekly timetable of the limits all jobs share, over --limit-upload, --limit-download and --limit-read " +
				"(repeatable; the last rule that sets a limit wins): 'mon-fri 08:00-18:00 upload=20MiB read=50MiB', 'daily 22:00-06:00 upload=off'; the host's local time"},
			&cli.StringFlag{Name: "limit-schedule-file", Usage: "a file of --limit-schedule rules, one a line (# comments), read again whenever it changes: no restart"},
			&cli.StringFlag{Name: "hooks-file", Usage: "hooks by domain, JSON: {\"domains\": {\"web1\": {\"pre_hook\": \"...\", \"post_hook\": \"...\", \"hook_timeout\": \"5m\"}}}; " +
				"a domain's entry replaces --pre-hook/--post-hook for it (\"\" turns one off); read at each backup; root's, not writable by others"},
			&cli.StringFlag{Name: "copy-to", Usage: "a repository copy jobs copy this daemon's backups into (POST /v1/jobs {\"kind\": \"copy\"}; --copy-every); it must exist"},
			&cli.BoolFlag{Name: "copy-to-allow-plaintext", Usage: "let copy jobs copy this daemon's encrypted repository into an unencrypted --copy-to (in the clear)"},
			&cli.StringFlag{Name: "copy-limit-upload", Usage: "store at most this much per second into --copy-to", DefaultText: "no limit"},
			durationFlag("copy-every", 0, "run a copy job of every domain's backups to --copy-to this often (e.g. 1d)", "never"),
			&cli.StringFlag{Name: "verify-read-data", Value: "10%", Usage: "share of the chunks a scheduled verify reads, those verified least recently first (10%: all in ten runs; 0: none)"},
		), append(append(retentionFlags(), jobFlags()...), sideFlags("copy-to", "copy-to-", "NBDMOVER_COPY_TO_PASSWORD")...)...),
		Action: func(c *cli.Context) error {
			if err := checkFlags(c); err != nil {
				return err
			}
			log, err := newLogger(c)
			if err != nil {
				return err
			}
			mem, err := parseSize(c.String("max-memory"))
			if err != nil {
				return usagef("--max-memory: %v", err)
			}
			if n := c.Int("readers"); n < 1 || n > 64 {
				return usagef("--readers %d: want 1 to 64", n)
			}
			policy, set, err := parsePolicy(c)
			if err != nil {
				return err
			}
			var retention *repo.Policy
			if set {
				retention = &policy
			}
			verifyShare := 0
			if v := c.String("verify-read-data"); v != "0" && v != "0%" {
				if verifyShare, err = parsePercent(v); err != nil {
					return usagef("--verify-read-data: %v", err)
				}
			}
			if c.IsSet("copy-every") && flagDuration(c, "copy-every") < time.Minute {
				return usagef("--copy-every %s: want at least 1m", formatDuration(flagDuration(c, "copy-every")))
			}
			if c.IsSet("verify-every") && flagDuration(c, "verify-every") < time.Minute {
				return usagef("--verify-every %s: want at least 1m", formatDuration(flagDuration(c, "verify-every")))
			}
			exportCache, err := parseSize(c.String("export-cache-size"))
			if err != nil || exportCache < 16<<20 {
				return usagef("--export-cache-size %s: want at least 16MiB", c.String("export-cache-size"))
			}
			exportIdle, err := parseDuration(c.String("export-idle-timeout"))
			if err != nil || exportIdle < 0 {
				return usagef("--export-idle-timeout %q: a duration like 1h, or 0 for never", c.String("export-idle-timeout"))
			}
			if exportIdle == 0 {
				exportIdle = -1 // never
			}
			if n := c.Int("max-restores"); n < 1 || n > 64 {
				return usagef("--max-restores %d: want 1 to 64", n)
			}
			for _, d := range c.StringSlice("restore-image-dir") {
				if !filepath.IsAbs(d) {
					return usagef("--restore-image-dir %s: an absolute path", d)
				}
			}
			if n := c.Int("max-exports"); n < 1 || n > 256 {
				return usagef("--max-exports %d: want 1 to 256", n)
			}
			filesIdle, err := parseDuration(c.String("files-idle-timeout"))
			if err != nil || filesIdle < time.Second {
				return usagef("--files-idle-timeout %q: a duration of at least 1s, like 60s", c.String("files-idle-timeout"))
			}
			filesMem, err := parseSize(c.String("files-memory"))
			if err != nil || filesMem < 256<<20 {
				return usagef("--files-memory %q: want at least 256MiB", c.String("files-memory"))
			}
			filesBudget, err := parseSize(c.String("files-memory-budget"))
			if err != nil || filesBudget < filesMem {
				return usagef("--files-memory-budget %q: want at least --files-memory (%s)", c.String("files-memory-budget"), c.String("files-memory"))
			}
			switch c.String("files-accel") {
			case "auto", "kvm", "tcg":
			default:
				return usagef("--files-accel %q: want auto, kvm or tcg", c.String("files-accel"))
			}
			hooks, err := hookOptions(c)
			if err != nil {
				return err
			}
			limitRead, err := readRate(c)
			if err != nil {
				return err
			}
			var schedule sink.Schedule
			for _, rule := range *c.Generic("limit-schedule").(*repeated) {
				r, err := sink.ParseScheduleRule(rule)
				if err != nil {
					return usagef("--limit-schedule: %v", err)
				}
				schedule = append(schedule, r)
			}
			copyTo, err := copyTarget(c)
			if err != nil {
				return err
			}
			token, err := serveToken(c)
			if err != nil {
				return err
			}
			if token != "" && c.String("token") == token && os.Getenv("NBDMOVER_TOKEN") != token {
				log.Warn("the bearer token was given on the command line, where ps shows it: use --token-file or NBDMOVER_TOKEN")
			}
			return daemon.Serve(c.Context, daemon.ServeOptions{
				Listen: c.String("listen"), Token: token, Log: log,
				TLS:            daemon.TLSOptions{Cert: c.String("tls-cert"), Key: c.String("tls-key"), ClientCA: c.String("tls-client-ca")},
				MaxConnections: c.Int("max-connections"), ShutdownTimeout: flagDuration(c, "shutdown-timeout"),
				MaxExports: c.Int("max-exports"), ExportCacheBytes: exportCache, ExportIdleTimeout: exportIdle,
				FilesIdleTimeout: filesIdle, FilesMemoryMiB: int(filesMem >> 20), FilesMemoryBudgetMiB: int(filesBudget >> 20),
				FilesAccel:    c.String("files-accel"),
				LimitSchedule: schedule, LimitScheduleFile: c.String("limit-schedule-file"), CopyTo: copyTo,
				CopyToPlaintext: c.Bool("copy-to-allow-plaintext"),
				Init:            c.Bool("init") || !c.IsSet("repo"),
				Runner: daemon.RunnerOptions{
					MaxJobs: c.Int("max-jobs"), MaxMemory: mem, KeepFor: flagDuration(c, "keep-for"), KeepMax: c.Int("keep-max"),
					Retention: retention, VerifyEvery: flagDuration(c, "verify-every"), VerifyReadPercent: verifyShare,
					CopyEvery: flagDuration(c, "copy-every"), HooksFile: c.String("hooks-file"),
					MaxRestores: c.Int("max-restores"), RestoreImageDirs: c.StringSlice("restore-image-dir"),
					Backup: mover.Options{Repo: repoOptions(c), RunDir: c.String("run-dir"), Tuning: pipeline.Tuning{Readers: c.Int("readers"), ReadRate: limitRead},
						Hooks: hooks},
					Domain: domain.Options{Connect: c.String("connect"), ScratchDir: c.String("scratch-dir")},
				},
			})
		},
	}
}

// copyTarget is the repository --copy-to names, with its own endpoint,
// secret and upload limit (nil: none).
func copyTarget(c *cli.Context) (*repo.Options, error) {
	if c.String("copy-to") == "" {
		for _, f := range []string{"copy-every", "copy-to-s3-endpoint", "copy-to-password-file", "copy-to-password-command", "copy-to-key-file",
			"copy-limit-upload", "copy-to-allow-plaintext"} {
			if c.IsSet(f) {
				return nil, usagef("--%s goes with --copy-to REPO", f)
			}
		}
		return nil, nil
	}
	o, _, err := sideOptions(c, "--copy-to", c.String("copy-to"), "copy-to-", "NBDMOVER_COPY_TO_PASSWORD")
	if err != nil {
		return nil, err
	}
	if o.Upload, err = rateFlag(c, "copy-limit-upload"); err != nil {
		return nil, err
	}
	return &o, nil
}

// repeated is a repeatable flag whose values are taken whole: a
// StringSliceFlag would split 'sat,sun 00:00-24:00 upload=off' at its comma.
type repeated []string

func (r *repeated) Set(v string) error { *r = append(*r, v); return nil }
func (r *repeated) String() string     { return strings.Join(*r, "; ") }

// serveToken reads the bearer token from --token-file, or takes --token
// (or NBDMOVER_TOKEN).
func serveToken(c *cli.Context) (string, error) {
	file := c.String("token-file")
	if file == "" {
		return c.String("token"), nil
	}
	if c.String("token") != "" {
		return "", usagef("give the token in --token-file or --token/NBDMOVER_TOKEN, not both")
	}
	b, err := os.ReadFile(file)
	if err != nil {
		return "", usagef("--token-file: %v", err)
	}
	token := strings.TrimSpace(string(b))
	if token == "" {
		return "", usagef("--token-file %s is empty", file)
	}
	return token, nil
}
