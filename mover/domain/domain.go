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

	"github.com/nbdmover/nbdmover/nbdclient"
	"github.com/nbdmover/nbdmover/repo"
	"libvirt.org/go/libvirt"
	"libvirt.org/go/libvirtxml"
)

// DefaultScratchDir holds the backup jobs' scratch images.
const DefaultScratchDir = "/var/lib/nbdmover/scratch"

// Options say which libvirt domain to back up and how.
type Options struct {
	Name    string
	Connect string   // libvirt URI (default qemu:///system)
	Disks   []string // back up only these disks (default: every disk)
	// Quiesce freezes the guest's filesystems (guest agent) and fails when
	// it cannot; QuiesceOptional tries and continues crash-consistent.
	Quiesce, QuiesceOptional bool
	ScratchDir               string // scratch images (default DefaultScratchDir)
}

// New returns the source that backs up a running libvirt domain
// through a pull-mode backup job; see docs/design.md for the steps and
// what each failure leaves behind.
func New(o Options) mover.Source {
	if o.Connect == "" {
		o.Connect = "qemu:///system"
	}
	if o.ScratchDir == "" {
		o.ScratchDir = DefaultScratchDir
	}
	return &domainSource{o: o}
}

type domainSource struct{ o Options }

// CountDisks is how many disks a backup of the domain would read.
func (s *domainSource) CountDisks() (int, error) {
	n, err := Disks(s.o.Connect, s.o.Name, s.o.Disks)
	if err == nil && n == 0 {
		err = errors.New("no disk to back up")
	}
	return n, err
}

func (s *domainSource) Name() string { return s.o.Name }

func (s *domainSource) Validate() error {
	if err := repo.ValidName("domain", s.o.Name); err != nil {
		return mover.Invalidf("%w", err)
	}
	for _, d := range s.o.Disks {
		if err := repo.ValidName("disk", d); err != nil {
			return mover.Invalidf("%w", err)
		}
	}
	if err := mover.CheckDir(s.o.ScratchDir); err != nil {
		return fmt.Errorf("scratch directory: %w", err)
	}
	return nil
}

// testHookLegacyNames, set by a test, names checkpoints as nbdmover did
// before they named their repository (nbdmover-<backup id>).
var testHookLegacyNames bool

// domainSession is a running pull-mode backup job of a domain.
type domainSession struct {
	o     Options
	req   mover.StartRequest
	log   *slog.Logger
	conn  *libvirt.Connect
	dom   *libvirt.Domain
	def   *libvirtxml.Domain
	plan  *domainPlan
	info  mover.SessionInfo
	dirs  []string // the job's run and scratch directories
	sock  string
	disks []mover.SourceDisk
	pools []*nbdclient.Pool
}

func (s *domainSource) Start(ctx context.Context, req mover.StartRequest) (_ mover.Session, err error) {
	ds := &domainSession{o: s.o, req: req, log: req.Log.With("domain", s.o.Name),
		info: mover.SessionInfo{Source: "libvirt"}}
	defer func() {
		if err != nil {
			ds.End(context.WithoutCancel(ctx), false)
			err = fmt.Errorf("backup of domain %s: %w", s.o.Name, err)
		}
	}()
	if err := ds.connect(ctx); err != nil {
		return nil, err
	}
	if err := ds.planDisks(ctx); err != nil {
		return nil, err
	}
	if err := ds.begin(ctx); err != nil {
		return nil, err
	}
	if err := ds.dialExports(ctx); err != nil {
		return nil, err
	}
	return ds, nil
}

