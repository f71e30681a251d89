package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"time"

	"github.com/nbdmover/nbdmover/chunker"
	"github.com/nbdmover/nbdmover/files"
	"github.com/nbdmover/nbdmover/internal/listen"
	"github.com/nbdmover/nbdmover/mover"
	"github.com/nbdmover/nbdmover/mover/domain"
	"github.com/nbdmover/nbdmover/repo"
	"github.com/nbdmover/nbdmover/sink"
)

// DefaultListen is where the daemon listens unless told otherwise.
const DefaultListen = "unix:///run/nbdmover/nbdmover.sock"

// ServeOptions configure the daemon.
type ServeOptions struct {
	// Listen is unix:///path (a 0600 socket) or host:port (TCP, which
	// needs Token, and TLS unless the address is a loopback one).
	Listen string
	// Token is the bearer token every request must carry; required on TCP.
	Token string `json:"-"`
	TLS   TLSOptions
	// MaxConnections bounds the connections served at once (default 64).
	MaxConnections int
	// HTTP timeouts (defaults: headers 10s, whole request 1m, response
	// 10m, idle keep-alive 2m).
	ReadHeaderTimeout, ReadTimeout, WriteTimeout, IdleTimeout time.Duration
	Runner                                                    RunnerOptions
	// ShutdownTimeout bounds how long SIGTERM waits for jobs to end.
	ShutdownTimeout time.Duration
	// MaxExports bounds the NBD exports served at once (default 4);
	// ExportCacheBytes is each one's cache of decoded chunks (default
	// 256 MiB).
	MaxExports       int
	ExportCacheBytes int64
	// ExportIdleTimeout ends an export no client has been connected to
	// for that long (default 1h; negative: never).
	ExportIdleTimeout time.Duration
	// Files: file-level restore sessions (GET .../files). Each appliance
	// has FilesMemoryMiB (default 512); all together at most
	// FilesMemoryBudgetMiB (default 2048); a session no request used for
	// FilesIdleTimeout (default 60s) is closed. FilesAccel is auto, kvm
	// or tcg (files.Options).
	FilesMemoryMiB, FilesMemoryBudgetMiB int
	FilesIdleTimeout                     time.Duration
	FilesAccel                           string
	// LimitSchedule changes the limits all jobs share (the repository's
	// Upload and Download rates, the backups' ReadRate) by the time of
	// day and week, over the limits given; LimitScheduleFile holds more
	// rules, read again whenever it changes (docs/api.md, "Limits").
	LimitSchedule     sink.Schedule
	LimitScheduleFile string
	// CopyTo, if set, is the repository copy jobs copy the daemon's
	// backups into (opened at start: one that is missing or that its
	// secret does not open stops the daemon); RunnerOptions.CopyEvery
	// schedules them.
	CopyTo *repo.Options
	// CopyToPlaintext lets copy jobs copy an encrypted repository into an
	// unencrypted CopyTo (refused at start otherwise).
	CopyToPlaintext bool

	// Init creates the repository at start when there is none; without
	// it, a missing repository stops the daemon (repo.ErrNoRepository).
	Init bool
	Log  *slog.Logger `json:"-"`
	// Ready, if set, is called with the listener's address once serving.
	Ready func(addr string) `json:"-"`
}

// filesCacheBytes is each file session's cache of decoded chunks: the
// appliance's own page cache keeps what it reads again.
const filesCacheBytes = 32 << 20

// maxBody is the largest request body the API reads.
const maxBody = 64 << 10

func (o ServeOptions) withDefaults() ServeOptions {
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.Listen == "" {
		o.Listen = DefaultListen
	}
	if o.ShutdownTimeout <= 0 {
		o.ShutdownTimeout = 2 * time.Minute
	}
	if o.MaxConnections <= 0 {
		o.MaxConnections = 64
	}
	if o.MaxExports <= 0 {
		o.MaxExports = 4
	}
	if o.ExportCacheBytes <= 0 {
		o.ExportCacheBytes = 256 << 20
	}
	if o.FilesMemoryMiB <= 0 {
		o.FilesMemoryMiB = files.DefaultMemoryMiB
	}
	if o.FilesMemoryBudgetMiB <= 0 {
		o.FilesMemoryBudgetMiB = 2048
	}
	if o.FilesIdleTimeout <= 0 {
		o.FilesIdleTimeout = time.Minute
	}
	if o.ExportIdleTimeout == 0 {
		o.ExportIdleTimeout = time.Hour
	}
	for _, d := range []struct {
		t   *time.Duration
		def time.Duration
	}{{&o.ReadHeaderTimeout, 10 * time.Second}, {&o.ReadTimeout, time.Minute}, {&o.WriteTimeout, 10 * time.Minute},
		{&o.IdleTimeout, 2 * time.Minute}} {
		if *d.t <= 0 {
			*d.t = d.def
		}
	}
	return o
}

