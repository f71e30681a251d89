package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/nbdmover/nbdmover/internal/progress"
	"github.com/nbdmover/nbdmover/repo"
)

// Job kinds.
const (
	KindBackup = "backup"
	KindForget = "forget"
	KindGC     = "gc"
	KindVerify = "verify"
	KindCopy   = "copy"
)

// VerifyReport is a verify job's result.
type VerifyReport struct {
	repo.VerifyStats
	ReadData bool           `json:"read_data"`
	Problems []repo.Problem `json:"problems"`
	// Complete: verify checked everything it was to check (with or
	// without problems); false when the store failed or it was cancelled.
	Complete bool `json:"complete"`
}

// checkBackupRequest refuses maintenance options in a backup request.
func checkBackupRequest(req JobRequest) error {
	if req.All || req.Policy != nil || req.Grace != "" || req.ReadData || req.ReadDataPercent != 0 || req.DryRun {
		return refuse(ErrInvalid, "all, policy, grace, read_data, read_data_percent and dry_run are options of maintenance jobs (kind forget, gc or verify), not of backups")
	}
	if req.Domain == "" {
		return refuse(ErrInvalid, `a backup job needs "domain": the libvirt domain to back up, e.g. {"domain": "web1"}`)
	}
	return nil
}

// checkMaintenance validates a maintenance request.
func checkMaintenance(req JobRequest) error {
	invalid := func(format string, args ...any) error { return refuse(ErrInvalid, format, args...) }
	if req.Mode != "" || len(req.Disks) > 0 || req.Compression != "" || req.Readers != 0 || req.Quiesce ||
		req.QuiesceOptional || req.VerifySample != nil {
		return invalid("a %s job takes no backup options", req.Kind)
	}
	if req.Domain != "" {
		if err := repo.ValidName("domain", req.Domain); err != nil {
			return invalid("%v", err)
		}
	}
	switch req.Kind {
	case KindForget:
		if req.ReadData || req.ReadDataPercent != 0 {
			return invalid("a forget job takes domain or all, policy and dry_run only")
		}
		if (req.Domain == "") == !req.All {
			return invalid("a forget job needs a domain or all: true")
		}
		if req.Policy == nil {
			return invalid("a forget job needs a policy, e.g. {\"keep_daily\": 7}")
		}
		if err := req.Policy.Validate(); err != nil {
			return invalid("policy: %v", err)
		}
	case KindGC:
		if req.Domain != "" || req.All || req.Policy != nil || req.ReadData || req.ReadDataPercent != 0 {
			return invalid("a gc job works on the whole repository: it takes grace and dry_run only")
		}
		if req.Grace != "" {
			if d, err := time.ParseDuration(req.Grace); err != nil || d <= 0 {
				return invalid("grace %q: want a positive duration such as \"24h\"", req.Grace)
			}
		}
	case KindCopy:
		if req.All || req.Policy != nil || req.Grace != "" || req.ReadData || req.ReadDataPercent != 0 {
			return invalid("a copy job takes domain and dry_run only (the target is the daemon's --copy-to)")
		}
	case KindVerify:
		if req.All || req.Policy != nil || req.Grace != "" || req.DryRun {
			return invalid("a verify job takes domain, read_data and read_data_percent only")
		}
		if req.ReadDataPercent < 0 || req.ReadDataPercent > 100 {
			return invalid("read_data_percent %d: want 1 to 100 (the share of the chunks read)", req.ReadDataPercent)
		}
	default:
		return invalid("job kind %q: want backup, forget, gc, verify, copy or instant-restore", req.Kind)
	}
	return nil
}

// submitMaintenance queues a maintenance job: one per repository at a
// time (the daemon has one repository). They take no backup slot nor
// memory budget.
func (r *Runner) submitMaintenance(req JobRequest) (JobView, error) {
	if err := checkMaintenance(req); err != nil {
		return JobView{}, err
	}
	if req.Kind == KindCopy && r.o.CopyTo == nil {
		return JobView{}, refuse(ErrInvalid, "this daemon has no repository to copy to: start it with --copy-to REPO")
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return JobView{}, ErrShuttingDown
	}
	if cur := r.maint; cur != nil {
		return JobView{}, refuse(ErrConflict, "the repository has maintenance job %s (%s, %s) already", cur.id, cur.req.Kind, cur.view().State)
	}
	r.prune()
	j, jctx := r.newJob(req, JobRunning)
	r.maint = j
	go r.runMaintenance(jctx, j)
	return j.view(), nil
}

