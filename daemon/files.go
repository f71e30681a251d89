package daemon

import (
	"cmp"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"net/http"
	"slices"
	"strconv"
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
	// "latest" is resolved first: a newer backup gets its own session.
	m, err := f.o.repo.Backup(ctx, domain, backup)
	if err != nil {
		if errors.Is(err, repo.ErrNoBackup) {
			return nil, time.Time{}, nil, refuse(ErrNotFound, "%v", err)
		}
		return nil, time.Time{}, nil, err
	}
	key := domain + "/" + m.ID + "/" + strings.Join(disks, ",")
	f.mu.Lock()
	e, ok := f.live[key]
	if !ok {
		if err := f.makeRoom(); err != nil {
			f.mu.Unlock()
			return nil, time.Time{}, nil, err
		}
		e = &fileSession{key: key, ready: make(chan struct{})}
		f.live[key] = e
		f.wg.Add(1)
		go f.open(e, domain, m.ID, disks)
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

// The API's file-level restore: GET /v1/backups/{domain}/{id}/filesystems,
// .../files (a directory's entries, a page at a time), .../files/content
// (a file's bytes) and .../files/tar (a tar stream of paths). Query
// parameters: disk (repeatable: the disks to give the appliance), fs (a
// filesystem at /, instead of the guest as it mounts them), path.

// maxFilesPage bounds a listing's page (?limit=).
const maxFilesPage = 10000

// fileSession answers with an error and returns nil when the request's
// session cannot be had; otherwise the session, mounted as ?fs= asks,
// and the function that ends the request's use of it.
func (a *api) fileSession(w http.ResponseWriter, r *http.Request) (*files.Session, time.Time, func()) {
	q := r.URL.Query()
	s, opened, release, err := a.files.get(r.Context(), r.PathValue("domain"), r.PathValue("id"), q["disk"])
	if err != nil {
		writeRunnerError(w, err)
		return nil, time.Time{}, nil
	}
	unmount, err := s.Use(q.Get("fs"))
	if err != nil {
		release()
		writeFilesError(w, err)
		return nil, time.Time{}, nil
	}
	return s, opened, func() { unmount(); release() }
}

// writeFilesError answers with the status that fits a files error.
func writeFilesError(w http.ResponseWriter, err error) {
	switch {
	case errors.Is(err, files.ErrInvalid):
		writeError(w, http.StatusUnprocessableEntity, err)
	case errors.Is(err, files.ErrNotFound):
		writeError(w, http.StatusNotFound, err)
	case errors.Is(err, files.ErrNoFilesystem):
		writeError(w, http.StatusConflict, err)
	default:
		writeRunnerError(w, err)
	}
}

// filesystems lists a backup's filesystems. It mounts the guest as it
// runs, which fills in the mount points; when that cannot be (several
// operating systems, or none and several filesystems), "mount_error"
// says why, and the list is what to choose ?fs= from.
func (a *api) filesystems(w http.ResponseWriter, r *http.Request) {
	s, opened, release, err := a.files.get(r.Context(), r.PathValue("domain"), r.PathValue("id"), r.URL.Query()["disk"])
	if err != nil {
		writeRunnerError(w, err)
		return
	}
	defer release()
	v := map[string]any{"domain": s.Domain, "id": s.Backup, "accel": s.Accel, "os": s.OS,
		"opened": opened, "launch_seconds": s.Launch.Seconds()}
	if unmount, err := s.Use(""); err != nil {
		v["mount_error"] = err.Error()
	} else {
		unmount()
	}
	v["filesystems"] = s.Filesystems()
	writeJSON(w, http.StatusOK, v)
}

// listFiles answers with a page of a directory: ?after= is the previous
// page's "next" (a cursor: the last name's bytes in base64url), ?limit=
// the page's size (default 1000, at most 10000).
func (a *api) listFiles(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	limit := 1000
	if l := q.Get("limit"); l != "" {
		n, err := strconv.Atoi(l)
		if err != nil || n < 1 || n > maxFilesPage {
			writeError(w, http.StatusUnprocessableEntity, fmt.Errorf("limit %q: want 1 to %d", l, maxFilesPage))
			return
		}
		limit = n
	}
	after, err := base64.RawURLEncoding.DecodeString(q.Get("after"))
	if err != nil {
		writeError(w, http.StatusUnprocessableEntity, fmt.Errorf("after %q: not a cursor from a listing's next", q.Get("after")))
		return
	}
	p := cmp.Or(q.Get("path"), "/")
	s, _, release := a.fileSession(w, r)
	if s == nil {
		return
	}
	defer release()
	es, more, err := s.List(r.Context(), p, string(after), limit)
	if err != nil {
		writeFilesError(w, err)
		return
	}
	v := map[string]any{"domain": s.Domain, "id": s.Backup, "path": p, "entries": es}
	if more {
		v["next"] = base64.RawURLEncoding.EncodeToString([]byte(es[len(es)-1].Name))
	}
	writeJSON(w, http.StatusOK, v)
}

// fileContent streams a regular file's bytes.
func (a *api) fileContent(w http.ResponseWriter, r *http.Request) {
	p := r.URL.Query().Get("path")
	s, _, release := a.fileSession(w, r)
	if s == nil {
		return
	}
	defer release()
	e, err := s.Stat(p)
	if err != nil {
		writeFilesError(w, err)
		return
	}
	if e.Type != "file" {
		writeError(w, http.StatusUnprocessableEntity, fmt.Errorf("%s is a %s, not a file (a directory comes as files/tar)", e.Path, e.Type))
		return
	}
	h := w.Header()
	h.Set("Content-Type", "application/octet-stream")
	h.Set("Content-Length", strconv.FormatInt(e.Size, 10))
	h.Set("Last-Modified", e.Mtime.UTC().Format(http.TimeFormat))
	h.Set("Content-Disposition", mime.FormatMediaType("attachment", map[string]string{"filename": e.Name}))
	if _, err := s.Read(r.Context(), e.Path, streamed(w)); err != nil {
		a.log.Warn("file content ended early", "path", e.Path, "error", err)
		panic(http.ErrAbortHandler) // the client sees a cut response, not a short file
	}
}

// fileTar streams ?path= (repeatable; default /) as a tar stream.
func (a *api) fileTar(w http.ResponseWriter, r *http.Request) {
	paths := r.URL.Query()["path"]
	if len(paths) == 0 {
		paths = []string{"/"}
	}
	s, _, release := a.fileSession(w, r)
	if s == nil {
		return
	}
	defer release()
	if _, err := s.CheckPaths(paths); err != nil { // what does not exist is a 404, before the stream starts
		writeFilesError(w, err)
		return
	}
	w.Header().Set("Content-Type", "application/x-tar")
	if _, err := s.Tar(r.Context(), paths, streamed(w)); err != nil {
		a.log.Warn("tar stream ended early", "paths", paths, "error", err)
		panic(http.ErrAbortHandler)
	}
}

// streamTimeout bounds each write of a streamed file: a client that
// stops reading loses its response then, and the appliance it held is
// free for the others.
const streamTimeout = time.Minute

// streamed is w for a response as long as the file it carries: the
// server's write timeout is replaced by one per write.
func streamed(w http.ResponseWriter) io.Writer {
	return deadlineWriter{w, http.NewResponseController(w)}
}

type deadlineWriter struct {
	w  http.ResponseWriter
	rc *http.ResponseController
}

func (d deadlineWriter) Write(p []byte) (int, error) {
	d.rc.SetWriteDeadline(time.Now().Add(streamTimeout))
	return d.w.Write(p)
}