// Serve runs the daemon until ctx is done (SIGTERM/SIGINT in the command),
// then stops accepting, cancels the running jobs and waits for them to end
// cleanly within ShutdownTimeout.
func Serve(ctx context.Context, o ServeOptions) error {
	o = o.withDefaults()
	for _, d := range []struct{ what, dir, def string }{{"--run-dir", o.Runner.Backup.RunDir, mover.DefaultRunDir},
		{"--scratch-dir", o.Runner.Domain.ScratchDir, domain.DefaultScratchDir}} {
		if d.dir == "" {
			d.dir = d.def
		}
		if err := mover.CheckDir(d.dir); err != nil {
			return refuse(ErrInvalid, "%s: %v", d.what, err)
		}
	}
	lim, err := newLimiter(&o)
	if err != nil {
		return err
	}
	if f := o.Runner.HooksFile; f != "" {
		if _, err := readHooks(f); err != nil {
			return refuse(ErrInvalid, "--hooks-file: %v", err)
		}
	}
	l, err := listenAPI(o.Listen, o.Token, o.TLS, o.MaxConnections)
	if err != nil {
		return err
	}
	// Open the repository now: one that is missing, unreachable, or
	// encrypted with another password stops the daemon at start, not
	// every job later (jobs reuse an encrypted repository's key).
	r, err := openAtStart(ctx, o)
	if err != nil {
		l.Close()
		return err
	}
	if o.CopyTo != nil {
		if o.Runner.CopyTo, err = o.CopyTo.Open(ctx); err != nil {
			l.Close()
			return fmt.Errorf("open the repository to copy to (--copy-to %s): %w", o.CopyTo.Location, err)
		}
		ct := o.Runner.CopyTo
		switch {
		case ct.Config().ID == r.Config().ID:
			err = refuse(ErrInvalid, "--copy-to %s is this daemon's own repository", o.CopyTo.Location)
		case ct.Config().ChunkSize != r.Config().ChunkSize:
			err = refuse(ErrInvalid, "--copy-to %s has %d-byte chunks, this daemon's repository %d-byte ones: a copy needs the same chunk size",
				o.CopyTo.Location, ct.Config().ChunkSize, r.Config().ChunkSize)
		case r.Encrypted() && !ct.Encrypted() && !o.CopyToPlaintext:
			err = refuse(ErrInvalid, "--copy-to %s is not encrypted and this daemon's repository is: its backups would be copied in the clear; add --copy-to-allow-plaintext if that is meant", o.CopyTo.Location)
		}
		if err != nil {
			l.Close()
			return err
		}
		if lc := ct.ObjectLock(); lc != nil && o.Runner.CopyEvery > time.Duration(lc.PeriodSeconds)*time.Second {
			o.Log.Warn("--copy-every is longer than the Object Lock period of --copy-to: a copied backup's chunks are unprotected between the end of its lock and the next copy; copy more often, or init the target with a longer period",
				"copy_every", o.Runner.CopyEvery.String(), "lock_period", (time.Duration(lc.PeriodSeconds) * time.Second).String())
		}
	}
	m := newMetrics()
	read, _ := o.Runner.Backup.Tuning.ReadRate.(*sink.Rate)
	m.limits = [3]*sink.Rate{o.Runner.Backup.Repo.Upload, o.Runner.Backup.Repo.Download, read}
	if ms, _, err := r.Backups(ctx, ""); err == nil {
		m.seedLastSuccess(ms)
	} else {
		o.Log.Warn("cannot list the backups: the last-success metrics start empty", "error", err)
	}
	ro := o.Runner
	ro.Log = o.Log
	// One repository for the daemon's life: every job, export and listing
	// uses it (and the store's limit on requests in flight). /healthz
	// opens it anew (at most every 5 s), which is how a repository
	// removed or re-keyed elsewhere shows.
	ro.Backup.Repository = r
	ro.Observe = m.observe
	ro.RestoreCacheBytes = o.ExportCacheBytes
	if ro.DomainDisks == nil {
		uri := ro.Domain.Connect
		ro.DomainDisks = func(ctx context.Context, name string, only []string) (int, error) {
			return domain.Disks(uri, name, only)
		}
	}
	startupCleanup(ctx, ro, o.Log)
	runner := NewRunner(context.WithoutCancel(ctx), ro)
	runner.ResumeRestores(ctx)
	// The store's temporary files in the background: a large local store
	// takes a while to walk, and no job needs them gone.
	cleaned := make(chan struct{})
	go func() { removeStoreTemp(runner.ctx, r, o.Log); close(cleaned) }()
	defer func() { <-cleaned }()
	m.runner = runner
	if lim != nil {
		lctx, stopLimits := context.WithCancel(ctx)
		limited := make(chan struct{})
		go func() { lim.run(lctx); close(limited) }()
		defer func() { stopLimits(); <-limited }()
	}
	runDir := ro.Backup.RunDir
	if runDir == "" {
		runDir = mover.DefaultRunDir
	}
	// Sockets and bind leftovers of exports of a daemon that died (its
	// API socket is ours now: no other daemon uses this run directory).
	if n, err := listen.Sweep(filepath.Join(runDir, "exports")); err != nil {
		o.Log.Warn("cannot sweep the exports' directory", "error", err)
	} else if n > 0 {
		o.Log.Info("removed what exports of an earlier run left", "entries", n)
	}
	xctx, stopExports := context.WithCancel(ctx)
	x := newExports(xctx, exportsOptions{repo: r, dir: filepath.Join(runDir, "exports"), max: o.MaxExports,
		cacheBytes: o.ExportCacheBytes, idle: o.ExportIdleTimeout}, o.Log)
	fs := newFileSessions(xctx, fileSessionsOptions{repo: r, runDir: filepath.Join(runDir, "files"), memoryMiB: o.FilesMemoryMiB,
		budgetMiB: o.FilesMemoryBudgetMiB, cacheBytes: filesCacheBytes, idle: o.FilesIdleTimeout, accel: o.FilesAccel}, o.Log)
	// Stop (the context) before waiting, whichever way Serve returns.
	defer x.wait()
	defer fs.wait()
	defer stopExports()
	m.exports, m.files = x, fs
	srv := &http.Server{Handler: newAPI(runner, x, fs, ro.Backup.Repo, r, o.Token, m, o.Log), ReadHeaderTimeout: o.ReadHeaderTimeout,
		ReadTimeout: o.ReadTimeout, WriteTimeout: o.WriteTimeout, IdleTimeout: o.IdleTimeout, MaxHeaderBytes: 64 << 10,
		ErrorLog:    slog.NewLogLogger(o.Log.Handler(), slog.LevelDebug),
		ConnContext: func(ctx context.Context, c net.Conn) context.Context { return context.WithValue(ctx, connKey{}, c) }}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(l) }()
	o.Log.Info("serving", "listen", o.Listen, "tls", o.TLS.Enabled(), "repository", ro.Backup.Repo.Location, "max_jobs", ro.MaxJobs)
	if o.Ready != nil {
		o.Ready(l.Addr().String())
	}
	select {
	case err := <-errc:
		runner.Shutdown(context.WithoutCancel(ctx))
		return err
	case <-ctx.Done():
	}
	o.Log.Info("shutting down: cancelling jobs")
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), o.ShutdownTimeout)
	defer cancel()
	srv.SetKeepAlivesEnabled(false)
	l.Close() // stop accepting at once; requests in progress finish below
	jobErr := runner.Shutdown(sctx)
	srv.Shutdown(sctx)
	return jobErr
}