// connect finds the running domain and ends what a crashed run of ours
// left on it (we hold the domain's lock, so no live run owns it): its
// backup job, a freeze, job directories. A job nbdmover did not start is
// left alone: that is an error.
func (ds *domainSession) connect(ctx context.Context) error {
	conn, err := connectLibvirt(ds.o.Connect)
	if err != nil {
		return err
	}
	ds.conn = conn
	if ds.dom, err = lookupRunning(conn, ds.o.Name, ds.o.Connect); err != nil {
		return err
	}
	// Only a leftover job blocks the backup; a failed thaw or directory
	// removal is logged (cleanup reports them too).
	t := tidyDomain(ctx, conn, ds.dom, ds.o.Name, ds.req.RunDir, ds.o.ScratchDir, ds.log)
	if t.jobLeft {
		return errors.New(strings.Join(t.problems, "; "))
	}
	for _, p := range t.problems {
		ds.log.Warn("tidying after an earlier run", "problem", p)
	}
	if job, err := backupJob(ds.dom); err != nil {
		return err
	} else if job != nil {
		return foreignJobError(ds.o.Name, job)
	}
	ds.def, err = liveDefinition(ds.dom)
	return err
}

// planDisks selects the disks and decides which go incremental.
func (ds *domainSession) planDisks(ctx context.Context) error {
	disks, skipped, err := diskSelection(ds.def, ds.o.Disks)
	if err != nil {
		return err
	}
	for _, s := range skipped {
		ds.log.Info("skipping disk", "disk", s)
	}
	if len(disks) == 0 {
		return fmt.Errorf("no disk to back up (skipped: %s)", strings.Join(skipped, ", "))
	}
	if ds.plan, err = planDomain(ctx, ds.req, ds.dom, ds.o.Name, ds.log, disks); err != nil {
		return err
	}
	if ds.plan.hasBitmaps() {
		ds.plan.checkpoint = CheckpointName(ds.req.Repo.Config().ID, ds.req.ID)
		if testHookLegacyNames {
			ds.plan.checkpoint = checkpointPrefix + ds.req.ID
		}
	}
	return nil
}

// begin makes the job's private directories and starts the pull-mode job;
// when libvirt refuses an incremental, it starts a full one instead.
func (ds *domainSession) begin(ctx context.Context) error {
	uid, gid := qemuOwner(ds.def)
	runDir, err := jobDir(ds.req.RunDir, ds.o.Name, ds.req.ID, uid, gid)
	if err != nil {
		return fmt.Errorf("run directory: %w", err)
	}
	ds.dirs = append(ds.dirs, runDir)
	scratchDir, err := jobDir(ds.o.ScratchDir, ds.o.Name, ds.req.ID, uid, gid)
	if err != nil {
		return fmt.Errorf("scratch directory: %w", err)
	}
	ds.dirs = append(ds.dirs, scratchDir)
	ds.sock = filepath.Join(runDir, "nbd.sock")

	plan := ds.plan
	consistency, err := beginBackup(ds.dom, ds.o, ds.req.RunDir, ds.log, plan, ds.sock, scratchDir)
	if err != nil && len(plan.incr) > 0 && ds.req.Mode == mover.ModeAuto && bitmapRefused(err) {
		// libvirt refuses an incremental whose bitmaps are missing or
		// broken: start over as a full backup from a fresh chain.
		ds.log.Warn("incremental backup refused, taking a full one", "error", err)
		deleteCheckpoint(ds.dom, plan.base)
		plan.fallback = fmt.Sprintf("libvirt refused the incremental from checkpoint %s: %v", plan.base, err)
		plan.incr, plan.base = map[string]bool{}, ""
		consistency, err = beginBackup(ds.dom, ds.o, ds.req.RunDir, ds.log, plan, ds.sock, scratchDir)
	}
	if err != nil {
		return err
	}
	ds.info.Consistency, ds.info.Checkpoint, ds.info.Fallback = consistency, plan.checkpoint, plan.fallback
	return nil
}

// testHookExports, when set by a test, may change what the job's XML
// says of the exports (a seam for exports libvirt describes wrongly).
var testHookExports func(map[string]libvirtxml.DomainBackupPullDisk)

