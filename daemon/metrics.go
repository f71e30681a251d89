package daemon

import (
	"errors"

	"github.com/nbdmover/nbdmover/nbdclient"
	"github.com/nbdmover/nbdmover/sink"
	"github.com/prometheus/client_golang/prometheus"
	"libvirt.org/go/libvirt"
)

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
