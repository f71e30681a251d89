package daemon

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/nbdmover/nbdmover/instant"
	"github.com/nbdmover/nbdmover/repo"
)

// KindInstantRestore is the kind of the jobs POST /v1/restores makes.
const KindInstantRestore = "instant-restore"

// DefaultRestoreImageDir is where instant restores make images unless
// the daemon is given others.
const DefaultRestoreImageDir = "/var/lib/libvirt/images"

// RestoreRequest is an instant restore (POST /v1/restores): the domain As
// runs from Domain's backup at once, and its disks are copied home into
// ImageDir while it runs. Resume, instead, continues the copy of the
// instant restore of that domain (after the daemon restarted, say). Live
// must be true: the daemon restores only this way (whole images:
// nbdmover restore).
type RestoreRequest struct {
	Live        bool   `json:"live"`
	Domain      string `json:"domain,omitempty"`
	Backup      string `json:"backup,omitempty"` // id or latest (default)
	As          string `json:"as,omitempty"`
	ImageDir    string `json:"image_dir,omitempty"` // one of the daemon's --restore-image-dir (default: the first)
	Format      string `json:"format,omitempty"`    // qcow2 (default) or raw
	KeepNetwork bool   `json:"keep_network,omitempty"`
	// NoStart defines the domain without starting it (a resume: does not
	// start one that is off) and copies while it is off.
	NoStart bool `json:"no_start,omitempty"`
	// BandwidthBytes limits each disk's copy, bytes per second (0: none).
	BandwidthBytes int64  `json:"bandwidth_bytes,omitempty"`
	Resume         string `json:"resume,omitempty"`
}

// restoreOptions checks a request and maps it onto instant's options.
func (r *Runner) restoreOptions(req *RestoreRequest) (instant.Options, error) {
	o := instant.Options{Repository: r.o.Backup.Repository, Repo: r.o.Backup.Repo, Domain: req.Domain, Backup: req.Backup,
		As: req.As, ImageDir: filepath.Clean(req.ImageDir), Format: req.Format, KeepNetwork: req.KeepNetwork, NoStart: req.NoStart,
		Bandwidth: req.BandwidthBytes,
		Connect:   r.o.Domain.Connect, RunDir: r.o.Backup.RunDir, CacheBytes: r.o.RestoreCacheBytes}
	switch {
	case !req.Live:
		return o, refuse(ErrInvalid, `only live restores are served ("live": true): nbdmover restore writes whole images`)
	case req.Resume != "":
		if req.Domain != "" || req.As != "" || req.ImageDir != "" || req.Format != "" || req.Backup != "" || req.KeepNetwork {
			return o, refuse(ErrInvalid, "resume continues what the restore started: give only resume (and bandwidth_bytes, no_start)")
		}
		if err := repo.ValidName("domain", req.Resume); err != nil {
			return o, &refusal{kind: ErrInvalid, err: fmt.Errorf("resume: %w", err)}
		}
		o.As = req.Resume
	case req.Domain == "" || req.As == "":
		return o, refuse(ErrInvalid, "an instant restore needs domain and as")
	case req.ImageDir == "":
		o.ImageDir = r.o.RestoreImageDirs[0]
	case !slices.Contains(r.o.RestoreImageDirs, o.ImageDir):
		return o, refuse(ErrInvalid, "image_dir %q: not one of the daemon's image directories (%s; serve --restore-image-dir)",
			req.ImageDir, strings.Join(r.o.RestoreImageDirs, ", "))
	}
	if req.BandwidthBytes < 0 {
		return o, refuse(ErrInvalid, "bandwidth_bytes must not be negative")
	}
	if req.Resume == "" {
		if err := o.Validate(); err != nil {
			return o, &refusal{kind: ErrInvalid, err: err}
		}
	}
	return o, nil
}