// dialExports connects to the job's NBD exports.
func (ds *domainSession) dialExports(ctx context.Context) error {
	exports, err := backupExports(ds.dom)
	if err != nil {
		return err
	}
	if testHookExports != nil {
		testHookExports(exports)
	}
	for _, d := range ds.plan.disks {
		ex := exports[d.name]
		cfg := nbdclient.Config{Socket: ds.sock, Export: ex.ExportName}
		if cfg.Export == "" {
			cfg.Export = d.name
		}
		incr := ds.plan.incr[d.name]
		if incr {
			cfg.Bitmap = ex.ExportBitmap
		}
		pool, err := nbdclient.DialPool(ctx, cfg, ds.req.Readers)
		if err != nil {
			return fmt.Errorf("disk %s: %w", d.name, err)
		}
		ds.pools = append(ds.pools, pool)
		ds.disks = append(ds.disks, mover.SourceDisk{Name: d.name, Disk: pool, Incremental: incr, Bitmap: cfg.Bitmap})
	}
	return nil
}

func (ds *domainSession) Disks() []mover.SourceDisk { return ds.disks }
func (ds *domainSession) Info() mover.SessionInfo   { return ds.info }

// Files returns the domain's definition (without secrets) and the new
// checkpoint's, for redefining it later.
func (ds *domainSession) Files(context.Context) (map[string][]byte, error) {
	files := map[string][]byte{}
	x, err := domainXML(ds.dom)
	if err != nil {
		return nil, fmt.Errorf("domain %s: domain XML: %w", ds.o.Name, err)
	}
	files["domain.xml"] = []byte(x)
	if cp := ds.plan.checkpoint; cp != "" {
		x, err := checkpointXML(ds.dom, cp)
		if err != nil {
			return nil, fmt.Errorf("domain %s: checkpoint %s: %w", ds.o.Name, cp, err)
		}
		files["checkpoint.xml"] = []byte(x)
	}
	return files, nil
}

// End ends the job and closes everything. An uncommitted backup's
// checkpoint is deleted (its changes merge into the parent checkpoint, so
// the chain stays complete); after a commit, the older checkpoints are of
// no more use.
func (ds *domainSession) End(ctx context.Context, committed bool) error {
	var errs []error
	for _, p := range ds.pools {
		p.Close()
	}
	// The job serving on our socket is ended, also one BackupBegin started
	// while reporting an error; while it runs, its directories stay, so
	// that the next run (or cleanup) still knows it as ours.
	ended := true
	if ds.dom != nil && ds.sock != "" {
		if err := endBackupJob(ctx, ds.conn, ds.dom, ds.sock); err != nil {
			errs = append(errs, err)
			ended = false
		}
	}
	if ds.plan != nil && ds.plan.checkpoint != "" && ended {
		if committed {
			pruneCheckpoints(ctx, ds.req.Repo, ds.dom, ds.o.Name, ds.plan.checkpoint, ds.log)
		} else if err := deleteCheckpoint(ds.dom, ds.plan.checkpoint); err != nil {
			ds.log.Warn("could not delete the uncommitted checkpoint", "checkpoint", ds.plan.checkpoint, "error", err)
		}
	}
	for _, d := range ds.dirs {
		if ended {
			os.RemoveAll(d)
		}
	}
	if ds.dom != nil {
		ds.dom.Free()
	}
	if ds.conn != nil {
		ds.conn.Close()
	}
	return errors.Join(errs...)
}

// domainPlan is what one domain backup will do.
type domainPlan struct {
	disks      []domainDisk
	incr       map[string]bool // disks read incrementally from base
	base       string          // checkpoint the incrementals start from
	fallback   string
	checkpoint string // the checkpoint this backup creates, "" when none
}

func (p *domainPlan) hasBitmaps() bool {
	for _, d := range p.disks {
		if d.format == "qcow2" {
			return true
		}
	}
	return false
}

