package mover

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/nbdmover/nbdmover/nbdclient"
	"github.com/nbdmover/nbdmover/repo"
	"github.com/nbdmover/nbdmover/sink"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"libvirt.org/go/libvirt"
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
		uri := ro.Backup.Connect
		if uri == "" {
			uri = "qemu:///system"
		}
		ro.CheckDomain = func(ctx context.Context, name string) error { return checkDomain(uri, name) }
	}
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

// checkDomain tells whether libvirt knows the domain (404 otherwise).
func checkDomain(uri, name string) error {
	conn, err := connectLibvirt(uri)
	if err != nil {
		return &RequestError{Status: 503, Err: err}
	}
	defer conn.Close()
	dom, err := conn.LookupDomainByName(name)
	if libvirtCode(err) == libvirt.ERR_NO_DOMAIN {
		return badRequest(404, "domain %s not found on %s", name, uri)
	}
	if err != nil {
		return &RequestError{Status: 503, Err: err}
	}
	dom.Free()
	return nil
}

type api struct {
	runner *Runner
	repo   RepoOptions
	token  []byte
	m      *metrics
	log    *slog.Logger
}

func newAPI(r *Runner, repo RepoOptions, token string, m *metrics, log *slog.Logger) http.Handler {
	a := &api{runner: r, repo: repo, token: []byte(token), m: m, log: log}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/jobs", a.submit)
	mux.HandleFunc("GET /v1/jobs", a.list)
	mux.HandleFunc("GET /v1/jobs/{id}", a.get)
	mux.HandleFunc("DELETE /v1/jobs/{id}", a.cancel)
	mux.HandleFunc("GET /v1/backups", a.backups)
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

// auth checks the bearer token (constant time) when one is configured.
func (a *api) auth(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if len(a.token) > 0 {
			got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
			if !ok || subtle.ConstantTimeCompare([]byte(got), a.token) != 1 {
				w.Header().Set("WWW-Authenticate", `Bearer realm="nbdmover"`)
				writeError(w, http.StatusUnauthorized, errors.New("missing or wrong bearer token"))
				return
			}
		}
		next.ServeHTTP(w, r)
	})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

func writeError(w http.ResponseWriter, status int, err error) {
	writeJSON(w, status, map[string]string{"error": err.Error()})
}

// writeRunnerError answers with the status a *RequestError carries, 500
// for anything else.
func writeRunnerError(w http.ResponseWriter, err error) {
	status := http.StatusInternalServerError
	var re *RequestError
	if errors.As(err, &re) {
		status = re.Status
	}
	writeError(w, status, err)
}

func (a *api) submit(w http.ResponseWriter, r *http.Request) {
	var req JobRequest
	dec := json.NewDecoder(io.LimitReader(r.Body, 64<<10))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		writeError(w, http.StatusBadRequest, fmt.Errorf("request body: %w", err))
		return
	}
	if dec.More() {
		writeError(w, http.StatusBadRequest, errors.New("request body: trailing data after the JSON object"))
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

func (a *api) cancel(w http.ResponseWriter, r *http.Request) {
	v, err := a.runner.Cancel(r.PathValue("id"))
	if err != nil {
		writeRunnerError(w, err)
		return
	}
	writeJSON(w, http.StatusAccepted, map[string]string{"id": v.ID, "state": "cancelling"})
}

func (a *api) backups(w http.ResponseWriter, r *http.Request) {
	domain := r.URL.Query().Get("domain")
	if domain != "" {
		if err := repo.ValidName("domain", domain); err != nil {
			writeError(w, http.StatusUnprocessableEntity, err)
			return
		}
	}
	ms, err := List(r.Context(), a.repo, domain)
	switch {
	case errors.Is(err, repo.ErrNoRepository): // nothing backed up yet
		ms = nil
	case err != nil:
		writeError(w, http.StatusInternalServerError, err)
		return
	}
	if ms == nil {
		ms = []*repo.Manifest{}
	}
	writeJSON(w, http.StatusOK, map[string]any{"backups": ms})
}

func (a *api) health(w http.ResponseWriter, r *http.Request) {
	queued, running := a.runner.Counts()
	writeJSON(w, http.StatusOK, map[string]any{"status": "ok", "jobs_queued": queued, "jobs_running": running})
}

// metrics are the daemon's Prometheus metrics, in a registry of its own.
type metrics struct {
	reg      *prometheus.Registry
	runner   *Runner
	finished *prometheus.CounterVec
	bytes    *prometheus.CounterVec
	duration *prometheus.HistogramVec
	errors   *prometheus.CounterVec
}

func newMetrics() *metrics {
	m := &metrics{reg: prometheus.NewRegistry()}
	m.finished = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "nbdmover_jobs_finished_total",
		Help: "Backup jobs that ended, by final state."}, []string{"state"})
	m.bytes = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "nbdmover_bytes_total",
		Help: "Bytes moved by succeeded backups: read from NBD, written to the store, deduplicated, zero."}, []string{"kind"})
	m.duration = prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "nbdmover_job_duration_seconds",
		Help: "Wall time of finished backup jobs.", Buckets: prometheus.ExponentialBuckets(1, 2, 16)}, []string{"state"})
	m.errors = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "nbdmover_job_errors_total",
		Help: "Failed jobs by kind of error: libvirt, nbd, store, cancelled, other."}, []string{"kind"})
	jobs := prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "nbdmover_jobs_running", Help: "Backup jobs running now."},
		func() float64 { _, r := m.runner.Counts(); return float64(r) })
	queued := prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "nbdmover_jobs_queued", Help: "Backup jobs waiting for a slot."},
		func() float64 { q, _ := m.runner.Counts(); return float64(q) })
	m.reg.MustRegister(m.finished, m.bytes, m.duration, m.errors, jobs, queued,
		prometheus.NewGoCollector(), prometheus.NewProcessCollector(prometheus.ProcessCollectorOpts{}))
	for _, s := range []string{JobSucceeded, JobFailed, JobCancelled} {
		m.finished.WithLabelValues(s)
	}
	return m
}

func (m *metrics) observe(v JobView, err error) {
	m.finished.WithLabelValues(v.State).Inc()
	m.duration.WithLabelValues(v.State).Observe(v.Seconds)
	if res := v.Result; res != nil {
		m.bytes.WithLabelValues("read").Add(float64(res.BytesRead))
		m.bytes.WithLabelValues("written").Add(float64(res.BytesWritten))
		m.bytes.WithLabelValues("dedup").Add(float64(res.BytesDedup))
		m.bytes.WithLabelValues("zero").Add(float64(res.BytesZero))
	}
	if err != nil {
		m.errors.WithLabelValues(errorKind(v.State, err)).Inc()
	}
}

func errorKind(state string, err error) string {
	var nerr *nbdclient.Error
	var serr *sink.Error
	var lerr libvirt.Error
	switch {
	case state == JobCancelled:
		return "cancelled"
	case errors.As(err, &nerr):
		return "nbd"
	case errors.As(err, &serr):
		return "store"
	case errors.As(err, &lerr):
		return "libvirt"
	}
	return "other"
}
