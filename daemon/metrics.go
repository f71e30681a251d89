package daemon

import (
	"errors"

	"github.com/nbdmover/nbdmover/export"
	"github.com/nbdmover/nbdmover/nbdclient"
	"github.com/nbdmover/nbdmover/pipeline"
	"github.com/nbdmover/nbdmover/repo"
	"github.com/nbdmover/nbdmover/sink"
	"github.com/prometheus/client_golang/prometheus"
	"libvirt.org/go/libvirt"
)

// metrics are the daemon's Prometheus metrics, in a registry of its own.
type metrics struct {
	reg      *prometheus.Registry
	runner   *Runner
	files    *fileSessions
	limits   [3]*sink.Rate // upload, download, read (nil: none)
	finished *prometheus.CounterVec
	bytes    *prometheus.CounterVec
	duration *prometheus.HistogramVec
	errors   *prometheus.CounterVec
	lies     prometheus.Counter
	gcDel    *prometheus.CounterVec
	gcLast   prometheus.Gauge
	forgot   prometheus.Counter
	// verify jobs: chunks by outcome, backups found damaged by the last
	// one, when the last one ran to its end; chunks backups healed.
	verified   *prometheus.CounterVec
	damaged    prometheus.Gauge
	verifyLast prometheus.Gauge
	healed     prometheus.Counter
	// backup jobs, per domain: when the last one succeeded (seeded at
	// start from the repository's newest backups), and whether the last
	// one did.
	copied      *prometheus.CounterVec
	copyLast    prometheus.Gauge
	lastSuccess *prometheus.GaugeVec
	lastResult  *prometheus.GaugeVec
	exports     *exports
}

