package daemon

import (
	"context"
	"errors"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/nbdmover/nbdmover/files"
	"github.com/nbdmover/nbdmover/repo"
)

// fileSessions are the daemon's file-level restore sessions (package
// files): one libguestfs appliance per (backup, disk set), opened by the
// first request that needs it, shared by the requests that come while it
// boots, and kept for later ones until no request has used it for the
// idle timeout. The appliances' memory together stays within a budget: a
// session no request is using is closed to make room (the least recently
// used first); with none, the request is refused (503) rather than the
// host run out of memory.
type fileSessions struct {
	ctx  context.Context // ends at shutdown
	o    fileSessionsOptions
	log  *slog.Logger
	mu   sync.Mutex
	live map[string]*fileSession
	wg   sync.WaitGroup // sessions' closes
}

type fileSessionsOptions struct {
	repo       *repo.Repo
	runDir     string // sessions' private sockets, beneath it
	memoryMiB  int    // each appliance's
	budgetMiB  int    // all appliances' together
	cacheBytes int64  // each session's chunk cache
	idle       time.Duration
	accel      string
}

// fileSession is one session, or one being opened (ready not yet closed).
type fileSession struct {
	key    string
	ready  chan struct{}
	s      *files.Session // set, or err, before ready is closed
	err    error
	users  int
	opened time.Time
	last   time.Time // when a request last ended its use
}

func newFileSessions(ctx context.Context, o fileSessionsOptions, log *slog.Logger) *fileSessions {
	f := &fileSessions{ctx: ctx, o: o, log: log, live: map[string]*fileSession{}}
	f.wg.Add(1)
	go f.reap()
	return f
}

// get returns the session for (domain, backup, disks), opening it if
// needed, and the function that ends the caller's use of it.
func (f *fileSessions) get(ctx context.Context, domain, backup string, disks []string) (*files.Session, time.Time, func(), error) {
	if err := repo.ValidName("domain", domain); err != nil {
		return nil, time.Time{}, nil, refuse(ErrInvalid, "%v", err)
	}
	if backup != "latest" {
		if err := repo.ValidBackupID(backup); err != nil {
			return nil, time.Time{}, nil, refuse(ErrInvalid, "%v", err)
		}
	}
	for _, d := range disks {
		if err := repo.ValidName("disk", d); err != nil {
			return nil, time.Time{}, nil, refuse(ErrInvalid, "%v", err)
		}
	}
	disks = slices.Compact(slices.Sorted(slices.Values(disks)))
	key := func(id string) string { return domain + "/" + id + "/" + strings.Join(disks, ",") }
	id := backup
	f.mu.Lock()
	e, ok := f.live[key(id)]
	f.mu.Unlock()
	if !ok || backup == "latest" {
		// Looked up in the repository when no session has it (a bad id is
		// a 404 before it takes a place in the budget), and "latest"
		// always: a newer backup gets its own session.
		m, err := f.o.repo.Backup(ctx, domain, backup)
		if err != nil {
			if errors.Is(err, repo.ErrNoBackup) {
				return nil, time.Time{}, nil, refuse(ErrNotFound, "%v", err)
			}
			return nil, time.Time{}, nil, err
		}
		id = m.ID
	}
	f.mu.Lock()
	e, ok = f.live[key(id)]
	if !ok {
		if err := f.makeRoom(); err != nil {
			f.mu.Unlock()
			return nil, time.Time{}, nil, err
		}
		e = &fileSession{key: key(id), ready: make(chan struct{})}
		f.live[e.key] = e
		f.wg.Add(1)
		go f.open(e, domain, id, disks)
	}
	e.users++
	f.mu.Unlock()
	release := func() {
		f.mu.Lock()
		e.users--
		e.last = time.Now()
		f.mu.Unlock()
	}
	select {
	case <-e.ready:
	case <-ctx.Done():
		release()
		return nil, time.Time{}, nil, ctx.Err()
	}
	if e.err != nil {
		release()
		return nil, time.Time{}, nil, e.err
	}
	return e.s, e.opened, release, nil
}