// openAtStart opens (with Init, creates) the daemon's repository.
func openAtStart(ctx context.Context, o ServeOptions) (*repo.Repo, error) {
	ro := o.Runner.Backup.Repo
	var r *repo.Repo
	var err error
	created := false
	if o.Init {
		if cs := o.Runner.Backup.ChunkSize; cs != 0 {
			if err := chunker.CheckChunkSize(cs); err != nil {
				return nil, refuse(ErrInvalid, "%v", err)
			}
		}
		r, created, err = ro.OpenOrInit(ctx, repo.InitOptions{ChunkSize: o.Runner.Backup.ChunkSize})
	} else {
		r, err = ro.Open(ctx)
	}
	switch {
	case err != nil && ro.Keys != nil:
		return nil, fmt.Errorf("open the encrypted repository with its %s: %w", ro.Keys.Kind(), err)
	case err != nil:
		return nil, fmt.Errorf("open the repository: %w", err)
	case created:
		o.Log.Info("created the repository", "repo", ro.Location)
	case ro.Keys != nil:
		o.Log.Info("encrypted repository unlocked", "repo", ro.Location)
	}
	return r, nil
}

// startupCleanup ends what crashed runs left on the domains
// (domain.Cleanup) before the daemon takes jobs (it holds each domain's
// lock while it tidies it, which a job would find taken); a failure is
// logged, not fatal.
func startupCleanup(ctx context.Context, ro RunnerOptions, log *slog.Logger) {
	rep, err := domain.Cleanup(ctx, domain.CleanupOptions{Repo: ro.Backup.Repo, Connect: ro.Domain.Connect,
		RunDir: ro.Backup.RunDir, ScratchDir: ro.Domain.ScratchDir, SkipStoreTemp: true, Log: log})
	if err != nil {
		log.Warn("start-up cleanup failed", "error", err)
		return
	}
	for _, d := range rep.Domains {
		log.Info("start-up cleanup", "domain", d.Domain, "ended_job", d.EndedJob, "thawed", d.Thawed,
			"deleted_checkpoints", d.DeletedCheckpoints, "removed_dirs", d.RemovedDirs, "skipped", d.Skipped, "problems", d.Problems)
	}
}

// removeStoreTemp removes the temporary files crashed writes left in the
// repository's store.
func removeStoreTemp(ctx context.Context, r *repo.Repo, log *slog.Logger) {
	if n, err := r.RemoveTemp(ctx, time.Hour); err != nil {
		log.Warn("removing the store's temporary files failed", "error", err)
	} else if n > 0 {
		log.Info("removed temporary files of interrupted writes", "store_temp_files", n)
	}
}