// planDomain decides which disks go incremental, from which checkpoint. The
// base is always the checkpoint of the last committed backup, never
// libvirt's newest; this repository's checkpoints that are not it (left
// by runs that did not commit) are deleted first, which merges their
// changes into it. Other repositories' checkpoints are left alone.
func planDomain(ctx context.Context, req mover.StartRequest, dom *libvirt.Domain, name string, log *slog.Logger, disks []domainDisk) (*domainPlan, error) {
	plan := &domainPlan{disks: disks, incr: map[string]bool{}}
	last := req.Last
	keep := ""
	if last != nil {
		keep = last.Checkpoint
	}
	pruneCheckpoints(ctx, req.Repo, dom, name, keep, log)
	if req.Mode == mover.ModeFull {
		return plan, nil
	}
	if last == nil {
		if req.Mode == mover.ModeIncremental {
			return nil, errors.New("cannot take an incremental: no committed backup in the repository")
		}
		return plan, nil
	}
	reason, err := incrementalDisks(ctx, req, dom, log, plan)
	if err != nil || reason == "" {
		return plan, err
	}
	if req.Mode == mover.ModeIncremental {
		return nil, fmt.Errorf("cannot take an incremental: %s", reason)
	}
	log.Info("taking a full backup", "reason", reason)
	plan.fallback = reason
	plan.incr = map[string]bool{}
	return plan, nil
}

// incrementalDisks marks the disks that can go incremental from the last
// backup's checkpoint, or says why none can.
func incrementalDisks(ctx context.Context, req mover.StartRequest, dom *libvirt.Domain, log *slog.Logger, plan *domainPlan) (string, error) {
	last := req.Last
	if last.Checkpoint == "" {
		return fmt.Sprintf("the last backup (%s) has no checkpoint", last.ID), nil
	}
	if !strings.HasPrefix(last.Checkpoint, checkpointPrefix) {
		return fmt.Sprintf("the last backup's checkpoint %s is not nbdmover's", last.Checkpoint), nil
	}
	if reason := ensureCheckpoint(ctx, req.Repo, dom, last, log); reason != "" {
		return reason, nil
	}
	tracked, err := checkpointDisks(dom, last.Checkpoint)
	if err != nil {
		return fmt.Sprintf("checkpoint %s: %v", last.Checkpoint, err), nil
	}
	// Disks without bitmaps (raw) are read in full every time; a qcow2
	// disk new since the last backup gets a full.
	var notIncr []string
	for _, d := range plan.disks {
		_, lastErr := last.Disk(d.name)
		inLast := lastErr == nil
		switch {
		case d.format != "qcow2":
		case tracked[d.name] && inLast:
			plan.incr[d.name] = true
		default:
			notIncr = append(notIncr, d.name)
		}
	}
	if len(notIncr) > 0 && req.Mode == mover.ModeIncremental {
		return "", fmt.Errorf("cannot take an incremental of disks %s (new, or not in checkpoint %s); "+
			"leave them out with --disk or use --mode auto", strings.Join(notIncr, ", "), last.Checkpoint)
	}
	if len(plan.incr) == 0 {
		return "no disk can be read incrementally", nil
	}
	plan.base = last.Checkpoint
	return "", nil
}

