package domain

import (
	"context"
	"errors"
	"fmt"
	"github.com/nbdmover/nbdmover/mover"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/nbdmover/nbdmover/repo"
	"libvirt.org/go/libvirt"
)

// CleanupOptions say what Cleanup tidies.
type CleanupOptions struct {
	Repo       repo.Options
	Connect    string // libvirt URI (default qemu:///system)
	Domain     string // only this domain ("" = every domain)
	RunDir     string // default mover.DefaultRunDir
	ScratchDir string // default DefaultScratchDir
	// TempAge: store temporary files older than this are removed
	// (default one hour); SkipStoreTemp leaves them (the walk of a large
	// local store takes a while).
	TempAge       time.Duration
	SkipStoreTemp bool
	// ForgetRepository retires a repository no longer backed up to: its
	// checkpoints (the id, or its first 12 hex digits) are deleted
	// instead of the uncommitted ones of Repo.
	ForgetRepository string
	Log              *slog.Logger `json:"-"`
}

// CleanupReport is what Cleanup did.
type CleanupReport struct {
	Domains []DomainCleanup `json:"domains"`
	// StoreTempFiles is how many temporary files of crashed writes were
	// removed from the repository's store.
	StoreTempFiles int `json:"store_temp_files"`
}

// DomainCleanup is what Cleanup did for one domain.
type DomainCleanup struct {
	Domain             string   `json:"domain"`
	EndedJob           string   `json:"ended_job,omitempty"` // the NBD socket of the backup job it ended
	Thawed             bool     `json:"thawed,omitempty"`
	DeletedCheckpoints []string `json:"deleted_checkpoints,omitempty"`
	// KeptCheckpoints are the nbdmover checkpoints left alone: the last
	// committed backup's, other repositories', and those that cannot be
	// told.
	KeptCheckpoints []KeptCheckpoint `json:"kept_checkpoints,omitempty"`
	RemovedDirs     []string         `json:"removed_dirs,omitempty"`
	// Skipped says why the domain was left alone (a backup of it runs,
	// or its state could not be read); Problems what failed.
	Skipped  string   `json:"skipped,omitempty"`
	Problems []string `json:"problems,omitempty"`
}

// changed says whether the report names the domain: something was done,
// or checkpoints were left alone that are not simply its last backup's.
func (d DomainCleanup) changed() bool {
	others := slices.ContainsFunc(d.KeptCheckpoints, func(k KeptCheckpoint) bool { return k.Why != keptLast })
	return d.EndedJob != "" || d.Thawed || len(d.DeletedCheckpoints) > 0 || len(d.RemovedDirs) > 0 ||
		d.Skipped != "" || len(d.Problems) > 0 || others
}

// Cleanup ends what crashed runs of nbdmover left behind: backup jobs it
// started, guests it froze, the repository's checkpoints of backups that
// never committed, stale job directories, and the store's temporary files
// older than TempAge. Domains a backup is working on are left alone.
// Nothing that nbdmover did not create is touched, nor another
// repository's checkpoints (they are listed in the report).
func Cleanup(ctx context.Context, o CleanupOptions) (*CleanupReport, error) {
	o = o.withDefaults()
	if o.Domain != "" {
		if err := repo.ValidName("domain", o.Domain); err != nil {
			return nil, mover.Invalidf("%w", err)
		}
	}
	if f := o.ForgetRepository; f != "" && (len(f) < 12 || strings.Trim(f, "0123456789abcdef") != "") {
		return nil, mover.Invalidf("repository id %q: want its id (nbdmover list shows it) or its first 12 hex digits, as checkpoint names hold them", f)
	}
	r, err := o.Repo.Open(ctx)
	if err != nil && !errors.Is(err, repo.ErrNoRepository) {
		return nil, err
	}
	if f := o.ForgetRepository; f != "" && r != nil && strings.HasPrefix(r.Config().ID, f[:12]) {
		return nil, mover.Invalidf("--forget-repository %s is the repository of --repo %s: forgetting it would drop the checkpoint its next backup starts from "+
			"(give another repository's id; to retire this one, run the cleanup with another --repo)", f, r.Location())
	}
	conn, err := connectLibvirt(o.Connect)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	names, err := o.domains(conn)
	if err != nil {
		return nil, err
	}
	rep := &CleanupReport{Domains: []DomainCleanup{}}
	for _, name := range names {
		if err := ctx.Err(); err != nil {
			return rep, err
		}
		if d := cleanupDomain(ctx, conn, r, name, o); d.changed() {
			rep.Domains = append(rep.Domains, d)
		}
	}
	if r != nil && !o.SkipStoreTemp {
		if rep.StoreTempFiles, err = r.RemoveTemp(ctx, o.TempAge); err != nil {
			return rep, err
		}
	}
	return rep, nil
}

