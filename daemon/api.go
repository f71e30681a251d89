package daemon

import (
	"cmp"
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/json"
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
	"github.com/nbdmover/nbdmover/internal/progress"
	"github.com/nbdmover/nbdmover/repo"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

type api struct {
	runner  *Runner
	exports *exports
	files   *fileSessions
	repo    repo.Options // for /healthz, which opens it anew
	opened  *repo.Repo   // for everything else
	token   []byte
	m       *metrics
	log     *slog.Logger

	healthMu  sync.Mutex
	healthAt  time.Time // when the repository was last opened for /healthz
	healthErr error
}

func newAPI(r *Runner, x *exports, fs *fileSessions, ro repo.Options, opened *repo.Repo, token string, m *metrics, log *slog.Logger) http.Handler {
	a := &api{runner: r, exports: x, files: fs, repo: ro, opened: opened, token: []byte(token), m: m, log: log}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/jobs", a.submit)
	mux.HandleFunc("GET /v1/jobs", a.list)
	mux.HandleFunc("GET /v1/jobs/{id}", a.get)
	mux.HandleFunc("GET /v1/jobs/{id}/events", a.events)
	mux.HandleFunc("DELETE /v1/jobs/{id}", a.cancel)
	mux.HandleFunc("GET /v1/backups", a.backups)
	mux.HandleFunc("POST /v1/restores", a.submitRestore)
	mux.HandleFunc("POST /v1/exports", a.startExport)
	mux.HandleFunc("GET /v1/exports", a.listExports)
	mux.HandleFunc("GET /v1/exports/{id}", a.getExport)
	mux.HandleFunc("DELETE /v1/exports/{id}", a.stopExport)
	mux.HandleFunc("GET /v1/backups/{domain}/{id}/filesystems", a.filesystems)
	mux.HandleFunc("GET /v1/backups/{domain}/{id}/files", a.listFiles)
	mux.HandleFunc("GET /v1/backups/{domain}/{id}/files/content", a.fileContent)
	mux.HandleFunc("GET /v1/backups/{domain}/{id}/files/tar", a.fileTar)
	mux.HandleFunc("GET /healthz", a.health)
	mux.Handle("GET /metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{}))
	return a.auth(jsonErrors(mux))
}

// jsonErrors answers requests no route takes (404, or 405 with Allow) with
// a JSON error body like every other error.
func jsonErrors(mux *http.ServeMux) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if _, pattern := mux.Handler(r); pattern != "" {
			mux.ServeHTTP(w, r)
			return
		}
		rec := &statusRecorder{header: w.Header(), status: http.StatusNotFound}
		mux.ServeHTTP(rec, r) // sets the status and, for 405, Allow
		writeError(w, rec.status, fmt.Errorf("%s %s: %s", r.Method, r.URL.Path, strings.ToLower(http.StatusText(rec.status))))
	})
}

type statusRecorder struct {
	header http.Header
	status int
}

func (s *statusRecorder) Header() http.Header         { return s.header }
func (s *statusRecorder) Write(b []byte) (int, error) { return len(b), nil }
func (s *statusRecorder) WriteHeader(code int)        { s.status = code }

// auth checks the bearer token when one is configured. The SHA-256 of
// both are compared in constant time, so neither the token's bytes nor
// its length show in the time an answer takes.
func (a *api) auth(next http.Handler) http.Handler {
	want := sha256.Sum256(a.token)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if len(a.token) > 0 {
			got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
			sum := sha256.Sum256([]byte(got))
			if !ok || subtle.ConstantTimeCompare(sum[:], want[:]) != 1 {
				w.Header().Set("WWW-Authenticate", `Bearer realm="nbdmover"`)
				w.Header().Set("Connection", "close") // a refused peer keeps no connection
				writeError(w, http.StatusUnauthorized, errors.New("missing or wrong bearer token"))
				return
			}
		}
		authenticated(r)
		next.ServeHTTP(w, r)
	})
}

// writeJSON answers with v, encoded before anything is sent: a value
// that cannot be encoded is a 500, not a 200 with half a document.
func writeJSON(w http.ResponseWriter, status int, v any) {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		status = http.StatusInternalServerError
		b, _ = json.Marshal(map[string]string{"error": "encoding the answer: " + err.Error()})
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	w.Write(append(b, '\n'))
}

func writeError(w http.ResponseWriter, status int, err error) {
	writeJSON(w, status, map[string]string{"error": err.Error()})
}

// writeRunnerError answers with the status that fits the runner's
// refusal, 500 for anything else.
func writeRunnerError(w http.ResponseWriter, err error) {
	status := http.StatusInternalServerError
	for _, m := range []struct {
		kind   error
		status int
	}{
		{ErrInvalid, http.StatusUnprocessableEntity},
		{ErrNotFound, http.StatusNotFound},
		{ErrConflict, http.StatusConflict},
		{ErrUnavailable, http.StatusServiceUnavailable},
	} {
		if errors.Is(err, m.kind) {
			status = m.status
			break
		}
	}
	writeError(w, status, err)
}

