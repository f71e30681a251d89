package daemon

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/nbdmover/nbdmover/chunker"
	"github.com/nbdmover/nbdmover/instant"
	"github.com/nbdmover/nbdmover/internal/progress"
	"github.com/nbdmover/nbdmover/mover"
	"github.com/nbdmover/nbdmover/mover/domain"
	"github.com/nbdmover/nbdmover/repo"
	"golang.org/x/sync/semaphore"
)

// Job states.
const (
	JobQueued    = "queued"
	JobRunning   = "running"
	JobSucceeded = "succeeded"
	JobFailed    = "failed"
	JobCancelled = "cancelled"
	// JobCancelling: DELETE asked a queued or running job to stop, and it
	// has not ended yet (a backup ends its libvirt job first).
	JobCancelling = "cancelling"
)

// JobRequest is a job a scheduler asks the daemon for: a backup (the
// default kind) or a maintenance job of the repository (forget, gc,
// verify). The repository and host settings are the daemon's; a request
// only chooses what and how.
type JobRequest struct {
	Kind            string   `json:"kind,omitempty"` // "backup" (default), "forget", "gc", "verify", "copy" or "instant-restore"
	Domain          string   `json:"domain,omitempty"`
	Mode            string   `json:"mode,omitempty"`
	Disks           []string `json:"disks,omitempty"`
	Compression     string   `json:"compression,omitempty"`
	Readers         int      `json:"readers,omitempty"`
	Quiesce         bool     `json:"quiesce,omitempty"`
	QuiesceOptional bool     `json:"quiesce_optional,omitempty"`
	// VerifySample: clean chunks per disk an incremental reads to check
	// the dirty bitmap (nil: the default, 0: none).
	VerifySample *int `json:"verify_sample,omitempty"`
	// Maintenance: forget applies Policy to Domain's backups (or, with
	// All, every domain's); gc deletes what is unreferenced and older than
	// Grace (a duration, "24h" by default); verify checks Domain's (or
	// every) backup, with ReadData their chunks' bytes (with
	// ReadDataPercent, 1 to 100, that share of them, verified least
	// recently first). DryRun: forget and gc report without deleting.
	All             bool         `json:"all,omitempty"`
	Policy          *repo.Policy `json:"policy,omitempty"`
	Grace           string       `json:"grace,omitempty"`
	ReadData        bool         `json:"read_data,omitempty"`
	ReadDataPercent int          `json:"read_data_percent,omitempty"`
	DryRun          bool         `json:"dry_run,omitempty"`
	// Restore is an instant restore's request (kind instant-restore;
	// POST /v1/restores).
	Restore *RestoreRequest `json:"restore,omitempty"`
}

// The runner's refusals; the HTTP layer maps them to statuses.
var (
	// ErrInvalid: the request can never work (bad names, mode, ...).
	ErrInvalid = errors.New("invalid request")
	// ErrNotFound: no such job, or libvirt does not know the domain.
	ErrNotFound = errors.New("not found")
	// ErrConflict: the domain has a job already, or the job has ended.
	ErrConflict = errors.New("conflict")
	// ErrUnavailable: the runner cannot take jobs now (shutting down,
	// libvirt unreachable).
	ErrUnavailable = errors.New("unavailable")
	// ErrShuttingDown: the runner takes no more jobs.
	ErrShuttingDown = fmt.Errorf("%w: the daemon is shutting down", ErrUnavailable)
)

// refusal is a request refused with one of the errors above.
type refusal struct {
	kind error
	err  error
}

func (e *refusal) Error() string        { return e.err.Error() }
func (e *refusal) Unwrap() error        { return e.err }
func (e *refusal) Is(target error) bool { return target == e.kind }

func refuse(kind error, format string, args ...any) error {
	return &refusal{kind: kind, err: fmt.Errorf(format, args...)}
}