// SubmitRestore starts an instant restore as a job of the new domain's
// name (no backup of it runs meanwhile). It does not wait for a job slot:
// it reads the repository, and its export's cache is outside the jobs'
// memory budget, like the exports'.
func (r *Runner) SubmitRestore(req RestoreRequest) (JobView, error) {
	o, err := r.restoreOptions(&req)
	if err != nil {
		return JobView{}, err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := r.admit(o.As); err != nil {
		return JobView{}, err
	}
	if n := r.restores(); n >= r.o.MaxRestores {
		return JobView{}, refuse(ErrUnavailable, "%d instant restores are running, the most this daemon runs at once (serve --max-restores)", n)
	}
	j, jctx := r.newJob(JobRequest{Kind: KindInstantRestore, Domain: o.As, Restore: &req}, JobRunning)
	r.byDomain[o.As] = j
	go r.runRestore(jctx, j, o)
	return j.view(), nil
}

// An instant restore that stopped is resumed after restoreRetry, then
// after twice as long each time, up to maxRestoreRetry.
var restoreRetry, maxRestoreRetry = 10 * time.Second, 10 * time.Minute

// restoreOnce runs (or resumes, when o has no source domain) an instant
// restore once.
func (r *Runner) restoreOnce(ctx context.Context, o instant.Options) (*instant.Result, error) {
	if o.Domain == "" {
		return instant.Resume(ctx, o)
	}
	return instant.Run(ctx, o)
}

// restores counts the running instant restores; r.mu is held.
func (r *Runner) restores() int {
	n := 0
	for _, j := range r.byDomain {
		if j.req.Kind == KindInstantRestore {
			n++
		}
	}
	return n
}

// ResumeRestores resumes the instant restores from this daemon's
// repository that a stop left unfinished (their domains run on what
// their overlays hold: a read of the rest pauses them until then).
func (r *Runner) ResumeRestores(ctx context.Context) {
	rp, err := r.repository(ctx)
	if err != nil {
		r.o.Log.Warn("cannot look for instant restores to resume", "error", err)
		return
	}
	pending, err := instant.Pending(r.o.Domain.Connect)
	if err != nil {
		r.o.Log.Warn("cannot look for instant restores to resume", "error", err)
		return
	}
	for name, p := range pending {
		if p.RepoID != rp.Config().ID {
			r.o.Log.Info("an unfinished instant restore from another repository is left alone", "domain", name)
			continue
		}
		// One the operator left off is copied while off, not started.
		v, err := r.SubmitRestore(RestoreRequest{Live: true, Resume: name, NoStart: !p.Active})
		if err != nil {
			r.o.Log.Warn("cannot resume an unfinished instant restore", "domain", name, "error", err)
			continue
		}
		r.o.Log.Info("resuming an unfinished instant restore", "domain", name, "job", v.ID)
	}
}

func (r *Runner) runRestore(ctx context.Context, j *job, o instant.Options) {
	defer r.wg.Done()
	log := r.o.Log.With("job", j.id, "kind", KindInstantRestore, "domain", o.As)
	o.Log = log
	o.Progress = func(p instant.Progress) {
		j.mu.Lock()
		j.restore = &p
		j.mu.Unlock()
	}
	// made: the domain exists (a resume, or a restore that got it
	// running), so a failure leaves a copy to finish.
	made := o.Domain == ""
	o.Running = func(res instant.Result) {
		log.Info("the restored domain runs", "from", res.From, "after_seconds", res.RunningAfter)
		j.mu.Lock()
		j.report = res
		made = true
		j.mu.Unlock()
	}
	log.Info("job started")
	res, err := r.restoreOnce(ctx, o)
	// What failed after the domain was made (libvirt restarted, the
	// repository unreachable a while) is retried from its state, with a
	// growing pause: the domain needs its copy finished. What can never
	// work is not, nor a restore that failed before its domain was made
	// (it undid everything; its error says why).
	retry := func() bool {
		j.mu.Lock()
		defer j.mu.Unlock()
		return made
	}
	for delay := restoreRetry; err != nil && res == nil && ctx.Err() == nil && !errors.Is(err, instant.ErrInvalid) && retry() &&
		delay <= maxRestoreRetry; delay *= 2 {
		log.Warn("the instant restore stopped; resuming it", "error", err, "in", delay)
		select {
		case <-ctx.Done():
		case <-time.After(delay):
			o.Domain = "" // a resume from now on
			res, err = r.restoreOnce(ctx, o)
		}
	}
	if res != nil {
		j.mu.Lock()
		j.report = *res
		j.mu.Unlock()
	}
	switch {
	case err == nil:
		r.finish(j, JobSucceeded, nil, log)
	case ctx.Err() != nil:
		r.finish(j, JobCancelled, err, log)
	case errors.Is(err, instant.ErrInvalid):
		r.finish(j, JobFailed, &refusal{kind: ErrInvalid, err: err}, log)
	default:
		r.finish(j, JobFailed, err, log)
	}
}