// decodeBody reads a request's JSON object into v (at most maxBody
// bytes, no unknown fields, nothing after it); false when it answered
// with an error.
func decodeBody(w http.ResponseWriter, r *http.Request, v any) bool {
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		status := http.StatusBadRequest
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			status = http.StatusRequestEntityTooLarge
			err = fmt.Errorf("more than %d bytes", maxBody)
			w.Header().Set("Connection", "close")
		}
		writeError(w, status, fmt.Errorf("request body: %w", err))
		return false
	}
	if _, err := dec.Token(); err != io.EOF {
		writeError(w, http.StatusBadRequest, errors.New("request body: trailing data after the JSON object"))
		return false
	}
	return true
}

func (a *api) submit(w http.ResponseWriter, r *http.Request) {
	var req JobRequest
	if !decodeBody(w, r, &req) {
		return
	}
	v, err := a.runner.Submit(r.Context(), req)
	if err != nil {
		writeRunnerError(w, err)
		return
	}
	w.Header().Set("Location", "/v1/jobs/"+v.ID)
	writeJSON(w, http.StatusAccepted, map[string]string{"id": v.ID, "state": v.State})
}

func (a *api) submitRestore(w http.ResponseWriter, r *http.Request) {
	var req RestoreRequest
	if !decodeBody(w, r, &req) {
		return
	}
	v, err := a.runner.SubmitRestore(req)
	if err != nil {
		writeRunnerError(w, err)
		return
	}
	w.Header().Set("Location", "/v1/jobs/"+v.ID)
	writeJSON(w, http.StatusAccepted, map[string]string{"id": v.ID, "state": v.State})
}

func (a *api) startExport(w http.ResponseWriter, r *http.Request) {
	var req ExportRequest
	if !decodeBody(w, r, &req) {
		return
	}
	v, err := a.exports.start(r.Context(), req)
	if err != nil {
		writeRunnerError(w, err)
		return
	}
	w.Header().Set("Location", "/v1/exports/"+v.ID)
	writeJSON(w, http.StatusCreated, v)
}

func (a *api) listExports(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, map[string]any{"exports": a.exports.list()})
}

func (a *api) getExport(w http.ResponseWriter, r *http.Request) {
	v, ok := a.exports.get(r.PathValue("id"))
	if !ok {
		writeError(w, http.StatusNotFound, fmt.Errorf("no export %s", r.PathValue("id")))
		return
	}
	writeJSON(w, http.StatusOK, v)
}

func (a *api) stopExport(w http.ResponseWriter, r *http.Request) {
	v, err := a.exports.stop(r.PathValue("id"))
	if err != nil {
		writeRunnerError(w, err)
		return
	}
	writeJSON(w, http.StatusOK, v)
}

func (a *api) list(w http.ResponseWriter, r *http.Request) {
	writeJSON(w, http.StatusOK, map[string]any{"jobs": a.runner.Jobs()})
}

func (a *api) get(w http.ResponseWriter, r *http.Request) {
	v, ok := a.runner.Job(r.PathValue("id"))
	if !ok {
		writeError(w, http.StatusNotFound, fmt.Errorf("no job %s", r.PathValue("id")))
		return
	}
	writeJSON(w, http.StatusOK, v)
}

// events streams a job's progress events as JSON lines, every interval
// (?interval=, 100ms to 30s, default 1s) until the job ends, then its
// summary; a job that ended answers with its last events and summary.
func (a *api) events(w http.ResponseWriter, r *http.Request) {
	every := time.Second
	if q := r.URL.Query().Get("interval"); q != "" {
		d, err := time.ParseDuration(q)
		if err != nil || d < 100*time.Millisecond || d > 30*time.Second {
			writeError(w, http.StatusBadRequest, fmt.Errorf("interval %q: want a duration from 100ms to 30s, like 2s", q))
			return
		}
		every = d
	}
	id := r.PathValue("id")
	if _, _, ok := a.runner.Events(id); !ok {
		writeError(w, http.StatusNotFound, fmt.Errorf("no job %s", id))
		return
	}
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.Header().Set("Cache-Control", "no-store")
	out, rc := streamed(w), http.NewResponseController(w)
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		events, summary, ok := a.runner.Events(id)
		if !ok { // pruned meanwhile
			return
		}
		if summary != nil {
			events = append(events, *summary)
		}
		if progress.WriteJSON(out, events...) != nil || rc.Flush() != nil || summary != nil {
			return
		}
		select {
		case <-r.Context().Done():
			return
		case <-t.C:
		}
	}
}

func (a *api) cancel(w http.ResponseWriter, r *http.Request) {
	v, err := a.runner.Cancel(r.PathValue("id"))
	if err != nil {
		writeRunnerError(w, err)
		return
	}
	writeJSON(w, http.StatusAccepted, map[string]string{"id": v.ID, "state": v.State})
}