// JobView is a job as the API shows it.
type JobView struct {
	ID         string     `json:"id"`
	Kind       string     `json:"kind"`
	Domain     string     `json:"domain,omitempty"`
	State      string     `json:"state"`
	Request    JobRequest `json:"request"`
	Created    time.Time  `json:"created"`
	Started    *time.Time `json:"started,omitempty"`
	Finished   *time.Time `json:"finished,omitempty"`
	Seconds    float64    `json:"seconds"`
	BytesDone  int64      `json:"bytes_done"`
	BytesTotal int64      `json:"bytes_total"`
	RateMBps   float64    `json:"rate_mb_per_s"`
	// Progress is the job's latest progress event (docs/api.md,
	// "Progress events"); Disks its disks'.
	Progress *progress.Event     `json:"progress,omitempty"`
	Memory   int64               `json:"memory_bytes"` // what the job takes of the memory budget
	Disks    []JobDisk           `json:"disks"`
	BackupID string              `json:"backup_id,omitempty"`
	Error    string              `json:"error,omitempty"`
	Result   *mover.BackupResult `json:"result,omitempty"`
	// Report is a maintenance job's result (repo.ForgetResult list,
	// repo.GCResult, VerifyReport); Retention is what the daemon's
	// retention policy forgot after a backup.
	Report    any                `json:"report,omitempty"`
	Retention *repo.ForgetResult `json:"retention,omitempty"`
}

// JobDisk is one disk's progress: for a backup, bytes read of the bytes
// it planned to read (bytes_total -1 while planning).
type JobDisk struct {
	Name         string   `json:"name"`
	Phase        string   `json:"phase,omitempty"`
	BytesDone    int64    `json:"bytes_done"`
	BytesTotal   int64    `json:"bytes_total"`
	BytesRead    int64    `json:"bytes_read"`
	BytesWritten int64    `json:"bytes_written"`
	ETA          *float64 `json:"eta_seconds,omitempty"`
}

type job struct {
	id      string
	req     JobRequest
	created time.Time
	cancel  context.CancelCauseFunc
	memory  int64 // of the budget

	tracker  mover.Tracker     // a backup's disks
	counters progress.Counters // a verify's

	mu         sync.Mutex
	state      string
	cancelling bool // DELETE asked it to stop
	started    time.Time
	finished   time.Time
	result     *mover.BackupResult
	report     any
	restore    *instant.Progress // an instant restore's copy, last seen
	retained   *repo.ForgetResult
	err        error
}

// events are the job's progress events now (one per disk, then the
// job's), and its summary once it ended. Under j.mu.
func (j *job) events() ([]progress.Event, *progress.Event) {
	op := progress.Operation{Name: j.req.Kind, Domain: j.req.Domain, Start: j.started}
	if j.started.IsZero() {
		op.Start = j.created
	}
	now := time.Now()
	if !j.finished.IsZero() {
		now = j.finished
	}
	phase, tasks := j.tracker.Sample()
	if j.req.Kind == KindVerify || j.req.Kind == KindCopy || j.req.Kind == KindGC {
		phase, tasks = j.counters.Sample()
	}
	if p := j.restore; p != nil {
		phase, tasks = "copy", nil
		for _, d := range p.Disks {
			tasks = append(tasks, progress.Task{Disk: d.Name, Phase: d.Phase, Done: d.Done, Total: d.Total, Written: d.Done})
		}
	}
	if len(tasks) == 0 && j.req.Kind != KindBackup || j.state == JobQueued {
		phase = j.state
	}
	events := op.Events(now, phase, tasks)
	if j.finished.IsZero() {
		return events, nil
	}
	s := op.Summary(now, tasks, j.err)
	if j.state == JobCancelled {
		s.Result = "cancelled"
	}
	return events, &s
}

func (j *job) view() JobView {
	j.mu.Lock()
	defer j.mu.Unlock()
	v := JobView{ID: j.id, Kind: j.req.Kind, Domain: j.req.Domain, State: j.state, Request: j.req, Created: j.created,
		Result: j.result, Report: j.report, Retention: j.retained, Disks: []JobDisk{}, Memory: j.memory}
	if j.cancelling && (j.state == JobQueued || j.state == JobRunning) {
		v.State = JobCancelling
	}
	end := time.Now()
	if !j.finished.IsZero() {
		end = j.finished
		v.Finished = &j.finished
	}
	if !j.started.IsZero() {
		v.Started = &j.started
		v.Seconds = end.Sub(j.started).Seconds()
	}
	events, _ := j.events()
	for _, e := range events[:len(events)-1] {
		v.Disks = append(v.Disks, JobDisk{Name: e.Disk, Phase: e.Phase, BytesDone: e.BytesDone, BytesTotal: e.BytesTotal,
			BytesRead: e.BytesRead, BytesWritten: e.BytesWritten, ETA: e.ETA})
	}
	all := events[len(events)-1]
	v.Progress = &all
	v.BytesDone, v.BytesTotal, v.RateMBps = all.BytesDone, all.BytesTotal, all.Rate/1e6
	if j.result != nil {
		v.BackupID = j.result.ID
	}
	if j.err != nil {
		v.Error = j.err.Error()
	}
	return v
}

