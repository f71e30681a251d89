package main

import (
	"fmt"
	"strings"
	"time"

	"github.com/nbdmover/nbdmover/internal/progress"
	"github.com/nbdmover/nbdmover/mover"
	"github.com/nbdmover/nbdmover/mover/domain"
	"github.com/nbdmover/nbdmover/mover/nbd"
	"github.com/nbdmover/nbdmover/pipeline"
	"github.com/urfave/cli/v2"
)

func backupCommand() *cli.Command {
	return &cli.Command{
		Name:  "backup",
		Usage: "back up a running libvirt domain (--domain) or any NBD export (--nbd with --name)",
		Flags: append(append(repoFlags(),
			&cli.StringFlag{Name: "domain", Usage: "libvirt domain to back up"},
			connectFlag(),
			&cli.StringFlag{Name: "nbd", Usage: "NBD URI of an export to back up instead of a domain"},
			&cli.StringFlag{Name: "name", Usage: "with --nbd: the name to list and restore the backup by"},
			&cli.StringFlag{Name: "bitmap", Usage: "with --nbd: dirty bitmap for incremental backups"},
			&cli.StringFlag{Name: "mode", Value: "auto", Usage: "auto, full or incremental"},
			&cli.StringSliceFlag{Name: "disk", Usage: "back up only this disk (repeatable); with --nbd, the disk's name"},
			&cli.IntFlag{Name: "readers", Value: 8, Usage: "NBD connections (parallel readers) per disk, 1 to 64"},
			&cli.StringFlag{Name: "compression", Usage: "zstd, zstd:1..4, s2 (fastest, larger) or none (default: the repository's)"},
			&cli.StringFlag{Name: "chunk-size", Value: "1MiB", Usage: "chunk size of a repository this backup creates (--init)"},
			&cli.BoolFlag{Name: "quiesce", Usage: "freeze guest filesystems through the guest agent; fail if that is impossible"},
			&cli.BoolFlag{Name: "quiesce-optional", Usage: "like --quiesce, but continue crash-consistent without a guest agent"},
			&cli.StringFlag{Name: "scratch-dir", Value: domain.DefaultScratchDir, Usage: "directory for the backup job's scratch files"},
			&cli.StringFlag{Name: "max-memory", Value: "1GiB", Usage: "most the backup's buffers may take (readers x disks x chunk size, roughly)"},
			&cli.IntFlag{Name: "verify-sample", Usage: "clean chunks per disk an incremental reads to check the dirty bitmap (0: none)",
				DefaultText: "16 + 0.1% of the chunks holding data, at most 256"},
			&cli.BoolFlag{Name: "init", Usage: "create the repository if there is none (without it, one is created on first use only at /var/lib/nbdmover/repo, when --repo and NBDMOVER_REPO are not set)"},
			jsonFlag(),
		), append(jobFlags(), progressFlags()...)...),
		Action: runBackup,
	}
}

func runBackup(c *cli.Context) error {
	if err := checkFlags(c); err != nil {
		return err
	}
	if (c.String("domain") == "") == (c.String("nbd") == "") {
		return usagef("backup: give --domain NAME, or --nbd URI with --name NAME")
	}
	o, err := backupOptions(c)
	if err != nil {
		return err
	}
	src, err := backupSource(c)
	if err != nil {
		return err
	}
	tracker := &mover.Tracker{}
	o.Progress = tracker.Add
	name := c.String("domain")
	if name == "" {
		name = c.String("name")
	}
	rep, err := progressReporter(c, "backup", name, tracker.Sample)
	if err != nil {
		return err
	}
	rep.Start(c.Context)
	res, err := mover.Backup(c.Context, src, o)
	rep.Finish(err)
	if err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(c.App.Writer, res)
	}
	w := c.App.Writer
	if res.CreatedRepository {
		fmt.Fprintf(w, "created repository %s (id %s)\n", res.Repository, res.RepositoryID)
	}
	fmt.Fprintf(w, "committed %s backup %s/%s in %.1fs: read %s (%.0f MB/s), stored %s (%.0f MB/s), deduplicated %s, zero %s\n",
		res.Mode, res.Domain, res.ID, res.Seconds, progress.Bytes(res.BytesRead), res.ReadMBps, progress.Bytes(res.BytesWritten), res.WrittenMBps,
		progress.Bytes(res.BytesDedup), progress.Bytes(res.BytesZero))
	if len(res.Disks) > 1 {
		for _, d := range res.Disks {
			fmt.Fprintf(w, "  %s: %s in %.1fs: read %s (%.0f MB/s), stored %s (%.0f MB/s)\n", d.Name, d.Mode, d.Seconds,
				progress.Bytes(d.BytesRead), d.ReadMBps, progress.Bytes(d.BytesWritten), d.WrittenMBps)
		}
	}
	if res.PostHookError != "" {
		fmt.Fprintf(w, "warning: the backup is committed, but its %s\n", res.PostHookError)
	}
	if v := res.Verification; v != nil {
		fmt.Fprintf(w, "dirty bitmaps checked: %s (%d clean chunks, %s read)\n", v.Outcome, v.Chunks, progress.Bytes(v.Bytes))
	}
	if res.Fallback != "" {
		fmt.Fprintf(w, "full instead of incremental: %s\n", res.Fallback)
	}
	return nil
}