func (a *api) backups(w http.ResponseWriter, r *http.Request) {
	domain := r.URL.Query().Get("domain")
	if domain != "" {
		if err := repo.ValidName("domain", domain); err != nil {
			writeError(w, http.StatusUnprocessableEntity, err)
			return
		}
	}
	ms, skipped, damaged, err := a.listBackups(r.Context(), domain)
	if err != nil {
		writeError(w, http.StatusInternalServerError, err)
		return
	}
	if ms == nil {
		ms = []*repo.Manifest{}
	}
	out := map[string]any{"backups": ms, "domains": newestByDomain(ms, time.Now())}
	if len(damaged) > 0 {
		var names []string
		for _, m := range ms {
			if damaged[m.Domain+"/"+m.ID] {
				names = append(names, m.Domain+"/"+m.ID)
			}
		}
		out["damaged"] = names
	}
	if len(skipped) > 0 {
		for _, p := range skipped {
			a.log.Warn("skipping a backup whose manifest cannot be read", "object", p.Object, "error", p.Problem)
		}
		out["skipped"] = skipped
	}
	writeJSON(w, http.StatusOK, out)
}

// health answers 200 while the repository can be opened (checked at most
// every healthEvery, within healthTimeout), 503 with the reason when it
// cannot: a store gone away, a repository removed, a config no key opens.
func (a *api) health(w http.ResponseWriter, r *http.Request) {
	queued, running := a.runner.Counts()
	if err := a.repoUsable(r.Context()); err != nil {
		writeJSON(w, http.StatusServiceUnavailable, map[string]any{"status": "unavailable", "error": "the repository cannot be used: " + err.Error(),
			"jobs_queued": queued, "jobs_running": running})
		return
	}
	writeJSON(w, http.StatusOK, map[string]any{"status": "ok", "jobs_queued": queued, "jobs_running": running})
}

const (
	healthEvery   = 5 * time.Second
	healthTimeout = 10 * time.Second
)

// repoUsable opens the repository, or returns the last answer when it is
// younger than healthEvery (a health probe every second costs a read
// every five).
func (a *api) repoUsable(ctx context.Context) error {
	a.healthMu.Lock()
	defer a.healthMu.Unlock()
	if time.Since(a.healthAt) < healthEvery {
		return a.healthErr
	}
	ctx, cancel := context.WithTimeout(ctx, healthTimeout)
	defer cancel()
	_, a.healthErr = a.repo.Open(ctx)
	a.healthAt = time.Now()
	return a.healthErr
}

// DomainSummary is what GET /v1/backups says of each domain: its newest
// backup and how old it is (the alert operators write first).
type DomainSummary struct {
	Domain           string    `json:"domain"`
	Backups          int       `json:"backups"`
	Newest           string    `json:"newest"`
	NewestCompleted  time.Time `json:"newest_completed"`
	NewestAgeSeconds float64   `json:"newest_age_seconds"`
}

// newestByDomain sums up ms (oldest first) by domain, in domain order.
func newestByDomain(ms []*repo.Manifest, now time.Time) []DomainSummary {
	by := map[string]*DomainSummary{}
	var names []string
	for _, m := range ms {
		d := by[m.Domain]
		if d == nil {
			d = &DomainSummary{Domain: m.Domain}
			by[m.Domain] = d
			names = append(names, m.Domain)
		}
		d.Backups++
		d.Newest, d.NewestCompleted, d.NewestAgeSeconds = m.ID, m.Completed, now.Sub(m.Completed).Seconds()
	}
	slices.Sort(names)
	out := []DomainSummary{}
	for _, n := range names {
		out = append(out, *by[n])
	}
	return out
}

// listBackups lists the committed backups of domain ("" = all), the
// manifests it could not read, and the backups verify found damaged (not
// marked, with a warning, when the damage records cannot be read); a
// repository that does not exist yet has none.
func (a *api) listBackups(ctx context.Context, domain string) ([]*repo.Manifest, []repo.Problem, map[string]bool, error) {
	r := a.opened
	ms, skipped, err := r.Backups(ctx, domain)
	if err != nil {
		return nil, nil, nil, err
	}
	_, damaged, err := r.Damage(ctx)
	if err != nil {
		a.log.Warn("the backups verify found damaged are not marked: the damage records cannot be read", "error", err)
	}
	return ms, skipped, damaged, nil
}

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
	res, err := s.Tar(r.Context(), paths, streamed(w))
	if err != nil {
		a.log.Warn("tar stream ended early", "paths", paths, "error", err)
		panic(http.ErrAbortHandler)
	}
	if len(res.Skipped) > 0 {
		a.log.Info("tar stream: entries left out", "domain", s.Domain, "id", s.Backup, "skipped", res.Skipped)
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
