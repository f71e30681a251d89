package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/nbdmover/nbdmover/mover"
)

// DefaultListen is where the daemon listens unless told otherwise.
const DefaultListen = "unix:///run/nbdmover/nbdmover.sock"

// ServeOptions configure the daemon.
type ServeOptions struct {
	// Listen is unix:///path (a 0600 socket) or host:port (TCP, which
	// needs Token).
	Listen string
	// Token is the bearer token every request must carry; required on TCP.
	Token  string
	Runner RunnerOptions
	// ShutdownTimeout bounds how long SIGTERM waits for jobs to end.
	ShutdownTimeout time.Duration
	Log             *slog.Logger `json:"-"`
	// Ready, if set, is called with the listener's address once serving.
	Ready func(addr string) `json:"-"`
}

// listen opens the daemon's listener. A unix socket is created with mode
// 0600 (umask set around the bind, so it is never wider).
func listen(spec, token string) (net.Listener, error) {
	if path, ok := strings.CutPrefix(spec, "unix://"); ok {
		if !filepath.IsAbs(path) {
			return nil, fmt.Errorf("--listen %s: want unix:///absolute/path", spec)
		}
		if err := os.MkdirAll(filepath.Dir(path), 0o711); err != nil {
			return nil, err
		}
		if c, err := net.Dial("unix", path); err == nil {
			c.Close()
			return nil, fmt.Errorf("--listen %s: another daemon is listening there", spec)
		}
		os.Remove(path) // a stale socket of a dead daemon
		old := syscall.Umask(0o177)
		l, err := net.Listen("unix", path)
		syscall.Umask(old)
		if err != nil {
			return nil, err
		}
		return l, os.Chmod(path, 0o600)
	}
	if strings.Contains(spec, "://") {
		return nil, fmt.Errorf("--listen %s: want unix:///path or host:port", spec)
	}
	if token == "" {
		return nil, fmt.Errorf("--listen %s: listening on TCP needs a bearer token (--token or NBDMOVER_TOKEN)", spec)
	}
	return net.Listen("tcp", spec)
}

// Serve runs the daemon until ctx is done (SIGTERM/SIGINT in the command),
// then stops accepting, cancels the running jobs and waits for them to end
// cleanly within ShutdownTimeout.
func Serve(ctx context.Context, o ServeOptions) error {
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.Listen == "" {
		o.Listen = DefaultListen
	}
	if o.ShutdownTimeout <= 0 {
		o.ShutdownTimeout = 2 * time.Minute
	}
	l, err := listen(o.Listen, o.Token)
	if err != nil {
		return err
	}
	m := newMetrics()
	ro := o.Runner
	ro.Log = o.Log
	ro.Observe = m.observe
	if ro.CheckDomain == nil {
		uri := ro.Domain.Connect
		ro.CheckDomain = func(ctx context.Context, name string) error { return mover.CheckDomain(uri, name) }
	}
	startupCleanup(ctx, ro, o.Log)
	runner := NewRunner(context.WithoutCancel(ctx), ro)
	m.runner = runner
	srv := &http.Server{Handler: newAPI(runner, ro.Backup.Repo, o.Token, m, o.Log), ReadHeaderTimeout: 10 * time.Second}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(l) }()
	o.Log.Info("serving", "listen", o.Listen, "repository", ro.Backup.Repo.Location, "max_jobs", ro.MaxJobs)
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
	if strings.HasPrefix(o.Listen, "unix://") {
		os.Remove(strings.TrimPrefix(o.Listen, "unix://"))
	}
	return jobErr
}

// startupCleanup ends what crashed runs left (mover.Cleanup) before the
// daemon takes jobs; a failure is logged, not fatal.
func startupCleanup(ctx context.Context, ro RunnerOptions, log *slog.Logger) {
	rep, err := mover.Cleanup(ctx, mover.CleanupOptions{Repo: ro.Backup.Repo, Connect: ro.Domain.Connect,
		RunDir: ro.Backup.RunDir, ScratchDir: ro.Domain.ScratchDir, Log: log})
	if err != nil {
		log.Warn("start-up cleanup failed", "error", err)
		return
	}
	for _, d := range rep.Domains {
		log.Info("start-up cleanup", "domain", d.Domain, "ended_job", d.EndedJob, "thawed", d.Thawed,
			"deleted_checkpoints", d.DeletedCheckpoints, "removed_dirs", d.RemovedDirs, "skipped", d.Skipped, "problems", d.Problems)
	}
	if rep.StoreTempFiles > 0 {
		log.Info("start-up cleanup", "store_temp_files", rep.StoreTempFiles)
	}
}