// ensureCheckpoint makes sure libvirt has the last backup's checkpoint,
// redefining it from the repository's copy when libvirt lost it. It returns
// why an incremental is impossible, or "".
func ensureCheckpoint(ctx context.Context, r *repo.Repo, dom *libvirt.Domain, last *repo.Manifest, log *slog.Logger) string {
	cp, err := dom.CheckpointLookupByName(last.Checkpoint, 0)
	if err == nil {
		cp.Free()
		return ""
	}
	if libvirtCode(err) != libvirt.ERR_NO_DOMAIN_CHECKPOINT {
		return fmt.Sprintf("checkpoint %s: %v", last.Checkpoint, err)
	}
	x, err := r.ReadFile(ctx, last, "checkpoint.xml")
	if err != nil {
		return fmt.Sprintf("libvirt lost checkpoint %s and the repository's copy is unreadable: %v", last.Checkpoint, err)
	}
	if err := redefineCheckpoint(dom, x); err != nil {
		if libvirtCode(err) == libvirt.ERR_CHECKPOINT_INCONSISTENT {
			return fmt.Sprintf("checkpoint %s is gone from libvirt and its bitmaps from the disk images, so the changes since it are unknown "+
				"(something other than this repository's backups deleted it: virsh checkpoint-delete, another backup tool, "+
				"or an nbdmover older than per-repository checkpoints backing the domain up to another repository): %v", last.Checkpoint, err)
		}
		return fmt.Sprintf("libvirt lost checkpoint %s and it could not be redefined from the repository's copy: %v", last.Checkpoint, err)
	}
	log.Info("redefined a checkpoint libvirt had lost", "checkpoint", last.Checkpoint)
	return ""
}

// jobDirName is the name of a job's run or scratch directory.
func jobDirName(domain, id string) string { return "job-" + domain + "-" + id }

// staleJobDirs lists the job directories of domain under parent: exactly
// job-<domain>-<backup id>, never those of a domain whose name extends
// this one's.
func staleJobDirs(parent, domain string) []string {
	entries, _ := os.ReadDir(parent)
	var dirs []string
	for _, e := range entries {
		id, ok := strings.CutPrefix(e.Name(), jobDirName(domain, ""))
		if ok && e.IsDir() && repo.ValidBackupID(id) == nil {
			dirs = append(dirs, filepath.Join(parent, e.Name()))
		}
	}
	return dirs
}

// ourJob tells whether a backup job is one nbdmover started for domain:
// its NBD socket lies in a job directory of the domain under runDir.
func ourJob(b *libvirtxml.DomainBackup, runDir, domain string) bool {
	sock := jobSocket(b)
	return sock != "" && filepath.Base(sock) == "nbd.sock" &&
		slices.Contains(staleJobDirs(runDir, domain), filepath.Dir(sock))
}

// jobDir makes a directory private to root and QEMU (mode 0700, owned by
// QEMU's user when it is not root) for the job's socket or scratch files.
func jobDir(parent, domain, id string, uid, gid int) (string, error) {
	if err := mover.TraversableDir(parent); err != nil {
		return "", err
	}
	dir := filepath.Join(parent, jobDirName(domain, id))
	if err := os.Mkdir(dir, 0o700); err != nil {
		return "", err
	}
	if uid >= 0 {
		if err := os.Chown(dir, uid, gid); err != nil {
			os.RemoveAll(dir)
			return "", err
		}
	}
	return dir, nil
}

// beginBackup starts the pull-mode job, freezing the guest's filesystems
// around it when asked (with a marker in runDir while frozen, so that a
// run killed before the thaw is undone). It returns the consistency the
// backup will have.
func beginBackup(dom *libvirt.Domain, o Options, runDir string, log *slog.Logger, plan *domainPlan, sock, scratchDir string) (string, error) {
	backupXML, checkpointXML, err := jobXML(plan, sock, scratchDir)
	if err != nil {
		return "", err
	}
	consistency := "crash-consistent"
	if o.Quiesce || o.QuiesceOptional {
		if err := markFrozen(runDir, o.Name); err != nil {
			return "", fmt.Errorf("freeze marker: %w", err)
		}
		if err := dom.FSFreeze(nil, 0); err != nil {
			// A freeze that timed out may still happen: thaw, and keep the
			// marker unless the thaw worked or there is no agent.
			if _, terr := thawLeftover(dom, runDir, o.Name); terr != nil {
				log.Warn("the failed freeze could not be undone: the next run (or nbdmover cleanup) tries again", "error", terr)
			}
			if !o.QuiesceOptional {
				return "", fmt.Errorf("cannot freeze the guest's filesystems (is the QEMU guest agent installed and running?): %w; "+
					"use --quiesce-optional to continue crash-consistent", err)
			}
			log.Warn("guest filesystems not frozen: the backup is crash-consistent", "error", err)
		} else {
			consistency = "quiesced"
			defer func() {
				if err := dom.FSThaw(nil, 0); err != nil {
					log.Error("thawing the guest's filesystems failed: the next run (or nbdmover cleanup) tries again", "error", err)
				} else {
					unmarkFrozen(runDir, o.Name)
				}
			}()
		}
	}
	if err := dom.BackupBegin(backupXML, checkpointXML, 0); err != nil {
		return "", fmt.Errorf("start the pull-mode backup: %w", err)
	}
	return consistency, nil
}