func newMetrics() *metrics {
	m := &metrics{reg: prometheus.NewRegistry()}
	m.finished = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "nbdmover_jobs_finished_total",
		Help: "Backup jobs that ended, by final state."}, []string{"state"})
	m.bytes = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "nbdmover_bytes_total",
		Help: "Bytes moved by succeeded backups: read from NBD, written to the store, deduplicated, zero, read to verify dirty bitmaps."}, []string{"kind"})
	m.duration = prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "nbdmover_job_duration_seconds",
		Help: "Wall time of finished backup jobs.", Buckets: prometheus.ExponentialBuckets(1, 2, 16)}, []string{"state"})
	m.errors = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "nbdmover_job_errors_total",
		Help: "Failed jobs by kind of error: libvirt, nbd, store, bitmap, cancelled, other."}, []string{"kind"})
	m.lies = prometheus.NewCounter(prometheus.CounterOpts{Name: "nbdmover_bitmap_mismatches_total",
		Help: "Incrementals whose dirty bitmap was caught missing changes (taken in full instead, or failed with --mode incremental)."})
	m.gcDel = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "nbdmover_gc_deleted_total",
		Help: "What gc jobs deleted: chunks and their bytes, index and file objects and their bytes."}, []string{"kind"})
	m.gcLast = prometheus.NewGauge(prometheus.GaugeOpts{Name: "nbdmover_gc_last_success_timestamp_seconds",
		Help: "When the last gc job that deleted (not a dry run) succeeded, in seconds since 1970; 0 before the first."})
	m.forgot = prometheus.NewCounter(prometheus.CounterOpts{Name: "nbdmover_backups_forgotten_total",
		Help: "Backups forgotten by forget jobs and by the retention policy."})
	m.verified = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "nbdmover_verify_chunks_total",
		Help: "Chunks verify jobs read whole (verified), found corrupt or missing, quarantined, and found repaired."}, []string{"result"})
	m.damaged = prometheus.NewGauge(prometheus.GaugeOpts{Name: "nbdmover_verify_damaged_backups",
		Help: "Backups the last verify job of the whole repository that ran to its end found referencing damaged objects."})
	m.verifyLast = prometheus.NewGauge(prometheus.GaugeOpts{Name: "nbdmover_verify_last_run_timestamp_seconds",
		Help: "When the last verify job of the whole repository that ran to its end (with or without problems) ended, in seconds since 1970; 0 before the first."})
	m.healed = prometheus.NewCounter(prometheus.CounterOpts{Name: "nbdmover_chunks_healed_total",
		Help: "Damaged chunks that backups built from the disks and stored again."})
	m.copied = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "nbdmover_copy_total",
		Help: "What copy jobs did: backups copied, chunks and their bytes stored into the target."}, []string{"kind"})
	m.copyLast = prometheus.NewGauge(prometheus.GaugeOpts{Name: "nbdmover_copy_last_success_timestamp_seconds",
		Help: "When the last copy job that was not a dry run succeeded, in seconds since 1970; 0 before the first."})
	m.lastSuccess = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "nbdmover_backup_last_success_timestamp_seconds",
		Help: "When the last backup of the domain that succeeded ended, in seconds since 1970 (from the repository's newest backup at start-up)."}, []string{"domain"})
	m.lastResult = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "nbdmover_backup_last_result",
		Help: "Whether the last backup job of the domain this daemon ran succeeded (1) or not (0: failed or cancelled)."}, []string{"domain"})
	jobs := prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "nbdmover_jobs_running", Help: "Backup jobs running now."},
		func() float64 { _, r := m.runner.Counts(); return float64(r) })
	queued := prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "nbdmover_jobs_queued", Help: "Backup jobs waiting for a slot."},
		func() float64 { q, _ := m.runner.Counts(); return float64(q) })
	inDone := prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "nbdmover_jobs_bytes_done",
		Help: "Bytes the running jobs have done (a backup: read from the disks) of nbdmover_jobs_bytes_total."},
		func() float64 { d, _ := m.runner.InFlight(); return float64(d) })
	inTotal := prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "nbdmover_jobs_bytes_total",
		Help: "Bytes the running jobs will do (a backup: planned to read from the disks' block status and dirty bitmaps)."},
		func() float64 { _, t := m.runner.InFlight(); return float64(t) })
	exportStat := func(f func(s export.Stats) float64) func() float64 {
		return func() float64 {
			if m.exports == nil {
				return 0
			}
			s, _ := m.exports.totals()
			return f(s)
		}
	}
	m.reg.MustRegister(
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "nbdmover_limit_upload_bytes_per_second",
			Help: "The limit on what the daemon stores into the repository, all jobs together (0: none; --limit-upload and --limit-schedule, as of now)."},
			func() float64 { return float64(m.limits[0].BytesPerSecond()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "nbdmover_limit_download_bytes_per_second",
			Help: "The limit on what the daemon reads from the repository, all jobs together (0: none; --limit-download and --limit-schedule, as of now)."},
			func() float64 { return float64(m.limits[1].BytesPerSecond()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "nbdmover_limit_read_bytes_per_second",
			Help: "The limit on what the daemon's backups read from the VMs' disks, all jobs together (0: none; --limit-read and --limit-schedule, as of now)."},
			func() float64 { return float64(m.limits[2].BytesPerSecond()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "nbdmover_file_sessions_open",
			Help: "File-level restore sessions (libguestfs appliances) open or opening."},
			func() float64 {
				if m.files == nil {
					return 0
				}
				return float64(m.files.count())
			}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "nbdmover_exports_open", Help: "NBD exports being served."},
			func() float64 {
				if m.exports == nil {
					return 0
				}
				_, open := m.exports.totals()
				return float64(open)
			}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: "nbdmover_export_clients", Help: "NBD clients connected to the exports."},
			exportStat(func(s export.Stats) float64 { return float64(s.Clients) })),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "nbdmover_export_reads_total", Help: "Read requests the exports answered."},
			exportStat(func(s export.Stats) float64 { return float64(s.Reads) })),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "nbdmover_export_bytes_served_total", Help: "Bytes the exports' reads returned."},
			exportStat(func(s export.Stats) float64 { return float64(s.BytesServed) })),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "nbdmover_export_read_errors_total",
			Help: "Reads the exports answered with EIO (a damaged chunk is also recorded as damage; a store failure is not)."},
			exportStat(func(s export.Stats) float64 { return float64(s.ReadErrors) })),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "nbdmover_export_cache_hits_total", Help: "Chunks the exports found in their caches."},
			exportStat(func(s export.Stats) float64 { return float64(s.CacheHits) })),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "nbdmover_export_fetches_total", Help: "Chunks the exports fetched from the repository."},
			exportStat(func(s export.Stats) float64 { return float64(s.Fetches) })),
		prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "nbdmover_export_fetch_seconds_total",
			Help: "Time the exports' chunk fetches took, added up (divided by nbdmover_export_fetches_total: the mean fetch latency)."},
			exportStat(func(s export.Stats) float64 { return s.FetchSeconds })),
	)
	m.reg.MustRegister(m.finished, m.bytes, m.duration, m.errors, m.lies, m.gcDel, m.gcLast, m.forgot, m.copied, m.copyLast,
		m.verified, m.damaged, m.verifyLast, m.healed, m.lastSuccess, m.lastResult, jobs, queued, inDone, inTotal,
		prometheus.NewGoCollector(), prometheus.NewProcessCollector(prometheus.ProcessCollectorOpts{}))
	for _, s := range []string{JobSucceeded, JobFailed, JobCancelled} {
		m.finished.WithLabelValues(s)
	}
	for _, k := range []string{"verified", "corrupt", "missing", "quarantined", "repaired"} {
		m.verified.WithLabelValues(k)
	}
	for _, k := range []string{"chunks", "chunk_bytes", "metadata", "metadata_bytes"} {
		m.gcDel.WithLabelValues(k)
	}
	return m
}