// RunnerOptions configure the daemon's job runner.
type RunnerOptions struct {
	// Backup and Domain are the templates of every job's options
	// (repository, tuning, libvirt URI, directories); requests fill in the
	// rest.
	Backup mover.Options
	Domain domain.Options
	// MaxJobs is the host-wide limit on running jobs (default 2); more
	// jobs queue.
	MaxJobs int
	// Keep finished jobs for KeepFor (default 24h), at most KeepMax (1000).
	KeepFor time.Duration
	KeepMax int
	// MaxMemory is the host-wide budget for the buffers of running jobs
	// (default mover.DefaultMaxMemory): a job that alone needs more is
	// refused, one that would push the sum over waits in the queue.
	MaxMemory int64
	// DomainDisks, if set, is asked at submission how many disks a job
	// backs up (domain.Disks), so that an unknown domain or disk is
	// refused, not a failed job, and the job's memory is known.
	DomainDisks func(ctx context.Context, name string, only []string) (int, error) `json:"-"`
	Log         *slog.Logger                                                       `json:"-"`
	// Observe, if set, is told of each finished job (for metrics).
	Observe func(v JobView, err error) `json:"-"`
	// Retention, if set, is applied to a domain's backups after each of
	// its backups succeeds.
	Retention *repo.Policy
	// VerifyEvery, if set, runs a verify job of the whole repository
	// that often (the first one VerifyEvery after the start), reading
	// VerifyReadPercent of the chunks (0: none, only that every chunk is
	// stored). A tick when another maintenance job runs is tried again
	// until it starts (every).
	VerifyEvery       time.Duration
	VerifyReadPercent int
	// CopyTo, if set, is the repository copy jobs copy into (opened);
	// CopyEvery, if set, runs a copy job of every domain that often, the
	// first one CopyEvery after the start.
	CopyTo    *repo.Repo `json:"-"`
	CopyEvery time.Duration
	// HooksFile, if set, gives domains hooks of their own (serve
	// --hooks-file; daemon/hooks.go), read at each backup job.
	HooksFile string
	// RestoreCacheBytes is the cache of an instant restore's export
	// (default export.DefaultCacheBytes).
	RestoreCacheBytes int64
	// MaxRestores bounds the instant restores running at once (default
	// 2); RestoreImageDirs are the directories they may make images in
	// (default /var/lib/libvirt/images): a request chooses among them,
	// never a path of its own.
	MaxRestores      int
	RestoreImageDirs []string
}

// Runner queues and runs backup jobs: one per domain at a time, at most
// MaxJobs at once. It is safe for concurrent use.
type Runner struct {
	o   RunnerOptions
	ctx context.Context // the runner's life; cancelled by Shutdown
	end context.CancelCauseFunc
	sem chan struct{}
	mem *semaphore.Weighted // the memory budget
	wg  sync.WaitGroup

	mu       sync.Mutex
	jobs     map[string]*job
	byDomain map[string]*job // the domain's queued or running job
	maint    *job            // the repository's queued or running maintenance job
	closed   bool
}

// NewRunner returns a runner whose jobs live until ctx is done or
// Shutdown.
func NewRunner(ctx context.Context, o RunnerOptions) *Runner {
	if o.MaxJobs <= 0 {
		o.MaxJobs = 2
	}
	if o.KeepFor <= 0 {
		o.KeepFor = 24 * time.Hour
	}
	if o.KeepMax <= 0 {
		o.KeepMax = 1000
	}
	if o.MaxMemory <= 0 {
		o.MaxMemory = mover.DefaultMaxMemory
	}
	o.Backup.MaxMemory = o.MaxMemory
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.MaxRestores <= 0 {
		o.MaxRestores = 2
	}
	if len(o.RestoreImageDirs) == 0 {
		o.RestoreImageDirs = []string{DefaultRestoreImageDir}
	}
	for i, d := range o.RestoreImageDirs {
		o.RestoreImageDirs[i] = filepath.Clean(d)
	}
	rctx, end := context.WithCancelCause(ctx)
	r := &Runner{o: o, ctx: rctx, end: end, sem: make(chan struct{}, o.MaxJobs), mem: semaphore.NewWeighted(o.MaxMemory),
		jobs: map[string]*job{}, byDomain: map[string]*job{}}
	if o.CopyEvery > 0 && o.CopyTo != nil {
		go r.every(o.CopyEvery, JobRequest{Kind: KindCopy})
	}
	if o.VerifyEvery > 0 {
		go r.verifyEvery()
	}
	return r
}