// jobXML builds the backup and checkpoint definitions of the job.
func jobXML(plan *domainPlan, sock, scratchDir string) (backupXML, checkpointXML string, err error) {
	pull := &libvirtxml.DomainBackupPull{
		Server: &libvirtxml.DomainBackupPullServer{UNIX: &libvirtxml.DomainBackupPullServerUNIX{Socket: sock}},
		Disks:  &libvirtxml.DomainBackupPullDisks{},
	}
	cpDisks := &libvirtxml.DomainCheckpointDisks{}
	for _, d := range plan.disks {
		bd := libvirtxml.DomainBackupPullDisk{Name: d.name, Backup: "yes", BackupMode: "full", ExportName: d.name,
			Driver:  &libvirtxml.DomainBackupDiskDriver{Type: "qcow2"},
			Scratch: &libvirtxml.DomainDiskSource{File: &libvirtxml.DomainDiskSourceFile{File: filepath.Join(scratchDir, d.name+".scratch.qcow2")}}}
		if plan.incr[d.name] {
			bd.BackupMode, bd.Incremental = "incremental", plan.base
		}
		pull.Disks.Disks = append(pull.Disks.Disks, bd)
		mode := "no"
		if d.format == "qcow2" {
			mode = "bitmap"
		}
		cpDisks.Disks = append(cpDisks.Disks, libvirtxml.DomainCheckpointDisk{Name: d.name, Checkpoint: mode})
	}
	if backupXML, err = (&libvirtxml.DomainBackup{Pull: pull}).Marshal(); err != nil {
		return "", "", err
	}
	if plan.checkpoint != "" {
		cp := &libvirtxml.DomainCheckpoint{Name: plan.checkpoint, Description: "nbdmover backup", Disks: cpDisks}
		if checkpointXML, err = cp.Marshal(); err != nil {
			return "", "", err
		}
	}
	return backupXML, checkpointXML, nil
}

// backupExports reads the running job's export names and bitmaps by disk.
func backupExports(dom *libvirt.Domain) (map[string]libvirtxml.DomainBackupPullDisk, error) {
	b, err := backupJob(dom)
	if err != nil {
		return nil, err
	}
	if b == nil {
		return nil, errors.New("the backup job ended before its disks were read")
	}
	out := map[string]libvirtxml.DomainBackupPullDisk{}
	if b.Pull != nil && b.Pull.Disks != nil {
		for _, d := range b.Pull.Disks.Disks {
			out[d.Name] = d
		}
	}
	return out, nil
}

// domainXML is the definition to keep with the backup: the persistent one
// when there is one. Secrets are left out (no VIR_DOMAIN_XML_SECURE).
func domainXML(dom *libvirt.Domain) (string, error) {
	if persistent, err := dom.IsPersistent(); err == nil && persistent {
		return dom.GetXMLDesc(libvirt.DOMAIN_XML_INACTIVE)
	}
	return dom.GetXMLDesc(0)
}

// checkpointXML is a checkpoint's definition.
func checkpointXML(dom *libvirt.Domain, name string) (string, error) {
	cp, err := dom.CheckpointLookupByName(name, 0)
	if err != nil {
		return "", err
	}
	defer cp.Free()
	return cp.GetXMLDesc(0)
}