func (r *Runner) runMaintenance(ctx context.Context, j *job) {
	defer r.wg.Done()
	log := r.o.Log.With("job", j.id, "kind", j.req.Kind)
	log.Info("job started")
	report, err := r.maintain(ctx, j.req, log, &j.counters)
	j.mu.Lock()
	j.report = report
	j.mu.Unlock()
	switch {
	case err == nil:
		r.finish(j, JobSucceeded, nil, log)
	case ctx.Err() != nil:
		r.finish(j, JobCancelled, fmt.Errorf("%w: %v", context.Cause(ctx), err), log)
	default:
		r.finish(j, JobFailed, err, log)
	}
}

// maintain runs a maintenance job; verify and copy count their progress
// in counters.
func (r *Runner) maintain(ctx context.Context, req JobRequest, log *slog.Logger, counters *progress.Counters) (any, error) {
	rp, err := r.repository(ctx)
	if err != nil {
		return nil, err
	}
	switch req.Kind {
	case KindForget:
		return rp.Forget(ctx, req.Domain, *req.Policy, req.DryRun)
	case KindCopy:
		if err := r.o.CopyTo.Recheck(ctx); err != nil { // removed, or made anew, since the start
			return nil, fmt.Errorf("the repository to copy to: %w", err)
		}
		res, err := repo.Copy(ctx, rp, r.o.CopyTo, repo.CopyOptions{Domain: req.Domain, DryRun: req.DryRun, Log: log, Progress: counters.Add})
		if res == nil {
			return nil, err
		}
		return res, err
	case KindGC:
		grace, _ := time.ParseDuration(req.Grace) // checked; "" is the default
		c := progress.NewCounter("", "list", -1)
		counters.Add(c)
		res, err := rp.GC(ctx, repo.GCOptions{Grace: grace, DryRun: req.DryRun, Log: log, Counter: c})
		if res == nil {
			return nil, err // not a typed nil in the report
		}
		return res, err
	}
	c := progress.NewCounter("", "check", -1)
	counters.Add(c)
	rep := &VerifyReport{Problems: []repo.Problem{}}
	rep.VerifyStats, err = rp.Verify(ctx, repo.VerifyOptions{Domain: req.Domain, ReadData: req.ReadData,
		ReadPercent: req.ReadDataPercent, Log: log, Progress: c},
		func(p repo.Problem) { rep.Problems = append(rep.Problems, p) })
	rep.ReadData, rep.Complete = rep.ReadPercent > 0, err == nil
	if err == nil && len(rep.Problems) > 0 {
		noun := "problems"
		if len(rep.Problems) == 1 {
			noun = "problem"
		}
		err = fmt.Errorf("verify found %d %s (the report lists them)", len(rep.Problems), noun)
	}
	return rep, err
}

// retain applies the daemon's retention policy to the domain of a backup
// that succeeded. A failure is logged and leaves the backup job
// succeeded: the backups are all there, only too many of them.
func (r *Runner) retain(ctx context.Context, j *job, log *slog.Logger) {
	if r.o.Retention == nil {
		return
	}
	rp, err := r.repository(ctx)
	var res []repo.ForgetResult
	if err == nil {
		res, err = rp.Forget(ctx, j.req.Domain, *r.o.Retention, false)
	}
	if errors.Is(err, repo.ErrInWindow) {
		// Kept for their S3 Object Lock window: the policy forgets them
		// after a later backup, once the window has ended.
		log.Info("retention policy applied; backups inside their Object Lock window were kept", "policy", r.o.Retention.String(), "detail", err)
		err = nil
	}
	if err != nil {
		log.Warn("the retention policy was not applied (the next backup tries again)", "policy", r.o.Retention.String(), "error", err)
		return
	}
	if len(res) == 1 {
		j.mu.Lock()
		j.retained = &res[0]
		j.mu.Unlock()
		log.Info("retention policy applied", "policy", r.o.Retention.String(), "kept", res[0].Kept, "forgotten", res[0].Forgotten)
	}
}