// verifyEvery submits the scheduled verify jobs until the runner ends.
func (r *Runner) verifyEvery() {
	r.every(r.o.VerifyEvery, JobRequest{Kind: KindVerify, ReadDataPercent: r.o.VerifyReadPercent})
}

// every submits the maintenance job req every period until the runner
// ends. A tick whose job cannot start because another maintenance job
// runs is not lost: it is tried again every scheduleRetry until it starts
// or the next tick comes (so two schedules of one period both run).
func (r *Runner) every(period time.Duration, req JobRequest) {
	t := time.NewTicker(period)
	defer t.Stop()
	retry := time.NewTicker(scheduleRetry)
	defer retry.Stop()
	pending := false
	for {
		select {
		case <-r.ctx.Done():
			return
		case <-t.C:
			pending = true
		case <-retry.C:
			if !pending {
				continue
			}
		}
		v, err := r.submitMaintenance(req)
		if errors.Is(err, ErrConflict) {
			continue // pending: tried again
		}
		pending = false
		if err != nil {
			r.o.Log.Warn("the scheduled job did not start (the next tick tries again)", "kind", req.Kind, "error", err)
			continue
		}
		r.o.Log.Info("scheduled job started", "kind", req.Kind, "job", v.ID)
	}
}

// scheduleRetry is how often a scheduled job that met another
// maintenance job is tried again.
var scheduleRetry = 30 * time.Second