func (o CleanupOptions) withDefaults() CleanupOptions {
	if o.Connect == "" {
		o.Connect = "qemu:///system"
	}
	if o.RunDir == "" {
		o.RunDir = mover.DefaultRunDir
	}
	if o.ScratchDir == "" {
		o.ScratchDir = DefaultScratchDir
	}
	if o.TempAge <= 0 {
		o.TempAge = time.Hour
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	return o
}

// domains lists the domains to tidy: o.Domain, or every running domain
// and every name that job directories or freeze markers mention.
func (o CleanupOptions) domains(conn *libvirt.Connect) ([]string, error) {
	if o.Domain != "" {
		return []string{o.Domain}, nil
	}
	doms, err := conn.ListAllDomains(libvirt.CONNECT_LIST_DOMAINS_ACTIVE)
	if err != nil {
		return nil, fmt.Errorf("list domains: %w", err)
	}
	var names []string
	for _, d := range doms {
		if n, err := d.GetName(); err == nil && repo.ValidName("domain", n) == nil {
			names = append(names, n)
		}
		d.Free()
	}
	names = append(names, leftoverNames(o.RunDir, o.ScratchDir)...)
	slices.Sort(names)
	return slices.Compact(names), nil
}

// leftoverNames are the domains that job directories and freeze markers
// under the directories name (a job directory is job-<domain>-<id>).
func leftoverNames(runDir, scratchDir string) []string {
	var names []string
	for _, dir := range []string{runDir, scratchDir} {
		entries, _ := os.ReadDir(dir)
		for _, e := range entries {
			rest, ok := strings.CutPrefix(e.Name(), "job-")
			if i := strings.LastIndex(rest, "-"); ok && i > 0 && repo.ValidBackupID(rest[i+1:]) == nil {
				names = append(names, rest[:i])
			}
		}
	}
	entries, _ := os.ReadDir(filepath.Join(runDir, "frozen"))
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}

// cleanupDomain tidies one domain while holding its lock.
func cleanupDomain(ctx context.Context, conn *libvirt.Connect, r *repo.Repo, name string, o CleanupOptions) DomainCleanup {
	d := DomainCleanup{Domain: name}
	lock, err := mover.LockName(o.RunDir, name)
	if err != nil {
		d.Skipped = err.Error()
		return d
	}
	defer lock.Close()
	log := o.Log.With("domain", name)
	dom, err := runningDomain(conn, name, o.Connect)
	if err != nil {
		d.Skipped = err.Error()
		return d
	}
	if dom != nil {
		defer dom.Free()
	}
	t := tidyDomain(ctx, conn, dom, name, o.RunDir, o.ScratchDir, log)
	d.EndedJob, d.Thawed, d.RemovedDirs, d.Problems = t.endedJob, t.thawed, t.removedDirs, t.problems
	if dom != nil {
		deleteUncommitted(ctx, r, dom, name, o, log, &d)
	}
	return d
}

// runningDomain looks the domain up: nil (and no error) when libvirt does
// not know it or it is not running.
func runningDomain(conn *libvirt.Connect, name, uri string) (*libvirt.Domain, error) {
	dom, err := lookupDomain(conn, name, uri)
	if errors.Is(err, ErrNoDomain) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	if active, err := dom.IsActive(); err != nil || !active {
		dom.Free()
		return nil, err
	}
	return dom, nil
}

// deleteUncommitted deletes this repository's checkpoints of the domain
// except its last committed backup's (or, with o.ForgetRepository, the
// checkpoints of that repository), and says which it left alone and why.
// Without a readable repository it deletes none.
func deleteUncommitted(ctx context.Context, r *repo.Repo, dom *libvirt.Domain, name string, o CleanupOptions, log *slog.Logger, d *DomainCleanup) {
	if r == nil && o.ForgetRepository == "" {
		names, err := nbdmoverCheckpoints(dom)
		if err != nil {
			d.Problems = append(d.Problems, "list checkpoints: "+err.Error())
		}
		for _, n := range names {
			d.KeptCheckpoints = append(d.KeptCheckpoints, KeptCheckpoint{n, "no repository here to tell whose it is (--repo)"})
		}
		return
	}
	keep := ""
	if o.ForgetRepository == "" {
		last, _, err := mover.LastBackup(ctx, r, name, log)
		if err != nil {
			d.Problems = append(d.Problems, "checkpoints left alone: "+err.Error())
			return
		}
		if last != nil {
			keep = last.Checkpoint
		}
	}
	p := deleteOwnCheckpoints(ctx, r, dom, name, keep, o.ForgetRepository)
	d.DeletedCheckpoints, d.KeptCheckpoints = p.deleted, p.kept
	for _, err := range p.errs {
		d.Problems = append(d.Problems, err.Error())
	}
}

// tidied is what tidyDomain did.
type tidied struct {
	endedJob    string
	thawed      bool
	removedDirs []string
	problems    []string
	jobLeft     bool // a job of ours could not be ended (or checked): it still uses its directories
}

// tidyDomain ends what crashed runs of ours left on a domain whose lock
// the caller holds: our backup job (a job we did not start is left
// alone), a freeze of the guest's filesystems we did not undo, and job
// directories. dom is nil when the domain is not running.
func tidyDomain(ctx context.Context, conn *libvirt.Connect, dom *libvirt.Domain, name, runDir, scratchDir string, log *slog.Logger) tidied {
	var t tidied
	if dom != nil {
		job, err := backupJob(dom)
		switch {
		case err != nil:
			t.problems = append(t.problems, err.Error())
			t.jobLeft = true
		case job != nil && ourJob(job, runDir, name):
			log.Warn("ending a backup job left by an earlier run", "socket", jobSocket(job))
			if err := endBackupJob(ctx, conn, dom, jobSocket(job)); err != nil {
				t.problems = append(t.problems, "leftover backup job: "+err.Error())
				t.jobLeft = true
			} else {
				t.endedJob = jobSocket(job)
			}
		}
	}
	if frozenMarked(runDir, name) {
		thawed, err := thawLeftover(dom, runDir, name)
		t.thawed = thawed
		if err != nil {
			t.problems = append(t.problems, err.Error())
		} else if thawed {
			log.Warn("thawed the guest's filesystems, frozen by an earlier run")
		}
	}
	if !t.jobLeft {
		for _, parent := range []string{runDir, scratchDir} {
			for _, dir := range staleJobDirs(parent, name) {
				if err := os.RemoveAll(dir); err != nil {
					t.problems = append(t.problems, err.Error())
					continue
				}
				t.removedDirs = append(t.removedDirs, dir)
			}
		}
	}
	return t
}

// The freeze marker: <runDir>/frozen/<domain> exists from just before
// nbdmover freezes a guest's filesystems until it has thawed them, so a
// run killed in between is undone by the next one (or by cleanup).
func frozenMarker(runDir, name string) string { return filepath.Join(runDir, "frozen", name) }

func markFrozen(runDir, name string) error {
	if err := os.MkdirAll(filepath.Join(runDir, "frozen"), 0o700); err != nil {
		return err
	}
	return os.WriteFile(frozenMarker(runDir, name), []byte(fmt.Sprintf("pid %d\n", os.Getpid())), 0o600)
}

func unmarkFrozen(runDir, name string) { os.Remove(frozenMarker(runDir, name)) }

func frozenMarked(runDir, name string) bool {
	_, err := os.Stat(frozenMarker(runDir, name))
	return err == nil
}

// thawLeftover thaws a guest an earlier run froze. The marker goes once
// the guest is thawed, is not running, or has no guest agent (then it
// cannot have been frozen).
func thawLeftover(dom *libvirt.Domain, runDir, name string) (bool, error) {
	if dom == nil {
		unmarkFrozen(runDir, name)
		return false, nil
	}
	err := dom.FSThaw(nil, 0)
	switch libvirtCode(err) {
	case libvirt.ERR_OK:
		unmarkFrozen(runDir, name)
		return true, nil
	case libvirt.ERR_ARGUMENT_UNSUPPORTED, libvirt.ERR_NO_SUPPORT:
		unmarkFrozen(runDir, name)
		return false, nil
	}
	return false, fmt.Errorf("thaw the guest's filesystems (frozen by an earlier run): %w", err)
}