// seedLastSuccess sets each domain's last success from its newest
// committed backup, so the alert on its age survives a restart.
func (m *metrics) seedLastSuccess(ms []*repo.Manifest) {
	for _, b := range ms { // oldest first: the newest of a domain is set last
		m.lastSuccess.WithLabelValues(b.Domain).Set(float64(b.Completed.UnixNano()) / 1e9)
	}
}

func (m *metrics) observe(v JobView, err error) {
	m.finished.WithLabelValues(v.State).Inc()
	if v.Kind == KindBackup || v.Kind == "" {
		ok := 0.0
		if v.State == JobSucceeded {
			ok = 1
			m.lastSuccess.WithLabelValues(v.Request.Domain).SetToCurrentTime()
		}
		m.lastResult.WithLabelValues(v.Request.Domain).Set(ok)
	}
	m.duration.WithLabelValues(v.State).Observe(v.Seconds)
	if v.Retention != nil {
		m.forgot.Add(float64(v.Retention.Forgotten))
	}
	switch rep := v.Report.(type) {
	case *repo.GCResult:
		if !rep.DryRun {
			m.gcDel.WithLabelValues("chunks").Add(float64(rep.Chunks.Deleted))
			m.gcDel.WithLabelValues("chunk_bytes").Add(float64(rep.Chunks.DeletedBytes))
			m.gcDel.WithLabelValues("metadata").Add(float64(rep.Metadata.Deleted))
			m.gcDel.WithLabelValues("metadata_bytes").Add(float64(rep.Metadata.DeletedBytes))
			if err == nil {
				m.gcLast.SetToCurrentTime()
			}
		}
	case *VerifyReport:
		for k, n := range map[string]int{"verified": rep.Verified, "corrupt": rep.Corrupt, "missing": rep.Missing,
			"quarantined": rep.Quarantined, "repaired": rep.Repaired} {
			m.verified.WithLabelValues(k).Add(float64(n))
		}
		if rep.Complete && v.Request.Domain == "" { // of the whole repository
			m.damaged.Set(float64(len(rep.Damaged)))
			m.verifyLast.SetToCurrentTime()
		}
	case *repo.CopyResult:
		if !v.Request.DryRun {
			m.copied.WithLabelValues("backups").Add(float64(len(rep.Backups)))
			m.copied.WithLabelValues("chunks").Add(float64(rep.Chunks))
			m.copied.WithLabelValues("bytes").Add(float64(rep.Bytes))
			if err == nil {
				m.copyLast.SetToCurrentTime()
			}
		}
	case []repo.ForgetResult:
		for _, d := range rep {
			if !v.Request.DryRun {
				m.forgot.Add(float64(d.Forgotten))
			}
		}
	}
	if res := v.Result; res != nil {
		m.bytes.WithLabelValues("read").Add(float64(res.BytesRead))
		m.bytes.WithLabelValues("written").Add(float64(res.BytesWritten))
		m.bytes.WithLabelValues("dedup").Add(float64(res.BytesDedup))
		m.bytes.WithLabelValues("zero").Add(float64(res.BytesZero))
		m.healed.Add(float64(res.Healed))
		if ver := res.Verification; ver != nil {
			m.bytes.WithLabelValues("verified").Add(float64(ver.Bytes))
			if ver.Outcome == "mismatch" {
				m.lies.Inc()
			}
		}
	}
	if err != nil {
		kind := errorKind(v.State, err)
		if kind == "bitmap" {
			m.lies.Inc()
		}
		m.errors.WithLabelValues(kind).Inc()
	}
}

func errorKind(state string, err error) string {
	var nerr *nbdclient.Error
	var serr *sink.Error
	var lerr libvirt.Error
	var berr *pipeline.BitmapError
	switch {
	case state == JobCancelled:
		return "cancelled"
	case errors.As(err, &berr):
		return "bitmap"
	case errors.As(err, &nerr):
		return "nbd"
	case errors.As(err, &serr):
		return "store"
	case errors.As(err, &lerr):
		return "libvirt"
	}
	return "other"
}