// open launches e's appliance (on the daemon's context: a first request
// that gives up does not end a launch others may be waiting for).
func (f *fileSessions) open(e *fileSession, domain, id string, disks []string) {
	defer f.wg.Done()
	s, err := files.Open(f.ctx, files.Options{Repository: f.o.repo, Domain: domain, Backup: id, Disks: disks, RunDir: f.o.runDir,
		MemoryMiB: f.o.memoryMiB, Accel: f.o.accel, CacheBytes: f.o.cacheBytes, Log: f.log.With("files", e.key)})
	f.mu.Lock()
	defer f.mu.Unlock()
	switch {
	case err == nil && f.ctx.Err() != nil:
		s.Close()
		err = ErrShuttingDown
	case errors.Is(err, files.ErrInvalid):
		err = refuse(ErrInvalid, "%v", err)
	case errors.Is(err, repo.ErrNoBackup), errors.Is(err, repo.ErrNoDisk):
		err = refuse(ErrNotFound, "%v", err)
	}
	if err != nil {
		e.err = err
		delete(f.live, e.key) // the next request tries again
		f.log.Warn("file session did not open", "files", e.key, "error", err)
	} else {
		e.s, e.opened, e.last = s, time.Now(), time.Now()
	}
	close(e.ready)
}

// makeRoom closes idle sessions, least recently used first, until one
// more appliance fits the budget (under f.mu).
func (f *fileSessions) makeRoom() error {
	if f.ctx.Err() != nil {
		return ErrShuttingDown
	}
	each := f.o.memoryMiB + int(f.o.cacheBytes>>20) // an appliance, and its export's cache
	for (len(f.live)+1)*each > f.o.budgetMiB {
		var lru *fileSession
		for _, e := range f.live {
			if e.users == 0 && e.s != nil && (lru == nil || e.last.Before(lru.last)) {
				lru = e
			}
		}
		if lru == nil {
			return refuse(ErrUnavailable, "%d file sessions are in use, all the memory budget (%d MiB, --files-memory-budget; each takes %d MiB) holds: "+
				"try again when one ends", len(f.live), f.o.budgetMiB, each)
		}
		f.closeLocked(lru, "to make room for another")
	}
	return nil
}

// closeLocked ends a session no request uses (under f.mu).
func (f *fileSessions) closeLocked(e *fileSession, why string) {
	delete(f.live, e.key)
	f.log.Info("file session closed "+why, "files", e.key, "opened_for", time.Since(e.opened).Round(time.Second))
	f.wg.Add(1)
	go func() {
		defer f.wg.Done()
		e.s.Close()
	}()
}

// reap closes sessions idle for the idle timeout and, at shutdown, all.
func (f *fileSessions) reap() {
	defer f.wg.Done()
	t := time.NewTicker(min(max(f.o.idle/4, 100*time.Millisecond), 5*time.Second))
	defer t.Stop()
	for {
		select {
		case <-f.ctx.Done():
			f.mu.Lock()
			for _, e := range f.live {
				if e.s != nil {
					// Requests still reading end with errors: the
					// daemon is going away.
					f.closeLocked(e, "at shutdown")
				}
			}
			f.mu.Unlock()
			return
		case <-t.C:
		}
		f.mu.Lock()
		for _, e := range f.live {
			if e.users == 0 && e.s != nil && time.Since(e.last) >= f.o.idle {
				f.closeLocked(e, "after the idle timeout")
			}
		}
		f.mu.Unlock()
	}
}

// count is the number of open (and opening) sessions, for the metrics.
func (f *fileSessions) count() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.live)
}

// wait waits for the sessions to close (after the context's end).
func (f *fileSessions) wait() { f.wg.Wait() }