func newJobID() string {
	b := make([]byte, 8)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// Submit validates a request and queues its job.
func (r *Runner) Submit(ctx context.Context, req JobRequest) (JobView, error) {
	if req.Kind == "" {
		req.Kind = KindBackup
	}
	if req.Kind == KindInstantRestore {
		if req.Restore == nil {
			return JobView{}, refuse(ErrInvalid, "an instant-restore job needs restore: {...} (or POST /v1/restores)")
		}
		return r.SubmitRestore(*req.Restore)
	}
	if req.Kind != KindBackup {
		return r.submitMaintenance(req)
	}
	if err := checkBackupRequest(req); err != nil {
		return JobView{}, err
	}
	src, o, err := r.backup(req)
	if err != nil {
		return JobView{}, refuse(ErrUnavailable, "%v", err)
	}
	for _, err := range []error{src.Validate(), o.Validate()} {
		if err != nil {
			return JobView{}, &refusal{kind: ErrInvalid, err: err}
		}
	}
	memory, err := r.memory(ctx, req, o)
	if err != nil {
		return JobView{}, err
	}

	r.mu.Lock()
	defer r.mu.Unlock()
	if err := r.admit(req.Domain); err != nil {
		return JobView{}, err
	}
	j, jctx := r.newJob(req, JobQueued)
	j.memory = memory
	r.byDomain[req.Domain] = j
	go r.run(jctx, j)
	return j.view(), nil
}

// newJob registers a new job of req, queued or (JobRunning) started now,
// with its own context; r.mu is held. The caller starts its goroutine,
// which ends with r.wg.Done.
func (r *Runner) newJob(req JobRequest, state string) (*job, context.Context) {
	jctx, cancel := context.WithCancelCause(r.ctx)
	j := &job{id: newJobID(), req: req, created: time.Now().UTC(), cancel: cancel, state: state}
	if state == JobRunning {
		j.started = j.created
	}
	r.jobs[j.id] = j
	r.wg.Add(1)
	return j, jctx
}

// admit refuses a new job of domain while the runner is closed or the
// domain has one, and drops old finished jobs; r.mu is held.
func (r *Runner) admit(domain string) error {
	if r.closed {
		return ErrShuttingDown
	}
	if cur := r.byDomain[domain]; cur != nil {
		return refuse(ErrConflict, "domain %s already has job %s (%s)", domain, cur.id, cur.view().State)
	}
	r.prune()
	return nil
}

// errCancelled is the cause of a job cancelled through the API.
var errCancelled = errors.New("cancelled by request")

func (r *Runner) run(ctx context.Context, j *job) {
	defer r.wg.Done()
	log := r.o.Log.With("job", j.id, "domain", j.req.Domain)
	finish := func(state string, res *mover.BackupResult, err error) {
		j.mu.Lock()
		j.result = res
		j.mu.Unlock()
		r.finish(j, state, err, log)
	}
	select {
	case r.sem <- struct{}{}:
		defer func() { <-r.sem }()
	case <-ctx.Done():
		finish(JobCancelled, nil, context.Cause(ctx))
		return
	}
	if err := r.mem.Acquire(ctx, j.memory); err != nil {
		finish(JobCancelled, nil, context.Cause(ctx))
		return
	}
	defer r.mem.Release(j.memory)
	j.mu.Lock()
	j.state, j.started = JobRunning, time.Now().UTC()
	j.mu.Unlock()
	log.Info("job started")

	src, o, err := r.backup(j.req)
	if err != nil {
		finish(JobFailed, nil, err) // before anything started
		return
	}
	o.Log = log
	o.Progress = j.tracker.Add
	res, err := mover.Backup(ctx, src, o)
	switch {
	case err == nil:
		r.retain(ctx, j, log)
		finish(JobSucceeded, res, nil)
	case ctx.Err() != nil && strings.Contains(err.Error(), context.Cause(ctx).Error()):
		finish(JobCancelled, nil, err) // says it already
	case ctx.Err() != nil:
		finish(JobCancelled, nil, fmt.Errorf("%w: %v", context.Cause(ctx), err))
	default:
		finish(JobFailed, nil, err)
	}
}

// finish records a job's end and tells Observe.
func (r *Runner) finish(j *job, state string, err error, log *slog.Logger) {
	j.mu.Lock()
	j.state, j.err, j.finished = state, err, time.Now().UTC()
	j.mu.Unlock()
	r.mu.Lock()
	if r.byDomain[j.req.Domain] == j {
		delete(r.byDomain, j.req.Domain)
	}
	if r.maint == j {
		r.maint = nil
	}
	r.mu.Unlock()
	j.cancel(nil)
	if err != nil {
		log.Warn("job ended", "state", state, "error", err)
	} else if res := j.view().Result; res != nil {
		log.Info("job ended", "state", state, "backup", res.ID, "seconds", res.Seconds)
	} else {
		log.Info("job ended", "state", state)
	}
	if r.o.Observe != nil {
		r.o.Observe(j.view(), err)
	}
}

// memory is what a request's job needs of the memory budget; an unknown
// domain or disk, or a job that alone needs more than the budget, is
// refused.
func (r *Runner) memory(ctx context.Context, req JobRequest, o mover.Options) (int64, error) {
	if r.o.DomainDisks == nil {
		return 0, nil
	}
	disks, err := r.o.DomainDisks(ctx, req.Domain, req.Disks)
	switch {
	case errors.Is(err, domain.ErrNoDomain):
		return 0, &refusal{kind: ErrNotFound, err: err}
	case errors.Is(err, mover.ErrInvalid):
		return 0, &refusal{kind: ErrInvalid, err: err}
	case err != nil:
		return 0, &refusal{kind: ErrUnavailable, err: err}
	}
	chunkSize, err := r.chunkSize(ctx)
	if err != nil {
		return 0, &refusal{kind: ErrUnavailable, err: err}
	}
	need := o.Memory(disks, chunkSize)
	if need > r.o.MaxMemory {
		return 0, refuse(ErrInvalid, "the job needs %d MiB of buffers for %d disks, more than the daemon's --max-memory of %d MiB: ask for fewer readers",
			need>>20, disks, r.o.MaxMemory>>20)
	}
	return need, nil
}

// chunkSize is the repository's chunk size (or the one a first backup
// gives it).
func (r *Runner) chunkSize(ctx context.Context) (int64, error) {
	rp, err := r.repository(ctx)
	switch {
	case errors.Is(err, repo.ErrNoRepository):
		if r.o.Backup.ChunkSize > 0 {
			return r.o.Backup.ChunkSize, nil
		}
		return chunker.DefaultChunkSize, nil
	case err != nil:
		return 0, err
	}
	return rp.Config().ChunkSize, nil
}

// repository is the daemon's open repository (shared by every job, and
// with it the store's limit on requests in flight), or, for a runner
// given none, the repository opened anew.
func (r *Runner) repository(ctx context.Context) (*repo.Repo, error) {
	if rp := r.o.Backup.Repository; rp != nil {
		return rp, rp.Recheck(ctx) // removed or replaced since the start: fail, do not write into it
	}
	return r.o.Backup.Repo.Open(ctx)
}

// backup is the source and options of a request's backup.
func (r *Runner) backup(req JobRequest) (mover.Source, mover.Options, error) {
	d := r.o.Domain
	d.Name, d.Disks, d.Quiesce, d.QuiesceOptional = req.Domain, req.Disks, req.Quiesce, req.QuiesceOptional
	o := r.o.Backup
	o.Mode = req.Mode
	if req.Compression != "" {
		o.Compression = req.Compression
	}
	if req.Readers != 0 {
		o.Tuning.Readers = req.Readers
	}
	if req.VerifySample != nil {
		o.VerifySample = req.VerifySample
	}
	var err error
	o.Hooks, err = r.hooksFor(req.Domain)
	return domain.New(d), o, err
}

// prune forgets finished jobs past their retention. Called with r.mu held.
func (r *Runner) prune() {
	var done []*job
	for _, j := range r.jobs {
		j.mu.Lock()
		if !j.finished.IsZero() {
			if time.Since(j.finished) > r.o.KeepFor {
				delete(r.jobs, j.id)
			} else {
				done = append(done, j)
			}
		}
		j.mu.Unlock()
	}
	if extra := len(done) - r.o.KeepMax; extra > 0 {
		sort.Slice(done, func(a, b int) bool { return done[a].finished.Before(done[b].finished) })
		for _, j := range done[:extra] {
			delete(r.jobs, j.id)
		}
	}
}

// Jobs returns every job, newest first.
func (r *Runner) Jobs() []JobView {
	r.mu.Lock()
	r.prune()
	jobs := make([]*job, 0, len(r.jobs))
	for _, j := range r.jobs {
		jobs = append(jobs, j)
	}
	r.mu.Unlock()
	views := make([]JobView, len(jobs))
	for i, j := range jobs {
		views[i] = j.view()
	}
	sort.Slice(views, func(a, b int) bool { return views[a].Created.After(views[b].Created) })
	return views
}

// Job returns one job.
func (r *Runner) Job(id string) (JobView, bool) {
	r.mu.Lock()
	j, ok := r.jobs[id]
	r.mu.Unlock()
	if !ok {
		return JobView{}, false
	}
	return j.view(), true
}

// Events returns a job's progress events now and, once it ended, its
// summary (docs/api.md, "Progress events").
func (r *Runner) Events(id string) ([]progress.Event, *progress.Event, bool) {
	r.mu.Lock()
	j, ok := r.jobs[id]
	r.mu.Unlock()
	if !ok {
		return nil, nil, false
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	events, summary := j.events()
	return events, summary, true
}

// Cancel asks a queued or running job to stop: its libvirt job is ended
// and nothing is committed.
func (r *Runner) Cancel(id string) (JobView, error) {
	r.mu.Lock()
	j, ok := r.jobs[id]
	r.mu.Unlock()
	if !ok {
		return JobView{}, refuse(ErrNotFound, "no job %s", id)
	}
	j.mu.Lock()
	state := j.state
	if state == JobQueued || state == JobRunning {
		j.cancelling = true
	}
	j.mu.Unlock()
	if state != JobQueued && state != JobRunning {
		return j.view(), refuse(ErrConflict, "job %s already %s", id, state)
	}
	j.cancel(errCancelled)
	return j.view(), nil
}

// InFlight is the running jobs' progress: bytes done of their totals
// (a total not known yet counts as what is done of it).
func (r *Runner) InFlight() (done, total int64) {
	r.mu.Lock()
	jobs := make([]*job, 0, len(r.jobs))
	for _, j := range r.jobs {
		jobs = append(jobs, j)
	}
	r.mu.Unlock()
	for _, j := range jobs {
		j.mu.Lock()
		if j.state == JobRunning {
			events, _ := j.events()
			all := events[len(events)-1] // the job's: also a verify's, which has no disks
			done += all.BytesDone
			total += max(all.BytesTotal, all.BytesDone)
		}
		j.mu.Unlock()
	}
	return done, total
}

// Counts returns how many jobs are queued and running (for the metrics
// and the health check: no views built, none sorted).
func (r *Runner) Counts() (queued, running int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, j := range r.jobs {
		j.mu.Lock()
		switch j.state {
		case JobQueued:
			queued++
		case JobRunning:
			running++
		}
		j.mu.Unlock()
	}
	return queued, running
}

// Shutdown takes no more jobs, cancels the ones queued and running, and
// waits for them to end cleanly (libvirt jobs ended, nothing half
// committed) or for ctx.
func (r *Runner) Shutdown(ctx context.Context) error {
	r.mu.Lock()
	r.closed = true
	r.mu.Unlock()
	r.end(ErrShuttingDown)
	done := make(chan struct{})
	go func() { r.wg.Wait(); close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("jobs still ending: %w", context.Cause(ctx))
	}
}