// backupOptions are the options the flags give a backup.
func backupOptions(c *cli.Context) (mover.Options, error) {
	chunk, err := parseSize(c.String("chunk-size"))
	if err != nil {
		return mover.Options{}, usagef("--chunk-size: %v", err)
	}
	mem, err := parseSize(c.String("max-memory"))
	if err != nil {
		return mover.Options{}, usagef("--max-memory: %v", err)
	}
	log, err := newLogger(c)
	if err != nil {
		return mover.Options{}, err
	}
	if n := c.Int("readers"); n < 1 || n > 64 {
		return mover.Options{}, usagef("--readers %d: want 1 to 64", n)
	}
	// A repository is created on first use only where none was ever
	// configured (the default), or when asked: a mistyped --repo must not
	// start a new repository (and a new chain of checkpoints).
	o := mover.Options{Repo: repoOptions(c), ChunkSize: chunk, Compression: c.String("compression"), Mode: c.String("mode"),
		Init: c.Bool("init") || !c.IsSet("repo"), Tuning: pipeline.Tuning{Readers: c.Int("readers")}, MaxMemory: mem, Log: log}
	if c.IsSet("verify-sample") {
		n := c.Int("verify-sample")
		o.VerifySample = &n
	}
	if o.Hooks, err = hookOptions(c); err != nil {
		return mover.Options{}, err
	}
	if o.Tuning.ReadRate, err = readRate(c); err != nil {
		return mover.Options{}, err
	}
	return o, nil
}

// jobFlags are what backup and serve (for all its backups) share: the
// hooks and the limit on reads from the disks.
func jobFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "pre-hook", Usage: "shell command run before the backup, once its checks pass (its failure fails the backup before anything starts; " +
			"environment: NBDMOVER_DOMAIN, NBDMOVER_MODE, NBDMOVER_REPOSITORY; README, \"Hooks\")"},
		&cli.StringFlag{Name: "post-hook", Usage: "shell command run after the backup, whatever became of it (NBDMOVER_RESULT success or failure, " +
			"NBDMOVER_BACKUP_ID, NBDMOVER_RESULT_FILE, NBDMOVER_ERROR); its failure is reported, the backup stands"},
		&cli.StringFlag{Name: "hook-timeout", Value: "10m", Usage: "kill a hook (and what it started) after this long"},
		&cli.StringFlag{Name: "limit-read", EnvVars: []string{"NBDMOVER_LIMIT_READ"},
			Usage:       "read at most this much per second from the VMs' disks (e.g. 50MiB: the guest keeps its own I/O; serve's holds for all its jobs together)",
			DefaultText: "no limit"},
	}
}

// readRate is --limit-read's pacer (nil: none).
func readRate(c *cli.Context) (pipeline.Pacer, error) {
	r, err := rateFlag(c, "limit-read")
	if r == nil { // not a typed nil in the interface
		return nil, err
	}
	return r, nil
}

// hookOptions are the hooks the flags give.
func hookOptions(c *cli.Context) (mover.Hooks, error) {
	timeout, err := parseDuration(c.String("hook-timeout"))
	if err != nil || timeout < time.Second {
		return mover.Hooks{}, usagef("--hook-timeout %q: a duration of at least 1s, like 10m", c.String("hook-timeout"))
	}
	h := mover.Hooks{Pre: c.String("pre-hook"), Post: c.String("post-hook"), Timeout: timeout}
	for _, f := range []struct{ name, cmd string }{{"--pre-hook", h.Pre}, {"--post-hook", h.Post}} {
		if c.IsSet(f.name[2:]) && strings.TrimSpace(f.cmd) == "" {
			return mover.Hooks{}, usagef("%s: an empty command", f.name)
		}
	}
	return h, nil
}

// backupSource is the domain or NBD export the flags name.
func backupSource(c *cli.Context) (mover.Source, error) {
	if c.String("domain") != "" {
		return domain.New(domain.Options{Name: c.String("domain"), Connect: c.String("connect"),
			Disks: c.StringSlice("disk"), Quiesce: c.Bool("quiesce"), QuiesceOptional: c.Bool("quiesce-optional"),
			ScratchDir: c.String("scratch-dir")}), nil
	}
	disks := c.StringSlice("disk")
	if len(disks) > 1 {
		return nil, usagef("backup --nbd: an NBD export is one disk; give at most one --disk name")
	}
	o := nbd.Options{URI: c.String("nbd"), Name: c.String("name"), Bitmap: c.String("bitmap")}
	if len(disks) == 1 {
		o.Disk = disks[0]
	}
	return nbd.New(o), nil
}
